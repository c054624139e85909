"""Batched execution of the tiled backend on the fused CPU kernel: a bounded number of ops.

The per-chunk loop of :mod:`attnkit.functional.tiled` dispatches a handful of ops for
every (query chunk, key segment) pair; on a loaded machine each op's parallel region
waits at a barrier, so the call slows with the op count. Here the call is split into

* the **near band**: for each query chunk of ``_BAND_Q`` positions, the keys from its
  first non-full block (or one block before the far part's edge) to its last non-empty
  block. Consecutive chunks whose bands have the same offset relative to the chunk, the
  same width and the same height form a *run*; a run is ONE call of the fused kernel,
  with queries viewed as (X, N, bq*G, D), keys and values as overlapping strided views
  (X, N, W, D) (no copy) and one additive mask (1|X, N, bq*G, W) evaluated by the mask
  and bias on a :class:`BandBlock` (every chunk's band at once).
* the **far part** (causal-like maps): keys wholly below a diagonal ``j <= i + s`` whose
  blocks are all full. It runs as the fused kernel's own ``is_causal`` (one call per query
  head within a group, plus one unmasked call for ``s > 0``); ALiBi enters as a per-key
  column plus a per-row shift of the log-sum-exp. The near band then excludes ``j <= i + s``.

The op count depends on the number of runs (a few for window, causal, dense, prefix-LM),
on G and on B (masks that depend on the batch element run per element), never on L.
Temporaries are O(L * band width).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from attnkit._blocks import EMPTY, FULL, ScoreBlock
from attnkit.biases import _ALiBi, _Chain
from attnkit.masks import _And, _Diagonal, _Not, _PrefixLM

_BAND_Q = 128  # queries per chunk, and keys per block of the block map
_MAX_PIECES = 4  # a long run splits into at most this many calls to bound its mask
_PIECE_BUDGET = 1 << 23  # mask elements per call before a run splits
_NEG_INF = float("-inf")


def _ops():
    return (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)


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


def _band_safe(obj) -> bool:
    """Whether a mask/bias evaluates from ``b, h, i, j`` alone (so a BandBlock is valid)."""
    if obj is None or isinstance(obj, (_Diagonal, _PrefixLM, _ALiBi)):
        return True
    if isinstance(obj, _And):  # _Or subclasses _And
        return _band_safe(obj.a) and _band_safe(obj.b)
    if isinstance(obj, _Not):
        return _band_safe(obj.a)
    if isinstance(obj, _Chain):
        return all(_band_safe(b) for b in obj.items)
    return False


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


def band_plan(call) -> BandPlan:
    """Runs of equal bands and the far diagonal, from the mask's block map at ``_BAND_Q``."""
    bq, q_len, k_len = _BAND_Q, call.q_len, call.k_len
    nq, nk = -(-q_len // bq), -(-k_len // bq)
    if call.mask is None:
        rows = [[FULL] * nk for _ in range(nq)]
    else:
        rows = call.mask.block_states(q_len, k_len, bq, bq, batch=call.batch, heads=call.heads).tolist()
    spans = []
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
    far = _far_diagonal(call, spans, nq)
    plans = [BandPlan(tuple(_pieces(_runs(spans, None, q_len, k_len), call, None)), None)]
    if far is not None:  # worth it when it leaves fewer runs (causal), not more (dense)
        plans.append(BandPlan(tuple(_pieces(_runs(spans, far, q_len, k_len), call, far)), far))
    return min(plans, key=lambda p: len(p.runs))


def _runs(spans, far: int | None, q_len: int, k_len: int) -> list[_Run]:
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


def _pieces(runs: list[_Run], call, far: int | None) -> list[_Run]:
    """Split long runs into at most ``_MAX_PIECES`` calls, to bound each call's mask (if any)."""
    if call.mask is None and call.bias is None and far is None:
        return runs
    out = []
    for run in runs:
        elems = run.n * run.rows * call.groups * run.width
        pieces = min(_MAX_PIECES, run.n, -(-elems // _PIECE_BUDGET))
        step = -(-run.n // pieces)
        for a in range(0, run.n, step):
            out.append(_Run(run.n0 + a, min(step, run.n - a), run.rows, run.k0 + a * run.stride, run.width,
                            run.stride))
    return out


def _far_diagonal(call, spans, nq) -> int | None:
    """``s`` such that every pair with ``j <= i + s`` lies in full blocks, if that part is worth a call."""
    last = nq - 1
    if spans[last] is None:
        return None
    c = spans[last][2] - last  # the last chunk's full prefix ends at block last + c
    if c + last < 2:
        return None
    for n, span in enumerate(spans):
        if n + c >= 1 and (span is None or span[0] != 0 or span[2] < n + c):
            return None
    s = (c - 1) * _BAND_Q
    if call.bias is not None and _far_bias(call, s) is None:
        return None
    return s


def _far_bias(call, s):
    """ALiBi on the far part as (row (B|1, Hkv, R, G), col (B|1, Hkv, 1, G, K)), or None.

    ALiBi is ``row(i) + col(j)`` on each side of its diagonal, so two strips inside the
    far part (its first key column, its last query row) give it all:
    ``f(i, j) = f(i, 0) - f(last, 0) + f(last, j)``.
    """
    if not all(isinstance(p, _ALiBi) for p in call.bias.parts()):
        return None
    r0 = max(0, -s)
    dt = call.compute_dtype
    sizes = (call.batch, call.kv_heads, call.groups, call.q_len, call.k_len)
    strip_a = ScoreBlock(*sizes, r0, call.q_len, 0, 1, call.q.device)
    strip_b = ScoreBlock(*sizes, call.q_len - 1, call.q_len, 0, call.k_len, call.q.device)
    a, b = call.bias.separable(strip_a, dt), call.bias.separable(strip_b, dt)
    if a is None or b is None:
        return None
    row = a[0] - a[0][:, :, -1:] + b[0]
    return row.squeeze(-1), b[1]


def _band_additive(call, run: _Run, far: int | None, dtype) -> Tensor | None:
    """The run's mask, biases and far exclusion as one additive (B|1, Hkv|1, N*bq, G|1, W) tensor."""
    q0 = run.n0 * _BAND_Q
    sizes = (call.batch, call.kv_heads, call.groups, call.q_len, call.k_len)
    if _band_safe(call.mask) and _band_safe(call.bias):
        blocks = [BandBlock(*sizes, q0, q0 + (run.n - 1) * _BAND_Q + run.rows, run.k0, run.k0 + run.width,
                            call.q.device, run.rows, run.stride)]
    else:  # one block per chunk, joined: the mask's own definition, more ops
        blocks = [ScoreBlock(*sizes, q0 + c * _BAND_Q, q0 + c * _BAND_Q + run.rows, run.k0 + c * run.stride,
                             run.k0 + c * run.stride + run.width, call.q.device) for c in range(run.n)]
    parts = [_additive(call, blk, far, dtype) for blk in blocks]
    if parts[0] is None:
        return None
    parts = [p.expand(p.shape[0], p.shape[1], blk.shape[2], p.shape[3], blk.shape[4]) for p, blk in zip(parts, blocks)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat(torch.broadcast_tensors(*parts), 2)


def _additive(call, block, far, dtype):
    add = None if call.bias is None else call.bias.values(block, dtype)
    allowed = None if call.mask is None else call.mask.allowed(block)
    if far is not None:
        beyond = block.j > block.i + far
        allowed = beyond if allowed is None else allowed & beyond
    if allowed is not None:
        base = add if add is not None else torch.zeros((), dtype=dtype, device=block.device)
        add = torch.where(allowed, base, _NEG_INF)
    return add


def _kernel_views(call, run: _Run, q_rows, k, v, add):
    """Per kernel call: (x slice, q (X, N, bq*G, D), k and v strided (X, N, W, D), mask (1|X, N, bq*G, W))."""
    b, hkv, g = call.batch, call.kv_heads, call.groups
    d, dv, lk = k.shape[-1], v.shape[-1], k.shape[2]
    n = _calls(run)
    qx = _rows(q_rows.reshape(b * hkv, -1, d), run, g)
    kx = k.as_strided((b * hkv, n, run.width, d), (lk * d, run.stride * d, d, 1), k.storage_offset() + run.k0 * d)
    vx = v.as_strided((b * hkv, n, run.width, dv), (lk * dv, run.stride * dv, dv, 1),
                      v.storage_offset() + run.k0 * dv)
    if add is None:
        return [(slice(None), qx, kx, vx, None)]
    add = add.expand(add.shape[0], add.shape[1], add.shape[2], g, add.shape[4])
    add = add.reshape(add.shape[0], add.shape[1], n, -1, run.width)
    if add.shape[0] == 1 and (add.shape[1] == 1 or b == 1):
        return [(slice(None), qx, kx, vx, add[0])]
    out = []
    for i in range(b):  # the mask depends on the batch element (or on the head, with B > 1)
        x = slice(i * hkv, (i + 1) * hkv)
        out.append((x, qx[x], kx[x], vx[x], add[i if add.shape[0] > 1 else 0]))
    return out


def _calls(run: _Run) -> int:
    """Chunks the kernel sees as separate batch entries: 1 when they share their keys (the
    rows are then one long query block, so key gradients are not returned per chunk)."""
    return 1 if run.stride == 0 else run.n


def _rows(t, run: _Run, g):
    """The run's rows of a (B*Hkv, Lq*G, ...) tensor, as a (B*Hkv, N|1, rows, ...) view."""
    r0 = run.n0 * _BAND_Q * g
    sub = t[:, r0 : r0 + ((run.n - 1) * _BAND_Q + run.rows) * g]
    return sub.view(t.shape[0], _calls(run), -1, *t.shape[2:])


def band_forward(call, plan: BandPlan, q_rows, k, v):
    """(out (B, Hkv, Lq*G, Dv), lse (B, Hkv, Lq*G)); inputs contiguous, in the compute dtype."""
    fwd, _ = _ops()
    b, hkv, g = call.batch, call.kv_heads, call.groups
    out = q_rows.new_zeros(b * hkv, q_rows.shape[2], v.shape[-1])
    lse = q_rows.new_full((b * hkv, q_rows.shape[2]), _NEG_INF)
    for run in plan.runs:
        add = _band_additive(call, run, plan.far, q_rows.dtype)
        o_run, l_run = _rows(out, run, g), _rows(lse, run, g)
        for x, qx, kx, vx, mask in _kernel_views(call, run, q_rows, k, v, add):
            o, lx = fwd(qx, kx, vx, attn_mask=mask, scale=call.scale)
            if mask is not None:  # the kernel reports lse = 0 for a row with no allowed key
                lx = torch.where((mask > _NEG_INF).any(-1), lx, _NEG_INF)
            o_run[x] = o
            l_run[x] = lx
    out, lse = out.view(b, hkv, -1, v.shape[-1]), lse.view(b, hkv, -1)
    if plan.far is not None:
        o_far, l_far = _far_forward(call, plan.far, q_rows, k, v)
        out, lse = lse_merge(out, lse, o_far, l_far)
    return out, lse


def lse_merge(out: Tensor | None, lse: Tensor | None, o: Tensor, lse_o: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two normalised partial results (out (..., Dv), lse (...)) by their log-sum-exp.

    ``out`` None starts an accumulation. Rows with ``lse = -inf`` on both sides stay zero.
    """
    if out is None:
        return o, lse_o
    new = torch.logaddexp(lse, lse_o)
    safe = torch.where(new == _NEG_INF, 0.0, new)
    return out * torch.exp(lse - safe).unsqueeze(-1) + o * torch.exp(lse_o - safe).unsqueeze(-1), new


def _far_pieces(call, s):
    """The far part's kernel calls as (rows, keys, is_causal), and its ALiBi terms or None."""
    q_len, k_len = call.q_len, call.k_len
    pieces = []
    if s >= 0:
        if s > 0:
            pieces.append((slice(0, q_len), slice(0, min(s, k_len)), False))
        if s < k_len:
            pieces.append((slice(0, q_len), slice(s, k_len), True))
    else:
        pieces.append((slice(-s, q_len), slice(0, k_len), True))
    bias = None if call.bias is None else _far_bias(call, s)
    return pieces, bias


def _far_forward(call, s, q_rows, k, v):
    fwd, _ = _ops()
    b, hkv, g = call.batch, call.kv_heads, call.groups
    q5 = q_rows.view(b, hkv, call.q_len, g, -1)
    out5 = q_rows.new_zeros(b, hkv, call.q_len, g, v.shape[-1])
    lse4 = q_rows.new_full((b, hkv, call.q_len, g), _NEG_INF)
    pieces, bias = _far_pieces(call, s)
    r0 = pieces[0][0].start
    for gi in range(g):
        acc_o = acc_l = None
        for rows, keys, causal in pieces:
            mask = None if bias is None else bias[1][:, :, :, gi, keys]
            o, lx = fwd(q5[:, :, rows, gi], k[:, :, keys], v[:, :, keys], is_causal=causal, attn_mask=mask,
                        scale=call.scale)
            acc_o, acc_l = lse_merge(acc_o, acc_l, o, lx)
        if bias is not None:
            acc_l = acc_l + bias[0][:, :, :, gi]
        out5[:, :, r0:, gi] = acc_o
        lse4[:, :, r0:, gi] = acc_l
    return out5.view(b, hkv, -1, v.shape[-1]), lse4.view(b, hkv, -1)


def band_backward(call, plan: BandPlan, q_rows, k, v, out, lse, dout):
    """FlashAttention-2's backward over the band plan, from the final ``out`` and ``lse``."""
    _, bwd = _ops()
    b, hkv, g = call.batch, call.kv_heads, call.groups
    d, dvd, lk = k.shape[-1], v.shape[-1], k.shape[2]
    dq = torch.zeros_like(q_rows).view(b * hkv, -1, d)
    dk = torch.zeros_like(k).view(b * hkv, lk, d)
    dv = torch.zeros_like(v).view(b * hkv, lk, dvd)
    dout = dout.contiguous()
    lse_b = torch.where(lse == _NEG_INF, float("inf"), lse)  # rows with no key: every p = 0
    flat = [t.reshape(b * hkv, *t.shape[2:]) for t in (out, lse_b, dout)]
    for run in plan.runs:
        add = _band_additive(call, run, plan.far, q_rows.dtype)
        o_run, l_run, do_run = (_rows(t, run, g) for t in flat)
        dq_run = _rows(dq, run, g)
        keys = (run.k0 + torch.arange(_calls(run), device=k.device).unsqueeze(1) * run.stride
                + torch.arange(run.width, device=k.device)).reshape(-1)
        for x, qx, kx, vx, mask in _kernel_views(call, run, q_rows, k, v, add):
            gq, gk, gv = bwd(do_run[x], qx, kx, vx, o_run[x], l_run[x], 0.0, False, attn_mask=mask,
                             scale=call.scale)
            dq_run[x] += gq
            dk[x] = dk[x].index_add(1, keys, gk.reshape(gk.shape[0], -1, d))
            dv[x] = dv[x].index_add(1, keys, gv.reshape(gv.shape[0], -1, dvd))
    dq, dk, dv = dq.view_as(q_rows), dk.view_as(k), dv.view_as(v)
    if plan.far is not None:
        _far_backward(call, plan.far, q_rows, k, v, out, lse_b, dout, dq, dk, dv)
    return dq, dk, dv


def _far_backward(call, s, q_rows, k, v, out, lse_b, dout, dq, dk, dv):
    _, bwd = _ops()
    b, hkv, g, q_len = call.batch, call.kv_heads, call.groups, call.q_len
    q5, dq5 = q_rows.view(b, hkv, q_len, g, -1), dq.view(b, hkv, q_len, g, -1)
    o5, do5 = out.view(b, hkv, q_len, g, -1), dout.view(b, hkv, q_len, g, -1)
    l4 = lse_b.view(b, hkv, q_len, g)
    pieces, bias = _far_pieces(call, s)
    r0 = pieces[0][0].start
    for gi in range(g):
        lse_g = l4[:, :, r0:, gi]
        if bias is not None:  # the kernel sees scores without the row shift
            lse_g = lse_g - bias[0][:, :, :, gi]
        lse_g = lse_g.contiguous()
        for rows, keys, causal in pieces:
            mask = None if bias is None else bias[1][:, :, :, gi, keys]
            gq, gk, gv = bwd(do5[:, :, rows, gi], q5[:, :, rows, gi], k[:, :, keys], v[:, :, keys],
                             o5[:, :, rows, gi], lse_g, 0.0, causal, attn_mask=mask, scale=call.scale)
            dq5[:, :, rows, gi] += gq
            dk[:, :, keys] += gk
            dv[:, :, keys] += gv
