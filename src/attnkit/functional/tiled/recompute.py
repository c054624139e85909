"""The tiled backend's blocks of log-probabilities, one at a time, as its backward recomputes them.

:func:`log_prob_blocks` walks the per-chunk plan (:func:`.plan.chunk_plan`) with the math kernel's
segment size, so every block it yields holds at most ``_SCORE_BUDGET`` values, and gives each
block's masked, transformed scores (:func:`.kernels.segment_scores`) minus the row's log-sum-exp:
``exp`` of them are that block's probabilities, what the backward recomputes, and what
:mod:`attnkit.functional.stats` reduces to statistics. Nothing of size (Lq x Lk) is allocated.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from attnkit._blocks import ScoreBlock
from attnkit.functional._call import AttentionCall
from attnkit.functional.tiled.autograd import chunk_block, fold_groups
from attnkit.functional.tiled.kernels import segment_scores
from attnkit.functional.tiled.plan import chunk_plan, query_block
from attnkit.functional.tiled.strategy import Strategy

__all__ = ["fold_heads", "log_prob_blocks"]

_MATH = Strategy("math", False, False, ("statistics: the math kernel's segments, whose scores are bounded",))


def fold_heads(t: Tensor, kv_heads: int) -> Tensor:
    """(B, H, L, ...) -> (B, Hkv, L*G, ...), rows ordered (i, g): the layout of :func:`log_prob_blocks`' rows."""
    return fold_groups(t, kv_heads, t.shape[1] // kv_heads)


def log_prob_blocks(call: AttentionCall, shift: Tensor) -> Iterator[tuple[ScoreBlock, Tensor]]:
    """Each block of ``call``'s log-probabilities ``s - shift`` that the mask allows at all, in the compute dtype.

    ``shift`` (B, Hkv, Lq, G): each row's log-sum-exp in the folded layout (:func:`fold_heads`); a large
    finite value (not inf) for a row that should get no weight. Yields ``(block, t)``: ``t`` (B, Hkv, bq, G, bk)
    in ``block``'s layout (see :mod:`attnkit._blocks`), the scores after scale, softcap and biases minus the
    row's shift, and the lowest finite value where the mask forbids a pair (so ``exp(t)`` is 0 there and
    ``exp(t) * t`` is 0, not NaN). Blocks the mask rules out entirely are skipped; each block holds at most
    ``_SCORE_BUDGET`` values. Without softcap and bias, scale and shift are one pass over the scores
    (``-shift + scale * q.k``). Runs without gradients.
    """
    cd = call.compute_dtype
    lowest = torch.finfo(cd).min
    g = call.groups
    q_rows = fold_heads(call.q.detach().to(cd), call.kv_heads)  # (B, Hkv, Lq*G, D)
    k = call.k.detach().to(cd)
    shift_rows = shift.reshape(call.batch, call.kv_heads, -1, 1)  # (B, Hkv, Lq*G, 1)
    plain = call.softcap is None and call.bias is None
    with torch.no_grad():
        for chunk in chunk_plan(call, query_block(call), _MATH):
            rows = slice(chunk.q_start * g, chunk.q_stop * g)
            q_c = q_rows[:, :, rows]
            for seg in chunk.segments:
                block = chunk_block(call, chunk, seg, q_rows.device)
                k_seg = k[:, :, seg.k_start : seg.k_stop]
                if plain:  # the scores as the reference computes them, (q.k) * scale, less the shift
                    t = torch.add(-shift_rows[:, :, rows], q_c @ k_seg.transpose(-1, -2), alpha=call.scale)
                    t = t.view(block.shape)
                    if seg.partial and call.mask is not None:
                        t.masked_fill_(~call.mask.allowed(block), lowest)
                else:
                    t = segment_scores(call, block, seg, q_c, k_seg)
                    t.sub_(shift_rows[:, :, rows].view(*block.shape[:4], 1))
                    t.clamp_(min=lowest)
                yield block, t
