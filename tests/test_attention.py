"""attention() on every backend against the float64 reference, forward and backward.

The reference itself is checked first against the definitions, written as loops over
(b, h, i, j) (masks, ALiBi in both alignments, softcap, score_mod), and, where the call is
a mask plus an additive bias, against PyTorch's own scaled_dot_product_attention in float64
given the loops' additive mask.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit import biases, masks

from conftest import assert_within, max_err, qkv


def dense_bias(mask, bias, b, h, lq, lk, softcap=None):
    """The (B, H, Lq, Lk) additive float mask equivalent to a mask and an additive bias."""
    out = torch.zeros(b, h, lq, lk, dtype=torch.float64)
    if bias is not None:
        out = out + bias.to_dense(lq, lk, batch=b, heads=h).double()
    if mask is not None:
        allowed = mask.to_dense(lq, lk, batch=b)
        out = out.masked_fill(~allowed, -math.inf)
    return out


def definition_scores(q, k, *, allow=None, add=None, softcap=None, mod=None):
    """(B, H, Lq, Lk) float64 scores built one (b, h, i, j) at a time from the definitions:
    ``s = q_i . k_j / sqrt(D)``, then ``softcap * tanh(s / softcap)``, then ``+ add(b, h, i, j)``
    and ``mod(s, b, h, i, j)``, and ``-inf`` where ``allow(b, i, j)`` is False. Query head h
    reads key head ``h // (H // Hkv)``."""
    nb, nh, lq, d = q.shape
    nkv, lk = k.shape[1], k.shape[2]
    out = torch.empty(nb, nh, lq, lk, dtype=torch.float64)
    for b in range(nb):
        for h in range(nh):
            kh = h // (nh // nkv)
            for i in range(lq):
                for j in range(lk):
                    s = sum(q[b, h, i, x].item() * k[b, kh, j, x].item() for x in range(d)) / math.sqrt(d)
                    if softcap is not None:
                        s = softcap * math.tanh(s / softcap)
                    if add is not None:
                        s += add(b, h, i, j)
                    if mod is not None:
                        idx = [torch.tensor(n) for n in (b, h, i, j)]
                        s = mod(torch.tensor(s, dtype=torch.float64), *idx).item()
                    if allow is not None and not allow(b, i, j):
                        s = -math.inf
                    out[b, h, i, j] = s
    return out


def _alibi_by_definition(num_heads, offset):
    """ALiBi (Press et al.): head h of n (a power of two) has slope 2^(-8 (h + 1) / n); the
    bias is -slope * |i + offset - j|."""
    return lambda b, h, i, j: -(2.0 ** (-8 * (h + 1) / num_heads)) * abs(i + offset - j)


def _mod(s, b, h, i, j):  # depends on every index, so a wrong b, h, i or j shows
    return s * (1 + 0.25 * b) + torch.cos(0.3 * (i - 2 * j).double()) * (h + 1)


DEFINITION_CASES = {
    # name: (B, H, Hkv, Lq, Lk, attention kwargs, definition kwargs)
    "plain": (2, 4, 4, 9, 7, {}, {}),
    "causal-bottom-right": (2, 4, 4, 5, 9, {"mask": masks.causal("bottom_right")},
                            {"allow": lambda b, i, j: j <= i + 4}),
    "window+alibi": (2, 4, 4, 11, 11, {"mask": masks.sliding_window(5, 3), "bias": biases.alibi(4)},
                     {"allow": lambda b, i, j: -5 <= j - i <= 3, "add": _alibi_by_definition(4, 0)}),
    "alibi-bottom-right": (1, 4, 4, 5, 12, {"bias": biases.alibi(4, align="bottom_right")},
                           {"add": _alibi_by_definition(4, 7)}),
    "document": (2, 4, 4, 12, 12, {"mask": masks.document(torch.arange(12) // 5)},
                 {"allow": lambda b, i, j: i // 5 == j // 5}),
    "gqa": (2, 4, 2, 7, 9, {}, {}),
    "softcap+causal": (2, 4, 2, 9, 9, {"softcap": 0.7, "mask": masks.causal()},
                       {"softcap": 0.7, "allow": lambda b, i, j: j <= i}),
    "score_mod": (2, 4, 4, 6, 8, {"bias": biases.score_mod(_mod)}, {"mod": _mod}),
}


@pytest.mark.parametrize("case", list(DEFINITION_CASES))
def test_reference_matches_the_definition_written_as_loops(case):
    b, h, hkv, lq, lk, kw, definition = DEFINITION_CASES[case]
    q, k, v = qkv(b, h, hkv, lq, lk, 6, seed=3, scale=1.5)  # scores of a few units: the softcap bites
    out, lse = attnkit.attention(q, k, v, backend="reference", return_lse=True, **kw)
    scores = definition_scores(q, k, **definition)
    vr = v.repeat_interleave(h // hkv, 1)
    assert max_err(out, torch.softmax(scores, -1) @ vr) < 1e-12
    assert max_err(lse, torch.logsumexp(scores, -1)) < 1e-12
    if "softcap" not in definition and "mod" not in definition:
        # PyTorch's SDPA, an independent kernel, given the loops' mask and bias as one additive mask
        additive = scores - definition_scores(q, k)
        kr = k.repeat_interleave(h // hkv, 1)
        assert max_err(out, F.scaled_dot_product_attention(q, kr, vr, attn_mask=additive)) < 1e-12


def make_case(name):
    """(shape kwargs, attention kwargs) for a named scenario."""
    shapes = dict(batch=2, heads=4, kv_heads=4, q_len=97, k_len=97, head_dim=40)
    kw: dict = {}
    if name == "dense-odd":
        shapes.update(q_len=7, k_len=13, head_dim=72)
    elif name == "len1":
        shapes.update(q_len=1, k_len=1)
    elif name == "causal":
        kw["mask"] = masks.causal()
    elif name == "causal-long":
        shapes.update(batch=1, heads=2, kv_heads=2, q_len=1025, k_len=1025)
        kw["mask"] = masks.causal()
    elif name == "causal-br-lq>lk":
        shapes.update(q_len=97, k_len=40)
        kw["mask"] = masks.causal("bottom_right")  # first 57 rows allow no key
    elif name == "causal-tl-lq<lk":
        shapes.update(q_len=40, k_len=97)
        kw["mask"] = masks.causal()
    elif name == "window":
        shapes.update(q_len=300, k_len=300)
        kw["mask"] = masks.sliding_window(37, 5)
    elif name == "window-br-decode":
        shapes.update(q_len=7, k_len=300)
        kw["mask"] = masks.sliding_window(64, align="bottom_right")
    elif name == "document+causal":
        shapes.update(q_len=300, k_len=300)
        kw["mask"] = masks.document(torch.arange(300) // 70) & masks.causal()
    elif name == "prefix":
        shapes.update(q_len=200, k_len=200)
        kw["mask"] = masks.prefix_lm(torch.tensor([0, 150]))
    elif name == "global|window":
        shapes.update(q_len=300, k_len=300)
        kw["mask"] = masks.global_tokens([0, 299]) | masks.sliding_window(16, 16)
    elif name == "padding":
        kw["mask"] = masks.key_padding([40, 0])  # batch 1 has no keys at all
    elif name == "dense-tensor":
        g = torch.Generator().manual_seed(3)
        kw["mask"] = torch.rand(2, 4, 97, 97, generator=g) > 0.3
    elif name == "alibi+causal":
        shapes.update(q_len=300, k_len=300)
        kw.update(mask=masks.causal(), bias=biases.alibi(4))
    elif name == "alibi-dense":
        shapes.update(q_len=300, k_len=300)
        kw["bias"] = biases.alibi(4, align="bottom_right")
    elif name == "softcap":
        kw.update(softcap=5.0, mask=masks.causal(), scale=1.0)
    elif name == "score_mod":
        kw["bias"] = biases.score_mod(lambda s, b, h, i, j: s + torch.cos(0.1 * (i - j).float()) * (h + 1))
    elif name == "gqa":
        shapes.update(heads=8, kv_heads=2)
        kw["mask"] = masks.causal()
    elif name == "mqa+window":
        shapes.update(heads=6, kv_heads=1, q_len=300, k_len=300)
        kw["mask"] = masks.sliding_window(20)
    elif name == "dv!=d":
        shapes.update(v_dim=24)
        kw["mask"] = masks.causal()
    elif name == "scale":
        kw["scale"] = 0.3
    return shapes, kw


CASES = ["dense-odd", "len1", "causal", "causal-long", "causal-br-lq>lk", "causal-tl-lq<lk",
         "window", "window-br-decode", "document+causal", "prefix", "global|window", "padding",
         "dense-tensor", "alibi+causal", "alibi-dense", "softcap", "score_mod", "gqa",
         "mqa+window", "dv!=d", "scale"]


def run_all(q, k, v, backend, kw):
    out, lse = attnkit.attention(q, k, v, backend=backend, return_lse=True, **kw)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, lse, grads


@pytest.mark.parametrize("name", CASES)
def test_tiled_matches_reference_float64(name, tiled_kernel):
    shapes, kw = make_case(name)
    q, k, v = qkv(**shapes, requires_grad=True)
    ref = run_all(q, k, v, "reference", kw)
    got = run_all(q, k, v, "tiled", kw)
    assert max_err(got[0], ref[0]) < 1e-10
    assert max_err(got[1], ref[1]) < 1e-10
    assert torch.equal(torch.isinf(got[1]), torch.isinf(ref[1]))
    for g, r in zip(got[2], ref[2]):
        assert torch.isfinite(g).all()
        assert max_err(g, r) < 1e-9


@pytest.mark.parametrize("name", ["dense-odd", "causal", "gqa", "padding", "scale", "causal-tl-lq<lk"])
def test_sdpa_backend_matches_reference(name):
    shapes, kw = make_case(name)
    q, k, v = qkv(**shapes, requires_grad=True)
    ref = attnkit.attention(q, k, v, backend="reference", **kw)
    with pytest.raises(ValueError, match="log-sum-exp"):
        attnkit.attention(q, k, v, backend="sdpa", return_lse=True, **kw)
    if name == "padding":  # a batch element without keys: sdpa declines, tiled takes it
        with pytest.raises(ValueError, match="Use backend='tiled'"):
            attnkit.attention(q, k, v, backend="sdpa", **kw)
        kw = {"mask": masks.key_padding([40, 97])}
        ref = attnkit.attention(q, k, v, backend="reference", **kw)
    out = attnkit.attention(q, k, v, backend="sdpa", **kw)
    assert max_err(out, ref) < 1e-10


@pytest.mark.parametrize("kw", [
    {"mask": masks.sliding_window(4)}, {"bias": biases.alibi(2)}, {"softcap": 3.0},
    {"mask": masks.causal("bottom_right")},
], ids=["window", "alibi", "softcap", "bottom-right"])
def test_sdpa_declines_what_it_cannot_do_and_names_tiled(kw):
    q, k, v = qkv(q_len=5, k_len=9)
    with pytest.raises(ValueError, match=r"backend='sdpa' cannot run this call: .*Use backend='tiled'"):
        attnkit.attention(q, k, v, backend="sdpa", **kw)


def test_auto_picks_sdpa_tiled_or_reference():
    from attnkit.functional import select_backend
    from attnkit.functional._call import make_call

    def pick(q_len, **kw):
        q, k, v = qkv(heads=8, q_len=q_len, head_dim=64, dtype=torch.float32)
        call = make_call(q, k, v, mask=kw.get("mask"), bias=kw.get("bias"), scale=None, softcap=None,
                         dropout_p=0.0, return_lse=kw.get("return_lse", False))
        return select_backend(call, "auto").name

    assert pick(1024) == "sdpa"
    assert pick(1024, mask=masks.causal()) == "sdpa"
    assert pick(1024, mask=masks.sliding_window(128)) == "tiled"
    assert pick(1024, return_lse=True) == "tiled"
    assert pick(8, mask=masks.sliding_window(2)) == "reference"


@pytest.mark.parametrize("name", ["causal", "window+alibi", "softcap", "score_mod", "gqa", "masked-rows"])
def test_gradcheck_tiled(name, tiled_kernel, one_thread):
    kw = {
        "causal": {"mask": masks.causal()},
        "window+alibi": {"mask": masks.sliding_window(3, 2), "bias": biases.alibi(4)},
        "softcap": {"softcap": 2.0, "mask": masks.causal()},
        "score_mod": {"bias": biases.score_mod(lambda s, b, h, i, j: s * torch.sigmoid(s))},
        "gqa": {"mask": masks.causal()},
        "masked-rows": {"mask": masks.causal("bottom_right")},
    }[name]
    q, k, v = qkv(2, 4, 2 if name == "gqa" else 4, 9, 7, 6, requires_grad=True)

    def f(q, k, v):
        out, lse = attnkit.attention(q, k, v, backend="tiled", return_lse=True, **kw)
        return out, lse.nan_to_num(neginf=0.0)  # gradcheck perturbs finite values only

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_tensor_bias_gradients(tiled_kernel, one_thread):
    q, k, v = qkv(1, 4, 1, 9, 7, 6, v_dim=5, requires_grad=True)
    g = torch.Generator().manual_seed(2)
    full = torch.randn(1, 4, 9, 7, generator=g, dtype=torch.float64, requires_grad=True)
    per_row = torch.randn(9, 1, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, a, b: attnkit.attention(q, k, v, bias=[a, b], mask=masks.causal(), backend="tiled"),
        (q, k, v, full, per_row),
    )


def low_precision_plain(q, k, v, add, scale):
    """Plain attention entirely in the inputs' dtype: the baseline for the tolerance rule."""
    h, hkv = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
    s = (q @ k.transpose(-1, -2)) * scale + add.to(q.dtype)
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("backend", "name"), [(backend, name) for backend in ("tiled", "sdpa", "reference")
                                               for name in ("causal", "gqa", "alibi+causal")
                                               if not (backend == "sdpa" and name == "alibi+causal")])  # no bias
def test_low_precision_within_twice_plain_error(dtype, backend, name):
    shapes, kw = make_case(name)
    shapes.update(q_len=128, k_len=128, head_dim=64, batch=1)
    q64, k64, v64 = qkv(**shapes, requires_grad=True)
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64))
    b, h = q.shape[:2]
    add = dense_bias(kw.get("mask"), kw.get("bias"), b, h, 128, 128)
    scale = 1 / math.sqrt(64)
    do = torch.randn(b, h, 128, 64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    ref = attnkit.attention(q64, k64, v64, backend="reference", **kw)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do)
    plain = low_precision_plain(q, k, v, add, scale)
    plain_grads = torch.autograd.grad(plain, (q, k, v), do.to(dtype))
    out = attnkit.attention(q, k, v, backend=backend, **kw)
    grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))

    assert out.dtype == dtype
    assert_within(max_err(out, ref), max_err(plain, ref), 2, 1e-5, "output")
    for name_, g, pg, rg in zip("qkv", grads, plain_grads, ref_grads):
        assert_within(max_err(g, rg), max_err(pg, rg), 3, 1e-5, f"d{name_}")


@pytest.mark.parametrize("backend", ["tiled", "reference", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fully_masked_rows_output_zero_with_zero_gradients(backend, dtype):
    q, k, v = qkv(2, 2, q_len=6, k_len=5, dtype=dtype, requires_grad=True)
    mask = masks.key_padding([0, 5]) if backend == "sdpa" else masks.causal("bottom_right")
    if backend == "sdpa":
        with pytest.raises(ValueError, match="no valid key"):
            attnkit.attention(q, k, v, mask=mask, backend=backend)
        return
    out, lse = attnkit.attention(q, k, v, mask=mask, backend=backend, return_lse=True)
    out.sum().backward()
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))  # row 0 sees no key
    assert torch.isinf(lse[:, :, 0]).all() and (lse[:, :, 0] < 0).all()
    assert torch.equal(q.grad[:, :, 0], torch.zeros_like(q.grad[:, :, 0]))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("backend", ["auto", "tiled", "reference", "sdpa"])
@pytest.mark.parametrize(("q_len", "k_len"), [(0, 5), (5, 0), (0, 0)])
def test_zero_lengths(backend, q_len, k_len):
    q, k, v = qkv(2, 4, 2, q_len, k_len, 8, v_dim=3, requires_grad=True)
    if backend == "sdpa":
        v = v.detach()[..., :1].expand(-1, -1, -1, 8).clone().requires_grad_()
    if backend == "sdpa":  # it returns no lse
        out = attnkit.attention(q, k, v, backend=backend)
    else:
        out, lse = attnkit.attention(q, k, v, backend=backend, return_lse=True)
        assert lse.shape == (2, 4, q_len) and (lse == -math.inf).all()
    assert out.shape == (2, 4, q_len, v.shape[-1])
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert q.grad is not None and torch.equal(q.grad, torch.zeros_like(q))


@pytest.mark.parametrize("backend", ["tiled", "reference", "sdpa"])
def test_huge_logits_in_float16_stay_finite(backend):
    q, k, v = qkv(1, 2, q_len=33, k_len=33, head_dim=16, dtype=torch.float16)
    q = q * 300  # scores reach ~1e4 and beyond
    out = attnkit.attention(q, k, v, backend=backend, mask=masks.causal())
    assert torch.isfinite(out).all()
    ref = attnkit.attention(q.double(), k.double(), v.double(), backend="reference", mask=masks.causal())
    assert max_err(out, ref) < 2e-2


def test_dropout_is_identical_on_reference_and_tiled(tiled_kernel):
    q, k, v = qkv(2, 4, 2, 37, 41, 8, requires_grad=True)
    kw = dict(dropout_p=0.25, mask=masks.causal("bottom_right"))
    torch.manual_seed(11)
    ref = run_all(q, k, v, "reference", kw)
    torch.manual_seed(11)
    got = run_all(q, k, v, "tiled", kw)
    assert max_err(got[0], ref[0]) < 1e-12
    for g, r in zip(got[2], ref[2]):
        assert max_err(g, r) < 1e-11


def test_dropout_keeps_the_right_fraction_and_is_unbiased():
    q, k, _ = qkv(1, 4, q_len=256, k_len=256, head_dim=8, dtype=torch.float32)
    eye = torch.eye(256).expand(1, 4, 256, 256)  # v = I: the output is the dropped-out probabilities
    draws = torch.stack([attnkit.attention(q, k, eye, dropout_p=0.3, backend="tiled") for _ in range(20)])
    keep_rate = (draws != 0).float().mean().item()
    assert abs(keep_rate - 0.7) < 0.005  # 5.2M draws: the standard deviation is 0.0002
    assert not torch.equal(draws[0], draws[1])  # a fresh seed each call
    # Kept probabilities are scaled by 1/(1-p), so each row still sums to 1 on average
    # (without the scaling it would be 0.7), and the mean approaches the probabilities.
    assert abs(draws.sum(-1).mean().item() - 1.0) < 0.01
    p = attnkit.attention_probs(q, k, eye)
    rel = ((draws.mean(0) - p).abs().sum() / p.abs().sum()).item()
    assert rel < 0.2  # expected about 0.12 for 20 draws; a biased mean would sit near 0.3


def test_gradcheck_with_dropout(tiled_kernel, one_thread):
    q, k, v = qkv(1, 2, q_len=9, k_len=7, head_dim=6, requires_grad=True)

    def f(q, k, v):
        torch.manual_seed(5)  # the same dropout pattern on every evaluation
        return attnkit.attention(q, k, v, backend="tiled", dropout_p=0.3)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_lse_gradient_flows(tiled_kernel):
    q, k, v = qkv(1, 2, q_len=20, k_len=20, head_dim=8, requires_grad=True)
    kw = {"mask": masks.sliding_window(5)}
    grads = []
    for backend in ("reference", "tiled"):
        out, lse = attnkit.attention(q, k, v, backend=backend, return_lse=True, **kw)
        grads.append(torch.autograd.grad((lse ** 2).sum() + out.sum(), (q, k, v)))
    for g, r in zip(*grads):
        assert max_err(g, r) < 1e-10


def test_attention_probs_match_definition():
    q, k, v = qkv(1, 2, q_len=5, k_len=6, head_dim=4)
    p = attnkit.attention_probs(q, k, v, mask=masks.causal("bottom_right"))
    s = (q @ k.transpose(-1, -2)) / 2 + dense_bias(masks.causal("bottom_right"), None, 1, 2, 5, 6)
    assert max_err(p, torch.softmax(s, -1)) < 1e-14


def test_backends_lists_features():
    info = attnkit.backends()
    assert set(info) == {"sdpa", "flex", "tiled", "reference"}
    assert "return_lse" in info["tiled"].features
    assert "tiled" in str(info["tiled"])


def test_a_shifted_tensor_bias_is_the_slice_and_refuses_grad():
    """``from_tensor(t).shifted(q0, k0)`` is ``t``'s slice for that piece. Its gradient cannot reach ``t`` on
    every backend, so a ``t`` that requires grad is refused instead of left without one."""
    g = torch.Generator().manual_seed(3)
    t = torch.randn(1, 2, 9, 9, generator=g, dtype=torch.float64)
    q, k, v = qkv(1, 2, 2, 4, 5, 8)
    piece = biases.from_tensor(t).shifted(3, 2, q_total=9, k_total=9)
    for backend in ("reference", "tiled"):
        out = attnkit.attention(q, k, v, bias=piece, backend=backend)
        ref = attnkit.attention(q, k, v, bias=t[..., 3:7, 2:7], backend="reference")
        assert max_err(out, ref) < 1e-12
    t.requires_grad_(True)
    with pytest.raises(ValueError, match="shifted tensor bias cannot require grad"):
        attnkit.attention(q, k, v, bias=biases.from_tensor(t).shifted(3, 2, q_total=9, k_total=9))
