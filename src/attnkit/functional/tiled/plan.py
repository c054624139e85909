"""The tiled backend's plans: which keys each query chunk visits, and how chunks batch.

* :func:`chunk_plan` (per-chunk engine): each query chunk's key *segments*, runs of full or
  partial blocks from the mask's block map; empty blocks are skipped.
* :func:`band_plan` (batched engine): consecutive chunks with the same band of keys
  relative to the chunk form one *run*, one fused-kernel call; a causal-like map's full
  part below a diagonal becomes the *far* part, run by the kernel's own ``is_causal``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attnkit._blocks import EMPTY, FULL, ScoreBlock
from attnkit.biases import Bias
from attnkit.functional._call import AttentionCall
from attnkit.functional.tiled.translate import (
    BandForm,
    band_form,
    bias_by_position,
    by_position,
    causal_offset,
    distance_form,
    separable,
    splits_by_side,
)
from attnkit.masks import Mask

if TYPE_CHECKING:
    from attnkit.functional.tiled.strategy import Strategy

_SCORE_BUDGET = 1 << 22  # elements of one math segment's score block: 16 MiB in float32
_BLOCK_K = 128  # key granularity of the block map
_MIN_SEGMENT = 512  # keys a materialising segment may span, at least, when the budget allows
_BAND_Q = 128  # batched engine: queries per chunk, and keys per block of the block map
_FAR_GAP = 2 * _BAND_Q  # with a bias, the far part starts this far below the diagonal (see _far_diagonal)
_MAX_PIECES = 4  # a long run splits into at most this many calls to bound its mask
_PIECE_BUDGET = 1 << 22  # mask elements per call (a bias is per head) before a run splits


@dataclass(frozen=True)
class _Segment:
    k_start: int
    k_stop: int
    partial: bool  # the mask must be evaluated on this segment


@dataclass(frozen=True)
class _Chunk:
    q_start: int
    q_stop: int
    segments: tuple[_Segment, ...]


def chunk_plan(call: AttentionCall, block_q: int, strategy: Strategy) -> list[_Chunk]:
    """Split the call into query chunks, each with the key segments it must visit."""
    q_len, k_len = call.q_len, call.k_len
    nq = -(-q_len // block_q)
    nk = -(-k_len // _BLOCK_K)
    if call.mask is None:
        state_rows = [[FULL] * nk for _ in range(nq)]
    else:
        state_rows = call.mask.block_states(q_len, k_len, block_q, _BLOCK_K, batch=call.batch,
                                               heads=call.heads).tolist()
    # A segment that materialises scores, a mask or a bias spans at most `cap` keys, so
    # its (B, H, bq, cap) tensors stay within the budget. Full segments on the fused
    # kernel without a bias materialise nothing and span any length.
    cap = max(_BLOCK_K, _SCORE_BUDGET // (call.batch * call.heads * block_q) // _BLOCK_K * _BLOCK_K)
    fused = strategy.fused_forward and (not call.requires_grad or strategy.fused_backward)
    full_cap = k_len if fused and call.bias is None else cap
    chunks = []
    for row, states in enumerate(state_rows):
        segments: list[_Segment] = []
        col = 0
        while col < nk:
            state = states[col]
            if state == EMPTY:
                col += 1
                continue
            limit = full_cap if state == FULL else cap
            start = col
            col += 1
            while col < nk and states[col] == state and (col - start + 1) * _BLOCK_K <= limit:
                col += 1
            segments.append(_Segment(start * _BLOCK_K, min(col * _BLOCK_K, k_len), state != FULL))
        q_start = row * block_q
        chunks.append(_Chunk(q_start, min(q_start + block_q, q_len), tuple(segments)))
    return chunks


def query_block(call: AttentionCall) -> int:
    """Query positions per chunk: a power of two in [16, 256] within the score budget."""
    per_row = call.batch * call.heads * _MIN_SEGMENT
    size = 256
    while size > 16 and size * per_row > _SCORE_BUDGET:
        size //= 2
    return size


# -- the batched engine's plan ---------------------------------------------------------


@dataclass(frozen=True)
class BandBlock(ScoreBlock):
    """Rows ``[q_start, q_stop)`` in chunks of ``chunk``; chunk ``c`` sees keys
    ``[k_start + c * stride, k_start + c * stride + width)`` with ``width = k_stop - k_start``.

    ``j`` is per row, shape (1, 1, rows, 1, width); ``shape`` is (B, Hkv, rows, G, width).
    Only masks and biases written in ``b, h, i, j`` (see :func:`_band_safe`) may read it.
    """

    chunk: int = 1
    stride: int = 0

    @cached_property
    def j(self) -> Tensor:
        rows = torch.arange(self.q_stop - self.q_start, device=self.device) // self.chunk
        width = torch.arange(self.k_stop - self.k_start, device=self.device)
        return (self.k_start + rows * self.stride).unsqueeze(1).add(width).view(1, 1, -1, 1, width.numel())


def _band_safe(obj: Mask | Bias | None) -> bool:
    """Whether a mask/bias evaluates from ``b, h, i, j`` alone (so a BandBlock is valid)."""
    if obj is None:
        return True
    return by_position(obj) if isinstance(obj, Mask) else bias_by_position(obj)


_Span = tuple[int, int, int]  # a chunk's live key blocks [lo, hi) and the end f of its full prefix


@dataclass(frozen=True)
class _Run:
    n0: int  # first chunk
    n: int  # chunks
    rows: int  # query positions per chunk
    k0: int  # first chunk's first key
    width: int
    stride: int  # keys between one chunk's band and the next's: 0 (shared) or _BAND_Q (sliding)


@dataclass(frozen=True)
class BandPlan:
    runs: tuple[_Run, ...]
    far: int | None  # s: the far part is j <= i + s, or None


def band_plan(call: AttentionCall) -> BandPlan:
    """Runs of equal bands and the far diagonal, from the mask's block map at ``_BAND_Q``."""
    bq, q_len, k_len = _BAND_Q, call.q_len, call.k_len
    # The far part runs on the kernel's is_causal, which masks before it scales: with a scale that is
    # <= 0 in the compute dtype that is -inf * 0 = NaN (or +inf), so such calls keep every block in bands.
    causal_ok = call.scale_positive_in(call.compute_dtype)
    exact = _exact_diagonal(call) if causal_ok else None
    if exact is not None and call.bias is None:
        return BandPlan((), exact)  # a plain causal mask is the far part alone: no band, no merge
    nq, nk = -(-q_len // bq), -(-k_len // bq)
    if call.mask is None:
        rows = [[FULL] * nk for _ in range(nq)]
    else:
        rows = call.mask.block_states(q_len, k_len, bq, bq, batch=call.batch, heads=call.heads).tolist()
    spans: list[_Span | None] = []
    for states in rows:
        live = [c for c, st in enumerate(states) if st != EMPTY]
        if not live:
            spans.append(None)
            continue
        lo, hi = live[0], live[-1] + 1
        f = lo
        while f < hi and states[f] == FULL:
            f += 1
        spans.append((lo, hi, f))
    far = _far_diagonal(call, spans, nq) if causal_ok else None
    plans = [BandPlan(tuple(_pieces(_runs(spans, None, q_len, k_len), call, None)), None)]
    if far is not None:  # worth it when it leaves fewer runs (causal), not more (dense)
        plans.append(BandPlan(tuple(_pieces(_runs(spans, far, q_len, k_len), call, far)), far))
    return min(plans, key=lambda p: len(p.runs))


def _exact_diagonal(call: AttentionCall) -> int | None:
    """``s`` if the mask is exactly ``j <= i + s`` (causal in either alignment, shifted), else None."""
    return None if call.mask is None else causal_offset(call.mask, call.q_len, call.k_len)


def _runs(spans: list[_Span | None], far: int | None, q_len: int, k_len: int) -> list[_Run]:
    """Consecutive chunks whose near bands have one offset, width and height, as runs."""
    bq = _BAND_Q
    runs: list[_Run] = []
    for n, span in enumerate(spans):
        if span is None:
            continue
        lo, hi, f = span
        start = lo if far is None else max(lo, min(f, n + far // bq))  # far // bq = c - 1
        k0, k1 = start * bq, min(hi * bq, k_len)
        if k1 <= k0:
            continue
        q0, q1 = n * bq, min(n * bq + bq, q_len)
        last = runs[-1] if runs else None
        if last is not None and last.n0 + last.n == n and last.rows == q1 - q0 and last.width == k1 - k0:
            stride = (k0 - last.k0) if last.n == 1 else last.stride
            if stride in (0, bq) and last.k0 + last.n * stride == k0:
                runs[-1] = _Run(last.n0, last.n + 1, last.rows, last.k0, last.width, stride)
                continue
        runs.append(_Run(n, 1, q1 - q0, k0, k1 - k0, 0))
    return runs


def _pieces(runs: list[_Run], call: AttentionCall, far: int | None) -> list[_Run]:
    """Split long runs into at most ``_MAX_PIECES`` calls, to bound each call's mask (if any)."""
    if call.mask is None and call.bias is None and far is None:
        return runs
    out: list[_Run] = []
    for run in runs:
        elems = run.n * run.rows * call.groups * run.width * (call.kv_heads if call.bias is not None else 1)
        pieces = min(_MAX_PIECES, run.n, -(-elems // _PIECE_BUDGET))
        step = -(-run.n // pieces)
        for a in range(0, run.n, step):
            out.append(_Run(run.n0 + a, min(step, run.n - a), run.rows, run.k0 + a * run.stride, run.width,
                            run.stride))
    return out


def _far_diagonal(call: AttentionCall, spans: list[_Span | None], nq: int) -> int | None:
    """``s`` such that every pair with ``j <= i + s`` lies in full blocks, if that part is worth a call."""
    last = nq - 1
    last_span = spans[last]
    if last_span is None:
        return None
    c = last_span[2] - last  # the last chunk's full prefix ends at block last + c
    if c + last < 2:
        return None
    for n, span in enumerate(spans):
        if n + c >= 1 and (span is None or span[0] != 0 or span[2] < n + c):
            return None
    s = (c - 1) * _BAND_Q
    if call.bias is not None:
        # The far part adds the bias as a per-key column (plus a per-row lse shift), whose
        # values span the whole key range: a score near the diagonal, added to a column of
        # magnitude slope * L, would keep only float32's absolute precision at that
        # magnitude (1e-4 at L = 4096 with slope 1/2). So the pairs nearest the diagonal
        # stay in the band, with the bias's exact values; the far part only has pairs whose
        # weight the bias has already cut down.
        s = min(s, -_FAR_GAP)
        if -s >= call.q_len or _far_bias(call, s) is None:  # no row reaches that far
            return None
    return s


def _far_bias(call: AttentionCall, s: int) -> tuple[Tensor, Tensor] | None:
    """ALiBi on the far part as (row (B|1, Hkv, R, G), col (B|1, Hkv, 1, G, K)), or None.

    ALiBi is ``row(i) + col(j)`` on each side of its diagonal, so two strips inside the
    far part (its first key column, its last query row) give it all:
    ``f(i, j) = f(i, 0) - f(last, 0) + f(last, j)``.
    """
    if call.bias is None or not splits_by_side(call.bias):
        return None
    r0 = max(0, -s)
    dt = call.compute_dtype
    sizes = (call.batch, call.kv_heads, call.groups, call.q_len, call.k_len)
    strip_a = ScoreBlock(*sizes, r0, call.q_len, 0, 1, call.q.device)
    strip_b = ScoreBlock(*sizes, call.q_len - 1, call.q_len, 0, call.k_len, call.q.device)
    a, b = separable(call.bias, strip_a, dt), separable(call.bias, strip_b, dt)
    if a is None or b is None:
        return None
    row = a[0] - a[0][:, :, -1:] + b[0]
    return row.squeeze(-1), b[1]


# -- the native kernel's plan --------------------------------------------------------------


@dataclass(frozen=True)
class NativeParams:
    """A mask and bias in the native kernel's arithmetic form, per batch element ``b``.

    Allowed pairs: ``dlo[b] <= j - i <= dhi[b]``, ``j < klen[b]`` and, with document ids,
    ``q_ids[b|0, i] == kv_ids[b|0, j]``. Bias: ALiBi ``-slopes[h] * |i + aoff[b] - j|``.
    All int64 (B,) except the ids, (1|B, Lq) and (1|B, Lk), and ``slopes`` (H,) in the
    compute dtype; empty tensors stand for "none".
    """

    dlo: Tensor
    dhi: Tensor
    klen: Tensor
    q_ids: Tensor
    kv_ids: Tensor
    slopes: Tensor
    aoff: Tensor


def native_params(call: AttentionCall) -> NativeParams | None:
    """The call's mask and bias for the native kernel, or None if it cannot describe them.

    The mask must have a :func:`.translate.band_form` (intersections of causal and
    sliding-window masks in either alignment, per-sequence lengths too, key padding by
    lengths, one document mask) and the bias a :meth:`~attnkit.biases.Bias.distance_form`
    (ALiBi); anything else (prefix-LM, global tokens, dense or function masks, tensor
    biases, ``|``, ``~``) is left to the other kernels.
    """
    b, q_len, k_len = call.batch, call.q_len, call.k_len
    form = BandForm.unbounded(k_len) if call.mask is None else band_form(call.mask, q_len, k_len)
    if form is None:
        return None
    slopes = torch.empty(0, dtype=call.compute_dtype)
    aoff = torch.zeros(b, dtype=torch.int64)
    if call.bias is not None:
        distance = distance_form(call.bias, q_len, k_len)
        if distance is None:
            return None
        slopes, aoff = distance[0].to(call.compute_dtype), distance[1].expand(b)
    empty = torch.empty(0, 0, dtype=torch.int64)
    q_ids = empty if form.q_ids is None else form.q_ids.contiguous()
    kv_ids = empty if form.kv_ids is None else form.kv_ids.contiguous()
    return NativeParams(form.lo.expand(b).contiguous(), form.hi.expand(b).contiguous(),
                        form.key_lengths.expand(b).contiguous(), q_ids, kv_ids, slopes.contiguous(),
                        aoff.contiguous())
