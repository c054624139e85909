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

import math
from collections.abc import Sequence

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

__all__ = [
    "BlockMap",
    "Mask",
    "causal",
    "document",
    "from_tensor",
    "global_tokens",
    "key_padding",
    "prefix_lm",
    "sliding_window",
]

_ALIGNS = ("top_left", "bottom_right")


def _offset(align: str, q_len: int, k_len: int) -> int:
    """Shift of the diagonal: query i sits at key position i + offset."""
    return 0 if align == "top_left" else k_len - q_len


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


class Mask:
    """Base class of all masks. Subclasses implement ``allowed`` and ``_block_states``."""

    def allowed(self, block: ScoreBlock) -> Tensor:
        """Bool tensor, broadcastable to ``block.shape`` = (B, Hkv, bq, G, bk)."""
        raise NotImplementedError

    def _block_states(self, q_len: int, k_len: int, block_q: int, block_k: int,
                      device: torch.device) -> Tensor:
        """int8 (ceil(Lq/bq), ceil(Lk/bk)) block states, aggregated over batch and heads."""
        raise NotImplementedError

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
        for q0, q1, block in self._row_chunks(b, mh, q_len, k_len, device):
            dense[:, :, q0:q1] = self.allowed(block).expand(block.shape).squeeze(3)
        return dense[0, 0] if (b, mh) == (1, 1) else dense

    def _row_chunks(self, batch: int, heads: int, q_len: int, k_len: int, device: torch.device):
        """Blocks of whole rows, each about 4M elements, so that evaluating the mask
        (int64 index arithmetic) never holds more than a chunk at once."""
        rows = max(1, (1 << 22) // max(1, k_len * batch * heads))
        for q0 in range(0, q_len, rows):
            q1 = min(q_len, q0 + rows)
            yield q0, q1, ScoreBlock(batch, heads, 1, q_len, k_len, q0, q1, 0, k_len, device)

    def blocks(self, q_len: int, k_len: int, block_size: int | tuple[int, int] = 128) -> BlockMap:
        """Classify every (block_q x block_k) block as empty, partial or full."""
        bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
        q_len, k_len = require_int("q_len", q_len, minimum=0), require_int("k_len", k_len, minimum=0)
        bq, bk = require_int("block_q", bq, minimum=1), require_int("block_k", bk, minimum=1)
        mb, mh = self.extent()
        self.check(mb, mh, q_len, k_len, torch.device("cpu"))
        state = self._block_states(q_len, k_len, bq, bk, torch.device("cpu"))
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
        for _, _, block in self._row_chunks(mb, mh, q_len, k_len, device):
            allowed += int(self.allowed(block).expand(block.shape).sum())
        return 1.0 - allowed / (q_len * k_len * mb * mh)

    def __and__(self, other: Mask) -> Mask:
        return _And(self, _as_mask("other", other))

    def __or__(self, other: Mask) -> Mask:
        return _Or(self, _as_mask("other", other))

    def __invert__(self) -> Mask:
        return _Not(self)

    def __str__(self) -> str:
        q_len, k_len = self.natural_size() or (16, 16)
        size = max(1, math.ceil(max(q_len, k_len) / 32))
        return str(self.blocks(q_len, k_len, size))


def _as_mask(name: str, m: object) -> Mask:
    if isinstance(m, Mask):
        return m
    if isinstance(m, Tensor):
        return from_tensor(m)
    raise TypeError(f"{name} must be an attnkit mask or a bool tensor; got {describe(m)}")


# -- composition ----------------------------------------------------------------------


class _And(Mask):
    def __init__(self, a: Mask, b: Mask):
        self.a, self.b = a, b

    def allowed(self, block: ScoreBlock) -> Tensor:
        return self.a.allowed(block) & self.b.allowed(block)

    def _block_states(self, q_len, k_len, block_q, block_k, device):
        sa = self.a._block_states(q_len, k_len, block_q, block_k, device)
        sb = self.b._block_states(q_len, k_len, block_q, block_k, device)
        return states((sa == EMPTY) | (sb == EMPTY), (sa == FULL) & (sb == FULL))

    def check(self, batch, heads, q_len, k_len, device):
        self.a.check(batch, heads, q_len, k_len, device)
        self.b.check(batch, heads, q_len, k_len, device)

    def extent(self):
        (b1, h1), (b2, h2) = self.a.extent(), self.b.extent()
        return max(b1, b2), max(h1, h2)

    def natural_size(self):
        return self.a.natural_size() or self.b.natural_size()

    def __repr__(self) -> str:
        return f"({self.a!r} & {self.b!r})"


class _Or(_And):
    def allowed(self, block):
        return self.a.allowed(block) | self.b.allowed(block)

    def _block_states(self, q_len, k_len, block_q, block_k, device):
        sa = self.a._block_states(q_len, k_len, block_q, block_k, device)
        sb = self.b._block_states(q_len, k_len, block_q, block_k, device)
        return states((sa == EMPTY) & (sb == EMPTY), (sa == FULL) | (sb == FULL))

    def __repr__(self) -> str:
        return f"({self.a!r} | {self.b!r})"


class _Not(Mask):
    def __init__(self, a: Mask):
        self.a = a

    def allowed(self, block):
        return ~self.a.allowed(block)

    def _block_states(self, q_len, k_len, block_q, block_k, device):
        s = self.a._block_states(q_len, k_len, block_q, block_k, device)
        return states(s == FULL, s == EMPTY)

    def check(self, batch, heads, q_len, k_len, device):
        self.a.check(batch, heads, q_len, k_len, device)

    def extent(self):
        return self.a.extent()

    def natural_size(self):
        return self.a.natural_size()

    def __repr__(self) -> str:
        return f"~{self.a!r}"


# -- analytic masks ---------------------------------------------------------------------


class _Diagonal(Mask):
    """Allows ``-left <= j - (i + offset) <= right``; ``None`` means unbounded."""

    def __init__(self, left: int | None, right: int | None, align: str):
        self.left, self.right = left, right
        self.align = require_choice("align", align, _ALIGNS)
        self.shift: int | None = None  # a fixed offset, set by _shifted for a piece of a longer sequence

    def _diagonal(self, q_len: int, k_len: int) -> int:
        return _offset(self.align, q_len, k_len) if self.shift is None else self.shift

    def allowed(self, block):
        d = block.j - (block.i + self._diagonal(block.q_len, block.k_len))
        ok = torch.ones((), dtype=torch.bool, device=block.device)
        if self.left is not None:
            ok = ok & (d >= -self.left)
        if self.right is not None:
            ok = ok & (d <= self.right)
        return ok

    def _block_states(self, q_len, k_len, block_q, block_k, device):
        off = self._diagonal(q_len, k_len)
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


class _Causal(_Diagonal):
    def __init__(self, align: str):
        super().__init__(None, 0, align)

    def __repr__(self) -> str:
        return f"causal(align={self.align!r})" if self.shift is None else f"causal(shift={self.shift})"


class _SlidingWindow(_Diagonal):
    def __repr__(self) -> str:
        where = f"align={self.align!r}" if self.shift is None else f"shift={self.shift}"
        return f"sliding_window(left={self.left}, right={self.right}, {where})"


def causal(align: str = "top_left") -> Mask:
    """Query ``i`` may attend to keys ``j <= i + offset``.

    Args:
        align: ``"top_left"`` (offset 0, SDPA's convention) or ``"bottom_right"``
            (offset ``Lk - Lq``: flash-attn's convention and KV-cache decoding). With
            bottom-right alignment and Lq > Lk the first ``Lq - Lk`` rows allow no key;
            they output 0.

    >>> causal().to_dense(3, 3).int()
    tensor([[1, 0, 0],
            [1, 1, 0],
            [1, 1, 1]], dtype=torch.int32)
    >>> causal(align="bottom_right").to_dense(2, 4).int()
    tensor([[1, 1, 1, 0],
            [1, 1, 1, 1]], dtype=torch.int32)
    """
    return _Causal(align)


def sliding_window(left: int, right: int = 0, align: str = "top_left") -> Mask:
    """Query ``i`` may attend to keys ``j`` with ``-left <= j - (i + offset) <= right``.

    ``sliding_window(left=w)`` is causal attention to the current token and the ``w``
    before it (Mistral's window of ``w + 1`` tokens). ``sliding_window(w, w)`` is a
    symmetric local window (Longformer). The offset follows ``align``, as for
    :func:`causal`.

    >>> sliding_window(1, 1).to_dense(4, 4).int()
    tensor([[1, 1, 0, 0],
            [1, 1, 1, 0],
            [0, 1, 1, 1],
            [0, 0, 1, 1]], dtype=torch.int32)
    """
    left = require_int("left", left, minimum=0)
    right = require_int("right", right, minimum=0)
    return _SlidingWindow(left, right, align)


class _PrefixLM(Mask):
    def __init__(self, prefix_length: int | Tensor, align: str):
        self.align = require_choice("align", align, _ALIGNS)
        if isinstance(prefix_length, Tensor):
            self.prefix = int_vector("prefix_length", prefix_length)
            if (self.prefix < 0).any():
                raise ValueError(f"prefix_length must be >= 0; got {self.prefix.tolist()}")
        else:
            self.prefix = torch.tensor([require_int("prefix_length", prefix_length, minimum=0)])
        self._causal = _Causal(align)

    def _prefix(self, device: torch.device) -> Tensor:
        return self.prefix.to(device)

    def allowed(self, block):
        p = self._prefix(block.device).view(-1, 1, 1, 1, 1)
        return self._causal.allowed(block) | (block.j < p)

    def _block_states(self, q_len, k_len, block_q, block_k, device):
        c = self._causal._block_states(q_len, k_len, block_q, block_k, device)
        k0, k1 = block_bounds(k_len, block_k, device)
        p = self._prefix(device)[:, None, None]  # (B, 1, 1)
        full = (c == FULL) | ((k1 - 1)[None, None, :] < p)
        empty = (c == EMPTY) & (k0[None, None, :] >= p)
        nq = c.shape[0]
        return reduce_over_batch(states(empty.expand(-1, nq, -1), full.expand(-1, nq, -1)))

    def check(self, batch, heads, q_len, k_len, device):
        if self.prefix.numel() not in (1, batch):
            raise ValueError(
                f"prefix_length has {self.prefix.numel()} entries; expected 1 or batch={batch}"
            )

    def extent(self):
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

    def allowed(self, block):
        gq = self._flags(block.q_len, block.device)[block.q_start : block.q_stop]
        gk = self._flags(block.k_len, block.device)[block.k_start : block.k_stop]
        return gq.view(1, 1, -1, 1, 1) | gk.view(1, 1, 1, 1, -1)

    def _block_states(self, q_len, k_len, block_q, block_k, device):
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

    def check(self, batch, heads, q_len, k_len, device):
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

    def allowed(self, block):
        q_ids, kv_ids = self._ids(block.device)
        qi = q_ids[:, block.q_start : block.q_stop].view(q_ids.shape[0], 1, -1, 1, 1)
        kj = kv_ids[:, block.k_start : block.k_stop].view(kv_ids.shape[0], 1, 1, 1, -1)
        return qi == kj

    def _block_states(self, q_len, k_len, block_q, block_k, device):
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

    def check(self, batch, heads, q_len, k_len, device):
        _check_rows("document q_ids", self.q_ids, batch, q_len, "Lq")
        _check_rows("document kv_ids", self.kv_ids, batch, k_len, "Lk")

    def extent(self):
        return max(self.q_ids.shape[0], self.kv_ids.shape[0]), 1

    def natural_size(self):
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

    def _valid_rows(self, k_len: int, device: torch.device) -> Tensor:
        if self.valid is not None:
            return self.valid.to(device)
        return torch.arange(k_len, device=device)[None, :] < self.lengths.to(device)[:, None]  # type: ignore[union-attr]

    def allowed(self, block):
        if self.lengths is not None:
            return block.j < self.lengths.to(block.device).view(-1, 1, 1, 1, 1)
        valid = self.valid.to(block.device)[:, block.k_start : block.k_stop]  # type: ignore[union-attr]
        return valid.view(valid.shape[0], 1, 1, 1, -1)

    def _block_states(self, q_len, k_len, block_q, block_k, device):
        valid = self._valid_rows(k_len, device)  # (B, Lk)
        nq = -(-q_len // block_q)
        if k_len == 0:
            return torch.zeros(nq, 0, dtype=torch.int8, device=device)
        lo, hi = _block_min_max(valid.to(torch.int8), block_k)  # (B, nk)
        per_batch = states(hi == 0, lo == 1)[:, None, :].expand(-1, nq, -1)
        return reduce_over_batch(per_batch)

    def check(self, batch, heads, q_len, k_len, device):
        if self.lengths is not None:
            if self.lengths.numel() not in (1, batch):
                raise ValueError(f"key_padding lengths has {self.lengths.numel()} entries; expected batch={batch}")
            if int(self.lengths.max()) > k_len:
                raise ValueError(f"key_padding lengths must be <= Lk={k_len}; got {self.lengths.tolist()}")
        else:
            _check_rows("key_padding valid", self.valid, batch, k_len, "Lk")  # type: ignore[arg-type]

    def extent(self):
        rows = self.lengths if self.lengths is not None else self.valid
        return rows.shape[0], 1  # type: ignore[union-attr]

    def natural_size(self):
        if self.valid is not None:
            return self.valid.shape[1], self.valid.shape[1]
        n = int(self.lengths.max()) if self.lengths.numel() else 0  # type: ignore[union-attr]
        return (n, n) if n else None

    def rows_without_keys(self, k_len: int) -> bool:
        """Whether some batch element has no valid key at all."""
        return bool((~self._valid_rows(k_len, torch.device("cpu")).any(1)).any())

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

    def allowed(self, block):
        return block.take(self.tensor.to(block.device))

    def _block_states(self, q_len, k_len, block_q, block_k, device):
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

    def check(self, batch, heads, q_len, k_len, device):
        check_broadcast_4d("mask", self.given, (batch, heads, q_len, k_len))
        if self.tensor.device != device:
            raise ValueError(
                f"mask tensor is on {self.tensor.device} but the inputs are on {device}; "
                "move the mask to the inputs' device"
            )

    def extent(self):
        return self.tensor.shape[0], self.tensor.shape[1]

    def natural_size(self):
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
