"""The reference backend: the one readable, materialising copy of the math.

It builds the full (B, H, Lq, Lk) score matrix, so it is O(Lq * Lk) in memory. It runs in
float64 when given float64 and supports every option; tests and inspection compare
against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit._blocks import ScoreBlock
from attnkit.functional._call import AttentionCall, dropout_keep, transform_scores


def masked_softmax(s: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last dim, and its log-sum-exp, with -inf entries masked.

    A row whose entries are all -inf gets probabilities 0 and lse -inf, with finite
    (zero) gradients.
    """
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    total = e.sum(-1, keepdim=True)
    some = total > 0
    safe = torch.where(some, total, torch.ones_like(total))
    probs = e / safe
    # log(0) would put an infinite derivative on an empty row, and 0 * inf = NaN in the
    # backward even where the loss masks that row's lse out; the row gets -inf by where.
    lse = torch.where(some, m + torch.log(safe), float("-inf")).squeeze(-1)
    return probs, lse


def reference_forward(call: AttentionCall) -> tuple[Tensor, Tensor, Tensor]:
    """Return (out, lse, probs): out in the input dtype, lse and probs in the compute dtype."""
    cd = call.compute_dtype
    q, k, v = call.q.to(cd), call.k.to(cd), call.v.to(cd)
    k = k.repeat_interleave(call.groups, dim=1)  # (B, H, Lk, D)
    v = v.repeat_interleave(call.groups, dim=1)  # (B, H, Lk, Dv)
    block = ScoreBlock(call.batch, call.heads, 1, call.q_len, call.k_len,
                       0, call.q_len, 0, call.k_len, q.device)

    raw = (q @ k.transpose(-1, -2)) * call.scale  # (B, H, Lq, Lk)
    s = transform_scores(raw.unsqueeze(3), block, call)  # (B, H, Lq, 1, Lk)
    if call.mask is not None:
        s = s.masked_fill(~call.mask.allowed(block), float("-inf"))
    probs, lse = masked_softmax(s.squeeze(3))

    weights = probs
    if call.dropout_p > 0:
        keep = dropout_keep(call, block).squeeze(3)
        weights = probs * keep / (1.0 - call.dropout_p)
    out = weights @ v  # (B, H, Lq, Dv)
    return out.to(call.q.dtype), lse, probs


class ReferenceBackend:
    name = "reference"
    summary = "materialises (Lq x Lk) scores; float64 when given float64; every option"
    features: tuple[str, ...] = ("every mask", "every bias", "softcap", "dropout", "GQA/MQA", "Lq != Lk",
                "Dv != D", "return_lse", "probabilities", "any device")

    def supports(self, call: AttentionCall) -> str | None:
        return None

    def run(self, call: AttentionCall) -> tuple[Tensor, Tensor]:
        out, lse, _ = reference_forward(call)
        return out, lse
