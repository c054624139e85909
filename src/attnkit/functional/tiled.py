"""The tiled backend: FlashAttention's algorithm in PyTorch, O(L) memory, with its own backward.

For each chunk of queries, the mask's block map (computed analytically) splits the
keys into *segments*: runs of full blocks, which need no mask work, and runs of partial
blocks, whose mask is evaluated for that segment alone. Empty blocks are skipped. Each
segment yields a partial output and its log-sum-exp; partial results merge by
log-sum-exp (the online softmax, one segment at a time). Nothing of size (Lq x Lk) is
ever allocated, forward or backward.

Each segment runs on one of two kernels that compute the same thing:

* ``math``: plain PyTorch ops, any device and every option (softcap, score_mod,
  dropout, Dv != D). Its scores are at most ``_SCORE_BUDGET`` elements.
* ``fused``: PyTorch's fused CPU flash kernel (``aten._scaled_dot_product_flash_attention_for_cpu``
  and its backward), used on CPU when the segment needs only a mask and additive biases.
  It receives the segment's mask and biases as a small additive tensor and returns the
  log-sum-exp that the merge needs. It is checked against the math kernel on first use.

The backward is a custom autograd function that recomputes each segment's
probabilities from q, k, v, the output and the log-sum-exp (FlashAttention-2): any
segment can be differentiated by either kernel given the global statistics.

Queries are folded by key/value group, rows ordered (i, g), so GQA/MQA never copies
keys or values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit._blocks import EMPTY, FULL, ScoreBlock
from attnkit.biases import tensor_bias_parts
from attnkit.functional import _bands
from attnkit.functional._call import AttentionCall, dropout_keep, transform_scores

_SCORE_BUDGET = 1 << 22  # elements of one math segment's score block: 16 MiB in float32
_BLOCK_K = 128  # key granularity of the block map
_MIN_SEGMENT = 512  # keys a materialising segment may span, at least, when the budget allows
_NEG_INF = float("-inf")

# "auto" (fused where it applies), "math" or "fused"; tests pin each in turn.
KERNEL = "auto"


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


def _plan(call: AttentionCall, block_q: int) -> list[_Chunk]:
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
    fused = _fused_forward_ok(call) and (not call.requires_grad or _fused_backward_ok(call))
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


def _block_q(call: AttentionCall) -> int:
    """Query positions per chunk: a power of two in [16, 256] within the score budget."""
    per_row = call.batch * call.heads * _MIN_SEGMENT
    size = 256
    while size > 16 and size * per_row > _SCORE_BUDGET:
        size //= 2
    return size


# -- the fused kernel ------------------------------------------------------------------

_fused_verified: bool | None = None


def _fused_op_available() -> bool:
    global _fused_verified
    if _fused_verified is None:
        _fused_verified = _verify_fused()
    return _fused_verified


def _verify_fused() -> bool:
    """Check the private aten op against plain math once; disable it if it disagrees."""
    try:
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        op_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        g = torch.Generator().manual_seed(0)
        q, k, v, do = (torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64) for _ in range(4))
        mask = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
        mask[..., 1, 3:] = _NEG_INF
        out, lse = op(q, k, v, attn_mask=mask, scale=0.3)
        s = (q @ k.transpose(-1, -2)) * 0.3 + mask
        ref_lse = torch.logsumexp(s, -1)
        p = torch.softmax(s, -1)
        ok = torch.allclose(out, p @ v) and torch.allclose(lse, ref_lse)
        dq, dk, dv = op_bwd(do, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=0.3)
        ok = ok and torch.allclose(dv, p.transpose(-1, -2) @ do)
        return bool(ok) and all(torch.isfinite(t).all() for t in (dq, dk))
    except (AttributeError, RuntimeError, TypeError):
        return False


def _fused_forward_ok(call: AttentionCall) -> bool:
    return (
        KERNEL != "math"
        and call.q.device.type == "cpu"
        and call.v.shape[-1] == call.q.shape[-1]
        and call.softcap is None
        and call.dropout_p == 0.0
        and (call.bias is None or call.bias.additive)
        and _fused_op_available()
    )


def _fused_backward_ok(call: AttentionCall) -> bool:
    return _fused_forward_ok(call) and not any(
        b.tensor.requires_grad for b in tensor_bias_parts(call.bias)
    )


def _additive_mask(call: AttentionCall, block: ScoreBlock, partial: bool, dtype: torch.dtype
                   ) -> tuple[Tensor | None, Tensor | None]:
    """The segment's mask and additive biases for the fused kernel.

    Returns ``(add, row)``: ``add`` is one float tensor (B|1, Hkv|1, bq*G|1, bk) or None;
    ``row`` (B|1, Hkv|1, bq*G) is a per-row shift left out of ``add`` (a separable
    bias), which changes only the log-sum-exp, or None.
    """
    _, _, bq, g, bk = block.shape
    if not partial and call.bias is not None:
        split = call.bias.separable(block, dtype)
        if split is not None:
            row, col = split
            row = row.expand(row.shape[0], row.shape[1], bq, g, 1)
            col = col.expand(col.shape[0], col.shape[1], 1, g, bk)
            if g > 1:
                col = col.expand(col.shape[0], col.shape[1], bq, g, bk)
            return (col.reshape(col.shape[0], col.shape[1], -1, bk),
                    row.reshape(row.shape[0], row.shape[1], bq * g))
    add = None if call.bias is None else call.bias.values(block, dtype)
    if partial:
        allowed = call.mask.allowed(block)  # type: ignore[union-attr]
        base = add if add is not None else torch.zeros((), dtype=dtype, device=block.device)
        add = torch.where(allowed, base, _NEG_INF)
    if add is None:
        return None, None
    add = add.expand(add.shape[0], add.shape[1], bq, g, bk)
    return add.reshape(add.shape[0], add.shape[1], bq * g, bk), None


def _fused_forward(call, block, seg, q_rows, k_seg, v_seg):
    add, row = _additive_mask(call, block, seg.partial, q_rows.dtype)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out, lse = op(q_rows, k_seg, v_seg, attn_mask=add, scale=call.scale)
    if add is not None:
        # The fused kernel reports lse = 0 for a row with no allowed key; it must be -inf.
        lse = torch.where((add > _NEG_INF).any(-1), lse, _NEG_INF)
    if row is not None:
        lse = lse + row
    return out, lse


def _fused_backward(call, block, seg, q_rows, k_seg, v_seg, out_rows, lse_rows, dout_rows):
    add, row = _additive_mask(call, block, seg.partial, q_rows.dtype)
    if row is not None:
        lse_rows = lse_rows - row  # the kernel sees scores without the row shift
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    return op(dout_rows, q_rows, k_seg, v_seg, out_rows, lse_rows, 0.0, False,
              attn_mask=add, scale=call.scale)


# -- the math kernel -------------------------------------------------------------------


def _scores(call, block, seg, q_rows, k_seg, leaves=None, raw=None):
    """Masked, transformed scores of one segment, (B, Hkv, bq, G, bk)."""
    if raw is None:
        raw = (q_rows @ k_seg.transpose(-1, -2)).mul_(call.scale).view(block.shape)
    s = transform_scores(raw, block, call, leaves)
    if seg.partial:
        s = s.masked_fill(~call.mask.allowed(block), _NEG_INF)
    return s


def _math_forward(call, block, seg, q_rows, k_seg, v_seg):
    s = _scores(call, block, seg, q_rows, k_seg)
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


def _math_backward(call, block, seg, q_rows, k_seg, v_seg, lse_rows, dout_rows, delta_rows,
                   bias_grads):
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
        s = _scores(call, block, seg, q_rows, k_seg, leaves, raw=raw)
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


# -- the autograd function ---------------------------------------------------------------


def _chunk_block(call: AttentionCall, chunk: _Chunk, seg: _Segment, device) -> ScoreBlock:
    return ScoreBlock(call.batch, call.kv_heads, call.groups, call.q_len, call.k_len,
                      chunk.q_start, chunk.q_stop, seg.k_start, seg.k_stop, device)


_merge = _bands.lse_merge


class _Banded(torch.autograd.Function):
    """The batched fused path (:mod:`attnkit.functional._bands`): ops independent of L."""

    @staticmethod
    def forward(ctx, call, plan, q_rows, k, v, *bias_tensors):
        out, lse = _bands.band_forward(call, plan, q_rows, k, v)
        ctx.call, ctx.plan = call, plan
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q_rows, k, v, out, lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        q_rows, k, v, out, lse = ctx.saved_tensors
        call = ctx.call
        if dlse is None:
            dout = torch.zeros_like(out) if dout is None else dout
            dq, dk, dv = _bands.band_backward(call, ctx.plan, q_rows, k, v, out, lse, dout)
        else:  # a gradient on lse: the per-chunk backward adds its term
            dq, dk, dv, _ = _backward_rows(call, _plan(call, _block_q(call)), q_rows, k, v, out, lse, dout, dlse)
        return (None, None, dq, dk, dv, *[None] * len(tensor_bias_parts(call.bias)))


class _Tiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call, plan, q_rows, k, v, *bias_tensors):
        # q_rows (B, Hkv, Lq*G, D); k (B, Hkv, Lk, D); v (B, Hkv, Lk, Dv); compute dtype
        b, hkv, _, _ = q_rows.shape
        g = call.groups
        out = q_rows.new_zeros(b, hkv, q_rows.shape[2], v.shape[-1])
        lse = q_rows.new_full((b, hkv, q_rows.shape[2]), _NEG_INF)
        kernel = _fused_forward if _fused_forward_ok(call) else _math_forward
        for chunk in plan:
            rows = slice(chunk.q_start * g, chunk.q_stop * g)
            q_c = q_rows[:, :, rows]
            acc_o = acc_l = None
            for seg in chunk.segments:
                block = _chunk_block(call, chunk, seg, q_rows.device)
                o, l = kernel(call, block, seg, q_c, k[:, :, seg.k_start : seg.k_stop],
                              v[:, :, seg.k_start : seg.k_stop])
                acc_o, acc_l = _merge(acc_o, acc_l, o, l)
            if acc_o is not None:
                out[:, :, rows] = acc_o
                lse[:, :, rows] = acc_l
        ctx.call, ctx.plan = call, plan
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q_rows, k, v, out, lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        q_rows, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv, bias_grads = _backward_rows(ctx.call, ctx.plan, q_rows, k, v, out, lse, dout, dlse)
        parts = tensor_bias_parts(ctx.call.bias)
        bias_out = [bias_grads[id(p)].reshape(p.tensor.shape).to(p.tensor.dtype)
                    if id(p) in bias_grads else None for p in parts]
        return None, None, dq, dk, dv, *bias_out


def _backward_rows(call, plan, q_rows, k, v, out, lse, dout, dlse):
    """FlashAttention-2's backward over the plan, from the rows' final ``out`` and ``lse``.

    ``out`` and ``lse`` may come from a larger call whose keys include these (ring
    attention): the recomputed probabilities ``exp(s - lse)`` are then this call's share.
    """
    g = call.groups
    dq = torch.zeros_like(q_rows)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    # D_i = rowsum(dO * O); a gradient on lse enters as -dlse (d lse / d s = p).
    delta = (dout * out).sum(-1)
    if dlse is not None:
        delta = delta - dlse
    # Rows with no allowed key: lse = +inf makes every recomputed probability 0.
    lse_b = torch.where(lse == _NEG_INF, float("inf"), lse)
    parts = tensor_bias_parts(call.bias)
    bias_grads = {id(p): torch.zeros_like(p.tensor4, dtype=q_rows.dtype) for p in parts
                  if p.tensor.requires_grad}
    fused = _fused_backward_ok(call)
    for chunk in plan:
        rows = slice(chunk.q_start * g, chunk.q_stop * g)
        q_c, o_c, l_c, do_c, d_c = (t[:, :, rows] for t in (q_rows, out, lse_b, dout, delta))
        for seg in chunk.segments:
            cols = slice(seg.k_start, seg.k_stop)
            block = _chunk_block(call, chunk, seg, q_rows.device)
            if fused:
                gq, gk, gv = _fused_backward(call, block, seg, q_c, k[:, :, cols], v[:, :, cols],
                                             o_c, l_c, do_c)
                if dlse is not None:  # the fused kernel knows only D_i = rowsum(dO * O)
                    extra_q, extra_k = _lse_grad(call, block, seg, q_c, k[:, :, cols], l_c,
                                                 dlse[:, :, rows])
                    gq, gk = gq + extra_q, gk + extra_k
            else:
                gq, gk, gv = _math_backward(call, block, seg, q_c, k[:, :, cols], v[:, :, cols],
                                            l_c, do_c, d_c, bias_grads)
            dq[:, :, rows] += gq
            dk[:, :, cols] += gk
            dv[:, :, cols] += gv
    return dq, dk, dv, bias_grads


def _fold(t: Tensor, hkv: int, g: int) -> Tensor:
    """(B, H, L, ...) -> (B, Hkv, L*G, ...) with rows ordered (i, g), as the plan expects."""
    if g == 1:
        return t
    b, _, length = t.shape[:3]
    rest = t.shape[3:]
    return t.view(b, hkv, g, length, *rest).transpose(2, 3).reshape(b, hkv, length * g, *rest)


def _unfold(t: Tensor, hkv: int, g: int) -> Tensor:
    if g == 1:
        return t
    b, _, rows = t.shape[:3]
    rest = t.shape[3:]
    return t.view(b, hkv, rows // g, g, *rest).transpose(2, 3).reshape(b, hkv * g, rows // g, *rest)


def partial_gradients(call: AttentionCall, out: Tensor, lse: Tensor, dout: Tensor,
                      dlse: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of q, k, v for the keys of ``call``, when they are part of a larger key set.

    ``out`` (B, H, Lq, Dv) and ``lse`` (B, H, Lq) are the final results over all keys, and
    ``dout``/``dlse`` their gradients. Used by ring attention: summing these over the key
    shards gives exactly the gradients of the whole call. O(L) memory, like the backward.
    """
    cd = call.compute_dtype
    hkv, g = call.kv_heads, call.groups
    q_rows = _fold(call.q.to(cd), hkv, g)
    fold = [_fold(t.to(cd), hkv, g) for t in (out, lse, dout)]
    dlse_rows = None if dlse is None else _fold(dlse.to(cd), hkv, g)
    plan = _plan(call, _block_q(call))
    dq, dk, dv, _ = _backward_rows(call, plan, q_rows, call.k.to(cd), call.v.to(cd), *fold, dlse_rows)
    return _unfold(dq, hkv, g), dk, dv


def _lse_grad(call, block, seg, q_rows, k_seg, lse_rows, dlse_rows):
    """Gradient of sum(dlse * lse) w.r.t. q and k on one segment: d lse_i / d s_ij = p_ij."""
    b, hkv, bq, g, bk = block.shape
    s = _scores(call, block, seg, q_rows, k_seg)
    p = torch.exp(s - lse_rows.reshape(b, hkv, bq, g, 1))
    ds = (p * dlse_rows.reshape(b, hkv, bq, g, 1)).reshape(b, hkv, bq * g, bk)
    return (ds @ k_seg) * call.scale, (ds.transpose(-1, -2) @ q_rows) * call.scale


def tiled_forward(call: AttentionCall) -> tuple[Tensor, Tensor]:
    cd = call.compute_dtype
    hkv, g = call.kv_heads, call.groups
    # Fold query heads by key/value group: rows ordered (i, g).  (B, Hkv, Lq*G, D)
    q_rows = _fold(call.q.to(cd), hkv, g)
    k, v = call.k.to(cd), call.v.to(cd)
    bias_tensors = [p.tensor for p in tensor_bias_parts(call.bias)]
    if KERNEL == "auto" and _fused_forward_ok(call) and (not call.requires_grad or _fused_backward_ok(call)):
        q_rows, k, v = q_rows.contiguous(), k.contiguous(), v.contiguous()
        out_rows, lse_rows = _Banded.apply(call, _bands.band_plan(call), q_rows, k, v, *bias_tensors)
    else:
        out_rows, lse_rows = _Tiled.apply(call, _plan(call, _block_q(call)), q_rows, k, v, *bias_tensors)
    return _unfold(out_rows, hkv, g).to(call.q.dtype), _unfold(lse_rows, hkv, g)


class TiledBackend:
    name = "tiled"
    summary = "FlashAttention's algorithm in PyTorch: O(L) memory, skips masked-out blocks"
    features = ("every mask, block-sparse", "every bias, per block", "softcap", "dropout",
                "GQA/MQA without copies", "Lq != Lk", "Dv != D", "return_lse",
                "custom backward", "any device")

    def supports(self, call: AttentionCall) -> str | None:
        return None

    def run(self, call: AttentionCall) -> tuple[Tensor, Tensor]:
        return tiled_forward(call)
