"""The tiled backend's kernels: per segment (fused or math) and per run (batched fused).

Each computes normalised outputs and log-sum-exps for the keys it is given; the
backward kernels recompute probabilities from the final ``lse`` (FlashAttention-2), so
any piece can be differentiated given the global statistics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnkit._blocks import ScoreBlock
from attnkit.biases import tensor_bias_parts
from attnkit.functional._call import AttentionCall, dropout_keep, transform_scores
from attnkit.functional._merge import lse_merge
from attnkit.functional.tiled.plan import _BAND_Q, BandBlock, BandPlan, _band_safe, _far_bias, _Run, _Segment
from attnkit.functional.tiled.translate import separable

_NEG_INF = float("-inf")


def _ops() -> tuple[Any, Any]:
    return (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)


# -- the fused kernel, per segment -------------------------------------------------------


def _additive_mask(call: AttentionCall, block: ScoreBlock, partial: bool, dtype: torch.dtype) -> tuple[Tensor | None,
                   Tensor | None]:
    """The segment's mask and additive biases for the fused kernel.

    Returns ``(add, row)``: ``add`` is one float tensor (B|1, Hkv|1, bq*G|1, bk) or None;
    ``row`` (B|1, Hkv|1, bq*G) is a per-row shift left out of ``add`` (a separable
    bias), which changes only the log-sum-exp, or None.
    """
    _, _, bq, g, bk = block.shape
    if not partial and call.bias is not None:
        split = separable(call.bias, block, dtype)
        if split is not None:
            row, col = split
            row = row.expand(row.shape[0], row.shape[1], bq, g, 1)
            col = col.expand(col.shape[0], col.shape[1], 1, g, bk)
            if g > 1:
                col = col.expand(col.shape[0], col.shape[1], bq, g, bk)
            return (col.reshape(col.shape[0], col.shape[1], -1, bk),
                    row.reshape(row.shape[0], row.shape[1], bq * g))
    add = None if call.bias is None else call.bias.values(block, dtype)
    if partial and call.mask is not None:  # a block is partial only under a mask
        allowed = call.mask.allowed(block)
        base = add if add is not None else torch.zeros((), dtype=dtype, device=block.device)
        add = torch.where(allowed, base, _NEG_INF)
    if add is None:
        return None, None
    add = add.expand(add.shape[0], add.shape[1], bq, g, bk)
    return add.reshape(add.shape[0], add.shape[1], bq * g, bk), None


def _fused_forward(call: AttentionCall, block: ScoreBlock, seg: _Segment, q_rows: Tensor, k_seg: Tensor,
                   v_seg: Tensor) -> tuple[Tensor, Tensor]:
    add, row = _additive_mask(call, block, seg.partial, q_rows.dtype)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out, lse = op(q_rows, k_seg, v_seg, attn_mask=add, scale=call.scale)
    if add is not None:
        # The fused kernel reports lse = 0 for a row with no allowed key; it must be -inf.
        lse = torch.where((add > _NEG_INF).any(-1), lse, _NEG_INF)
    if row is not None:
        lse = lse + row
    return out, lse


def _fused_backward(call: AttentionCall, block: ScoreBlock, seg: _Segment, q_rows: Tensor, k_seg: Tensor, v_seg: Tensor,
                    out_rows: Tensor, lse_rows: Tensor, dout_rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    add, row = _additive_mask(call, block, seg.partial, q_rows.dtype)
    if row is not None:
        lse_rows = lse_rows - row  # the kernel sees scores without the row shift
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    return op(dout_rows, q_rows, k_seg, v_seg, out_rows, lse_rows, 0.0, False,
              attn_mask=add, scale=call.scale)


# -- the math kernel, per segment --------------------------------------------------------


def segment_scores(call: AttentionCall, block: ScoreBlock, seg: _Segment, q_rows: Tensor, k_seg: Tensor,
            leaves: dict[int, Tensor] | None = None, raw: Tensor | None = None) -> Tensor:
    """Masked, transformed scores of one segment, (B, Hkv, bq, G, bk)."""
    if raw is None:
        raw = (q_rows @ k_seg.transpose(-1, -2)).mul_(call.scale).view(block.shape)
    s = transform_scores(raw, block, call, leaves)
    if seg.partial and call.mask is not None:  # a segment is partial only under a mask
        s = s.masked_fill(~call.mask.allowed(block), _NEG_INF)
    return s


def _math_forward(call: AttentionCall, block: ScoreBlock, seg: _Segment, q_rows: Tensor, k_seg: Tensor,
                  v_seg: Tensor) -> tuple[Tensor, Tensor]:
    s = segment_scores(call, block, seg, q_rows, k_seg)
    m = s.amax(-1, keepdim=True)
    m = torch.where(m == _NEG_INF, 0.0, m)
    p = (s - m).exp_()
    total = p.sum(-1, keepdim=True)
    lse = (m + torch.log(total)).flatten(2, 3).squeeze(-1)  # (B, Hkv, bq*G)
    if call.dropout_p > 0:
        p = p * dropout_keep(call, block) / (1.0 - call.dropout_p)
    b, hkv, bq, g, bk = block.shape
    out = p.view(b, hkv, bq * g, bk) @ v_seg
    out = out / torch.where(total > 0, total, 1.0).view(b, hkv, bq * g, 1)
    return out, lse


def _math_backward(call: AttentionCall, block: ScoreBlock, seg: _Segment, q_rows: Tensor, k_seg: Tensor, v_seg: Tensor,
                   lse_rows: Tensor, dout_rows: Tensor, delta_rows: Tensor,
                   bias_grads: dict[int, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    b, hkv, bq, g, bk = block.shape
    parts = [p for p in tensor_bias_parts(call.bias) if p.tensor.requires_grad]
    needs_chain = call.softcap is not None or (call.bias is not None and not call.bias.additive) or parts
    raw = (q_rows @ k_seg.transpose(-1, -2)).mul_(call.scale).view(block.shape)
    leaves: dict[int, Tensor] = {}
    with torch.enable_grad() if needs_chain else torch.no_grad():
        if needs_chain:
            raw = raw.detach().requires_grad_(True)
            leaves = {id(p): block.take(p.tensor4).detach().to(raw.dtype).requires_grad_(True)
                      for p in parts}
        s = segment_scores(call, block, seg, q_rows, k_seg, leaves, raw=raw)
    with torch.no_grad():
        p = torch.exp(s.detach() - lse_rows.reshape(b, hkv, bq, g, 1))  # (B, Hkv, bq, G, bk)
        pv = p
        if call.dropout_p > 0:
            keep = dropout_keep(call, block).to(p.dtype) / (1.0 - call.dropout_p)
            pv = p * keep
        dv = pv.view(b, hkv, bq * g, bk).transpose(-1, -2) @ dout_rows
        dp = (dout_rows @ v_seg.transpose(-1, -2)).view(block.shape)
        if call.dropout_p > 0:
            dp = dp * keep
        ds = p * (dp - delta_rows.reshape(b, hkv, bq, g, 1))
    if needs_chain:
        inputs = [raw, *leaves.values()]
        grads = torch.autograd.grad(s, inputs, ds, allow_unused=True)
        ds = grads[0] if grads[0] is not None else torch.zeros_like(raw)
        for part, grad in zip(parts, grads[1:]):
            if grad is not None:
                bias_grads[id(part)][block.slices(part.tensor4)] += block.untake(grad, part.tensor4)
    ds = ds.reshape(b, hkv, bq * g, bk)
    dq = (ds @ k_seg) * call.scale
    dk = (ds.transpose(-1, -2) @ q_rows) * call.scale
    return dq, dk, dv


def _lse_grad(call: AttentionCall, block: ScoreBlock, seg: _Segment, q_rows: Tensor, k_seg: Tensor, lse_rows: Tensor,
              dlse_rows: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient of sum(dlse * lse) w.r.t. q and k on one segment: d lse_i / d s_ij = p_ij."""
    b, hkv, bq, g, bk = block.shape
    s = segment_scores(call, block, seg, q_rows, k_seg)
    p = torch.exp(s - lse_rows.reshape(b, hkv, bq, g, 1))
    ds = (p * dlse_rows.reshape(b, hkv, bq, g, 1)).reshape(b, hkv, bq * g, bk)
    return (ds @ k_seg) * call.scale, (ds.transpose(-1, -2) @ q_rows) * call.scale


# -- the batched fused kernel, per run ----------------------------------------------------


def _band_additive(call: AttentionCall, run: _Run, far: int | None, dtype: torch.dtype) -> Tensor | None:
    """The run's mask, biases and far exclusion as one additive (B|1, Hkv|1, N*bq, G|1, W) tensor."""
    q0 = run.n0 * _BAND_Q
    sizes = (call.batch, call.kv_heads, call.groups, call.q_len, call.k_len)
    blocks: list[ScoreBlock]
    if _band_safe(call.mask) and _band_safe(call.bias):
        blocks = [BandBlock(*sizes, q0, q0 + (run.n - 1) * _BAND_Q + run.rows, run.k0, run.k0 + run.width,
                            call.q.device, run.rows, run.stride)]
    else:  # one block per chunk, joined: the mask's own definition, more ops
        blocks = [ScoreBlock(*sizes, q0 + c * _BAND_Q, q0 + c * _BAND_Q + run.rows, run.k0 + c * run.stride,
                             run.k0 + c * run.stride + run.width, call.q.device) for c in range(run.n)]
    # every block gets a tensor (mask, bias or far exclusion present) or none does
    adds = [a for a in (_additive(call, blk, far, dtype) for blk in blocks) if a is not None]
    if not adds:
        return None
    parts = [p.expand(p.shape[0], p.shape[1], blk.shape[2], p.shape[3], blk.shape[4]) for p, blk in zip(adds, blocks)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat(torch.broadcast_tensors(*parts), 2)


def _additive(call: AttentionCall, block: ScoreBlock, far: int | None, dtype: torch.dtype) -> Tensor | None:
    add = None if call.bias is None else call.bias.values(block, dtype)
    allowed = None if call.mask is None else call.mask.allowed(block)
    if far is not None:
        beyond = block.j > block.i + far
        allowed = beyond if allowed is None else allowed & beyond
    if allowed is not None:
        base = add if add is not None else torch.zeros((), dtype=dtype, device=block.device)
        add = torch.where(allowed, base, _NEG_INF)
    return add


def _kernel_views(call: AttentionCall, run: _Run, q_rows: Tensor, k: Tensor, v: Tensor,
                  add: Tensor | None) -> list[tuple[slice, Tensor, Tensor, Tensor, Tensor | None]]:
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
    out: list[tuple[slice, Tensor, Tensor, Tensor, Tensor | None]] = []
    for i in range(b):  # the mask depends on the batch element (or on the head, with B > 1)
        x = slice(i * hkv, (i + 1) * hkv)
        out.append((x, qx[x], kx[x], vx[x], add[i if add.shape[0] > 1 else 0]))
    return out


def _calls(run: _Run) -> int:
    """Chunks the kernel sees as separate batch entries: 1 when they share their keys (the
    rows are then one long query block, so key gradients are not returned per chunk)."""
    return 1 if run.stride == 0 else run.n


def _rows(t: Tensor, run: _Run, g: int) -> Tensor:
    """The run's rows of a (B*Hkv, Lq*G, ...) tensor, as a (B*Hkv, N|1, rows, ...) view."""
    r0 = run.n0 * _BAND_Q * g
    sub = t[:, r0 : r0 + ((run.n - 1) * _BAND_Q + run.rows) * g]
    return sub.view(t.shape[0], _calls(run), -1, *t.shape[2:])


def band_forward(call: AttentionCall, plan: BandPlan, q_rows: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
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
        out, lse = lse_merge(out, lse, o_far, l_far) if plan.runs else (o_far, l_far)
    return out, lse


def _far_pieces(call: AttentionCall, s: int) -> tuple[list[tuple[slice, slice, bool]], tuple[Tensor, Tensor] | None]:
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


def _far_forward(call: AttentionCall, s: int, q_rows: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    fwd, _ = _ops()
    b, hkv, g = call.batch, call.kv_heads, call.groups
    q5 = q_rows.view(b, hkv, call.q_len, g, -1)
    out5 = q_rows.new_zeros(b, hkv, call.q_len, g, v.shape[-1])
    lse4 = q_rows.new_full((b, hkv, call.q_len, g), _NEG_INF)
    pieces, bias = _far_pieces(call, s)
    r0 = pieces[0][0].start
    for gi in range(g):
        acc_o: Tensor | None = None
        acc_l: Tensor | None = None
        for rows, keys, causal in pieces:
            mask = None if bias is None else bias[1][:, :, :, gi, keys]
            o, lx = fwd(q5[:, :, rows, gi], k[:, :, keys], v[:, :, keys], is_causal=causal, attn_mask=mask,
                        scale=call.scale)
            acc_o, acc_l = lse_merge(acc_o, acc_l, o, lx)
        assert acc_o is not None and acc_l is not None  # pieces is never empty
        if bias is not None:
            acc_l = acc_l + bias[0][:, :, :, gi]
        out5[:, :, r0:, gi] = acc_o
        lse4[:, :, r0:, gi] = acc_l
    return out5.view(b, hkv, -1, v.shape[-1]), lse4.view(b, hkv, -1)


def band_backward(call: AttentionCall, plan: BandPlan, q_rows: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:
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


def _far_backward(call: AttentionCall, s: int, q_rows: Tensor, k: Tensor, v: Tensor, out: Tensor, lse_b: Tensor,
                  dout: Tensor, dq: Tensor, dk: Tensor, dv: Tensor) -> None:
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
