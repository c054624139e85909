"""The mask protocol (:class:`Mask`), its block maps, and the algebra of masks (``&``, ``|``, ``~``, shifted)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from attnkit._blocks import EMPTY, FULL, PARTIAL, ScoreBlock, block_bounds, states
from attnkit._checks import describe, require_int


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


def _moved(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated and will be removed in the next release: a mask says what is allowed, "
                  f"and each kernel translates it itself; use {new}", DeprecationWarning, stacklevel=3)


class Mask:
    """Base class of all masks.

    A subclass implements at least one of :meth:`allowed` (a block of the score matrix)
    or :meth:`mask_mod` (FlexAttention's elementwise function); each has a default in
    terms of the other. Everything else has an exact default: :meth:`block_states`
    evaluates the mask block by block in bounded memory, :meth:`shifted` translates the
    coordinates. Built-in masks override them with analytic versions. A subclass that
    varies by batch or head reports it in :meth:`extent`, and checks sizes in :meth:`check`.

    A mask knows nothing of kernels. Each kernel translates the built-in masks into its own
    terms from their public fields (SDPA's arguments: :func:`attnkit.functional.sdpa.sdpa_form`;
    the tiled engines' band form, causal diagonal and positional evaluation:
    :mod:`attnkit.functional.tiled.translate`) and answers None where it has no exact form, so
    a user's own subclass runs on every backend through :meth:`allowed` and :meth:`block_states`.
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
        """This mask at lengths (Lq, Lk) as FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)``:
        :func:`attnkit.masks.flex.mask_mod`, Flex's translation of the mask.

        The function takes int index tensors that broadcast together (or 0-d tensors, as
        under Flex's ``vmap``) and returns a bool tensor of their broadcast shape. Built-in
        masks compute it from the indices; a subclass may define the mask by overriding this
        method instead of :meth:`allowed`; otherwise the mask is materialised once,
        (B, H, Lq, Lk), and indexed.
        """
        from attnkit.masks.flex import builtin_mask_mod

        return builtin_mask_mod(self, q_len, k_len)

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

    # -- kernels' translations, moved to the kernels (deprecated here, for one release) ---------

    def sdpa_form(self, q_len: int, k_len: int) -> Any:
        """Deprecated: :func:`attnkit.functional.sdpa.sdpa_form` (``mask``, ``q_len``, ``k_len``)."""
        from attnkit.functional.sdpa import sdpa_form

        _moved("Mask.sdpa_form()", "attnkit.functional.sdpa.sdpa_form(mask, q_len, k_len)")
        return sdpa_form(self, q_len, k_len)

    def band_form(self, q_len: int, k_len: int) -> Any:
        """Deprecated: :func:`attnkit.functional.tiled.translate.band_form` (``mask``, ``q_len``, ``k_len``)."""
        from attnkit.functional.tiled.translate import band_form

        _moved("Mask.band_form()", "attnkit.functional.tiled.translate.band_form(mask, q_len, k_len)")
        return band_form(self, q_len, k_len)

    def causal_offset(self, q_len: int, k_len: int) -> int | None:
        """Deprecated: :func:`attnkit.functional.tiled.translate.causal_offset` (``mask``, ``q_len``, ``k_len``)."""
        from attnkit.functional.tiled.translate import causal_offset

        _moved("Mask.causal_offset()", "attnkit.functional.tiled.translate.causal_offset(mask, q_len, k_len)")
        return causal_offset(self, q_len, k_len)

    @property
    def by_position(self) -> bool:
        """Deprecated: :func:`attnkit.functional.tiled.translate.by_position` (``mask``)."""
        from attnkit.functional.tiled.translate import by_position

        _moved("Mask.by_position", "attnkit.functional.tiled.translate.by_position(mask)")
        return by_position(self)

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
        return Shifted(self, q_offset, k_offset, q_total, k_total)

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
        return And(self, as_mask("other", other))

    def __or__(self, other: Mask) -> Mask:
        return Or(self, as_mask("other", other))

    def __invert__(self) -> Mask:
        return Not(self)

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
        from attnkit.masks._analytic import from_tensor

        return from_tensor(m)
    raise TypeError(f"{name} must be an attnkit mask or a bool tensor; got {describe(m)}")


# -- composition ----------------------------------------------------------------------


class _Binary(Mask):
    """Two masks combined (:class:`And`, :class:`Or`): ``a`` and ``b``."""

    def __init__(self, a: Mask, b: Mask):
        self.a, self.b = a, b

    def _both(self, q_len: int, k_len: int, block_q: int, block_k: int, batch: int | None, heads: int | None,
              device: torch.device | str) -> tuple[Tensor, Tensor]:
        return (self.a.block_states(q_len, k_len, block_q, block_k, batch=batch, heads=heads, device=device),
                self.b.block_states(q_len, k_len, block_q, block_k, batch=batch, heads=heads, device=device))

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


class And(_Binary):
    """Allowed where both ``a`` and ``b`` allow: ``a & b``."""

    def allowed(self, block: ScoreBlock) -> Tensor:
        return self.a.allowed(block) & self.b.allowed(block)

    def block_states(self, q_len: int, k_len: int, block_q: int, block_k: int, *, batch: int | None = None,
                     heads: int | None = None, device: torch.device | str = "cpu") -> Tensor:
        sa, sb = self._both(q_len, k_len, block_q, block_k, batch, heads, device)
        return states((sa == EMPTY) | (sb == EMPTY), (sa == FULL) & (sb == FULL))

    def __repr__(self) -> str:
        return f"({self.a!r} & {self.b!r})"


class Or(_Binary):
    """Allowed where either ``a`` or ``b`` allows: ``a | b``."""

    def allowed(self, block: ScoreBlock) -> Tensor:
        return self.a.allowed(block) | self.b.allowed(block)

    def block_states(self, q_len: int, k_len: int, block_q: int, block_k: int, *, batch: int | None = None,
                     heads: int | None = None, device: torch.device | str = "cpu") -> Tensor:
        sa, sb = self._both(q_len, k_len, block_q, block_k, batch, heads, device)
        return states((sa == EMPTY) & (sb == EMPTY), (sa == FULL) | (sb == FULL))

    def __repr__(self) -> str:
        return f"({self.a!r} | {self.b!r})"


class Not(Mask):
    """Allowed where ``a`` forbids: ``~a``."""

    def __init__(self, a: Mask):
        self.a = a

    def allowed(self, block: ScoreBlock) -> Tensor:
        return ~self.a.allowed(block)

    def block_states(self, q_len: int, k_len: int, block_q: int, block_k: int, *, batch: int | None = None,
                     heads: int | None = None, device: torch.device | str = "cpu") -> Tensor:
        s = self.a.block_states(q_len, k_len, block_q, block_k, batch=batch, heads=heads, device=device)
        return states(s == FULL, s == EMPTY)

    def shifted(self, q_offset: int, k_offset: int, *, q_total: int | None = None,
                k_total: int | None = None) -> Mask:
        return Not(self.a.shifted(q_offset, k_offset, q_total=q_total, k_total=k_total))

    def check(self, batch: int, heads: int, q_len: int, k_len: int, device: torch.device) -> None:
        self.a.check(batch, heads, q_len, k_len, device)

    def extent(self) -> tuple[int, int]:
        return self.a.extent()

    def natural_size(self) -> tuple[int, int] | None:
        return self.a.natural_size()

    def __repr__(self) -> str:
        return f"~{self.a!r}"


class Shifted(Mask):
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
