"""Linear attention: the chunked causal form against the explicit masked quadratic form, the
recurrent step against the parallel form, FAVOR+ against exact softmax attention, gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit.functional.linear import favor_projection, linear_attention, linear_attention_step

from conftest import qkv


def _quadratic(q, k, v, phi, causal, eps=1e-6):
    """The explicit (L x L) form, in float64, K/V repeated per query head."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    a = phi(q) @ phi(k).transpose(-1, -2)
    if causal:
        a = a * torch.ones(a.shape[-2:], dtype=torch.float64).tril()
    return (a @ v) / (a.sum(-1, keepdim=True) + eps)


def _elu(x):
    return F.elu(x) + 1


@pytest.mark.parametrize("length", [1, 7, 64, 97, 130])
@pytest.mark.parametrize("chunk", [1, 16, 64])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (3, 1)])
def test_chunked_causal_equals_masked_quadratic(length, chunk, heads, kv_heads):
    q, k, v = qkv(2, heads, kv_heads, length, length, 12, v_dim=10, dtype=torch.float32, seed=length + chunk)
    ours = linear_attention(q, k, v, causal=True, chunk_size=chunk)
    ref = _quadratic(q, k, v, _elu, causal=True)
    assert ours.dtype == torch.float32
    assert (ours.double() - ref).abs().max() <= 2e-5 * ref.abs().max()


@pytest.mark.parametrize("causal", [False, True])
def test_favor_and_callable_maps_equal_quadratic_form(causal):
    q, k, v = qkv(1, 4, 2, 50, 50, 16, seed=1)
    w = favor_projection(16, 64, seed=3)

    def favor(x):  # Performer's estimator written out directly, softmax scale 1/sqrt(16)
        x = x.double() * 16**-0.25
        return torch.exp(x @ w.t() - 0.5 * (x * x).sum(-1, keepdim=True)) / 64**0.5

    ours = linear_attention(q, k, v, feature_map="favor", num_features=64, seed=3, causal=causal, chunk_size=16)
    ref = _quadratic(q, k, v, favor, causal)
    assert (ours.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
    custom = linear_attention(q, k, v, feature_map=lambda x: F.relu(x) + 0.1, causal=causal)
    assert (custom.double() - _quadratic(q, k, v, lambda x: F.relu(x) + 0.1, causal)).abs().max() <= 1e-4


def test_non_causal_with_lq_not_lk():
    q, k, v = qkv(2, 2, 2, 5, 31, 8, seed=2)
    ref = _quadratic(q, k, v, _elu, causal=False)
    assert torch.allclose(linear_attention(q, k, v).double(), ref, atol=1e-5)


@pytest.mark.parametrize("feature_map", ["elu", "favor"])
def test_recurrent_step_equals_parallel_form(feature_map):
    q, k, v = qkv(2, 4, 2, 40, 40, 16, dtype=torch.float64, seed=4)
    parallel = linear_attention(q, k, v, feature_map=feature_map, causal=True, chunk_size=16)
    state, rows = None, []
    for t in range(40):
        state, out = linear_attention_step(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                           feature_map=feature_map)
        rows.append(out)
    assert state.length == 40 and state.kv.shape == (2, 2, state.kv.shape[2], 16)
    assert torch.allclose(torch.cat(rows, dim=2), parallel, rtol=1e-9, atol=1e-12)


def test_favor_error_falls_as_features_grow():
    """Monte Carlo error of an unbiased estimate falls as 1/sqrt(F): 16x the features should
    cut it about 4x. Averaged over 6 seeds, assert at least 2x from F=64 to F=1024 (half the
    theoretical factor, a margin for the ratio's own noise), and monotone over 16..1024."""
    q, k, v = qkv(1, 4, 4, 64, 64, 16, dtype=torch.float64, seed=5)
    q, k = q * 0.6, k * 0.6  # moderate logits, where FAVOR+ is meant to be used
    exact = attnkit.attention(q, k, v)
    errors = []
    for m in (16, 64, 256, 1024):
        e = [((linear_attention(q, k, v, feature_map="favor", num_features=m, seed=s) - exact).norm()
              / exact.norm()).item() for s in range(6)]
        errors.append(sum(e) / len(e))
    assert errors == sorted(errors, reverse=True), errors
    assert errors[3] <= errors[1] / 2, errors


@pytest.mark.parametrize("x", [torch.full((8,), 0.3, dtype=torch.float64),
                               torch.tensor([0.8] + [0.0] * 7, dtype=torch.float64)], ids=["ones", "axis"])
def test_favor_kernel_estimate_is_unbiased(x):
    """Averaged over projections, phi(x).phi(y) must estimate exp(x.y) without bias: the
    mean over 3000 seeds lies within 4 standard errors of the target."""
    import math

    y = x.flip(0) * 0.9
    est = []
    for seed in range(3000):
        w = favor_projection(8, 8, seed=seed)
        est.append(float((torch.exp(w @ x - x @ x / 2) @ torch.exp(w @ y - y @ y / 2)) / 8))
    est = torch.tensor(est, dtype=torch.float64)
    target = math.exp(float(x @ y))
    assert abs(est.mean().item() - target) <= 4 * est.std().item() / math.sqrt(len(est)), (est.mean(), target)


def test_favor_stays_finite_with_keys_of_very_different_norms():
    """A large key must not overflow later features (step) or underflow earlier rows (causal)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    k[:, :, 0] *= 8  # the first key is far larger: its logits set a high running maximum
    k[:, :, 30] *= 10  # and a later one larger still
    ref = linear_attention(q.double(), k.double(), v.double(), causal=True, feature_map="favor", chunk_size=8)
    par = linear_attention(q, k, v, causal=True, feature_map="favor", chunk_size=8)
    state, rows = None, []
    for t in range(40):
        state, out = linear_attention_step(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                           feature_map="favor")
        rows.append(out)
    step = torch.cat(rows, dim=2)
    assert torch.isfinite(par).all() and torch.isfinite(step).all()
    assert (par.double() - ref).abs().max() <= 1e-4 and (step.double() - ref).abs().max() <= 1e-4


def test_chunk_larger_than_sequence_and_cached_projection_is_private():
    q, k, v = qkv(1, 2, 2, 10, 10, 8, dtype=torch.float32, seed=3)
    assert torch.allclose(linear_attention(q, k, v, causal=True, chunk_size=200_000),
                          linear_attention(q, k, v, causal=True, chunk_size=10), atol=1e-6)
    before = linear_attention(q, k, v, feature_map="favor")
    state, _ = linear_attention_step(None, q[:, :, :1], k[:, :, :1], v[:, :, :1], feature_map="favor")
    state.spec.projection.mul_(2)  # a caller scribbling on its state must not change later calls
    assert torch.equal(linear_attention(q, k, v, feature_map="favor"), before)


def test_favor_projection_rows_are_orthogonal_in_blocks_and_seeded():
    w = favor_projection(8, 20, seed=1)
    block = w[:8] / w[:8].norm(dim=1, keepdim=True)
    assert torch.allclose(block @ block.t(), torch.eye(8, dtype=torch.float64), atol=1e-12)
    assert torch.equal(w, favor_projection(8, 20, seed=1))
    assert not torch.equal(w, favor_projection(8, 20, seed=2))
    q, k, v = qkv(1, 1, 1, 9, 9, 8, seed=0)
    torch.manual_seed(0)
    a = linear_attention(q, k, v, feature_map="favor", redraw=True)
    b = linear_attention(q, k, v, feature_map="favor", redraw=True)
    assert not torch.equal(a, b)  # a fresh projection each call


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("feature_map", ["elu", "favor", "custom"])
def test_gradcheck_float64(causal, feature_map):
    q, k, v = qkv(1, 2, 1, 6, 6, 4, v_dim=3, dtype=torch.float64, seed=6)
    for t in (q, k, v):
        t.requires_grad_(True)
    kw = {"num_features": 8} if feature_map == "favor" else {}
    if feature_map == "custom":
        feature_map = lambda x: F.softplus(x) * x.exp()  # noqa: E731 - a differentiable positive map
    assert torch.autograd.gradcheck(
        lambda q, k, v: linear_attention(q, k, v, feature_map=feature_map, causal=causal, chunk_size=4, **kw),
        (q, k, v))


def test_never_allocates_l_by_l():
    from test_memory import LargestTensor

    length = 4096
    q, k, v = qkv(1, 2, 2, length, length, 32, dtype=torch.float32, seed=7, requires_grad=True)
    with LargestTensor() as probe:
        linear_attention(q, k, v, causal=True, chunk_size=64).sum().backward()
    # 64-token chunks: the largest tensors are (heads x L x 64), 1/32 of one (L x L) matrix
    assert probe.largest <= 2 * length * 64, probe.largest


def test_low_precision_computes_in_float32():
    q, k, v = qkv(1, 2, 2, 33, 33, 16, dtype=torch.float32, seed=8)
    ref = linear_attention(q, k, v, causal=True)
    for dt in (torch.float16, torch.bfloat16):
        low = linear_attention(q.to(dt), k.to(dt), v.to(dt), causal=True)
        assert low.dtype == dt
        plain = linear_attention(q.to(dt).float(), k.to(dt).float(), v.to(dt).float(), causal=True)
        assert (low.float() - plain).abs().max() <= torch.finfo(dt).eps * plain.abs().max() * 2
        assert (low.float() - ref).abs().max() <= 0.05


def test_empty_and_errors():
    q, k, v = qkv(1, 2, 2, 4, 0, 8, seed=0)
    assert torch.equal(linear_attention(q, k, v), torch.zeros(1, 2, 4, 8))
    q, k, v = qkv(1, 2, 2, 4, 6, 8, seed=0)
    with pytest.raises(ValueError, match="causal linear attention needs Lq == Lk"):
        linear_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="feature_map must be 'elu', 'favor' or a callable"):
        linear_attention(q, k, v, feature_map="relu")
    with pytest.raises(ValueError, match="apply to feature_map='favor' only"):
        linear_attention(q, k, v, num_features=32)
    with pytest.raises(ValueError, match=r"q's heads \(2\) must be a multiple"):
        linear_attention(q, k[:, :1].expand(1, 3, 6, 8).contiguous(), v[:, :1].expand(1, 3, 6, 8).contiguous())
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        linear_attention(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="feature_map must return"):
        linear_attention(q, k, v, feature_map=lambda x: x.sum(-1))
    with pytest.raises(ValueError, match="takes one token"):
        linear_attention_step(None, q, k, v)
    with pytest.raises(ValueError, match="non-negative features"):
        linear_attention(q, k, v, feature_map=lambda x: x)
    with pytest.raises(ValueError, match="redraw=True applies to feature_map='favor' only"):
        linear_attention(q, k, v, redraw=True)
    with pytest.raises(TypeError, match="seed must be an int"):
        linear_attention(q, k, v, feature_map="favor", seed=1.5)
    state, _ = linear_attention_step(None, q[:, :, :1], k[:, :, :1], v[:, :, :1])
    with pytest.raises(ValueError, match="do not match the state's"):
        linear_attention_step(state, q[:, :, :1, :4], k[:, :, :1, :4], v[:, :, :1])
    q0, k0, v0 = (t.requires_grad_(True) for t in qkv(1, 2, 2, 3, 0, 8, seed=0))
    linear_attention(q0, k0, v0).sum().backward()  # Lk = 0 stays in the graph
    assert torch.equal(q0.grad, torch.zeros_like(q0))
