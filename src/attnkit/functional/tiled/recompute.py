"""The tiled backend's blocks of scores, one at a time, as its backward recomputes them.

:func:`score_blocks` walks the per-chunk plan (:func:`.plan._plan`) with the math kernel's
segment size, so every block it yields holds at most ``_SCORE_BUDGET`` scores, and gives
each block's masked, transformed scores (:func:`.kernels._scores`). With a row's
log-sum-exp, ``exp(scores - lse)`` are that block's probabilities: what the backward
recomputes, and what :mod:`attnkit.functional.stats` reduces to statistics. Nothing of
size (Lq x Lk) is allocated.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from attnkit._blocks import ScoreBlock
from attnkit.functional._call import AttentionCall
from attnkit.functional.tiled.autograd import _chunk_block, _fold
from attnkit.functional.tiled.kernels import _scores
from attnkit.functional.tiled.plan import _block_q, _plan
from attnkit.functional.tiled.strategy import Strategy

__all__ = ["fold_heads", "score_blocks"]

_MATH = Strategy("math", False, False, ("statistics: the math kernel's segments, whose scores are bounded",))


def fold_heads(t: Tensor, kv_heads: int) -> Tensor:
    """(B, H, L, ...) -> (B, Hkv, L*G, ...), rows ordered (i, g): the layout of :func:`score_blocks`' rows."""
    return _fold(t, kv_heads, t.shape[1] // kv_heads)


def score_blocks(call: AttentionCall) -> Iterator[tuple[ScoreBlock, bool, Tensor]]:
    """Each block of ``call``'s scores that the mask allows at all, in the compute dtype.

    Yields ``(block, partial, scores)``: ``scores`` (B, Hkv, bq, G, bk) in ``block``'s layout
    (see :mod:`attnkit._blocks`), after scale, softcap, biases and, where ``partial``, the mask
    (-inf where a pair is not allowed). Blocks the mask rules out entirely are skipped; each
    block holds at most ``_SCORE_BUDGET`` scores. Runs without gradients.
    """
    cd = call.compute_dtype
    q_rows = fold_heads(call.q.detach().to(cd), call.kv_heads)  # (B, Hkv, Lq*G, D)
    k = call.k.detach().to(cd)
    g = call.groups
    with torch.no_grad():
        for chunk in _plan(call, _block_q(call), _MATH):
            q_c = q_rows[:, :, chunk.q_start * g : chunk.q_stop * g]
            for seg in chunk.segments:
                block = _chunk_block(call, chunk, seg, q_rows.device)
                yield block, seg.partial, _scores(call, block, seg, q_c, k[:, :, seg.k_start : seg.k_stop])
