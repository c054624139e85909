"""The built-in masks: diagonals (causal, sliding windows), prefix LM, global tokens, per-token masks
(documents, key padding, dense tensors) and any elementwise function."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

from attnkit._blocks import EMPTY, FULL, ScoreBlock, block_bounds, reduce_over_batch, states
from attnkit._checks import check_broadcast_4d, describe, int_vector, require_choice, require_int, require_tensor
from attnkit._index_fn import IndexFunction
from attnkit.masks._core import Mask, MaskMod, _evaluate_states
from attnkit.masks._lengths import _ALIGNS, _PADDINGS, Lengths, _offset

# -- analytic masks ---------------------------------------------------------------------


class Diagonal(Mask):
    """Allows ``-left <= j - (i + offset) <= right``; ``None`` means unbounded.

    ``shift``, if set, is a fixed offset (a piece of a longer sequence) instead of the one
    that ``align`` gives at the call's lengths.
    """

    lengths: Lengths | None = None  # per-sequence alignment, if given

    def __init__(self, left: int | None, right: int | None, align: str, shift: int | None = None):
        self.left, self.right = left, right
        self.align = require_choice("align", align, _ALIGNS)
        self.shift = shift


    def diagonal(self, q_len: int, k_len: int) -> int:
        return _offset(self.align, q_len, k_len) if self.shift is None else self.shift

    def diagonals(self, q_len: int, k_len: int, device: torch.device) -> Tensor | int:
        """The offset, or (B, 1, 1, 1, 1) offsets with per-sequence lengths."""
        if self.lengths is None:
            return self.diagonal(q_len, k_len)
        return self.lengths.offsets(self.align, q_len, k_len, device).view(-1, 1, 1, 1, 1)

    def _within(self, d: Tensor) -> Tensor:
        ok = torch.ones((), dtype=torch.bool, device=d.device)
        if self.left is not None:
            ok = ok & (d >= -self.left)
        if self.right is not None:
            ok = ok & (d <= self.right)
        return ok

    def allowed(self, block: ScoreBlock) -> Tensor:
        return self._within(block.j - (block.i + self.diagonals(block.q_len, block.k_len, block.device)))

    def block_states(self, q_len: int, k_len: int, block_q: int, block_k: int, *, batch: int | None = None,
                     heads: int | None = None, device: torch.device | str = "cpu") -> Tensor:
        device = torch.device(device)
        if self.lengths is not None:
            per = [self._states_at(int(o), q_len, k_len, block_q, block_k, device)
                   for o in self.lengths.offsets(self.align, q_len, k_len, device).tolist()]
            return reduce_over_batch(torch.stack(per))
        return self._states_at(self.diagonal(q_len, k_len), q_len, k_len, block_q, block_k, device)

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
        base = 0 if q_total is None or k_total is None else self.diagonal(q_total, k_total)
        return type(self)(self.left, self.right, self.align, q_offset - k_offset + base)

    def _where(self) -> str:
        where = f"align={self.align!r}" if self.shift is None else f"shift={self.shift}"
        return where if self.lengths is None else f"{where}, {self.lengths!r}"


class Causal(Diagonal):
    """``j <= i + offset`` (:func:`causal`): a :class:`Diagonal` with ``left=None``, ``right=0``."""

    def __init__(self, left: int | None, right: int | None, align: str, shift: int | None = None):
        super().__init__(None, 0, align, shift)

    def __repr__(self) -> str:
        return f"causal({self._where()})"


class SlidingWindow(Diagonal):
    """``-left <= j - (i + offset) <= right`` (:func:`sliding_window`): a :class:`Diagonal`."""

    def __repr__(self) -> str:
        return f"sliding_window(left={self.left}, right={self.right}, {self._where()})"


def _aligned(mask: Diagonal, q_lengths: Sequence[int] | Tensor | None, k_lengths: Sequence[int] | Tensor | None,
             padding: str) -> Diagonal:
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
    return _aligned(Causal(None, 0, align), q_lengths, k_lengths, padding)


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
    return _aligned(SlidingWindow(left, right, align), q_lengths, k_lengths, padding)


class PrefixLM(Mask):
    """Causal, and every query sees keys ``j < prefix[b]`` (:func:`prefix_lm`). Fields: ``prefix`` (int64
    (1|B,)), ``align``."""


    def __init__(self, prefix_length: int | Tensor, align: str):
        self.align = require_choice("align", align, _ALIGNS)
        if isinstance(prefix_length, Tensor):
            self.prefix = int_vector("prefix_length", prefix_length)
            if (self.prefix < 0).any():
                raise ValueError(f"prefix_length must be >= 0; got {self.prefix.tolist()}")
        else:
            self.prefix = torch.tensor([require_int("prefix_length", prefix_length, minimum=0)])
        self._causal = Causal(None, 0, align)

    def _prefix(self, device: torch.device) -> Tensor:
        return self.prefix.to(device)

    def allowed(self, block: ScoreBlock) -> Tensor:
        p = self._prefix(block.device).view(-1, 1, 1, 1, 1)
        return self._causal.allowed(block) | (block.j < p)

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
    return PrefixLM(prefix_length, align)


class GlobalTokens(Mask):
    """Rows and columns of ``positions`` (int64) allowed throughout (:func:`global_tokens`)."""

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
    return GlobalTokens(positions)


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


class Document(Mask):
    """``q_ids[b, i] == kv_ids[b, j]`` (:func:`document`). Fields: ``q_ids`` (1|B, Lq), ``kv_ids`` (1|B, Lk),
    int64."""

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

    def allowed(self, block: ScoreBlock) -> Tensor:
        q_ids, kv_ids = self._ids(block.device)
        qi = q_ids[:, block.q_start : block.q_stop].view(q_ids.shape[0], 1, -1, 1, 1)
        kj = kv_ids[:, block.k_start : block.k_stop].view(kv_ids.shape[0], 1, 1, 1, -1)
        return qi == kj

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
    return Document(q_ids, kv_ids)


class KeyPadding(Mask):
    """Real keys only (:func:`key_padding`). Fields: ``lengths`` (int64 (B,): the first ``lengths[b]``
    keys are real) or ``valid`` (bool (B, Lk)); one of them is None."""

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

    def valid_rows(self, k_len: int, device: torch.device) -> Tensor:
        if self.valid is not None:
            return self.valid.to(device)
        return torch.arange(k_len, device=device)[None, :] < self.lengths.to(device)[:, None]  # type: ignore[union-attr]

    def allowed(self, block: ScoreBlock) -> Tensor:
        if self.lengths is not None:
            return block.j < self.lengths.to(block.device).view(-1, 1, 1, 1, 1)
        valid = self.valid.to(block.device)[:, block.k_start : block.k_stop]  # type: ignore[union-attr]
        return valid.view(valid.shape[0], 1, 1, 1, -1)

    def block_states(self, q_len: int, k_len: int, block_q: int, block_k: int, *, batch: int | None = None,
                     heads: int | None = None, device: torch.device | str = "cpu") -> Tensor:
        device = torch.device(device)
        valid = self.valid_rows(k_len, device)  # (B, Lk)
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
    return KeyPadding(lengths, valid)


class Dense(Mask):
    """A bool tensor (:func:`from_tensor`). Field: ``tensor``, (B|1, H|1, Lq|1, Lk|1)."""

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
    return Dense(mask)


# -- any elementwise function ---------------------------------------------------------------


class Evaluated(Mask):
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


class Function(Evaluated):
    """Any elementwise ``fn(b, h, q_idx, kv_idx)`` (:func:`from_function`). Fields: ``fn``, ``name``."""

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
    exact but one to two orders of magnitude slower (docs/core.md has the measured table). On
    the first block the broadcast answer is also checked against per-position calls at up to
    81 positions, and a function that disagrees there
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
    return Function(fn, name)
