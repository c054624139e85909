"""Flex-style index functions, evaluated on a block: one contract for ``masks.from_function`` and ``biases.score_mod``.

FlexAttention calls ``mask_mod(b, h, q_idx, kv_idx)`` and ``score_mod(score, b, h, q_idx, kv_idx)`` once per
position through ``torch.vmap``, so each argument is a 0-d tensor there. attnkit evaluates a whole block at once
and tries that first: the function gets index tensors of one fixed 4-D layout,

    b (B, 1, 1, 1)   h (1, H, 1, 1)   q_idx (1, 1, bq, 1)   kv_idx (1, 1, 1, bk)   score (B, H, bq, bk)

whatever the backend, and must return a tensor that broadcasts to (B, H, bq, bk) (fewer dimensions are
leading ones: a 0-d ``True`` allows everything). Functions written for 0-d indices (``doc[q_idx]`` works
both ways, but ``bias[q_idx][kv_idx]``, ``torch.dot`` or ``interval[0]`` on an index do not) fail that call or
return a wrong shape; they are then evaluated as Flex does, with ``torch.vmap`` over every position.

Which style a function has is decided on its first block, once per function object: the broadcast answer is
also compared with the per-position one at up to 81 positions (every combination of first, middle and last
b, h, q_idx, kv_idx), and a function whose broadcast answer differs there is evaluated per position from then
on. Per-position evaluation is exact and one to two orders of magnitude slower than a broadcast call (it
materialises four index tensors of the block's size, in chunks of 1M positions; docs/core.md has the measured
table, from benchmarks/flex_functions.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor

from attnkit._blocks import ScoreBlock
from attnkit._checks import describe

_CHUNK = 1 << 20  # positions per vmap call


class IndexFunction:
    """``fn`` of ``(b, h, q_idx, kv_idx)``, or of ``(score, b, h, q_idx, kv_idx)`` when ``with_score``.

    ``what`` names it in errors (``"mask function 'doc'"``); ``index_dtype`` is the indices' dtype.
    """

    def __init__(self, fn: Callable[..., Tensor], what: str, *, with_score: bool, index_dtype: torch.dtype):
        self.fn = fn
        self.what = what
        self.with_score = with_score
        self.index_dtype = index_dtype
        self.per_position: bool | None = None  # decided on the first block

    def on_block(self, block: ScoreBlock, score: Tensor | None = None) -> Tensor:
        """``fn`` over ``block``, in its (B|1, Hkv|1, bq|1, G|1, bk|1) layout.

        ``score`` (``with_score`` only) is the block's scores, broadcastable to ``block.shape``.
        """
        shape = (block.batch, block.heads, block.q_stop - block.q_start, block.k_stop - block.k_start)
        if 0 in shape:  # nothing to evaluate, and nothing to decide the function's style from
            dtype = torch.bool if score is None else score.dtype
            return block.to_layout(torch.zeros(shape, dtype=dtype, device=block.device))
        dt = self.index_dtype
        idx = (block.b.to(dt).reshape(-1, 1, 1, 1), block.h.to(dt).reshape(1, -1, 1, 1),
               block.i.to(dt).reshape(1, 1, -1, 1), block.j.to(dt).reshape(1, 1, 1, -1))
        args: tuple[Tensor, ...] = idx
        if self.with_score:
            assert score is not None
            s = score.expand(block.shape).transpose(2, 3).reshape(shape)  # (B, H, bq, bk)
            args = (s, *idx)
        if self.per_position:
            out = self._per_position(args, shape)
        else:
            broadcast = self._broadcast(args, shape)
            if isinstance(broadcast, str):  # the broadcast call failed: this function is written for 0-d indices
                self.per_position, out = True, self._per_position(args, shape, broadcast)
            elif self.per_position is None and not self._agrees(broadcast, args, shape):
                self.per_position, out = True, self._per_position(args, shape)
            else:
                self.per_position, out = False, broadcast
        return block.to_layout(out.reshape((1,) * (4 - out.dim()) + tuple(out.shape)))

    def _broadcast(self, args: tuple[Tensor, ...], shape: tuple[int, ...]) -> Tensor | str:
        """The broadcast call's result, or why it does not fit."""
        try:
            out = self.fn(*args)
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        out = self._check(out)
        if out.dim() > 4 or any(n not in (1, m) for n, m in zip(reversed(out.shape), reversed(shape))):
            return f"it returned shape {tuple(out.shape)}, which does not broadcast to {shape}"
        return out

    def _per_position(self, args: tuple[Tensor, ...], shape: tuple[int, ...], failure: str = "") -> Tensor:
        """``fn`` on 0-d arguments at every position of ``shape`` (none of them 0), as FlexAttention calls it."""
        total = shape[0] * shape[1] * shape[2] * shape[3]
        device = args[-1].device
        parts = [self._vmapped(_at(args, shape, torch.arange(start, min(total, start + _CHUNK), device=device)),
                               failure) for start in range(0, total, _CHUNK)]
        return torch.cat(parts).view(shape)

    def _vmapped(self, flat_args: tuple[Tensor, ...], failure: str) -> Tensor:
        try:
            out = torch.vmap(self.fn)(*flat_args)
        except Exception as e:
            tried = f"; called with broadcast index tensors, {failure}" if failure else ""
            raise ValueError(
                f"{self.what} raised {type(e).__name__}: {e} (called per position through torch.vmap with 0-d "
                f"index tensors, as FlexAttention does{tried}). It must be a function of tensors without Python "
                "control flow on their values: use torch.where instead of if") from e
        out = self._check(out)
        if out.shape != flat_args[-1].shape:
            raise ValueError(f"{self.what} must return one value per position; called with 0-d indices it "
                             f"returned shape {tuple(out.shape[1:])}")
        return out

    def _agrees(self, out: Tensor, args: tuple[Tensor, ...], shape: tuple[int, ...]) -> bool:
        """Whether the broadcast answer equals the per-position one at a few positions (True if the
        function cannot run per position: it was written for broadcast tensors)."""
        picks = [sorted({0, n // 2, n - 1}) for n in shape]
        points = torch.tensor(list(itertools.product(*picks)), device=args[-1].device)  # (P, 4)
        flat = (((points[:, 0] * shape[1] + points[:, 1]) * shape[2] + points[:, 2]) * shape[3] + points[:, 3])
        with torch.no_grad():
            try:
                expected = torch.vmap(self.fn)(*_at(args, shape, flat))
            except Exception:
                return True
            got = out.expand(shape).reshape(-1)[flat]
            if not isinstance(expected, Tensor) or expected.shape != got.shape:
                return True
            if got.dtype == torch.bool:
                return bool(torch.equal(got, expected.to(torch.bool)))
            return bool(torch.allclose(got, expected.to(got.dtype), rtol=1e-6, atol=1e-6, equal_nan=True))

    def _check(self, out: object) -> Tensor:
        """``out`` if it is a tensor of the right kind; raise TypeError naming the function otherwise."""
        kind = "a score tensor" if self.with_score else "a bool tensor"
        if not isinstance(out, Tensor):
            raise TypeError(f"{self.what} must return {kind}; got {describe(out)}")
        if not self.with_score and out.dtype != torch.bool:
            raise TypeError(f"{self.what} must return a bool tensor (True = may attend); got dtype {out.dtype}. "
                            "Compare instead of computing, e.g. (q_idx >= kv_idx)")
        return out


def _at(args: tuple[Tensor, ...], shape: tuple[int, ...], flat: Tensor) -> tuple[Tensor, ...]:
    """Each argument (4-D, each dim 1 or full) at the flat positions ``flat`` of ``shape``, as 1-D tensors."""
    coords = torch.unravel_index(flat, shape)
    zero = torch.zeros_like(flat)
    return tuple(a[tuple(c if a.shape[d] != 1 else zero for d, c in enumerate(coords))] for a in args)
