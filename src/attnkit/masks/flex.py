"""FlexAttention's terms for attnkit masks: :func:`to_flex`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attnkit._blocks import FULL, PARTIAL
from attnkit._checks import require_int
from attnkit.masks._core import Mask, MaskMod, as_mask

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

# -- FlexAttention -------------------------------------------------------------------------


def to_flex(mask: Mask, B: int | None, H: int | None, Lq: int, Lk: int, *,
            block_size: int | tuple[int, int] = 128,
            device: torch.device | str = "cpu") -> tuple[BlockMask, MaskMod]:
    """``mask`` as FlexAttention's ``(BlockMask, mask_mod)`` for a (B, H, Lq, Lk) call.

    The ``mask_mod`` is :meth:`Mask.mask_mod` at these lengths; the ``BlockMask`` is built
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

    mod = mask.mask_mod(q_len, k_len)
    block_mask = BlockMask.from_kv_blocks(*blocks(state == PARTIAL), *blocks(state == FULL), BLOCK_SIZE=(bq, bk),
                                          mask_mod=mod, seq_lengths=(q_len, k_len))
    return block_mask, mod
