"""What the tiled backend's engines need to know of a mask, asked of the mask's structure: its translations.

A mask says which pairs are allowed and how its blocks look (:class:`attnkit.masks.Mask`); how an engine wants
that said is the engine's own business, here. Each function dispatches on the mask's type and answers None (or
False) where it has no exact form, so a user's own :class:`~attnkit.masks.Mask` subclass runs everywhere on the
general path:

* :func:`band_form`: the native kernel's arithmetic on positions (a band of diagonals, key lengths, document ids);
* :func:`causal_offset`: the batched engine's far part, run by PyTorch's ``is_causal`` below a diagonal;
* :func:`by_position`: whether the mask reads only ``b, h, i, j``, so the batched engine may evaluate it on its
  moving band of keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit.masks import And, ByDistance, Diagonal, Document, KeyPadding, Mask, Not, Or, PrefixLM

__all__ = ["BandForm", "band_form", "by_position", "causal_offset"]


@dataclass(frozen=True)
class BandForm:
    """A mask as arithmetic on positions, per batch element ``b`` (see :func:`band_form`).

    Allowed: ``lo[b] <= j - i <= hi[b]`` and ``j < key_lengths[b]`` and, when ``q_ids`` is
    set, ``q_ids[b|0, i] == kv_ids[b|0, j]``. ``lo``, ``hi``, ``key_lengths``: int64 (B,)
    (B = 1 for a mask that is the same for every sequence); ``UNBOUNDED`` stands for no bound.
    ``q_ids`` (1|B, Lq), ``kv_ids`` (1|B, Lk): int64 document ids, or None.
    """

    UNBOUNDED = 1 << 62

    lo: Tensor
    hi: Tensor
    key_lengths: Tensor
    q_ids: Tensor | None = None
    kv_ids: Tensor | None = None

    def __and__(self, other: BandForm) -> BandForm | None:
        """Both at once, or None when both carry document ids (not one band form)."""
        if self.q_ids is not None and other.q_ids is not None:
            return None
        ids = self if self.q_ids is not None else other
        return BandForm(torch.maximum(self.lo, other.lo), torch.minimum(self.hi, other.hi),
                        torch.minimum(self.key_lengths, other.key_lengths), ids.q_ids, ids.kv_ids)

    @classmethod
    def unbounded(cls, k_len: int) -> BandForm:
        far = torch.full((1,), cls.UNBOUNDED, dtype=torch.int64)
        return cls(-far, far, torch.full((1,), k_len, dtype=torch.int64))


def band_form(mask: Mask, q_len: int, k_len: int) -> BandForm | None:
    """``mask`` as a :class:`BandForm` at these lengths, or None if it is not one: intersections of
    causal and sliding-window masks (either alignment, per-sequence lengths too), key padding by
    lengths and one document mask. Unions, complements, strided and dilated masks are not one band."""
    if isinstance(mask, And):
        a, b = band_form(mask.a, q_len, k_len), band_form(mask.b, q_len, k_len)
        return None if a is None or b is None else a & b
    form = BandForm.unbounded(k_len)
    if isinstance(mask, Diagonal) and not isinstance(mask, ByDistance):  # kept distances need not be one interval
        off = mask.diagonals(q_len, k_len, torch.device("cpu"))
        off = off.view(-1).to(torch.int64) if isinstance(off, Tensor) else torch.tensor([off])
        lo = form.lo if mask.left is None else off - mask.left
        hi = form.hi if mask.right is None else off + mask.right
        return BandForm(lo, hi, form.key_lengths)
    if isinstance(mask, Document):
        return BandForm(form.lo, form.hi, form.key_lengths, mask.q_ids.contiguous(), mask.kv_ids.contiguous())
    if isinstance(mask, KeyPadding) and mask.lengths is not None:  # valid= rows need not be a prefix of the keys
        return BandForm(form.lo, form.hi, torch.minimum(form.key_lengths, mask.lengths.to(torch.int64)))
    return None


def causal_offset(mask: Mask, q_len: int, k_len: int) -> int | None:
    """``s`` if ``mask`` is exactly ``j <= i + s`` at these lengths (causal in either alignment, or
    shifted), else None."""
    if isinstance(mask, Diagonal) and mask.left is None and mask.right is not None and mask.lengths is None:
        return mask.diagonal(q_len, k_len) + mask.right
    return None


def by_position(mask: Mask) -> bool:
    """Whether ``mask.allowed`` reads only the block's ``b, h, i, j`` index tensors (never its ranges),
    so it can be evaluated on any layout of indices, such as the batched engine's band of keys that
    moves with each query row."""
    if isinstance(mask, (And, Or)):
        return by_position(mask.a) and by_position(mask.b)
    if isinstance(mask, Not):
        return by_position(mask.a)
    return isinstance(mask, (Diagonal, PrefixLM))
