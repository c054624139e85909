"""Sparse patterns of the literature: strided and dilated (Sparse Transformer, LongNet), chunked (Llama 4),
a user's block map, BigBird."""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from attnkit._blocks import ScoreBlock, block_bounds, states
from attnkit._checks import check_broadcast_4d, describe, require_int, require_tensor
from attnkit.masks._analytic import Diagonal, Evaluated
from attnkit.masks._core import Mask

# -- sparse patterns of the literature -------------------------------------------------------


class ByDistance(Diagonal):
    """A mask that depends only on ``d = (i + offset) - j``: ``_keep(d)``, elementwise.

    Every block holds every distance between its extremes, so a block is empty (full) iff
    no (every) distance in [dmin, dmax] is kept: O(Lq + Lk) prefix sums over distances,
    then O(1) per block, exact.
    """

    def __init__(self, align: str, shift: int | None = None):
        super().__init__(None, None, align, shift)

    def _keep(self, d: Tensor) -> Tensor:
        raise NotImplementedError

    def allowed(self, block: ScoreBlock) -> Tensor:
        return self._keep(block.i + self.diagonal(block.q_len, block.k_len) - block.j)

    def block_states(self, q_len: int, k_len: int, block_q: int, block_k: int, *, batch: int | None = None,
                     heads: int | None = None, device: torch.device | str = "cpu") -> Tensor:
        device = torch.device(device)
        off = self.diagonal(q_len, k_len)
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
        base = 0 if q_total is None or k_total is None else self.diagonal(q_total, k_total)
        out = copy.copy(self)
        out.shift = q_offset - k_offset + base
        return out


class Strided(ByDistance):
    """Sparse Transformer's strided pattern (:func:`strided`). Fields: ``stride``, ``align``."""

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
    return Strided(require_int("stride", stride, minimum=1), align)


class Dilated(ByDistance):
    """A dilated causal window (:func:`dilated`). Fields: ``window``, ``dilation``, ``align``."""

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
    return Dilated(window, require_int("dilation", dilation, minimum=1), align)


class Chunked(Mask):
    """``i // size == j // size`` (:func:`chunked`). Field: ``size``."""

    def __init__(self, size: int):
        self.size = size

    def allowed(self, block: ScoreBlock) -> Tensor:
        return block.i // self.size == block.j // self.size

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
    return Chunked(require_int("size", size, minimum=1))


class FromBlocks(Evaluated):
    """A user's block map (:func:`from_blocks`). Fields: ``blocks_`` (B|1, H|1, nq, nk) bool, ``block_q``,
    ``block_k``."""

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
    return FromBlocks(block_mask, block_q, block_k)


class BigBird(Evaluated):
    """BigBird's window, global and random blocks (:func:`bigbird`). Fields as the constructor's arguments."""

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
    return BigBird(require_int("window", window, minimum=0), require_int("global_tokens", global_tokens, minimum=0),
                    require_int("random_blocks", random_blocks, minimum=0),
                    require_int("block_size", block_size, minimum=1), require_int("seed", seed))
