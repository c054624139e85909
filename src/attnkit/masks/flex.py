"""FlexAttention's terms for attnkit masks: :func:`mask_mod` (Flex's elementwise function) and :func:`to_flex`
(with the ``BlockMask``). The masks themselves know nothing of Flex; this is its translation of each built-in
mask, from their public fields."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attnkit._blocks import FULL, PARTIAL
from attnkit._checks import require_int
from attnkit.masks._analytic import Dense, Diagonal, Document, Function, GlobalTokens, KeyPadding, PrefixLM
from attnkit.masks._core import And, Mask, MaskMod, Not, Or, Shifted, as_mask
from attnkit.masks._literature import BigBird, ByDistance, Chunked, FromBlocks

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

# -- FlexAttention -------------------------------------------------------------------------


def to_flex(mask: Mask, B: int | None, H: int | None, Lq: int, Lk: int, *,
            block_size: int | tuple[int, int] = 128,
            device: torch.device | str = "cpu") -> tuple[BlockMask, MaskMod]:
    """``mask`` as FlexAttention's ``(BlockMask, mask_mod)`` for a (B, H, Lq, Lk) call.

    The ``mask_mod`` is :func:`mask_mod` at these lengths; the ``BlockMask`` is built
    from :meth:`Mask.block_states` (analytic for built-ins, cached for
    :func:`from_function`), not by evaluating ``mask_mod`` again, and is shared by every
    batch element and head (B and H only widen the states to the mask's variation).
    Blocks at a ragged edge are marked partial, as Flex's ``create_block_mask`` marks
    them, so the kernel applies ``mask_mod`` there. Needs a torch with
    ``torch.nn.attention.flex_attention`` (ImportError otherwise).

    >>> block_mask, mask_mod = to_flex(causal(), None, None, 256, 256)  # doctest: +SKIP
    >>> flex_attention(q, k, v, block_mask=block_mask)  # doctest: +SKIP
    """
    from torch.nn.attention.flex_attention import BlockMask

    mask = as_mask("mask", mask)
    q_len, k_len = require_int("Lq", Lq, minimum=1), require_int("Lk", Lk, minimum=1)
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    bq, bk = require_int("block_q", bq, minimum=1), require_int("block_k", bk, minimum=1)
    mb, mh = mask.extent()
    batch, heads = B or mb, H or mh
    device = torch.device(device)
    mask.check(batch, heads, q_len, k_len, device)
    state = mask.block_states(q_len, k_len, bq, bk, batch=batch, heads=heads).clone()
    if q_len % bq:
        state[-1][state[-1] == FULL] = PARTIAL
    if k_len % bk:
        state[:, -1][state[:, -1] == FULL] = PARTIAL

    def blocks(which: Tensor) -> tuple[Tensor, Tensor]:
        order = torch.argsort((~which).to(torch.int8), dim=-1, stable=True)  # listed blocks first
        return (which.sum(-1).to(torch.int32)[None, None].to(device),
                order.to(torch.int32)[None, None].contiguous().to(device))

    mod = mask_mod(mask, q_len, k_len)
    block_mask = BlockMask.from_kv_blocks(*blocks(state == PARTIAL), *blocks(state == FULL), BLOCK_SIZE=(bq, bk),
                                          mask_mod=mod, seq_lengths=(q_len, k_len))
    return block_mask, mod


def mask_mod(mask: Mask, q_len: int, k_len: int) -> MaskMod:
    """``mask`` at lengths (Lq, Lk) as FlexAttention's ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``.

    Built-in masks compute it from the indices (broadcast tensors or Flex's 0-d ones). A subclass that defines
    :meth:`Mask.mask_mod` itself gives its own (a subclass of a built-in mask too); any other mask is
    materialised once, (B|1, H|1, Lq, Lk), and indexed.

    >>> import torch
    >>> from attnkit import masks
    >>> fn = mask_mod(masks.sliding_window(1), 4, 4)
    >>> fn(torch.tensor(0), torch.tensor(0), torch.tensor(3), torch.arange(4))
    tensor([False, False,  True,  True])
    """
    for cls in type(mask).__mro__:
        if cls is Mask:
            break
        if "mask_mod" in vars(cls):  # the mask defines itself by its mask_mod
            return mask.mask_mod(q_len, k_len)
        if cls in _MODS:
            return _MODS[cls](mask, q_len, k_len)
    return _materialised_mod(mask, q_len, k_len)


def builtin_mask_mod(mask: Mask, q_len: int, k_len: int) -> MaskMod:
    """:func:`mask_mod` without asking the mask's own ``mask_mod`` (what :meth:`Mask.mask_mod` gives, so that a
    subclass's ``super().mask_mod()`` does not come back to it): the built-in translation, else materialised."""
    for cls in type(mask).__mro__:
        if cls in _MODS:
            return _MODS[cls](mask, q_len, k_len)
    return _materialised_mod(mask, q_len, k_len)


def _materialised_mod(mask: Mask, q_len: int, k_len: int) -> MaskMod:
    """The mask materialised once, (B|1, H|1, Lq, Lk), and indexed."""
    if type(mask).allowed is Mask.allowed:
        raise NotImplementedError(f"{type(mask).__name__} must implement allowed() or mask_mod()")
    mb, mh = mask.extent()
    dense = mask.to_dense(q_len, k_len, batch=mb).reshape(mb, mh, q_len, k_len)

    def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return dense[b if mb > 1 else 0, h if mh > 1 else 0, q_idx, kv_idx]

    return mod


def _and_mod(mask: And, q_len: int, k_len: int) -> MaskMod:
    fa, fb = mask_mod(mask.a, q_len, k_len), mask_mod(mask.b, q_len, k_len)
    return lambda b, h, q_idx, kv_idx: fa(b, h, q_idx, kv_idx) & fb(b, h, q_idx, kv_idx)


def _or_mod(mask: Or, q_len: int, k_len: int) -> MaskMod:
    fa, fb = mask_mod(mask.a, q_len, k_len), mask_mod(mask.b, q_len, k_len)
    return lambda b, h, q_idx, kv_idx: fa(b, h, q_idx, kv_idx) | fb(b, h, q_idx, kv_idx)


def _not_mod(mask: Not, q_len: int, k_len: int) -> MaskMod:
    fa = mask_mod(mask.a, q_len, k_len)
    return lambda b, h, q_idx, kv_idx: ~fa(b, h, q_idx, kv_idx)


def _shifted_mod(mask: Shifted, q_len: int, k_len: int) -> MaskMod:
    fn = mask_mod(mask.inner, *mask._totals(q_len, k_len))
    qo, ko = mask.q_offset, mask.k_offset
    return lambda b, h, q_idx, kv_idx: fn(b, h, q_idx + qo, kv_idx + ko)


def _diagonal_mod(mask: Diagonal, q_len: int, k_len: int) -> MaskMod:
    if mask.lengths is None:
        off = mask.diagonal(q_len, k_len)
        return lambda b, h, q_idx, kv_idx: mask._within(kv_idx - (q_idx + off))
    offs = mask.lengths.offsets(mask.align, q_len, k_len, torch.device("cpu"))
    many = offs.numel() > 1
    return lambda b, h, q_idx, kv_idx: mask._within(kv_idx - (q_idx + offs.to(q_idx.device)[b if many else 0]))


def _prefixlm_mod(mask: PrefixLM, q_len: int, k_len: int) -> MaskMod:
    causal, prefix, many = mask_mod(mask._causal, q_len, k_len), mask.prefix, mask.prefix.numel() > 1

    def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        p = prefix.to(kv_idx.device)[b if many else 0]
        return causal(b, h, q_idx, kv_idx) | (kv_idx < p)

    return mod


def _globaltokens_mod(mask: GlobalTokens, q_len: int, k_len: int) -> MaskMod:
    gq, gk = mask._flags(q_len, torch.device("cpu")), mask._flags(k_len, torch.device("cpu"))
    return lambda b, h, q_idx, kv_idx: gq.to(q_idx.device)[q_idx] | gk.to(kv_idx.device)[kv_idx]


def _document_mod(mask: Document, q_len: int, k_len: int) -> MaskMod:
    q_ids, kv_ids = mask.q_ids, mask.kv_ids
    many_q, many_k = q_ids.shape[0] > 1, kv_ids.shape[0] > 1

    def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        qi = q_ids.to(q_idx.device)[b if many_q else 0, q_idx]
        kj = kv_ids.to(kv_idx.device)[b if many_k else 0, kv_idx]
        return qi == kj

    return mod


def _keypadding_mod(mask: KeyPadding, q_len: int, k_len: int) -> MaskMod:
    valid = mask.valid_rows(k_len, torch.device("cpu"))
    many = valid.shape[0] > 1
    return lambda b, h, q_idx, kv_idx: valid.to(kv_idx.device)[b if many else 0, kv_idx]


def _dense_mod(mask: Dense, q_len: int, k_len: int) -> MaskMod:
    t = mask.tensor
    b_, h_, q_, k_ = (n > 1 for n in t.shape)

    def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        z = torch.zeros((), dtype=torch.int64, device=t.device)
        return t[b if b_ else z, h if h_ else z, q_idx if q_ else z, kv_idx if k_ else z]

    return mod


def _function_mod(mask: Function, q_len: int, k_len: int) -> MaskMod:
    return mask.fn


def _bydistance_mod(mask: ByDistance, q_len: int, k_len: int) -> MaskMod:
    off = mask.diagonal(q_len, k_len)
    return lambda b, h, q_idx, kv_idx: mask._keep(q_idx + off - kv_idx)


def _chunked_mod(mask: Chunked, q_len: int, k_len: int) -> MaskMod:
    return lambda b, h, q_idx, kv_idx: q_idx // mask.size == kv_idx // mask.size


def _fromblocks_mod(mask: FromBlocks, q_len: int, k_len: int) -> MaskMod:
    t, bq, bk = mask.blocks_, mask.block_q, mask.block_k
    many_b, many_h = t.shape[0] > 1, t.shape[1] > 1

    def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        z = torch.zeros((), dtype=torch.int64, device=t.device)
        return t[b if many_b else z, h if many_h else z, q_idx // bq, kv_idx // bk]

    return mod


def _bigbird_mod(mask: BigBird, q_len: int, k_len: int) -> MaskMod:
    lay, bs, g = mask.layout(q_len, k_len), mask.block_size, mask.global_tokens

    def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return lay.to(q_idx.device)[q_idx // bs, kv_idx // bs] | (q_idx < g) | (kv_idx < g)

    return mod


_MODS: dict[type, Callable[..., MaskMod]] = {
    And: _and_mod,
    Or: _or_mod,
    Not: _not_mod,
    Shifted: _shifted_mod,
    Diagonal: _diagonal_mod,
    PrefixLM: _prefixlm_mod,
    GlobalTokens: _globaltokens_mod,
    Document: _document_mod,
    KeyPadding: _keypadding_mod,
    Dense: _dense_mod,
    Function: _function_mod,
    ByDistance: _bydistance_mod,
    Chunked: _chunked_mod,
    FromBlocks: _fromblocks_mod,
    BigBird: _bigbird_mod,
}
