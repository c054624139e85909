"""The flex backend (compiled FlexAttention, here on CPU through inductor) against the float64 reference on the
mask grid of tests/test_attention.py; what it refuses; and its per-call cache. Compiling takes seconds per shape
on CPU, so the default tier runs a few cases and the whole grid is ``slow``."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit import biases, masks
from attnkit.functional import flex
from attnkit.functional._call import make_call
from test_attention import CASES, dense_bias, low_precision_plain, make_case

from conftest import assert_within, max_err, qkv

pytest.importorskip("torch.nn.attention.flex_attention")

FEW = ["mqa+window", "alibi+causal"]  # a mask, GQA, and a bias as score_mod


def _flex_vs_reference(name):
    shapes, kw = make_case(name)
    q64, k64, v64 = qkv(**shapes)
    ref = attnkit.attention(q64, k64, v64, backend="reference", **kw)
    q, k, v = (t.float() for t in (q64, k64, v64))
    plain = attnkit.attention(q, k, v, backend="reference", **kw)  # the same call, computed plainly in float32
    out = attnkit.attention(q, k, v, backend="flex", **kw)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert_within(max_err(out, ref), max_err(plain, ref), 2, 2e-6, f"flex on {name}")


@pytest.mark.parametrize("name", FEW)
def test_flex_matches_the_float64_reference(name):
    _flex_vs_reference(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [c for c in CASES if c not in FEW])
def test_flex_matches_the_float64_reference_on_the_whole_grid(name):
    _flex_vs_reference(name)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["causal", "gqa", "alibi+causal"])
def test_flex_in_low_precision_within_twice_plain_error(dtype, name):
    shapes, kw = make_case(name)
    shapes.update(q_len=128, k_len=128, head_dim=64, batch=1)
    q64, k64, v64 = qkv(**shapes)
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    add = dense_bias(kw.get("mask"), kw.get("bias"), 1, q.shape[1], 128, 128)
    ref = attnkit.attention(q64, k64, v64, backend="reference", **kw)
    out = attnkit.attention(q, k, v, backend="flex", **kw)
    assert out.dtype == dtype
    assert_within(max_err(out, ref), max_err(low_precision_plain(q, k, v, add, 1 / math.sqrt(64)), ref), 2, 1e-5,
                  "output")


def test_what_flex_cannot_do_is_refused_in_one_message_listing_each_reason():
    q, k, v = qkv(heads=2, q_len=9, requires_grad=True)  # float64, with gradients
    with pytest.raises(ValueError, match=r"backend='flex' cannot run this call: it has no dropout; its CPU kernel "
                                         r"takes float32, float16 and bfloat16, not float64; its CPU kernel does not "
                                         r"return the log-sum-exp \(return_lse=True\); its CPU kernel has no "
                                         r"backward \(inputs require grad\)\. Use backend='tiled'"):
        attnkit.attention(q, k, v, dropout_p=0.1, return_lse=True, backend="flex")
    q, k, v = qkv(heads=2, q_len=9, dtype=torch.float32)
    learned = biases.from_tensor(torch.zeros(9, 9, requires_grad=True))
    with pytest.raises(ValueError, match="it gives no gradient to a tensor bias"):
        attnkit.attention(q, k, v, bias=learned, backend="flex")
    with pytest.raises(ValueError, match=r"the bias .*shifted.* has no score_mod form"):
        attnkit.attention(q, k, v, bias=biases.alibi(2).shifted(3, 3), backend="flex")


def test_the_block_mask_is_built_once_per_shape_and_mask(monkeypatch):
    built = []
    real = flex.to_flex
    monkeypatch.setattr(flex, "to_flex", lambda *a, **kw: built.append(a[3:5]) or real(*a, **kw))
    mask = masks.sliding_window(20)
    q, k, v = qkv(heads=2, q_len=200, head_dim=16, dtype=torch.float32)

    def prepared(q, mask):
        return flex._prepared(make_call(q, k, v, mask=mask, bias=None, scale=None, softcap=None, dropout_p=0.0,
                                        return_lse=False))

    first = prepared(q, mask)
    assert prepared(q, mask) == first and built == [(200, 200)]
    prepared(q[:, :, :150], mask)
    prepared(q, masks.sliding_window(20))  # another mask object: its own entry
    assert built == [(200, 200), (150, 200), (200, 200)]


def test_masks_that_print_alike_or_change_in_place_get_their_own_block_mask():
    # The BlockMask cache must not be keyed by what a mask prints: these two document masks print alike (two
    # documents each) but split the keys differently, and a document mask whose ids change in place is a new mask.
    q, k, v = qkv(heads=2, q_len=256, head_dim=16)
    halves = torch.tensor([0] * 128 + [1] * 128)
    ragged = torch.tensor([0] * 40 + [1] * 216)
    ids = torch.zeros(256, dtype=torch.int64)  # one document: every 128-block is full

    def check(mask):
        ref = attnkit.attention(q, k, v, mask=mask, backend="reference")
        out = attnkit.attention(q.float(), k.float(), v.float(), mask=mask, backend="flex")
        assert max_err(out, ref) < 1e-5, repr(mask)

    a, b = masks.document(halves), masks.document(ragged)
    assert repr(a) == repr(b)
    check(a)
    check(b)
    changing = masks.document(ids)
    check(changing)
    ids[128:] = 1  # now the two off-diagonal blocks are empty, not full
    check(changing)
