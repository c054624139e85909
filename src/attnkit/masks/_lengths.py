"""Per-sequence alignment of masks and biases in a padded batch: :class:`Lengths`, and the diagonal's offset."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnkit._checks import int_vector, require_choice

_ALIGNS = ("top_left", "bottom_right")


def _offset(align: str, q_len: int, k_len: int) -> int:
    """Shift of the diagonal: query i sits at key position i + offset."""
    return 0 if align == "top_left" else k_len - q_len


_PADDINGS = ("right", "left")


class Lengths:
    """Per-sequence real lengths of a padded batch, for masks and biases that align to them.

    ``q_lengths`` (B,) and ``k_lengths`` (B,) count each sequence's real queries and keys
    (None: all Lq, or all Lk, are real). ``padding="right"`` puts the real tokens first,
    ``"left"`` puts them last.
    """

    def __init__(self, q_lengths: Sequence[int] | Tensor | None, k_lengths: Sequence[int] | Tensor | None,
                 padding: str):
        if q_lengths is None and k_lengths is None:
            raise TypeError("per-sequence alignment needs q_lengths=, k_lengths= or both")
        self.q = None if q_lengths is None else int_vector("q_lengths", q_lengths)
        self.k = None if k_lengths is None else int_vector("k_lengths", k_lengths)
        for name, t in (("q_lengths", self.q), ("k_lengths", self.k)):
            if t is not None and (t < 0).any():
                raise ValueError(f"{name} must be >= 0; got {t.tolist()}")
        if self.q is not None and self.k is not None and 1 not in (self.q.numel(), self.k.numel()) \
                and self.q.numel() != self.k.numel():
            raise ValueError(f"q_lengths and k_lengths must have one entry per batch element; got "
                             f"{self.q.numel()} and {self.k.numel()}")
        self.padding = require_choice("padding", padding, _PADDINGS)

    @property
    def batch(self) -> int:
        return max(t.numel() for t in (self.q, self.k) if t is not None)

    def check(self, batch: int, q_len: int, k_len: int) -> None:
        for name, t, length, what in (("q_lengths", self.q, q_len, "Lq"), ("k_lengths", self.k, k_len, "Lk")):
            if t is None:
                continue
            if t.numel() not in (1, batch):
                raise ValueError(f"{name} has {t.numel()} entries; expected 1 or batch={batch}")
            if int(t.max()) > length:
                raise ValueError(f"{name} must be <= {what}={length}; got {t.tolist()}")

    def offsets(self, align: str, q_len: int, k_len: int, device: torch.device) -> Tensor:
        """(B,) int64: sequence b's query i sits at key position i + offset[b] (padded coordinates)."""
        lq = torch.full((1,), q_len) if self.q is None else self.q
        lk = torch.full((1,), k_len) if self.k is None else self.k
        off = lk - lq if align == "bottom_right" else torch.zeros_like(lk - lq)
        if self.padding == "left":  # real tokens start at L - length
            off = off + (k_len - lk) - (q_len - lq)
        return off.to(device)

    def __repr__(self) -> str:
        parts = [f"{n}={t.tolist()}" for n, t in (("q_lengths", self.q), ("k_lengths", self.k)) if t is not None]
        return ", ".join(parts) + (", padding='left'" if self.padding == "left" else "")
