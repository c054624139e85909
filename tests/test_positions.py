"""Positions: published numbers, RoPE invariants, and transformers' implementation where installed."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit import biases
from attnkit.positions import (
    LearnedPositionalEmbedding,
    RopeScaling,
    RotaryEmbedding,
    ntk_base,
    rope_inv_freq,
    sinusoidal,
    yarn_attention_factor,
)


def test_inv_freq_published_values():
    f = rope_inv_freq(128, 10000.0)
    assert f.shape == (64,)
    assert f[0].item() == 1.0
    assert f[1].item() == pytest.approx(0.865964, abs=1e-6)
    assert f[63].item() == pytest.approx(1.15478e-4, rel=1e-5)


def test_ntk_base_and_yarn_factor_published_values():
    assert ntk_base(10000.0, 4.0, 128) == pytest.approx(40889.9, abs=0.1)
    assert yarn_attention_factor(4.0) == pytest.approx(1.13863, abs=1e-5)
    assert RotaryEmbedding(64, scaling=RopeScaling("yarn", 4.0)).attention_factor == pytest.approx(1.13863, abs=1e-5)


def test_alibi_slopes_for_12_heads():
    # Press et al.'s rule for a head count that is not a power of two: the 8-head series
    # 2^-1..2^-8, then every other slope of the 16-head series 2^-0.5, 2^-1, 2^-1.5, ...,
    # i.e. 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5
    expected = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(0.5 + i) for i in range(4)]
    assert biases.alibi_slopes(12).tolist() == pytest.approx(expected, rel=1e-6)


def test_sinusoidal_matches_the_paper_formula_and_shift_is_a_rotation():
    pe = sinusoidal(50, 16).double()
    p, i = 37, 3
    assert pe[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / 16)), abs=1e-6)
    assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / 16)), abs=1e-6)
    # PE(p + k) is PE(p) rotated pair by pair by the angle k * w_i, the same for every p
    k = 5
    w = 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    sin_p, cos_p = pe[:-k, 0::2], pe[:-k, 1::2]
    assert torch.allclose(pe[k:, 0::2], sin_p * torch.cos(k * w) + cos_p * torch.sin(k * w), atol=1e-6)
    assert torch.allclose(pe[k:, 1::2], cos_p * torch.cos(k * w) - sin_p * torch.sin(k * w), atol=1e-6)


def test_learned_positions_reject_out_of_range():
    emb = LearnedPositionalEmbedding(8, 4)
    assert emb(torch.arange(8)).shape == (8, 4)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 8\)"):
        emb(torch.arange(9))


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("scaling", [None, RopeScaling("linear", 4.0), RopeScaling("llama3", 8.0, 64)])
def test_rope_scores_depend_only_on_offset(layout, scaling):
    torch.manual_seed(0)
    rope = RotaryEmbedding(32, layout=layout, scaling=scaling)
    q, k = torch.randn(1, 1, 1, 32, dtype=torch.float64), torch.randn(1, 1, 1, 32, dtype=torch.float64)

    def score(m, n):
        return (rope(q, torch.tensor([m])) * rope(k, torch.tensor([n]))).sum().item()

    for m, n, shift in [(3, 1, 100), (50, 7, 1000), (0, 9, 4096)]:
        assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-9)
    assert score(5, 1) != pytest.approx(score(5, 2), abs=1e-3)  # and it does depend on the offset


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_preserves_norms(layout):
    x = torch.randn(2, 3, 40, 16)
    y = RotaryEmbedding(16, layout=layout)(x, torch.arange(1000, 1040))
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_interleaved_equals_half_after_permutation():
    d = 24
    perm = torch.cat((torch.arange(0, d, 2), torch.arange(1, d, 2)))  # interleaved pairs -> half pairs
    x = torch.randn(1, 2, 9, d)
    pos = torch.arange(3, 12)
    inter = RotaryEmbedding(d, layout="interleaved")(x, pos)
    half = RotaryEmbedding(d, layout="half")(x[..., perm], pos)
    assert torch.allclose(inter[..., perm], half, atol=1e-6)


def test_rope_cos_sin_in_float32_for_half_inputs():
    rope = RotaryEmbedding(64)
    x = torch.randn(1, 1, 4, 64).to(torch.bfloat16)
    pos = torch.arange(20000, 20004)  # bf16 cannot even represent these positions
    exact = rope(x.double(), pos)
    low = rope(x, pos)
    assert low.dtype == torch.bfloat16
    # only the final rounding to bf16 is lost: error within bf16's half-ulp of the values
    assert (low.double() - exact).abs().max() <= 2 ** -8 * exact.abs().max()


def test_rope_per_batch_positions():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 1, 3, 8)
    pos = torch.tensor([[0, 1, 2], [5, 6, 7]])
    y = rope(x, pos)
    assert torch.allclose(y[1:], rope(x[1:], torch.arange(5, 8)), atol=1e-6)
    assert torch.allclose(y[:1], rope(x[:1]), atol=1e-6)


def test_rope_bad_input():
    with pytest.raises(ValueError, match="head_dim must be even"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match=r"x must be \(B, H, L, head_dim=8\)"):
        RotaryEmbedding(8)(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="positions must be"):
        RotaryEmbedding(8)(torch.randn(1, 1, 3, 8), torch.arange(4))
    with pytest.raises(TypeError, match="integer tensor"):
        RotaryEmbedding(8)(torch.randn(1, 1, 3, 8), torch.arange(3.0))
    with pytest.raises(ValueError, match="kind must be one of"):
        RopeScaling("cubic", 2.0)
    with pytest.raises(ValueError, match="factor must be >= 1"):
        RopeScaling("linear", 0.5)
    with pytest.raises(ValueError, match="0 < beta_slow < beta_fast"):
        RopeScaling("yarn", 2.0, beta_slow=0)
    with pytest.raises(ValueError, match="0 < low_freq_factor < high_freq_factor"):
        RopeScaling("llama3", 2.0, low_freq_factor=0)
    with pytest.raises(ValueError, match="base must be > 1"):
        sinusoidal(3, 4, base=-1.0)


_HF_CASES = [
    ("linear", {"factor": 4.0}, RopeScaling("linear", 4.0), 2048, None),
    ("dynamic", {"factor": 4.0}, RopeScaling("dynamic", 4.0, original_max_position=2048), 2048, 8000),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 2048},
     RopeScaling("yarn", 4.0, original_max_position=2048), 2048, None),
    ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192},
     RopeScaling("llama3", 8.0, original_max_position=8192), 131072, None),
]


@pytest.mark.parametrize(("kind", "params", "ours", "max_pos", "seq_len"), _HF_CASES, ids=[c[0] for c in _HF_CASES])
def test_rope_scaling_matches_transformers(kind, params, ours, max_pos, seq_len):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=512, num_attention_heads=4, max_position_embeddings=max_pos,
                         rope_parameters={"rope_type": kind, "rope_theta": 10000.0, **params})
    kw = {} if seq_len is None else {"seq_len": seq_len}
    theirs, factor = ROPE_INIT_FUNCTIONS[kind](config, "cpu", **kw)
    mine = rope_inv_freq(128, 10000.0, ours, seq_len=seq_len)
    assert torch.allclose(theirs.double(), mine, rtol=1e-6, atol=0)  # they compute in float32
    assert RotaryEmbedding(128, scaling=ours).attention_factor == pytest.approx(factor, rel=1e-12)


def test_yarn_rotation_matches_transformers_with_its_attention_factor():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=512)
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                              "original_max_position_embeddings": 128}
    q = torch.randn(1, 4, 9, 64)
    pos = torch.arange(300, 309)[None]
    cos, sin = LlamaRotaryEmbedding(config)(q, pos)
    theirs, _ = apply_rotary_pos_emb(q, q, cos, sin)
    ours = RotaryEmbedding(64, scaling=RopeScaling("yarn", 4.0, original_max_position=128))(q, pos)
    assert torch.allclose(ours, theirs, atol=1e-4)  # float32 angles there, float64 here (see below)


def test_rotary_matches_transformers_llama():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_theta=500000.0)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    hf = LlamaRotaryEmbedding(config)
    q, k = torch.randn(2, 4, 11, 64), torch.randn(2, 4, 11, 64)
    pos = torch.arange(100, 111)[None].expand(2, 11)
    cos, sin = hf(q, pos)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    ours = RotaryEmbedding(64, base=500000.0)
    # transformers forms the angles (~110 rad) in float32, whose spacing there is 7.6e-6;
    # attnkit forms them in float64, so they differ by a few 1e-5 on values of a few units
    assert torch.allclose(ours(q, pos), q_hf, atol=1e-4)
    assert torch.allclose(ours(k, pos), k_hf, atol=1e-4)
    assert torch.allclose(ours(q.double(), pos), q_hf.double(), atol=1e-4)
