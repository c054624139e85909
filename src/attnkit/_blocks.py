"""Coordinates of a block of attention scores, shared by masks, biases and backends.

Einsum letters used throughout attnkit:

    b  batch            h  query head         g  query head within its key/value group
    i  query position   j  key position       d  head dim        e  value head dim

A block's scores are laid out as ``(B, Hkv, bq, G, bk)``: query heads are folded into
groups that share one key/value head (``h = hkv * G + g``), so grouped-query attention
never copies keys or values. The reference backend uses the same layout with
``Hkv = H, G = 1``. Masks and biases are evaluated against a :class:`ScoreBlock` and
return tensors broadcastable to that layout, so every backend obeys one definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

EMPTY, PARTIAL, FULL = 0, 1, 2
"""Block states: no pair allowed, some pairs allowed, every pair allowed."""


@dataclass(frozen=True)
class ScoreBlock:
    """Queries ``[q_start, q_stop)`` against keys ``[k_start, k_stop)`` of one call."""

    batch: int
    kv_heads: int
    groups: int
    q_len: int
    k_len: int
    q_start: int
    q_stop: int
    k_start: int
    k_stop: int
    device: torch.device

    @property
    def heads(self) -> int:
        return self.kv_heads * self.groups

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (
            self.batch,
            self.kv_heads,
            self.q_stop - self.q_start,
            self.groups,
            self.k_stop - self.k_start,
        )

    def _arange(self, start: int, stop: int) -> Tensor:
        return torch.arange(start, stop, device=self.device)

    @cached_property
    def b(self) -> Tensor:
        """Batch index, shape (B, 1, 1, 1, 1)."""
        return self._arange(0, self.batch).view(-1, 1, 1, 1, 1)

    @cached_property
    def h(self) -> Tensor:
        """Query head index, shape (1, Hkv, 1, G, 1)."""
        return self._arange(0, self.heads).view(1, self.kv_heads, 1, self.groups, 1)

    @cached_property
    def i(self) -> Tensor:
        """Query position, shape (1, 1, bq, 1, 1)."""
        return self._arange(self.q_start, self.q_stop).view(1, 1, -1, 1, 1)

    @cached_property
    def j(self) -> Tensor:
        """Key position, shape (1, 1, 1, 1, bk)."""
        return self._arange(self.k_start, self.k_stop).view(1, 1, 1, 1, -1)

    def take(self, t: Tensor) -> Tensor:
        """Slice a tensor broadcastable to (B, H, Lq, Lk) into this block's layout.

        ``t`` must be 4-D with each dim either 1 or full size (checked by the caller).
        Returns a view of shape (B|1, Hkv|1, bq|1, G|1, bk|1) when the head dim is 1,
        else a permuted view.
        """
        if t.shape[2] != 1:
            t = t[:, :, self.q_start : self.q_stop]
        if t.shape[3] != 1:
            t = t[:, :, :, self.k_start : self.k_stop]
        return self.to_layout(t)

    def to_layout(self, t: Tensor) -> Tensor:
        """A block-local (B|1, H|1, bq|1, bk|1) tensor as a view in this block's layout,
        (B|1, Hkv|1, bq|1, G|1, bk|1)."""
        if t.shape[1] == 1:
            return t.unsqueeze(3)  # (B|1, 1, bq|1, 1, bk|1)
        t = t.unflatten(1, (self.kv_heads, self.groups))  # (B|1, Hkv, G, bq|1, bk|1)
        return t.transpose(2, 3)

    def untake(self, grad: Tensor, like: Tensor) -> Tensor:
        """Inverse of :meth:`take` for a gradient of ``take(like)``'s shape.

        Returns a tensor shaped like ``like``'s slice for this block: (B|1, H|1, bq|1, bk|1).
        """
        if like.shape[1] == 1:
            return grad.squeeze(3)
        return grad.transpose(2, 3).flatten(1, 2)

    def slices(self, t: Tensor) -> tuple[slice, slice, slice, slice]:
        """The index of this block within a (B|1, H|1, Lq|1, Lk|1) tensor ``t``."""
        rows = slice(self.q_start, self.q_stop) if t.shape[2] != 1 else slice(None)
        cols = slice(self.k_start, self.k_stop) if t.shape[3] != 1 else slice(None)
        return slice(None), slice(None), rows, cols


def block_bounds(length: int, size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Start and stop (exclusive) of each block of ``size`` over ``length`` positions."""
    starts = torch.arange(0, length, size, device=device)
    stops = torch.clamp(starts + size, max=length)
    return starts, stops


def states(empty: Tensor, full: Tensor) -> Tensor:
    """Combine boolean empty/full maps into EMPTY / PARTIAL / FULL codes (int8)."""
    out = torch.full(empty.shape, PARTIAL, dtype=torch.int8, device=empty.device)
    out[full] = FULL
    out[empty] = EMPTY
    return out


def reduce_over_batch(per_batch: Tensor) -> Tensor:
    """Aggregate per-batch (or per-head) block states (N, nq, nk) into one map (nq, nk).

    A block may be skipped only if it is empty for every batch element, and may skip
    mask work only if it is full for every batch element.
    """
    empty = (per_batch == EMPTY).all(0)
    full = (per_batch == FULL).all(0)
    return states(empty, full)
