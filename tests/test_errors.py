"""Every bad input gets a ValueError/TypeError naming the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import biases, masks

from conftest import qkv


def good():
    return qkv(2, 4, 2, 7, 9, 8, dtype=torch.float32)


@pytest.mark.parametrize(("change", "error", "message"), [
    (lambda q, k, v: (q[0], k, v), ValueError, r"q must be 4-D \(batch, heads, length, head_dim\); got a 3-D"),
    (lambda q, k, v: (q, k.unsqueeze(0), v), ValueError, "k must be 4-D"),
    (lambda q, k, v: (q.numpy(), k, v), TypeError, "q must be a torch.Tensor; got ndarray"),
    (lambda q, k, v: (q.int(), k, v), TypeError, "q must be float16, bfloat16, float32 or float64"),
    (lambda q, k, v: (q.double(), k, v), TypeError, "q, k and v must share one dtype; got q torch.float64"),
    (lambda q, k, v: (q, k[:1], v[:1]), ValueError, "q, k and v must share the batch size; got q 2, k 1"),
    (lambda q, k, v: (q[:, :3], k, v), ValueError, r"q's heads \(3\) must be a multiple of k's and v's heads \(2\)"),
    (lambda q, k, v: (q, k[:, :1], v), ValueError, "k and v must have the same number of heads"),
    (lambda q, k, v: (q[..., :6], k, v), ValueError, "q and k must have the same head_dim; got q 6, k 8"),
    (lambda q, k, v: (q, k, v[:, :, :5]), ValueError, "k and v must have the same length; got k 9, v 5"),
    (lambda q, k, v: (q, k, v.to("meta")), ValueError, "q, k and v must be on one device"),
])
def test_bad_tensors(change, error, message):
    with pytest.raises(error, match=message):
        attnkit.attention(*change(*good()))


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"dropout_p": 1.0}, ValueError, r"dropout_p must be in \[0, 1\); got 1.0"),
    ({"dropout_p": -0.1}, ValueError, "dropout_p must be in"),
    ({"dropout_p": "0.1"}, TypeError, "dropout_p must be a real number"),
    ({"backend": "flash"}, ValueError,
     "backend must be 'auto' or one of 'sdpa', 'flex', 'tiled', 'reference'; got 'flash'"),
    ({"backend": None}, TypeError, "backend must be a str"),
    ({"softcap": 0.0}, ValueError, "softcap must be > 0"),
    ({"scale": float("nan")}, ValueError, "scale must be finite"),
    ({"return_lse": 1}, TypeError, "return_lse must be a bool"),
    ({"mask": torch.ones(3, 7, 9, dtype=torch.bool)}, ValueError,
     r"mask of shape \(3, 7, 9\) cannot broadcast to \(batch, heads, Lq, Lk\) = \(2, 4, 7, 9\): its heads dim is 3"),
    ({"mask": torch.ones(7, 8, dtype=torch.bool)}, ValueError, "its Lk dim is 8, expected 1 or 9"),
    ({"mask": torch.zeros(7, 9)}, TypeError, "mask tensor must be bool"),
    ({"mask": "causal"}, TypeError, "mask must be an attnkit mask or a bool tensor; got str"),
    ({"bias": torch.zeros(5, 7, 9)}, ValueError, "bias of shape .* its heads dim is 5"),
    ({"bias": torch.zeros(7, 9, dtype=torch.int64)}, TypeError, "bias tensor must be floating point"),
    ({"bias": 3.0}, TypeError, "bias must be an attnkit bias, a float tensor or a list of them"),
    ({"bias": biases.alibi(8)}, ValueError, "alibi has 8 slopes but the query has 4 heads"),
    ({"mask": masks.document(torch.zeros(5, dtype=torch.long))}, ValueError,
     "document q_ids has length 5; expected Lq=7"),
    ({"mask": masks.key_padding([3, 4, 5])}, ValueError, "key_padding lengths has 3 entries; expected batch=2"),
    ({"mask": masks.key_padding([3, 10])}, ValueError, r"key_padding lengths must be <= Lk=9; got \[3, 10\]"),
    ({"mask": masks.key_padding(valid=torch.ones(2, 5, dtype=torch.bool))}, ValueError,
     "key_padding valid has length 5; expected Lk=9"),
    ({"mask": masks.global_tokens([20])}, ValueError, r"global_tokens positions must be < max\(Lq, Lk\) = 9"),
    ({"mask": masks.prefix_lm(torch.tensor([1, 2, 3]))}, ValueError, "prefix_length has 3 entries"),
])
def test_bad_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        attnkit.attention(*good(), **kwargs)


def test_score_mod_must_return_a_tensor():
    with pytest.raises(TypeError, match="score_mod 'bad' must return a score tensor; got float"):
        attnkit.attention(*good(), bias=biases.score_mod(lambda s, b, h, i, j: 1.0, name="bad"),
                          backend="reference")


def test_alibi_arguments():
    with pytest.raises(TypeError, match="exactly one of num_heads or slopes="):
        biases.alibi()
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        biases.alibi_slopes(0)
    with pytest.raises(ValueError, match="slopes must be a 1-D float tensor"):
        biases.alibi(slopes=torch.ones(2, 2))
