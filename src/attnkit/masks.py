"""Masks: which keys each query may attend to, as values with structure.

A mask answers two questions:

1. Is key ``j`` allowed for query ``i`` (in batch ``b``, head ``h``)? Elementwise, so the
   reference backend can materialise it.
2. For a block of queries and keys: is it empty, full or partial? Every built-in mask
   answers this analytically in O(1) per block (O(L) for per-token masks), so the tiled
   backend skips empty blocks and does no mask work on full ones.

Masks compose with ``&``, ``|`` and ``~``. Causal alignment is explicit when Lq != Lk::

    Lq = 2, Lk = 5, causal(align="top_left")     causal(align="bottom_right")
        1 0 0 0 0                                   1 1 1 1 0
        1 1 0 0 0                                   1 1 1 1 1

``top_left`` is SDPA's convention; ``bottom_right`` is flash-attn's, and what KV-cache
decoding needs (the last query is the newest token and sees every key).

>>> from attnkit import masks
>>> m = masks.causal() & masks.sliding_window(left=2)
>>> m.to_dense(4, 4).int()
tensor([[1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [0, 1, 1, 1]], dtype=torch.int32)
>>> round(m.sparsity(4, 4), 3)
0.438
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attnkit._blocks import EMPTY, FULL, PARTIAL, ScoreBlock, block_bounds, reduce_over_batch, states
from attnkit._checks import (
    check_broadcast_4d,
    describe,
    int_vector,
    require_choice,
    require_int,
    require_tensor,
)
from attnkit._index_fn import IndexFunction

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

__all__ = [
    "BandForm",
    "BlockMap",
    "Mask",
    "MaskMod",
    "SDPAForm",
    "as_mask",
    "bigbird",
    "causal",
    "chunked",
    "dilated",
    "document",
    "from_blocks",
    "from_function",
    "from_tensor",
    "global_tokens",
    "key_padding",
    "prefix_lm",
    "sliding_window",
    "strided",
    "to_flex",
]

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


class BlockMap:
    """Block states of a mask for given lengths: EMPTY (0), PARTIAL (1) or FULL (2).

    Prints as a picture: ``█`` full, ``▒`` partial, ``·`` empty.
    """

    def __init__(self, mask: Mask, state: Tensor, q_len: int, k_len: int, block_q: int, block_k: int):
        self.mask = mask
        self.state = state
        self.q_len, self.k_len = q_len, k_len
        self.block_q, self.block_k = block_q, block_k

    def _areas(self) -> Tensor:
        q0, q1 = block_bounds(self.q_len, self.block_q, torch.device("cpu"))
        k0, k1 = block_bounds(self.k_len, self.block_k, torch.device("cpu"))
        return (q1 - q0)[:, None] * (k1 - k0)[None, :]

    @property
    def sparsity(self) -> float:
        """Fraction of the (Lq x Lk) score area that lies in skipped (empty) blocks."""
        area = self._areas()
        total = self.q_len * self.k_len
        return float(area[self.state.cpu() == EMPTY].sum()) / total if total else 0.0

    def counts(self) -> dict[str, int]:
        s = self.state
        return {"empty": int((s == EMPTY).sum()), "partial": int((s == PARTIAL).sum()),
                "full": int((s == FULL).sum())}

    def __str__(self) -> str:
        glyph = {EMPTY: "·", PARTIAL: "▒", FULL: "█"}
        rows = ["".join(glyph[int(c)] for c in row) for row in self.state.cpu()]
        c = self.counts()
        unit = "1 query x 1 key" if self.block_q == self.block_k == 1 else \
            f"{self.block_q} queries x {self.block_k} keys"
        head = (
            f"{self.mask!r} on Lq={self.q_len}, Lk={self.k_len}, a cell = {unit}; "
            f"{c['full']} full, {c['partial']} partial, {c['empty']} empty; "
            f"sparsity {100 * self.sparsity:.1f}%"
        )
        return "\n".join([head, *rows])

    __repr__ = __str__


MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""FlexAttention's ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``."""


@dataclass(frozen=True)
class SDPAForm:
    """A mask in the terms of PyTorch's ``scaled_dot_product_attention``.

    ``is_causal``: pass ``is_causal=True`` (top-left causal). ``key_valid``: a (B|1, Lk)
    bool tensor of real keys, to pass as a (B|1, 1, 1, Lk) ``attn_mask``; None if there
    is none. At most one of the two is set (SDPA takes one or the other).
    """

    is_causal: bool = False
    key_valid: Tensor | None = None


@dataclass(frozen=True)
class BandForm:
    """A mask as arithmetic on positions, per batch element ``b`` (see :meth:`Mask.band_form`).

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


class Mask:
    """Base class of all masks.

    A subclass implements at least one of :meth:`allowed` (a block of the score matrix)
    or :meth:`mask_mod` (FlexAttention's elementwise function); each has a default in
    terms of the other. Everything else has an exact default: :meth:`block_states`
    evaluates the mask block by block in bounded memory, :meth:`shifted` translates the
    coordinates. Built-in masks override them with analytic versions. A subclass that
    varies by batch or head reports it in :meth:`extent`, and checks sizes in :meth:`check`.
    """

    # -- the elementwise definition ---------------------------------------------------

    def allowed(self, block: ScoreBlock) -> Tensor:
        """Bool tensor, broadcastable to ``block.shape`` = (B, Hkv, bq, G, bk): True = may attend.

        The default calls :meth:`mask_mod` with the block's index tensors.
        """
        if type(self).mask_mod is Mask.mask_mod:
            raise NotImplementedError(f"{type(self).__name__} must implement allowed() or mask_mod()")
        return self.mask_mod(block.q_len, block.k_len)(block.b, block.h, block.i, block.j)

    def mask_mod(self, q_len: int, k_len: int) -> MaskMod:
        """This mask at lengths (Lq, Lk) as FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)``.

        The function takes int index tensors that broadcast together (or 0-d tensors, as
        under Flex's ``vmap``) and returns a bool tensor of their broadcast shape. The
        default materialises the mask once, (B, H, Lq, Lk), and indexes it; built-in masks
        compute it from the indices.
        """
        if type(self).allowed is Mask.allowed:
            raise NotImplementedError(f"{type(self).__name__} must implement allowed() or mask_mod()")
        mb, mh = self.extent()
        dense = self.to_dense(q_len, k_len, batch=mb).reshape(mb, mh, q_len, k_len)

        def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return dense[b if mb > 1 else 0, h if mh > 1 else 0, q_idx, kv_idx]

        return mod

    # -- block structure ----------------------------------------------------------------

    def block_states(self, q_len: int, k_len: int, block_q: int, block_k: int, *, batch: int | None = None,
                     heads: int | None = None, device: torch.device | str = "cpu") -> Tensor:
        """Classify each (block_q x block_k) block of an (Lq x Lk) call.

        Returns an int8 tensor (ceil(Lq / block_q), ceil(Lk / block_k)) on ``device`` of
        EMPTY (0: no pair allowed), PARTIAL (1) or FULL (2: every pair allowed), aggregated
        over batch and heads: a block is EMPTY only if it is empty for every batch element
        and head, FULL only if full for all. The last block of each axis may be short; only
        its real positions count. ``batch`` and ``heads`` are the call's sizes (default: the
        mask's :meth:`extent`); a mask that does not vary by them ignores them.

        The default is exact: it evaluates :meth:`allowed` on row chunks of about 8M
        pairs, so it costs O(Lq * Lk) time and bounded memory.
        """
        mb, mh = self.extent()
        return _evaluate_states(self.allowed, q_len, k_len, block_q, block_k,
                                batch or mb, heads or mh, torch.device(device))

    def is_full(self, q_len: int, k_len: int, *, batch: int | None = None, heads: int | None = None) -> bool:
        """Whether every (query, key) pair is allowed at these lengths (True if there is none)."""
        s = self.block_states(q_len, k_len, max(q_len, 1), max(k_len, 1), batch=batch, heads=heads)
        return bool((s == FULL).all())

    def is_empty(self, q_len: int, k_len: int, *, batch: int | None = None, heads: int | None = None) -> bool:
        """Whether no (query, key) pair is allowed at these lengths (True if there is none)."""
        s = self.block_states(q_len, k_len, max(q_len, 1), max(k_len, 1), batch=batch, heads=heads)
        return bool((s == EMPTY).all())

    def sdpa_form(self, q_len: int, k_len: int) -> SDPAForm | None:
        """This mask as SDPA's native arguments at these lengths, or None if it needs a dense mask."""
        return None

    @property
    def by_position(self) -> bool:
        """Whether :meth:`allowed` reads only the block's ``b, h, i, j`` index tensors (never its
        ranges), so it can be evaluated on any layout of indices, such as the tiled backend's
        band of keys that moves with each query row. False unless a mask says so."""
        return False

    def causal_offset(self, q_len: int, k_len: int) -> int | None:
        """``s`` if this mask is exactly ``j <= i + s`` at these lengths (causal in either
        alignment, or shifted), else None."""
        return None

    def band_form(self, q_len: int, k_len: int) -> BandForm | None:
        """This mask as a :class:`BandForm` at these lengths (a band of diagonals, key
        lengths and document ids), or None if it is not one. Kernels that mask by
        arithmetic on positions (the native tiled kernel) ask this."""
        return None

    # -- pieces of a longer sequence ------------------------------------------------------

    def shifted(self, q_offset: int, k_offset: int, *, q_total: int | None = None,
                k_total: int | None = None) -> Mask:
        """This mask seen from a piece of a longer sequence.

        Query ``i`` of the piece is query ``q_offset + i`` of the whole, key ``j`` is key
        ``k_offset + j``. ``q_total`` and ``k_total`` are the whole's lengths: they place
        the diagonal of ``bottom_right`` masks and size per-token masks. If not given, the
        whole is taken as square (both aligns agree) and as long as the piece reaches.
        The piece's own lengths are those of the call it is used in.
        """
        q_offset = require_int("q_offset", q_offset, minimum=0)
        k_offset = require_int("k_offset", k_offset, minimum=0)
        if q_offset == k_offset == 0 and q_total is None and k_total is None:
            return self
        return _Shifted(self, q_offset, k_offset, q_total, k_total)

    # -- facts about the mask -------------------------------------------------------------

    def check(self, batch: int, heads: int, q_len: int, k_len: int, device: torch.device) -> None:
        """Raise ValueError if this mask cannot apply to a call of these sizes."""

    def extent(self) -> tuple[int, int]:
        """(batch, heads) this mask varies over; 1 where it does not."""
        return 1, 1

    def natural_size(self) -> tuple[int, int] | None:
        """(Lq, Lk) this mask was built for, if it carries per-token data."""
        return None

    # -- public helpers -------------------------------------------------------------

    def to_dense(self, q_len: int, k_len: int, *, batch: int | None = None,
                 device: torch.device | str = "cpu") -> Tensor:
        """Materialise the mask as a bool tensor (True = allowed).

        Shape is (Lq, Lk) for masks that vary by neither batch nor head, else
        (B, H, Lq, Lk) with B, H = 1 where the mask does not vary.
        """
        q_len, k_len = require_int("q_len", q_len, minimum=0), require_int("k_len", k_len, minimum=0)
        mb, mh = self.extent()
        b = batch if batch is not None else mb
        device = torch.device(device)
        self.check(b, mh, q_len, k_len, device)
        dense = torch.empty(b, mh, q_len, k_len, dtype=torch.bool, device=device)
        for q0, q1, block in _row_chunks(b, mh, q_len, k_len, device):
            dense[:, :, q0:q1] = self.allowed(block).expand(block.shape).squeeze(3)
        return dense[0, 0] if (b, mh) == (1, 1) else dense

    def blocks(self, q_len: int, k_len: int, block_size: int | tuple[int, int] = 128) -> BlockMap:
        """Classify every (block_q x block_k) block as empty, partial or full."""
        bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
        q_len, k_len = require_int("q_len", q_len, minimum=0), require_int("k_len", k_len, minimum=0)
        bq, bk = require_int("block_q", bq, minimum=1), require_int("block_k", bk, minimum=1)
        mb, mh = self.extent()
        self.check(mb, mh, q_len, k_len, torch.device("cpu"))
        state = self.block_states(q_len, k_len, bq, bk)
        return BlockMap(self, state, q_len, k_len, bq, bk)

    def sparsity(self, q_len: int, k_len: int) -> float:
        """Exact fraction of (query, key) pairs masked out, averaged over batch and heads.

        Evaluated in row chunks: O(Lq * Lk) time, O(Lk) memory per row.
        """
        q_len, k_len = require_int("q_len", q_len, minimum=0), require_int("k_len", k_len, minimum=0)
        if q_len * k_len == 0:
            return 0.0
        mb, mh = self.extent()
        device = torch.device("cpu")
        self.check(mb, mh, q_len, k_len, device)
        allowed = 0
        for _, _, block in _row_chunks(mb, mh, q_len, k_len, device):
            allowed += int(self.allowed(block).expand(block.shape).sum())
        return 1.0 - allowed / (q_len * k_len * mb * mh)

    def __and__(self, other: Mask) -> Mask:
        return _And(self, as_mask("other", other))

    def __or__(self, other: Mask) -> Mask:
        return _Or(self, as_mask("other", other))

    def __invert__(self) -> Mask:
        return _Not(self)

    def _picture_size(self) -> tuple[int, int]:
        return self.natural_size() or (16, 16)

    def __str__(self) -> str:
        q_len, k_len = self._picture_size()
        size = max(1, math.ceil(max(q_len, k_len) / 32))
        return str(self.blocks(q_len, k_len, size))


def _row_chunks(batch: int, heads: int, q_len: int, k_len: int,
                device: torch.device) -> Iterator[tuple[int, int, ScoreBlock]]:
    """Blocks of whole rows, each about 4M elements, so that evaluating the mask never
    holds more than a chunk at once."""
    rows = max(1, (1 << 22) // max(1, k_len * batch * heads))
    for q0 in range(0, q_len, rows):
        q1 = min(q_len, q0 + rows)
        yield q0, q1, ScoreBlock(batch, heads, 1, q_len, k_len, q0, q1, 0, k_len, device)


_ONES = int.from_bytes(b"\x01" * 8, "little")  # an int64 whose 8 bytes are each True


def _block_any_all(some: Tensor, every: Tensor, block_q: int, block_k: int) -> tuple[Tensor, Tensor]:
    """Per block of two (R, C) bool tensors (R, C multiples of the block): any of ``some``
    and all of ``every`` (which may be the same tensor, then read once)."""
    nr, nk = some.shape[0] // block_q, some.shape[1] // block_k
    if block_k % 8 == 0:
        # 8 bools as one int64 word: a word is 0 iff all 8 are False and _ONES iff all are
        # True, and lies in [0, _ONES] otherwise, so min and max over words decide all and any.
        def words(t: Tensor) -> Tensor:
            return t.view(torch.int64).view(nr, block_q, nk, block_k // 8)

        if some is every:
            low, high = torch.aminmax(words(some), dim=1)
        else:
            low, high = words(every).amin(1), words(some).amax(1)
        return high.amax(2) != 0, low.amin(2) == _ONES
    return (some.view(nr, block_q, nk, block_k).any(1).any(2),
            every.view(nr, block_q, nk, block_k).all(1).all(2))


def _evaluate_states(allowed: Callable[[ScoreBlock], Tensor], q_len: int, k_len: int, block_q: int,
                     block_k: int, batch: int, heads: int, device: torch.device) -> Tensor:
    """Exact block states from an elementwise ``allowed``, one chunk of block rows at a time.

    Every pair is evaluated (a block is EMPTY or FULL only if each of its pairs says so),
    in chunks of about 8M pairs (few, large dispatches), with the reductions on 8 pairs per
    machine word.
    """
    nq, nk = -(-q_len // block_q), -(-k_len // block_k)
    out = torch.empty(nq, nk, dtype=torch.int8, device=device)
    if nq == 0 or nk == 0:
        return out
    kp = nk * block_k
    def five_d(t: Tensor) -> Tensor:
        return t.reshape((1,) * (5 - t.dim()) + tuple(t.shape))

    # a probe row tells which of batch and heads the mask varies over: chunks hold 8M results
    probe = five_d(allowed(ScoreBlock(batch, heads, 1, q_len, k_len, 0, 1, 0, k_len, device)))
    spread = probe.shape[0] * probe.shape[1] * probe.shape[3]
    rows = max(block_q, (1 << 23) // max(1, k_len * spread) // block_q * block_q)
    for q0 in range(0, q_len, rows):
        q1 = min(q_len, q0 + rows)
        block = ScoreBlock(batch, heads, 1, q_len, k_len, q0, q1, 0, k_len, device)
        a = five_d(allowed(block))  # (B|1, H|1, r|1, 1, Lk|1)
        r, nr = q1 - q0, -(-(q1 - q0) // block_q)
        a = torch.broadcast_to(a, (*a.shape[:2], r, a.shape[3], k_len)).transpose(2, 3).flatten(0, 2)
        some, every = (a.any(0), a.all(0)) if a.shape[0] > 1 else (a[0], a[0])  # over batch and heads
        if r % block_q or k_len % block_k:  # ragged edge: pad so that padding never counts
            padded = torch.zeros(2, nr * block_q, kp, dtype=torch.bool, device=device)
            padded[1] = True
            padded[0, :r, :k_len], padded[1, :r, :k_len] = some, every
            some, every = padded[0], padded[1]
        if some is every:
            some = every = some.contiguous()
        else:
            some, every = some.contiguous(), every.contiguous()
        row = q0 // block_q
        any_, all_ = _block_any_all(some, every, block_q, block_k)
        out[row: row + nr] = states(~any_, all_)
    return out


def as_mask(name: str, m: object) -> Mask:
    """``m`` as a :class:`Mask`: a mask as is, a bool tensor through :func:`from_tensor`.

    Raises TypeError naming ``name`` for anything else.
    """
    if isinstance(m, Mask):
        return m
    if isinstance(m, Tensor):
        return from_tensor(m)
    raise TypeError(f"{name} must be an attnkit mask or a bool tensor; got {describe(m)}")


# -- composition ----------------------------------------------------------------------


class _And(Mask):
    def __init__(self, a: Mask, b: Mask):
        self.a, self.b = a, b

    @property
    def by_position(self) -> bool:
        return self.a.by_position and self.b.by_position

    def allowed(self, block: ScoreBlock) -> Tensor:
        return self.a.allowed(block) & self.b.allowed(block)

    def mask_mod(self, q_len: int, k_len: int) -> MaskMod:
        fa, fb = self.a.mask_mod(q_len, k_len), self.b.mask_mod(q_len, k_len)
        return lambda b, h, q_idx, kv_idx: fa(b, h, q_idx, kv_idx) & fb(b, h, q_idx, kv_idx)

    def band_form(self, q_len: int, k_len: int) -> BandForm | None:
        a, b = self.a.band_form(q_len, k_len), self.b.band_form(q_len, k_len)
        return None if a is None or b is None else a & b

    def _both(self, q_len: int, k_len: int, block_q: int, block_k: int, batch: int | None, heads: int | None,
              device: torch.device | str) -> tuple[Tensor, Tensor]:
        return (self.a.block_states(q_len, k_len, block_q, block_k, batch=batch, heads=heads, device=device),
                self.b.block_states(q_len, k_len, block_q, block_k, batch=batch, heads=heads, device=device))

    def block_states(self, q_len: int, k_len: int, block_q: int, block_k: int, *, batch: int | None = None,
                     heads: int | None = None, device: torch.device | str = "cpu") -> Tensor:
        sa, sb = self._both(q_len, k_len, block_q, block_k, batch, heads, device)
        return states((sa == EMPTY) | (sb == EMPTY), (sa == FULL) & (sb == FULL))

    def shifted(self, q_offset: int, k_offset: int, *, q_total: int | None = None,
                k_total: int | None = None) -> Mask:
        kw = {"q_total": q_total, "k_total": k_total}
        return type(self)(self.a.shifted(q_offset, k_offset, **kw), self.b.shifted(q_offset, k_offset, **kw))

    def check(self, batch: int, heads: int, q_len: int, k_len: int, device: torch.device) -> None:
        self.a.check(batch, heads, q_len, k_len, device)
        self.b.check(batch, heads, q_len, k_len, device)

    def extent(self) -> tuple[int, int]:
        (b1, h1), (b2, h2) = self.a.extent(), self.b.extent()
        return max(b1, b2), max(h1, h2)

    def natural_size(self) -> tuple[int, int] | None:
        return self.a.natural_size() or self.b.natural_size()

    def __repr__(self) -> str:
        return f"({self.a!r} & {self.b!r})"


class _Or(_And):
    def allowed(self, block: ScoreBlock) -> Tensor:
        return self.a.allowed(block) | self.b.allowed(block)

    def band_form(self, q_len: int, k_len: int) -> BandForm | None:
        return None  # a union of bands is not one band

    def mask_mod(self, q_len: int, k_len: int) -> MaskMod:
        fa, fb = self.a.mask_mod(q_len, k_len), self.b.mask_mod(q_len, k_len)
        return lambda b, h, q_idx, kv_idx: fa(b, h, q_idx, kv_idx) | fb(b, h, q_idx, kv_idx)

    def block_states(self, q_len: int, k_len: int, block_q: int, block_k: int, *, batch: int | None = None,
                     heads: int | None = None, device: torch.device | str = "cpu") -> Tensor:
        sa, sb = self._both(q_len, k_len, block_q, block_k, batch, heads, device)
        return states((sa == EMPTY) & (sb == EMPTY), (sa == FULL) | (sb == FULL))

    def __repr__(self) -> str:
        return f"({self.a!r} | {self.b!r})"


class _Not(Mask):
    def __init__(self, a: Mask):
        self.a = a

    @property
    def by_position(self) -> bool:
        return self.a.by_position

    def allowed(self, block: ScoreBlock) -> Tensor:
        return ~self.a.allowed(block)

    def mask_mod(self, q_len: int, k_len: int) -> MaskMod:
        fa = self.a.mask_mod(q_len, k_len)
        return lambda b, h, q_idx, kv_idx: ~fa(b, h, q_idx, kv_idx)

    def block_states(self, q_len: int, k_len: int, block_q: int, block_k: int, *, batch: int | None = None,
                     heads: int | None = None, device: torch.device | str = "cpu") -> Tensor:
        s = self.a.block_states(q_len, k_len, block_q, block_k, batch=batch, heads=heads, device=device)
        return states(s == FULL, s == EMPTY)

    def shifted(self, q_offset: int, k_offset: int, *, q_total: int | None = None,
                k_total: int | None = None) -> Mask:
        return _Not(self.a.shifted(q_offset, k_offset, q_total=q_total, k_total=k_total))

    def check(self, batch: int, heads: int, q_len: int, k_len: int, device: torch.device) -> None:
        self.a.check(batch, heads, q_len, k_len, device)

    def extent(self) -> tuple[int, int]:
        return self.a.extent()

    def natural_size(self) -> tuple[int, int] | None:
        return self.a.natural_size()

    def __repr__(self) -> str:
        return f"~{self.a!r}"


class _Shifted(Mask):
    """``inner`` on queries [q_offset, ...) and keys [k_offset, ...) of a longer sequence."""

    def __init__(self, inner: Mask, q_offset: int, k_offset: int, q_total: int | None, k_total: int | None):
        self.inner, self.q_offset, self.k_offset = inner, q_offset, k_offset
        self.q_total, self.k_total = q_total, k_total

    def _totals(self, q_len: int, k_len: int) -> tuple[int, int]:
        if self.q_total is not None and self.k_total is not None:
            return self.q_total, self.k_total
        side = max(self.q_offset + q_len, self.k_offset + k_len)
        return (self.q_total or side), (self.k_total or side)

    def allowed(self, block: ScoreBlock) -> Tensor:
        q_total, k_total = self._totals(block.q_len, block.k_len)
        whole = ScoreBlock(block.batch, block.kv_heads, block.groups, q_total, k_total,
                           block.q_start + self.q_offset, block.q_stop + self.q_offset,
                           block.k_start + self.k_offset, block.k_stop + self.k_offset, block.device)
        return self.inner.allowed(whole)

    def mask_mod(self, q_len: int, k_len: int) -> MaskMod:
        fn = self.inner.mask_mod(*self._totals(q_len, k_len))
        qo, ko = self.q_offset, self.k_offset
        return lambda b, h, q_idx, kv_idx: fn(b, h, q_idx + qo, kv_idx + ko)

    def check(self, batch: int, heads: int, q_len: int, k_len: int, device: torch.device) -> None:
        q_total, k_total = self._totals(q_len, k_len)
        if self.q_offset + q_len > q_total or self.k_offset + k_len > k_total:
            raise ValueError(f"a piece of Lq={q_len} at query {self.q_offset}, Lk={k_len} at key {self.k_offset} "
                             f"does not fit in the whole (Lq={q_total}, Lk={k_total}) of {self.inner!r}")
        self.inner.check(batch, heads, q_total, k_total, device)

    def extent(self) -> tuple[int, int]:
        return self.inner.extent()

    def __repr__(self) -> str:
        return f"{self.inner!r}.shifted({self.q_offset}, {self.k_offset})"


# -- analytic masks ---------------------------------------------------------------------


class _Diagonal(Mask):
    """Allows ``-left <= j - (i + offset) <= right``; ``None`` means unbounded.

    ``shift``, if set, is a fixed offset (a piece of a longer sequence) instead of the one
    that ``align`` gives at the call's lengths.
    """

    lengths: Lengths | None = None  # per-sequence alignment, if given

    def __init__(self, left: int | None, right: int | None, align: str, shift: int | None = None):
        self.left, self.right = left, right
        self.align = require_choice("align", align, _ALIGNS)
        self.shift = shift

    by_position = True

    def _diagonal(self, q_len: int, k_len: int) -> int:
        return _offset(self.align, q_len, k_len) if self.shift is None else self.shift

    def causal_offset(self, q_len: int, k_len: int) -> int | None:
        if self.left is not None or self.right is None or self.lengths is not None:
            return None
        return self._diagonal(q_len, k_len) + self.right

    def band_form(self, q_len: int, k_len: int) -> BandForm | None:
        off = self._diagonals(q_len, k_len, torch.device("cpu"))
        off = off.view(-1).to(torch.int64) if isinstance(off, Tensor) else torch.tensor([off])
        form = BandForm.unbounded(k_len)
        lo = form.lo if self.left is None else off - self.left
        hi = form.hi if self.right is None else off + self.right
        return BandForm(lo, hi, form.key_lengths)

    def _diagonals(self, q_len: int, k_len: int, device: torch.device) -> Tensor | int:
        """The offset, or (B, 1, 1, 1, 1) offsets with per-sequence lengths."""
        if self.lengths is None:
            return self._diagonal(q_len, k_len)
        return self.lengths.offsets(self.align, q_len, k_len, device).view(-1, 1, 1, 1, 1)

    def _within(self, d: Tensor) -> Tensor:
        ok = torch.ones((), dtype=torch.bool, device=d.device)
        if self.left is not None:
            ok = ok & (d >= -self.left)
        if self.right is not None:
            ok = ok & (d <= self.right)
        return ok

    def allowed(self, block: ScoreBlock) -> Tensor:
        return self._within(block.j - (block.i + self._diagonals(block.q_len, block.k_len, block.device)))

    def mask_mod(self, q_len: int, k_len: int) -> MaskMod:
        if self.lengths is None:
            off = self._diagonal(q_len, k_len)
            return lambda b, h, q_idx, kv_idx: self._within(kv_idx - (q_idx + off))
        offs = self.lengths.offsets(self.align, q_len, k_len, torch.device("cpu"))
        many = offs.numel() > 1
        return lambda b, h, q_idx, kv_idx: self._within(kv_idx - (q_idx + offs.to(q_idx.device)[b if many else 0]))

    def block_states(self, q_len: int, k_len: int, block_q: int, block_k: int, *, batch: int | None = None,
                     heads: int | None = None, device: torch.device | str = "cpu") -> Tensor:
        device = torch.device(device)
        if self.lengths is not None:
            per = [self._states_at(int(o), q_len, k_len, block_q, block_k, device)
                   for o in self.lengths.offsets(self.align, q_len, k_len, device).tolist()]
            return reduce_over_batch(torch.stack(per))
        return self._states_at(self._diagonal(q_len, k_len), q_len, k_len, block_q, block_k, device)

    def check(self, batch: int, heads: int, q_len: int, k_len: int, device: torch.device) -> None:
        if self.lengths is not None:
            self.lengths.check(batch, q_len, k_len)

    def extent(self) -> tuple[int, int]:
        return (1 if self.lengths is None else self.lengths.batch), 1

    def _states_at(self, off: int, q_len: int, k_len: int, block_q: int, block_k: int,
                   device: torch.device) -> Tensor:
        q0, q1 = block_bounds(q_len, block_q, device)
        k0, k1 = block_bounds(k_len, block_k, device)
        dmin = k0[None, :] - (q1[:, None] - 1) - off
        dmax = (k1[None, :] - 1) - q0[:, None] - off
        empty = torch.zeros_like(dmin, dtype=torch.bool)
        full = torch.ones_like(dmin, dtype=torch.bool)
        if self.left is not None:
            empty |= dmax < -self.left
            full &= dmin >= -self.left
        if self.right is not None:
            empty |= dmin > self.right
            full &= dmax <= self.right
        return states(empty, full)

    def shifted(self, q_offset: int, k_offset: int, *, q_total: int | None = None,
                k_total: int | None = None) -> Mask:
        if self.lengths is not None:  # per-sequence diagonals: the exact, evaluated view
            return super().shifted(q_offset, k_offset, q_total=q_total, k_total=k_total)
        q_offset = require_int("q_offset", q_offset, minimum=0)
        k_offset = require_int("k_offset", k_offset, minimum=0)
        base = 0 if q_total is None or k_total is None else self._diagonal(q_total, k_total)
        return type(self)(self.left, self.right, self.align, q_offset - k_offset + base)

    def _where(self) -> str:
        where = f"align={self.align!r}" if self.shift is None else f"shift={self.shift}"
        return where if self.lengths is None else f"{where}, {self.lengths!r}"


class _Causal(_Diagonal):
    def __init__(self, left: int | None, right: int | None, align: str, shift: int | None = None):
        super().__init__(None, 0, align, shift)

    def sdpa_form(self, q_len: int, k_len: int) -> SDPAForm | None:
        if self.shift is None and self.lengths is None and (self.align == "top_left" or q_len == k_len):
            return SDPAForm(is_causal=True)
        return None

    def __repr__(self) -> str:
        return f"causal({self._where()})"


class _SlidingWindow(_Diagonal):
    def __repr__(self) -> str:
        return f"sliding_window(left={self.left}, right={self.right}, {self._where()})"


def _aligned(mask: _Diagonal, q_lengths: Sequence[int] | Tensor | None, k_lengths: Sequence[int] | Tensor | None,
             padding: str) -> _Diagonal:
    if q_lengths is not None or k_lengths is not None:
        mask.lengths = Lengths(q_lengths, k_lengths, padding)
    else:
        require_choice("padding", padding, _PADDINGS)
    return mask


def causal(align: str = "top_left", *, q_lengths: Sequence[int] | Tensor | None = None,
           k_lengths: Sequence[int] | Tensor | None = None, padding: str = "right") -> Mask:
    """Query ``i`` may attend to keys ``j <= i + offset``.

    Args:
        align: ``"top_left"`` (offset 0, SDPA's convention) or ``"bottom_right"``
            (offset ``Lk - Lq``: flash-attn's convention and KV-cache decoding). With
            bottom-right alignment and Lq > Lk the first ``Lq - Lk`` rows allow no key;
            they output 0.
        q_lengths, k_lengths: per-sequence real lengths (B,) of a padded batch (None: all
            real). The diagonal of sequence ``b`` then sits at its own lengths, as in
            flash-attn's varlen and KV-cache calls: bottom-right alignment uses
            ``k_lengths[b] - q_lengths[b]``. Padding keys are not masked by this; combine
            with :func:`key_padding` for that.
        padding: ``"right"`` (real tokens first) or ``"left"`` (real tokens last, as in
            left-padded generation batches).

    >>> causal().to_dense(3, 3).int()
    tensor([[1, 0, 0],
            [1, 1, 0],
            [1, 1, 1]], dtype=torch.int32)
    >>> causal(align="bottom_right").to_dense(2, 4).int()
    tensor([[1, 1, 1, 0],
            [1, 1, 1, 1]], dtype=torch.int32)
    """
    return _aligned(_Causal(None, 0, align), q_lengths, k_lengths, padding)


def sliding_window(left: int, right: int = 0, align: str = "top_left", *,
                   q_lengths: Sequence[int] | Tensor | None = None, k_lengths: Sequence[int] | Tensor | None = None,
                   padding: str = "right") -> Mask:
    """Query ``i`` may attend to keys ``j`` with ``-left <= j - (i + offset) <= right``.

    ``sliding_window(left=w)`` is causal attention to the current token and the ``w``
    before it (Mistral's window of ``w + 1`` tokens). ``sliding_window(w, w)`` is a
    symmetric local window (Longformer). The offset follows ``align``, as for
    :func:`causal`, per sequence with ``q_lengths``/``k_lengths``/``padding`` as there.

    >>> sliding_window(1, 1).to_dense(4, 4).int()
    tensor([[1, 1, 0, 0],
            [1, 1, 1, 0],
            [0, 1, 1, 1],
            [0, 0, 1, 1]], dtype=torch.int32)
    """
    left = require_int("left", left, minimum=0)
    right = require_int("right", right, minimum=0)
    return _aligned(_SlidingWindow(left, right, align), q_lengths, k_lengths, padding)


class _PrefixLM(Mask):
    by_position = True

    def __init__(self, prefix_length: int | Tensor, align: str):
        self.align = require_choice("align", align, _ALIGNS)
        if isinstance(prefix_length, Tensor):
            self.prefix = int_vector("prefix_length", prefix_length)
            if (self.prefix < 0).any():
                raise ValueError(f"prefix_length must be >= 0; got {self.prefix.tolist()}")
        else:
            self.prefix = torch.tensor([require_int("prefix_length", prefix_length, minimum=0)])
        self._causal = _Causal(None, 0, align)

    def _prefix(self, device: torch.device) -> Tensor:
        return self.prefix.to(device)

    def allowed(self, block: ScoreBlock) -> Tensor:
        p = self._prefix(block.device).view(-1, 1, 1, 1, 1)
        return self._causal.allowed(block) | (block.j < p)

    def mask_mod(self, q_len: int, k_len: int) -> MaskMod:
        causal, prefix, many = self._causal.mask_mod(q_len, k_len), self.prefix, self.prefix.numel() > 1

        def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            p = prefix.to(kv_idx.device)[b if many else 0]
            return causal(b, h, q_idx, kv_idx) | (kv_idx < p)

        return mod

    def block_states(self, q_len: int, k_len: int, block_q: int, block_k: int, *, batch: int | None = None,
                     heads: int | None = None, device: torch.device | str = "cpu") -> Tensor:
        device = torch.device(device)
        c = self._causal.block_states(q_len, k_len, block_q, block_k, device=device)
        k0, k1 = block_bounds(k_len, block_k, device)
        p = self._prefix(device)[:, None, None]  # (B, 1, 1)
        full = (c == FULL) | ((k1 - 1)[None, None, :] < p)
        empty = (c == EMPTY) & (k0[None, None, :] >= p)
        nq = c.shape[0]
        return reduce_over_batch(states(empty.expand(-1, nq, -1), full.expand(-1, nq, -1)))

    def check(self, batch: int, heads: int, q_len: int, k_len: int, device: torch.device) -> None:
        if self.prefix.numel() not in (1, batch):
            raise ValueError(
                f"prefix_length has {self.prefix.numel()} entries; expected 1 or batch={batch}"
            )

    def extent(self) -> tuple[int, int]:
        return self.prefix.numel(), 1

    def __repr__(self) -> str:
        p = self.prefix.item() if self.prefix.numel() == 1 else self.prefix.tolist()
        return f"prefix_lm({p}, align={self.align!r})"


def prefix_lm(prefix_length: int | Tensor, align: str = "top_left") -> Mask:
    """Bidirectional over the first ``prefix_length`` keys, causal after (T5/UL2 prefix LM).

    ``prefix_length`` is an int, or a (B,) int tensor for one prefix per batch element.

    >>> prefix_lm(2).to_dense(4, 4).int()
    tensor([[1, 1, 0, 0],
            [1, 1, 0, 0],
            [1, 1, 1, 0],
            [1, 1, 1, 1]], dtype=torch.int32)
    """
    return _PrefixLM(prefix_length, align)


class _GlobalTokens(Mask):
    def __init__(self, positions: Sequence[int] | Tensor):
        self.positions = int_vector("positions", positions)
        if (self.positions < 0).any():
            raise ValueError(f"positions must be >= 0; got {self.positions.tolist()}")

    def _flags(self, length: int, device: torch.device) -> Tensor:
        flags = torch.zeros(length, dtype=torch.bool, device=device)
        pos = self.positions.to(device)
        flags[pos[pos < length]] = True
        return flags

    def allowed(self, block: ScoreBlock) -> Tensor:
        gq = self._flags(block.q_len, block.device)[block.q_start : block.q_stop]
        gk = self._flags(block.k_len, block.device)[block.k_start : block.k_stop]
        return gq.view(1, 1, -1, 1, 1) | gk.view(1, 1, 1, 1, -1)

    def mask_mod(self, q_len: int, k_len: int) -> MaskMod:
        gq, gk = self._flags(q_len, torch.device("cpu")), self._flags(k_len, torch.device("cpu"))
        return lambda b, h, q_idx, kv_idx: gq.to(q_idx.device)[q_idx] | gk.to(kv_idx.device)[kv_idx]

    def block_states(self, q_len: int, k_len: int, block_q: int, block_k: int, *, batch: int | None = None,
                     heads: int | None = None, device: torch.device | str = "cpu") -> Tensor:
        device = torch.device(device)
        def per_block(length: int, size: int) -> tuple[Tensor, Tensor]:
            n = -(-length // size)
            flags = torch.zeros(n * size, dtype=torch.bool, device=device)
            flags[:length] = self._flags(length, device)
            padded = flags.view(n, size)
            # Padding positions never count: a block is "all global" over real positions only.
            real = torch.arange(n * size, device=device).view(n, size) < length
            return (padded | ~real).all(1), padded.any(1)

        q_all, q_any = per_block(q_len, block_q)
        k_all, k_any = per_block(k_len, block_k)
        full = q_all[:, None] | k_all[None, :]
        empty = ~q_any[:, None] & ~k_any[None, :]
        return states(empty, full)

    def check(self, batch: int, heads: int, q_len: int, k_len: int, device: torch.device) -> None:
        if self.positions.numel() and int(self.positions.max()) >= max(q_len, k_len):
            raise ValueError(
                f"global_tokens positions must be < max(Lq, Lk) = {max(q_len, k_len)}; "
                f"got {self.positions.tolist()}"
            )

    def __repr__(self) -> str:
        return f"global_tokens({self.positions.tolist()})"


def global_tokens(positions: Sequence[int] | Tensor) -> Mask:
    """Longformer's global attention: these positions attend to every key and are
    attended to by every query. Combine with a local window:
    ``sliding_window(w, w) | global_tokens([0])``.

    >>> global_tokens([0]).to_dense(3, 3).int()
    tensor([[1, 1, 1],
            [1, 0, 0],
            [1, 0, 0]], dtype=torch.int32)
    """
    return _GlobalTokens(positions)


# -- per-token masks ----------------------------------------------------------------------


def _rows(name: str, t: Tensor) -> Tensor:
    """A (N, L) view of a (L,) or (N, L) tensor."""
    if t.dim() == 1:
        return t.unsqueeze(0)
    if t.dim() == 2:
        return t
    raise ValueError(f"{name} must be 1-D (L,) or 2-D (batch, L); got shape {tuple(t.shape)}")


def _check_rows(name: str, t: Tensor, batch: int, length: int, what: str) -> None:
    if t.shape[0] not in (1, batch):
        raise ValueError(f"{name} has batch size {t.shape[0]}; expected 1 or batch={batch}")
    if t.shape[1] != length:
        raise ValueError(f"{name} has length {t.shape[1]}; expected {what}={length}")


def _block_min_max(rows: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Per-block min and max along the last dim of (N, L), padding with the edge value."""
    n, length = rows.shape
    nb = -(-length // size)
    pad = nb * size - length
    if pad:
        rows = torch.cat([rows, rows[:, -1:].expand(n, pad)], dim=1)
    blocks = rows.view(n, nb, size)
    return blocks.amin(2), blocks.amax(2)


class _Document(Mask):
    def __init__(self, q_ids: Tensor, kv_ids: Tensor | None):
        for name, t in (("q_ids", q_ids), ("kv_ids", kv_ids)):
            if t is None:
                continue
            require_tensor(name, t)
            if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
                raise TypeError(f"{name} must hold integer document ids; got {describe(t)}")
        self.q_ids = _rows("q_ids", q_ids).to(torch.int64)
        self.kv_ids = self.q_ids if kv_ids is None else _rows("kv_ids", kv_ids).to(torch.int64)

    def _ids(self, device: torch.device) -> tuple[Tensor, Tensor]:
        return self.q_ids.to(device), self.kv_ids.to(device)

    def band_form(self, q_len: int, k_len: int) -> BandForm | None:
        form = BandForm.unbounded(k_len)
        return BandForm(form.lo, form.hi, form.key_lengths, self.q_ids.contiguous(), self.kv_ids.contiguous())

    def allowed(self, block: ScoreBlock) -> Tensor:
        q_ids, kv_ids = self._ids(block.device)
        qi = q_ids[:, block.q_start : block.q_stop].view(q_ids.shape[0], 1, -1, 1, 1)
        kj = kv_ids[:, block.k_start : block.k_stop].view(kv_ids.shape[0], 1, 1, 1, -1)
        return qi == kj

    def mask_mod(self, q_len: int, k_len: int) -> MaskMod:
        q_ids, kv_ids = self.q_ids, self.kv_ids
        many_q, many_k = q_ids.shape[0] > 1, kv_ids.shape[0] > 1

        def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            qi = q_ids.to(q_idx.device)[b if many_q else 0, q_idx]
            kj = kv_ids.to(kv_idx.device)[b if many_k else 0, kv_idx]
            return qi == kj

        return mod

    def block_states(self, q_len: int, k_len: int, block_q: int, block_k: int, *, batch: int | None = None,
                     heads: int | None = None, device: torch.device | str = "cpu") -> Tensor:
        device = torch.device(device)
        q_ids, kv_ids = self._ids(device)
        if q_len == 0 or k_len == 0:
            return torch.zeros(-(-q_len // block_q), -(-k_len // block_k), dtype=torch.int8)
        qmin, qmax = _block_min_max(q_ids, block_q)  # (Bq, nq)
        kmin, kmax = _block_min_max(kv_ids, block_k)  # (Bk, nk)
        qmin, qmax = qmin[:, :, None], qmax[:, :, None]
        kmin, kmax = kmin[:, None, :], kmax[:, None, :]
        empty = (qmax < kmin) | (kmax < qmin)
        full = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
        return reduce_over_batch(states(empty, full))

    def check(self, batch: int, heads: int, q_len: int, k_len: int, device: torch.device) -> None:
        _check_rows("document q_ids", self.q_ids, batch, q_len, "Lq")
        _check_rows("document kv_ids", self.kv_ids, batch, k_len, "Lk")

    def extent(self) -> tuple[int, int]:
        return max(self.q_ids.shape[0], self.kv_ids.shape[0]), 1

    def natural_size(self) -> tuple[int, int] | None:
        return self.q_ids.shape[1], self.kv_ids.shape[1]

    def __repr__(self) -> str:
        n = int(torch.unique(torch.cat([self.q_ids.flatten(), self.kv_ids.flatten()])).numel())
        return f"document({n} documents)"


def document(q_ids: Tensor, kv_ids: Tensor | None = None) -> Mask:
    """Tokens attend only within their own document (sequence packing).

    Args:
        q_ids: integer document id per query token, shape (Lq,) or (B, Lq).
        kv_ids: the same per key token, (Lk,) or (B, Lk); defaults to ``q_ids``.

    Ids need not be sorted, but sorted (packed) ids give the tiled backend the most
    empty blocks to skip. Combine with :func:`causal` for packed causal LM training.

    >>> document(torch.tensor([0, 0, 1, 1])).to_dense(4, 4).int()
    tensor([[1, 1, 0, 0],
            [1, 1, 0, 0],
            [0, 0, 1, 1],
            [0, 0, 1, 1]], dtype=torch.int32)
    """
    return _Document(q_ids, kv_ids)


class _KeyPadding(Mask):
    def __init__(self, lengths: Sequence[int] | Tensor | None, valid: Tensor | None):
        if (lengths is None) == (valid is None):
            raise TypeError("key_padding needs exactly one of lengths= or valid=")
        self.lengths: Tensor | None = None
        self.valid: Tensor | None = None
        if lengths is not None:
            self.lengths = int_vector("lengths", lengths)
            if (self.lengths < 0).any():
                raise ValueError(f"lengths must be >= 0; got {self.lengths.tolist()}")
        else:
            require_tensor("valid", valid)
            if valid.dtype != torch.bool:  # type: ignore[union-attr]
                raise TypeError(f"valid must be a bool tensor (True = real token); got {describe(valid)}")
            self.valid = _rows("valid", valid)  # type: ignore[arg-type]

    def band_form(self, q_len: int, k_len: int) -> BandForm | None:
        if self.lengths is None:  # given as valid= rows: not necessarily a prefix of the keys
            return None
        form = BandForm.unbounded(k_len)
        return BandForm(form.lo, form.hi, torch.minimum(form.key_lengths, self.lengths.to(torch.int64)))

    def _valid_rows(self, k_len: int, device: torch.device) -> Tensor:
        if self.valid is not None:
            return self.valid.to(device)
        return torch.arange(k_len, device=device)[None, :] < self.lengths.to(device)[:, None]  # type: ignore[union-attr]

    def allowed(self, block: ScoreBlock) -> Tensor:
        if self.lengths is not None:
            return block.j < self.lengths.to(block.device).view(-1, 1, 1, 1, 1)
        valid = self.valid.to(block.device)[:, block.k_start : block.k_stop]  # type: ignore[union-attr]
        return valid.view(valid.shape[0], 1, 1, 1, -1)

    def mask_mod(self, q_len: int, k_len: int) -> MaskMod:
        valid = self._valid_rows(k_len, torch.device("cpu"))
        many = valid.shape[0] > 1
        return lambda b, h, q_idx, kv_idx: valid.to(kv_idx.device)[b if many else 0, kv_idx]

    def sdpa_form(self, q_len: int, k_len: int) -> SDPAForm | None:
        return SDPAForm(key_valid=self._valid_rows(k_len, torch.device("cpu")))

    def block_states(self, q_len: int, k_len: int, block_q: int, block_k: int, *, batch: int | None = None,
                     heads: int | None = None, device: torch.device | str = "cpu") -> Tensor:
        device = torch.device(device)
        valid = self._valid_rows(k_len, device)  # (B, Lk)
        nq = -(-q_len // block_q)
        if k_len == 0:
            return torch.zeros(nq, 0, dtype=torch.int8, device=device)
        lo, hi = _block_min_max(valid.to(torch.int8), block_k)  # (B, nk)
        per_batch = states(hi == 0, lo == 1)[:, None, :].expand(-1, nq, -1)
        return reduce_over_batch(per_batch)

    def check(self, batch: int, heads: int, q_len: int, k_len: int, device: torch.device) -> None:
        if self.lengths is not None:
            if self.lengths.numel() not in (1, batch):
                raise ValueError(f"key_padding lengths has {self.lengths.numel()} entries; expected batch={batch}")
            if int(self.lengths.max()) > k_len:
                raise ValueError(f"key_padding lengths must be <= Lk={k_len}; got {self.lengths.tolist()}")
        else:
            _check_rows("key_padding valid", self.valid, batch, k_len, "Lk")  # type: ignore[arg-type]

    def extent(self) -> tuple[int, int]:
        rows = self.lengths if self.lengths is not None else self.valid
        return rows.shape[0], 1  # type: ignore[union-attr]

    def natural_size(self) -> tuple[int, int] | None:
        if self.valid is not None:
            return self.valid.shape[1], self.valid.shape[1]
        n = int(self.lengths.max()) if self.lengths.numel() else 0  # type: ignore[union-attr]
        return (n, n) if n else None

    def __repr__(self) -> str:
        if self.lengths is not None:
            return f"key_padding(lengths={self.lengths.tolist()})"
        return f"key_padding(valid of shape {tuple(self.valid.shape)})"  # type: ignore[union-attr]


def key_padding(lengths: Sequence[int] | Tensor | None = None, *, valid: Tensor | None = None) -> Mask:
    """Mask out padding keys, per batch element.

    Give either ``lengths`` (B,): the first ``lengths[b]`` keys are real, or ``valid``
    (B, Lk) bool: True for real keys. A batch element with no real key gets zero output.

    >>> key_padding([2, 3]).to_dense(2, 3).int()[:, 0]
    tensor([[[1, 1, 0],
             [1, 1, 0]],
    <BLANKLINE>
            [[1, 1, 1],
             [1, 1, 1]]], dtype=torch.int32)
    """
    return _KeyPadding(lengths, valid)


class _Dense(Mask):
    def __init__(self, tensor: Tensor):
        require_tensor("mask", tensor)
        if tensor.dtype != torch.bool:
            raise TypeError(
                f"mask tensor must be bool (True = may attend); got {describe(tensor)}. "
                "For an additive float mask, pass it as bias= instead"
            )
        if tensor.dim() > 4 or tensor.dim() < 2:
            raise ValueError(
                f"mask tensor must have 2 to 4 dims, broadcastable to (batch, heads, Lq, Lk); "
                f"got shape {tuple(tensor.shape)}"
            )
        self.given = tensor
        self.tensor = tensor.reshape((1,) * (4 - tensor.dim()) + tuple(tensor.shape))

    def allowed(self, block: ScoreBlock) -> Tensor:
        return block.take(self.tensor.to(block.device))

    def mask_mod(self, q_len: int, k_len: int) -> MaskMod:
        t = self.tensor
        b_, h_, q_, k_ = (n > 1 for n in t.shape)

        def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            z = torch.zeros((), dtype=torch.int64, device=t.device)
            return t[b if b_ else z, h if h_ else z, q_idx if q_ else z, kv_idx if k_ else z]

        return mod

    def block_states(self, q_len: int, k_len: int, block_q: int, block_k: int, *, batch: int | None = None,
                     heads: int | None = None, device: torch.device | str = "cpu") -> Tensor:
        device = torch.device(device)
        t = self.tensor.to(device).expand(-1, -1, q_len, k_len).flatten(0, 1)  # (N, Lq, Lk)
        nq, nk = -(-q_len // block_q), -(-k_len // block_k)
        if nq == 0 or nk == 0:
            return torch.zeros(nq, nk, dtype=torch.int8, device=device)
        pad = (0, nk * block_k - k_len, 0, nq * block_q - q_len)
        as_int = t.to(torch.int8)
        any_ = torch.nn.functional.pad(as_int, pad, value=0).view(-1, nq, block_q, nk, block_k)
        all_ = torch.nn.functional.pad(as_int, pad, value=1).view(-1, nq, block_q, nk, block_k)
        empty = any_.amax((2, 4)) == 0
        full = all_.amin((2, 4)) == 1
        return reduce_over_batch(states(empty, full))

    def check(self, batch: int, heads: int, q_len: int, k_len: int, device: torch.device) -> None:
        check_broadcast_4d("mask", self.given, (batch, heads, q_len, k_len))
        if self.tensor.device != device:
            raise ValueError(
                f"mask tensor is on {self.tensor.device} but the inputs are on {device}; "
                "move the mask to the inputs' device"
            )

    def extent(self) -> tuple[int, int]:
        return self.tensor.shape[0], self.tensor.shape[1]

    def natural_size(self) -> tuple[int, int] | None:
        lq, lk = self.tensor.shape[2], self.tensor.shape[3]
        return (lq, lk) if lq > 1 or lk > 1 else None

    def __repr__(self) -> str:
        return f"from_tensor(shape {tuple(self.tensor.shape)})"


def from_tensor(mask: Tensor) -> Mask:
    """A dense bool mask (True = may attend), broadcastable to (B, H, Lq, Lk).

    Its block states are found by reduction, O(Lq * Lk) once per call; prefer the
    analytic masks where one fits.

    >>> from_tensor(torch.tensor([[True, False], [True, True]])).to_dense(2, 2).int()
    tensor([[1, 0],
            [1, 1]], dtype=torch.int32)
    """
    return _Dense(mask)


# -- any elementwise function ---------------------------------------------------------------


class _Evaluated(Mask):
    """A mask whose block states come from evaluating it (exact), cached per
    (lengths, block sizes, batch, heads, device)."""

    _CACHE_SIZE = 16
    _cache: OrderedDict[tuple, Tensor]

    def block_states(self, q_len: int, k_len: int, block_q: int, block_k: int, *, batch: int | None = None,
                     heads: int | None = None, device: torch.device | str = "cpu") -> Tensor:
        device = torch.device(device)
        mb, mh = self.extent()
        batch, heads = batch or mb, heads or mh
        key = (q_len, k_len, block_q, block_k, batch, heads, str(device))
        cache = self.__dict__.setdefault("_cache", OrderedDict())
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        state = _evaluate_states(self.allowed, q_len, k_len, block_q, block_k, batch, heads, device)
        cache[key] = state
        if len(cache) > self._CACHE_SIZE:
            cache.popitem(last=False)
        return state


class _Function(_Evaluated):
    def __init__(self, fn: MaskMod, name: str | None):
        if not callable(fn):
            raise TypeError(f"from_function needs a callable fn(b, h, q_idx, kv_idx) -> bool tensor; "
                            f"got {describe(fn)}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None; got {describe(name)}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        # int32 indices, as in Flex's compiled kernels: half the memory traffic of int64
        self.evaluator = IndexFunction(fn, f"mask function {self.name!r}", with_score=False, index_dtype=torch.int32)

    def allowed(self, block: ScoreBlock) -> Tensor:
        return self.evaluator.on_block(block)

    def mask_mod(self, q_len: int, k_len: int) -> MaskMod:
        return self.fn

    def __repr__(self) -> str:
        return f"from_function({self.name})"


def from_function(fn: MaskMod, name: str | None = None) -> Mask:
    """Any mask, given as FlexAttention's ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``.

    The contract, the same on every backend: ``fn`` is first called on a whole block with
    int32 index tensors (as in Flex's compiled kernels) of one fixed layout, ``b`` (B, 1, 1, 1),
    ``h`` (1, H, 1, 1), ``q_idx`` (1, 1, bq, 1) and ``kv_idx`` (1, 1, 1, bk), and returns a
    bool tensor (True = may attend) that broadcasts to (B, H, bq, bk); a result with fewer
    dimensions has them as leading ones (Flex's ``noop_mask`` returns a 0-d True). A function
    written for FlexAttention's per-position calls (0-d indices), which fails on index
    tensors or returns another shape (``bias[q_idx][kv_idx]``, ``torch.dot(a[q_idx],
    a[kv_idx])``), is then called as Flex calls it: through ``torch.vmap``, once per position,
    exact but about 20x slower. On the first block the broadcast answer is also checked
    against per-position calls at up to 81 positions, and a function that disagrees there
    is evaluated per position from then on (see ``attnkit/_index_fn.py``). ``fn`` must be
    pure: the same inputs give the same answer, whenever and however often it is called, or
    cached block states go stale.

    Block states are exact: :meth:`Mask.block_states` evaluates ``fn`` on every pair, in
    chunks of about 8M pairs, and reduces each block (a block is empty or full only if
    each of its pairs says so; no black-box function allows less). The result is cached
    per (lengths, block sizes, batch, heads, device), so the tiled backend's later calls
    pay nothing. ``fn`` is evaluated over the call's batch and heads; a function that
    ignores ``b`` and ``h`` returns a tensor without those axes and costs nothing extra.

    Errors name the function: an exception in both kinds of call (with both reasons), a
    non-tensor, a dtype other than bool, or more than one value per position raise
    ValueError/TypeError.

    >>> m = from_function(lambda b, h, q_idx, kv_idx: (q_idx - kv_idx) % 3 == 0, name="every_third")
    >>> m.to_dense(4, 4).int()
    tensor([[1, 0, 0, 1],
            [0, 1, 0, 0],
            [0, 0, 1, 0],
            [1, 0, 0, 1]], dtype=torch.int32)
    """
    return _Function(fn, name)


# -- sparse patterns of the literature -------------------------------------------------------


class _ByDistance(_Diagonal):
    """A mask that depends only on ``d = (i + offset) - j``: ``_keep(d)``, elementwise.

    Every block holds every distance between its extremes, so a block is empty (full) iff
    no (every) distance in [dmin, dmax] is kept: O(Lq + Lk) prefix sums over distances,
    then O(1) per block, exact.
    """

    def __init__(self, align: str, shift: int | None = None):
        super().__init__(None, None, align, shift)

    def _keep(self, d: Tensor) -> Tensor:
        raise NotImplementedError

    def band_form(self, q_len: int, k_len: int) -> BandForm | None:
        return None  # kept distances need not be one interval

    def allowed(self, block: ScoreBlock) -> Tensor:
        return self._keep(block.i + self._diagonal(block.q_len, block.k_len) - block.j)

    def mask_mod(self, q_len: int, k_len: int) -> MaskMod:
        off = self._diagonal(q_len, k_len)
        return lambda b, h, q_idx, kv_idx: self._keep(q_idx + off - kv_idx)

    def block_states(self, q_len: int, k_len: int, block_q: int, block_k: int, *, batch: int | None = None,
                     heads: int | None = None, device: torch.device | str = "cpu") -> Tensor:
        device = torch.device(device)
        off = self._diagonal(q_len, k_len)
        q0, q1 = block_bounds(q_len, block_q, device)
        k0, k1 = block_bounds(k_len, block_k, device)
        low = -(k_len - 1) + off  # smallest distance (i + off) - j
        d = torch.arange(low, q_len + off, device=device)
        kept = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), self._keep(d).to(torch.int64).cumsum(0)])
        dmin = q0[:, None] + off - (k1[None, :] - 1)
        dmax = (q1[:, None] - 1) + off - k0[None, :]
        count = kept[dmax - low + 1] - kept[dmin - low]
        return states(count == 0, count == dmax - dmin + 1)

    def shifted(self, q_offset: int, k_offset: int, *, q_total: int | None = None,
                k_total: int | None = None) -> Mask:
        q_offset = require_int("q_offset", q_offset, minimum=0)
        k_offset = require_int("k_offset", k_offset, minimum=0)
        base = 0 if q_total is None or k_total is None else self._diagonal(q_total, k_total)
        out = copy.copy(self)
        out.shift = q_offset - k_offset + base
        return out


class _Strided(_ByDistance):
    def __init__(self, stride: int, align: str, shift: int | None = None):
        super().__init__(align, shift)
        self.stride = stride

    def _keep(self, d: Tensor) -> Tensor:
        return (d >= 0) & ((d < self.stride) | (d % self.stride == 0))

    def _picture_size(self) -> tuple[int, int]:
        return 4 * self.stride, 4 * self.stride

    def __repr__(self) -> str:
        return f"strided({self.stride}, {self._where()})"


def strided(stride: int, align: str = "top_left") -> Mask:
    """The strided pattern of the Sparse Transformer (Child et al. 2019, "Generating Long
    Sequences with Sparse Transformers", section 4.2): query ``i`` attends to key ``j``
    iff ``j <= i`` and (``i - j < stride`` or ``(i - j) % stride == 0``).

    The two terms are the paper's two heads of factorised attention (the previous
    ``stride`` keys, and every ``stride``-th key before them) in one mask; it is causal
    by definition, so ``strided(s) & causal()`` equals ``strided(s)``. With Lq != Lk,
    ``i`` is shifted by ``align`` as for :func:`causal`. Block states are exact, O(1) per block.

    >>> strided(3).to_dense(7, 7).int()[6]
    tensor([1, 0, 0, 1, 1, 1, 1], dtype=torch.int32)
    """
    return _Strided(require_int("stride", stride, minimum=1), align)


class _Dilated(_ByDistance):
    def __init__(self, window: int, dilation: int, align: str, shift: int | None = None):
        super().__init__(align, shift)
        self.window, self.dilation = window, dilation

    def _keep(self, d: Tensor) -> Tensor:
        return (d >= 0) & (d < self.window) & (d % self.dilation == 0)

    def _picture_size(self) -> tuple[int, int]:
        return 2 * self.window, 2 * self.window

    def __repr__(self) -> str:
        return f"dilated(window={self.window}, dilation={self.dilation}, {self._where()})"


def dilated(window: int, dilation: int, align: str = "top_left") -> Mask:
    """A causal window of ``window`` positions that keeps every ``dilation``-th key:
    query ``i`` attends to key ``j`` iff ``0 <= i - j < window`` and
    ``(i - j) % dilation == 0``.

    This is the dilated sliding window of Longformer (Beltagy et al. 2020, section 3.1),
    causal, and LongNet's dilation (Ding et al. 2023) within a sliding window rather than
    fixed segments: the receptive field grows with ``dilation`` at the same cost.
    ``dilated(w, 1)`` is ``sliding_window(w - 1)``. Block states are exact, O(1) per block.

    >>> dilated(window=6, dilation=2).to_dense(7, 7).int()[6]
    tensor([0, 0, 1, 0, 1, 0, 1], dtype=torch.int32)
    """
    window = require_int("window", window, minimum=1)
    return _Dilated(window, require_int("dilation", dilation, minimum=1), align)


class _Chunked(Mask):
    def __init__(self, size: int):
        self.size = size

    def allowed(self, block: ScoreBlock) -> Tensor:
        return block.i // self.size == block.j // self.size

    def mask_mod(self, q_len: int, k_len: int) -> MaskMod:
        return lambda b, h, q_idx, kv_idx: q_idx // self.size == kv_idx // self.size

    def block_states(self, q_len: int, k_len: int, block_q: int, block_k: int, *, batch: int | None = None,
                     heads: int | None = None, device: torch.device | str = "cpu") -> Tensor:
        device = torch.device(device)
        q0, q1 = block_bounds(q_len, block_q, device)
        k0, k1 = block_bounds(k_len, block_k, device)
        qa, qb = (q0 // self.size)[:, None], ((q1 - 1) // self.size)[:, None]  # chunks a block spans
        ka, kb = (k0 // self.size)[None, :], ((k1 - 1) // self.size)[None, :]
        return states((qb < ka) | (kb < qa), (qa == qb) & (ka == kb) & (qa == ka))

    def _picture_size(self) -> tuple[int, int]:
        return 4 * self.size, 4 * self.size

    def __repr__(self) -> str:
        return f"chunked({self.size})"


def chunked(size: int) -> Mask:
    """Attention only within the same chunk of ``size`` positions: query ``i`` attends to
    key ``j`` iff ``i // size == j // size``.

    Llama 4's chunked local attention (Meta 2025; ``attention_chunk_size`` in its config,
    8192) is ``chunked(size) & causal()``: each token sees the tokens of its own chunk up
    to itself. Block states are exact, O(1) per block.

    >>> chunked(2).to_dense(4, 4).int()
    tensor([[1, 1, 0, 0],
            [1, 1, 0, 0],
            [0, 0, 1, 1],
            [0, 0, 1, 1]], dtype=torch.int32)
    """
    return _Chunked(require_int("size", size, minimum=1))


class _FromBlocks(_Evaluated):
    def __init__(self, block_mask: Tensor, block_q: int, block_k: int):
        require_tensor("block_mask", block_mask)
        if block_mask.dtype != torch.bool:
            raise TypeError(f"block_mask must be a bool tensor (True = the block may attend); "
                            f"got {describe(block_mask)}")
        if not 2 <= block_mask.dim() <= 4:
            raise ValueError(f"block_mask must be (nq, nk), (H, nq, nk) or (B, H, nq, nk); got shape "
                             f"{tuple(block_mask.shape)}")
        self.blocks_ = block_mask.reshape((1,) * (4 - block_mask.dim()) + tuple(block_mask.shape))
        self.block_q, self.block_k = block_q, block_k

    def allowed(self, block: ScoreBlock) -> Tensor:
        t = self.blocks_.to(block.device)
        rows = torch.arange(block.q_start, block.q_stop, device=block.device) // self.block_q
        cols = torch.arange(block.k_start, block.k_stop, device=block.device) // self.block_k
        sub = t[:, :, rows][:, :, :, cols]  # (B|1, H|1, bq, bk)
        if sub.shape[1] == 1:
            return sub.unsqueeze(3)
        return sub.unflatten(1, (block.kv_heads, block.groups)).transpose(2, 3)  # (B|1, Hkv, bq, G, bk)

    def mask_mod(self, q_len: int, k_len: int) -> MaskMod:
        t, bq, bk = self.blocks_, self.block_q, self.block_k
        many_b, many_h = t.shape[0] > 1, t.shape[1] > 1

        def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            z = torch.zeros((), dtype=torch.int64, device=t.device)
            return t[b if many_b else z, h if many_h else z, q_idx // bq, kv_idx // bk]

        return mod

    def check(self, batch: int, heads: int, q_len: int, k_len: int, device: torch.device) -> None:
        nq, nk = -(-q_len // self.block_q), -(-k_len // self.block_k)
        if tuple(self.blocks_.shape[2:]) != (nq, nk):
            raise ValueError(f"block_mask has {tuple(self.blocks_.shape[2:])} blocks; Lq={q_len}, Lk={k_len} in "
                             f"blocks of {self.block_q} x {self.block_k} need ({nq}, {nk})")
        check_broadcast_4d("block_mask", self.blocks_, (batch, heads, nq, nk))

    def extent(self) -> tuple[int, int]:
        return self.blocks_.shape[0], self.blocks_.shape[1]

    def natural_size(self) -> tuple[int, int] | None:
        return self.blocks_.shape[2] * self.block_q, self.blocks_.shape[3] * self.block_k

    def __repr__(self) -> str:
        return f"from_blocks({tuple(self.blocks_.shape[2:])} blocks of {self.block_q} x {self.block_k})"


def from_blocks(block_mask: Tensor, block_q: int, block_k: int | None = None) -> Mask:
    """A user's boolean block map: query block ``r`` may attend to key block ``c`` iff
    ``block_mask[..., r, c]``.

    Args:
        block_mask: bool, (nq, nk), (H, nq, nk) or (B, H, nq, nk) with 1 where a dim does
            not vary; nq = ceil(Lq / block_q), nk = ceil(Lk / block_k) (the last block of
            each axis may be short).
        block_q, block_k: block sizes in tokens (``block_k`` defaults to ``block_q``).

    This is the block-sparse layout that flash-attn's block-sparse attention and Flex's
    ``BlockMask.from_kv_blocks`` take (as a dense map). Block states on the tiled
    backend's own grid are evaluated exactly and cached.

    >>> from_blocks(torch.tensor([[True, False], [True, True]]), 2).to_dense(4, 4).int()
    tensor([[1, 1, 0, 0],
            [1, 1, 0, 0],
            [1, 1, 1, 1],
            [1, 1, 1, 1]], dtype=torch.int32)
    """
    block_q = require_int("block_q", block_q, minimum=1)
    block_k = block_q if block_k is None else require_int("block_k", block_k, minimum=1)
    return _FromBlocks(block_mask, block_q, block_k)


class _BigBird(_Evaluated):
    def __init__(self, window: int, global_tokens: int, random_blocks: int, block_size: int, seed: int):
        self.window, self.global_tokens, self.random_blocks = window, global_tokens, random_blocks
        self.block_size, self.seed = block_size, seed

    def layout(self, q_len: int, k_len: int) -> Tensor:
        """The (nq, nk) bool map of window and random blocks at these lengths (global tokens aside)."""
        nq, nk = -(-q_len // self.block_size), -(-k_len // self.block_size)
        r, c = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
        near = (r - c).abs() <= self.window
        g = torch.Generator().manual_seed(self.seed)
        # each query block draws random_blocks key blocks uniformly among those outside its window
        draw = torch.rand(nq, nk, generator=g).masked_fill(near, 2.0)
        take = min(self.random_blocks, nk)
        chosen = torch.zeros(nq, nk, dtype=torch.bool)
        if take:
            picks = draw.topk(take, dim=1, largest=False)
            chosen.scatter_(1, picks.indices, picks.values < 2.0)
        return near | chosen

    def allowed(self, block: ScoreBlock) -> Tensor:
        lay = self.layout(block.q_len, block.k_len).to(block.device)
        i = torch.arange(block.q_start, block.q_stop, device=block.device)
        j = torch.arange(block.k_start, block.k_stop, device=block.device)
        a = lay[i // self.block_size][:, j // self.block_size]
        a = a | (i < self.global_tokens)[:, None] | (j < self.global_tokens)[None, :]
        return a.view(1, 1, a.shape[0], 1, a.shape[1])

    def mask_mod(self, q_len: int, k_len: int) -> MaskMod:
        lay, bs, g = self.layout(q_len, k_len), self.block_size, self.global_tokens

        def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return lay.to(q_idx.device)[q_idx // bs, kv_idx // bs] | (q_idx < g) | (kv_idx < g)

        return mod

    def _picture_size(self) -> tuple[int, int]:
        return 12 * self.block_size, 12 * self.block_size

    def __repr__(self) -> str:
        return (f"bigbird(window={self.window}, global_tokens={self.global_tokens}, random_blocks="
                f"{self.random_blocks}, block_size={self.block_size}, seed={self.seed})")


def bigbird(window: int = 1, global_tokens: int = 0, random_blocks: int = 3, block_size: int = 64,
            seed: int = 0) -> Mask:
    """BigBird's sparse attention (Zaheer et al. 2020, "Big Bird: Transformers for Longer
    Sequences"), in its block-sparse form (appendix D): window + global + random.

    The sequence is cut into blocks of ``block_size`` tokens. Query block ``r`` attends to
    key blocks ``c`` with ``|r - c| <= window`` (the paper's 3-block window is
    ``window=1``), and to ``random_blocks`` more key blocks drawn uniformly, without
    replacement, among those outside its window. The first ``global_tokens`` tokens attend
    to every key and every query attends to them (BigBird-ITC's global tokens).

    The random blocks are deterministic: the same ``seed`` and lengths give the same
    layout (:meth:`layout`) on every call, backend and process, as the paper's
    block-sparse implementation fixes them per layer. Block states on the tiled grid are
    evaluated exactly and cached.
    """
    return _BigBird(require_int("window", window, minimum=0), require_int("global_tokens", global_tokens, minimum=0),
                    require_int("random_blocks", random_blocks, minimum=0),
                    require_int("block_size", block_size, minimum=1), require_int("seed", seed))


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
