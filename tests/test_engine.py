"""Structural tests of the tiled backend's batched engine: the op count must not grow with L.

Timing on a shared machine is noise; the number of aten ops a call dispatches is not.
Each op is one parallel region ending in a barrier, so a count that grows with L is what
made the per-chunk engine slow down 150-200x under load.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnkit
from attnkit import biases, masks
from attnkit.functional import tiled
from attnkit.functional._call import make_call
from attnkit.functional.tiled.plan import _FAR_GAP, band_plan

from conftest import max_err, qkv


@pytest.fixture(autouse=True)
def _pure_pytorch_engine(monkeypatch):
    """These tests are about the batched pure-PyTorch engine: keep a cached native build out
    (tests/test_native.py counts the native kernel's ops)."""
    monkeypatch.setenv("ATTNKIT_NATIVE", "0")


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _ops(length: int, mask, bias, backward: bool) -> Counter[str]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, length, 8, generator=g).requires_grad_(backward) for _ in range(3))
    with _Count() as count:
        out = attnkit.attention(q, k, v, mask=mask, bias=bias, backend="tiled")
        if backward:
            out.sum().backward()
    return count.ops


CASES = {
    "window512": (lambda: masks.sliding_window(512), lambda: None),
    "causal+alibi": (lambda: masks.causal(), lambda: biases.alibi(2)),
}


@pytest.mark.parametrize("backward", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", list(CASES))
def test_op_count_does_not_grow_with_length(case, backward):
    mask, bias = CASES[case]
    short = _ops(2048, mask(), bias(), backward)
    long = _ops(16384, mask(), bias(), backward)
    n_short, n_long = sum(short.values()), sum(long.values())
    assert n_long <= 1.5 * n_short, (n_short, n_long, (long - short).most_common(5))
    # The per-chunk engine needed one kernel call per (chunk, segment): hundreds here.
    kernel = "aten._scaled_dot_product_flash_attention_for_cpu.default"
    assert 1 <= long[kernel] <= 16


def test_window_backward_op_count_small_tier():
    short = _ops(1024, masks.sliding_window(256), None, True)
    long = _ops(4096, masks.sliding_window(256), None, True)
    assert sum(long.values()) <= 1.5 * sum(short.values())


def test_per_chunk_engine_grows():
    """The count test can fail: the per-chunk engine's count grows about 4x from 1024 to 4096."""
    with tiled.kernel("fused"):
        short = sum(_ops(1024, masks.sliding_window(256), None, False).values())
        long = sum(_ops(4096, masks.sliding_window(256), None, False).values())
    assert long > 3 * short


@pytest.mark.parametrize("mask_name", ["causal", "causal_br", "window", "prefix", "dense", "document"])
def test_band_plan_matches_reference_with_gqa_and_odd_lengths(mask_name):
    """Lengths not multiples of the chunk, Lq != Lk, GQA and a per-batch mask, against float64 math."""
    q_len, k_len = (300, 430) if mask_name != "document" else (300, 300)
    ids = torch.tensor([[0] * 100 + [1] * 200, [0] * 250 + [1] * 50])
    mask = {"causal": masks.causal(), "causal_br": masks.causal("bottom_right"),
            "window": masks.sliding_window(150), "prefix": masks.prefix_lm(140), "dense": None,
            "document": masks.document(ids) if mask_name == "document" else None}[mask_name]
    q, k, v = qkv(batch=2, heads=4, kv_heads=2, q_len=q_len, k_len=k_len, requires_grad=True)
    bias = biases.alibi(4) if mask_name in ("causal", "window") else None
    out = attnkit.attention(q, k, v, mask=mask, bias=bias, backend="tiled")
    ref = attnkit.attention(q, k, v, mask=mask, bias=bias, backend="reference")
    assert max_err(out, ref) < 1e-12
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    assert max(max_err(a, b) for a, b in zip(grads, ref_grads)) < 1e-12


def test_causal_alibi_keeps_float32_precision_at_long_length():
    # Regression: the far part adds ALiBi as a per-key column spanning slope * L; with the
    # diagonal inside it a slope of 1/2 at L = 2048 kept only 5e-5 of float32's precision.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2048, 16, generator=g) for _ in range(3))
    mask, bias = masks.causal(), biases.alibi(8)  # slopes 1/2 ... 1/256
    ref = attnkit.attention(q.double(), k.double(), v.double(), mask=mask, bias=bias, backend="reference")
    out = attnkit.attention(q, k, v, mask=mask, bias=bias, backend="tiled")
    dense = bias.to_dense(2048, 2048, heads=8) + torch.full((2048, 2048), float("-inf")).triu(1)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    assert (out.double() - ref).abs().max() <= 3 * (sdpa.double() - ref).abs().max()


def test_causal_plans_use_the_far_part_and_few_runs():
    q, k, v = qkv(q_len=2048, dtype=torch.float32)

    def plan(mask):
        return band_plan(make_call(q, k, v, mask=mask, bias=biases.alibi(2), scale=None, softcap=None,
                                   dropout_p=0.0, return_lse=False))

    bare = band_plan(make_call(q, k, v, mask=masks.causal(), bias=None, scale=None, softcap=None, dropout_p=0.0,
                               return_lse=False))
    assert bare.far == 0 and bare.runs == ()  # exactly j <= i, no bias: the kernel's is_causal alone
    exact = plan(masks.causal())  # with ALiBi the pairs nearest the diagonal stay in the band (exact bias)
    assert exact.far == -_FAR_GAP and 1 <= len(exact.runs) <= 3
    both = plan(masks.causal() & masks.prefix_lm(0))  # not a bare diagonal: band + far
    assert both.far == -_FAR_GAP
    assert 1 <= len(both.runs) <= 3
