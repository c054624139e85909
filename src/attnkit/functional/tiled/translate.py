"""What the tiled backend's engines need to know of a mask, asked of the mask's structure: its translations.

A mask says which pairs are allowed and how its blocks look (:class:`attnkit.masks.Mask`); how an engine wants
that said is the engine's own business, here. Each function dispatches on the mask's type and answers None (or
False) where it has no exact form, so a user's own :class:`~attnkit.masks.Mask` subclass runs everywhere on the
general path:

* :func:`band_form`: the native kernel's arithmetic on positions (a band of diagonals, key lengths, document ids);
* :func:`causal_offset`: the batched engine's far part, run by PyTorch's ``is_causal`` below a diagonal;
* :func:`by_position`: whether the mask reads only ``b, h, i, j``, so the batched engine may evaluate it on its
  moving band of keys.

Biases alike: :func:`distance_form` (ALiBi as slopes and offsets, for the native kernel), :func:`bias_by_position`,
:func:`splits_by_side` and :func:`separable` (a bias as row plus column terms on a block wholly on one side of its
diagonal, so the fused kernel gets a small column instead of a materialised block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit._blocks import ScoreBlock
from attnkit.biases import ALiBi, Bias, Chain, Shifted
from attnkit.masks import And, ByDistance, Diagonal, Document, KeyPadding, Mask, Not, Or, PrefixLM

__all__ = ["BandForm", "band_form", "bias_by_position", "by_position", "causal_offset", "distance_form", "separable",
           "splits_by_side"]


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


def query_offset(mask: Mask | Tensor | None, q_len: int, k_len: int) -> int:
    """The key position of query 0: the diagonal of ``mask``'s causal or window part (a :class:`Diagonal`,
    alone or in an :class:`And`, without per-sequence lengths) in its own alignment, else ``k_len - q_len``
    (bottom-right, as in decoding with a cache)."""
    parts, diagonals = [mask], []
    while parts:
        part = parts.pop()
        if isinstance(part, And):
            parts += [part.b, part.a]
        elif isinstance(part, Diagonal) and part.lengths is None:
            diagonals.append(part.diagonal(q_len, k_len))
    return diagonals[0] if diagonals else k_len - q_len


def by_position(mask: Mask) -> bool:
    """Whether ``mask.allowed`` reads only the block's ``b, h, i, j`` index tensors (never its ranges),
    so it can be evaluated on any layout of indices, such as the batched engine's band of keys that
    moves with each query row."""
    if isinstance(mask, (And, Or)):
        return by_position(mask.a) and by_position(mask.b)
    if isinstance(mask, Not):
        return by_position(mask.a)
    return isinstance(mask, (Diagonal, PrefixLM))


# -- biases ------------------------------------------------------------------------------------------------------------


def distance_form(bias: Bias, q_len: int, k_len: int) -> tuple[Tensor, Tensor] | None:
    """``(slopes, offsets)`` if ``bias`` is exactly ``-slopes[h] * |i + offsets[b] - j|`` at these lengths (ALiBi),
    else None. ``slopes`` (H,) float, ``offsets`` int64 (B|1,)."""
    if not isinstance(bias, ALiBi):
        return None
    if bias.lengths is None:
        return bias.slopes, torch.tensor([0 if bias.align == "top_left" else k_len - q_len])
    return bias.slopes, bias.lengths.offsets(bias.align, q_len, k_len, torch.device("cpu")).to(torch.int64)


def bias_by_position(bias: Bias) -> bool:
    """Whether the bias reads only a block's ``b, h, i, j`` index tensors (so it can be evaluated on any layout of
    indices, such as the batched engine's moving band of keys)."""
    if isinstance(bias, Chain):
        return all(bias_by_position(b) for b in bias.items)
    return isinstance(bias, ALiBi)


def splits_by_side(bias: Bias) -> bool:
    """Whether, on each side of its diagonal, the bias is ``row(i) + col(j)`` everywhere (ALiBi), so
    :func:`separable` answers for any block wholly on one side."""
    if isinstance(bias, Chain):
        return all(splits_by_side(b) for b in bias.items)
    return isinstance(bias, ALiBi)


def separable(bias: Bias, block: ScoreBlock, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
    """On this block, the bias as ``row + col``, if it splits so: ``row`` broadcastable to (B, Hkv, bq, G, 1) and
    ``col`` to (B, Hkv, 1, G, bk). A row term only shifts a row's log-sum-exp, so the tiled backend can pass
    ``col`` to a kernel as a small broadcast tensor instead of materialising the block. None otherwise."""
    if isinstance(bias, Chain):
        terms = [separable(b, block, dtype) for b in bias.items]
        if any(t is None for t in terms):
            return None
        rows, cols = [t[0] for t in terms if t is not None], [t[1] for t in terms if t is not None]
        return sum(rows[1:], rows[0]), sum(cols[1:], cols[0])
    if isinstance(bias, Shifted):
        return separable(bias.inner, bias.whole(block), dtype)
    if isinstance(bias, ALiBi) and bias.lengths is None:
        return _alibi_sides(bias, block, dtype)
    return None


def _alibi_sides(bias: ALiBi, block: ScoreBlock, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
    # On a block wholly on one side of the diagonal, |i' - j| = +-(i' - r) -+ (j - r). The reference key r is the
    # block's key nearest the diagonal, so the column term is ~0 on the keys that carry the weight and loses no
    # precision there.
    offset = bias.offset(block)
    diag = block.i + offset  # (1, 1, bq, 1, 1)
    slopes = bias.slopes.to(device=block.device, dtype=dtype)[block.h]
    if block.k_stop - 1 <= block.q_start + offset:  # every j <= i'
        r = block.k_stop - 1
        return -slopes * (diag - r).to(dtype), slopes * (block.j - r).to(dtype)
    if block.k_start >= block.q_stop - 1 + offset:  # every j >= i'
        r = block.k_start
        return -slopes * (r - diag).to(dtype), -slopes * (block.j - r).to(dtype)
    return None
