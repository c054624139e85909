"""Pattern scores: the kernels behind the head roles, on float64 probabilities (..., Lq, Lk)
that :func:`attnkit.inspect._views.resolve` has checked. Each returns float64 (...), one score
per head; the patterns are bool (Lq, Lk) matrices built on the CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "diagonal_pattern", "distance", "earlier_same", "entropy", "first_pattern", "induction_pattern", "monotonicity",
    "previous_pattern", "set_mass", "share", "top_key", "visible", "visible_all",
]


def share(t: Tensor, pattern: Tensor) -> Tensor:
    """sum(A * P) / sum(A) over the rows where ``pattern`` has any key; (..., Lq, Lk) -> (...)."""
    pattern = pattern.to(t.device)
    rows = pattern.any(-1)  # (Lq,)
    qi, kj = pattern.nonzero(as_tuple=True)  # patterns are sparse: read only their entries
    return t[..., qi, kj].sum(-1) / t.sum(-1)[..., rows].sum(-1)


def earlier_same(ids: Tensor) -> Tensor:
    """(L, L) bool: token j is an earlier occurrence of token i (j < i, ids[j] == ids[i])."""
    return (ids[:, None] == ids[None, :]).tril(-1)


def previous_pattern(length: int) -> Tensor:
    return torch.ones(length, length, dtype=torch.bool).tril(-1).triu(-1)


def induction_pattern(ids: Tensor) -> Tensor:
    pattern = torch.zeros(len(ids), len(ids), dtype=torch.bool)
    pattern[:, 1:] = earlier_same(ids)[:, :-1]  # key j follows an earlier occurrence j - 1 of token i
    return pattern


def first_pattern(q_len: int, k_len: int) -> Tensor:
    pattern = torch.zeros(q_len, k_len, dtype=torch.bool)
    pattern[:, :1] = True
    return pattern


def distance(t: Tensor) -> Tensor:
    pos = torch.arange(t.shape[-1], dtype=torch.float64, device=t.device)
    return (t * (pos[:, None] - pos[None, :]).abs()).sum((-2, -1)) / t.sum((-2, -1))


def entropy(t: Tensor, allowed: Tensor | None) -> Tensor:
    """Mean row entropy in nats; with ``allowed`` (Lq, Lk), divided by log(keys allowed in the row)."""
    total = t.sum(-1, keepdim=True)  # (..., Lq, 1)
    p = t / total.where(total > 0, 1.0)
    h = -torch.xlogy(p, p).sum(-1)  # (..., Lq), 0 log 0 = 0
    if allowed is None:
        counted = total.squeeze(-1) > 0
    else:
        keys = allowed.to(t.device).sum(-1, dtype=torch.float64)  # (Lq,)
        counted = (keys >= 2) & (total.squeeze(-1) > 0)
        h = h / keys.clamp(min=2).log()
    return (h * counted).sum(-1) / counted.sum(-1)


def visible(t: Tensor) -> Tensor:
    """(Lq, Lk) bool: keys that some head gives weight to; the mask is shared by the heads."""
    return (t > 0).flatten(0, -3).any(0) if t.dim() > 2 else t > 0


def diagonal_pattern(q_len: int, k_len: int) -> Tensor:
    """(Lq, Lk) bool: the keys the diagonal gives row i when the Lq rows are spread evenly over
    the Lk keys: row i covers ``[i * Lk / Lq, (i + 1) * Lk / Lq)`` and key j covers ``[j, j + 1)``;
    the keys that overlap it, ``floor(i * Lk / Lq) <= j <= max(floor(i * Lk / Lq), ceil((i + 1) * Lk / Lq) - 1)``.
    ``j == i`` when Lq == Lk, a run of about Lk / Lq keys when the keys are more, one or two when fewer."""
    i = torch.arange(q_len)
    low = i * k_len // q_len
    high = torch.maximum(low, -(-(i + 1) * k_len // q_len) - 1)
    j = torch.arange(k_len)
    return (j[None, :] >= low[:, None]) & (j[None, :] <= high[:, None])


def top_key(t: Tensor) -> Tensor:
    """Share of all the attention on the single most attended key; (..., Lq, Lk) -> (...)."""
    per_key = t.sum(-2)  # (..., Lk)
    return per_key.amax(-1) / per_key.sum(-1)


def monotonicity(t: Tensor, rows: Tensor) -> Tensor:
    """Share of successive counted rows whose argmax key does not move back; (..., Lq, Lk) -> (...)."""
    top = t[..., rows.to(t.device), :].argmax(-1)  # (..., counted rows); ties: the earliest key
    return (top[..., 1:] >= top[..., :-1]).to(torch.float64).mean(-1)  # NaN with fewer than two rows


def set_mass(t: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(t.device)
    return t[..., mask].sum((-2, -1)) / t.sum((-2, -1))


def visible_all(t: Tensor) -> Tensor:
    """:func:`visible` over every layer, one layer at a time."""
    seen = torch.zeros(t.shape[-2:], dtype=torch.bool, device=t.device)
    for layer in t:
        seen |= visible(layer)
    return seen
