"""The tiled backend's autograd functions and entry points."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnkit._blocks import ScoreBlock
from attnkit.biases import tensor_bias_parts
from attnkit.functional._call import AttentionCall
from attnkit.functional._merge import lse_merge
from attnkit.functional.tiled import kernels
from attnkit.functional.tiled.kernels import _fused_backward, _fused_forward, _lse_grad, _math_backward, _math_forward
from attnkit.functional.tiled.plan import (
    BandPlan,
    NativeParams,
    _Chunk,
    _Segment,
    band_plan,
    chunk_plan,
    query_block,
)
from attnkit.functional.tiled.strategy import Strategy, choose

_NEG_INF = float("-inf")


def chunk_block(call: AttentionCall, chunk: _Chunk, seg: _Segment, device: torch.device) -> ScoreBlock:
    return ScoreBlock(call.batch, call.kv_heads, call.groups, call.q_len, call.k_len,
                      chunk.q_start, chunk.q_stop, seg.k_start, seg.k_stop, device)


def _recompute_backward(call: AttentionCall, strategy: Strategy, plan: BandPlan | None, q_rows: Tensor, k: Tensor,
                        v: Tensor, out: Tensor, lse: Tensor, dout: Tensor | None,
                        dlse: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv from the forward's ``out`` and ``lse`` (rows folded by KV head): the batched
    fused backward on ``plan`` when there is one and no gradient on the lse, else the
    per-chunk backward (which adds the lse term)."""
    if dlse is None and plan is not None:
        dout = torch.zeros_like(out) if dout is None else dout
        return kernels.band_backward(call, plan, q_rows, k, v, out, lse, dout)
    chunks = chunk_plan(call, query_block(call), strategy)
    dq, dk, dv, _ = _backward_rows(call, strategy, chunks, q_rows, k, v, out, lse, dout, dlse)
    return dq, dk, dv


class _Banded(torch.autograd.Function):
    """The batched fused path (:func:`.plan.band_plan`, :func:`.kernels.band_forward`): ops independent of L."""

    @staticmethod
    def forward(ctx: Any, call: AttentionCall, strategy: Strategy, plan: BandPlan, q_rows: Tensor, k: Tensor,
                v: Tensor, *bias_tensors: Tensor) -> tuple[Tensor, Tensor]:
        out, lse = kernels.band_forward(call, plan, q_rows, k, v)
        ctx.call, ctx.strategy, ctx.plan = call, strategy, plan
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q_rows, k, v, out, lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout: Tensor | None, dlse: Tensor | None) -> tuple[Tensor | None, ...]:
        q_rows, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _recompute_backward(ctx.call, ctx.strategy, ctx.plan, q_rows, k, v, out, lse, dout, dlse)
        return (None, None, None, dq, dk, dv, *[None] * len(tensor_bias_parts(ctx.call.bias)))


class _Native(torch.autograd.Function):
    """The native forward (:mod:`.native`) and its backward (:func:`_native_backward`, where the strategy says
    ``native_backward``; else the batched fused one, or the per-chunk one)."""

    @staticmethod
    def forward(ctx: Any, call: AttentionCall, strategy: Strategy, params: NativeParams, q: Tensor, k: Tensor,
                v: Tensor) -> tuple[Tensor, Tensor]:
        # q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv): contiguous, compute dtype or the
        # low-precision dtype the kernel's block GEMMs take (native.gemm_dtype); lse comes back in fp32
        from attnkit.functional.tiled import native

        module: Any = native.load()
        if module is None:  # choose() loaded it before this call was routed here
            raise RuntimeError(f"the native kernel is not available: {native.native_status()}")
        p = params
        out, lse = module.forward(q, k, v, call.scale, p.dlo, p.dhi, p.klen, p.q_ids, p.kv_ids, p.slopes,
                                         p.aoff, native.BLOCK_Q, native.BLOCK_K)
        ctx.call, ctx.strategy = call, strategy
        ctx.set_materialize_grads(False)
        if any(ctx.needs_input_grad[3:]):  # folded for the backward there, not copied here for nothing
            ctx.save_for_backward(q, k, v, out, lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout: Tensor | None, dlse: Tensor | None) -> tuple[Tensor | None, ...]:
        call, strategy = ctx.call, ctx.strategy
        cd = call.compute_dtype  # the backward computes in float32 (float64), whatever the forward's GEMMs took
        q, k, v, out, lse = (t.to(cd) for t in ctx.saved_tensors)
        dout = torch.zeros_like(out) if dout is None else dout.to(cd)
        dlse = None if dlse is None else dlse.to(cd)
        if strategy.native_backward:
            return None, None, None, *_native_backward(call, strategy.native, q, k, v, out, lse, dout, dlse)
        hkv, g = call.kv_heads, call.groups
        plan = band_plan(call) if strategy.fused_backward else None
        dq, dk, dv = _recompute_backward(call, strategy, plan, fold_groups(q, hkv, g), k, v, fold_groups(out, hkv, g),
                                         fold_groups(lse, hkv, g), fold_groups(dout, hkv, g).contiguous(),
                                         None if dlse is None else fold_groups(dlse, hkv, g))
        return None, None, None, _unfold(dq, hkv, g), dk, dv


def _native_backward(call: AttentionCall, params: NativeParams, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                     lse: Tensor, dout: Tensor, dlse: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """dq (B, H, Lq, D), dk, dv (B, Hkv, Lk, D|Dv) from the native kernel's backward (FlashAttention-2: the
    probabilities recomputed from ``lse``, O(L) extra memory); every tensor in the compute dtype. dq's sum over
    key blocks runs in key-block order (the same bits at every thread count) under
    ``torch.use_deterministic_algorithms(True)``, else in the order the threads finish."""
    from attnkit.functional.tiled import native

    module: Any = native.load()
    # delta_i = rowsum(dO * O); a gradient on lse enters as -dlse (d lse / d s = p).  (B, H, Lq)
    delta = (dout * out).sum(-1)
    if dlse is not None:
        delta = delta - dlse
    lse_b = torch.where(lse == _NEG_INF, float("inf"), lse)  # rows with no key: every probability 0
    p = params
    dq, dk, dv = module.backward(q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous(),
                                 lse_b.contiguous(), delta.contiguous(), call.scale, p.dlo, p.dhi, p.klen, p.q_ids,
                                 p.kv_ids, p.slopes, p.aoff, native.BLOCK_Q, native.BLOCK_K,
                                 torch.are_deterministic_algorithms_enabled())
    return dq, dk, dv


class _Tiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, call: AttentionCall, strategy: Strategy, plan: list[_Chunk], q_rows: Tensor, k: Tensor,
                v: Tensor, *bias_tensors: Tensor) -> tuple[Tensor, Tensor]:
        # q_rows (B, Hkv, Lq*G, D); k (B, Hkv, Lk, D); v (B, Hkv, Lk, Dv); compute dtype
        b, hkv, _, _ = q_rows.shape
        g = call.groups
        out = q_rows.new_zeros(b, hkv, q_rows.shape[2], v.shape[-1])
        lse = q_rows.new_full((b, hkv, q_rows.shape[2]), _NEG_INF)
        kernel = _fused_forward if strategy.fused_forward else _math_forward
        for chunk in plan:
            rows = slice(chunk.q_start * g, chunk.q_stop * g)
            q_c = q_rows[:, :, rows]
            acc_o: Tensor | None = None
            acc_l: Tensor | None = None
            for seg in chunk.segments:
                block = chunk_block(call, chunk, seg, q_rows.device)
                o, l = kernel(call, block, seg, q_c, k[:, :, seg.k_start : seg.k_stop],
                              v[:, :, seg.k_start : seg.k_stop])
                acc_o, acc_l = lse_merge(acc_o, acc_l, o, l)
            if acc_o is not None and acc_l is not None:
                out[:, :, rows] = acc_o
                lse[:, :, rows] = acc_l
        ctx.call, ctx.strategy, ctx.plan = call, strategy, plan
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q_rows, k, v, out, lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout: Tensor | None, dlse: Tensor | None) -> tuple[Tensor | None, ...]:
        q_rows, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv, bias_grads = _backward_rows(ctx.call, ctx.strategy, ctx.plan, q_rows, k, v, out, lse, dout,
                                                dlse)
        parts = tensor_bias_parts(ctx.call.bias)
        bias_out = [bias_grads[id(p)].reshape(p.tensor.shape).to(p.tensor.dtype)
                    if id(p) in bias_grads else None for p in parts]
        return None, None, None, dq, dk, dv, *bias_out


def _backward_rows(call: AttentionCall, strategy: Strategy, plan: list[_Chunk], q_rows: Tensor, k: Tensor,
                   v: Tensor, out: Tensor, lse: Tensor, dout: Tensor | None,
                   dlse: Tensor | None) -> tuple[Tensor, Tensor, Tensor, dict[int, Tensor]]:
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
    fused = strategy.fused_backward
    for chunk in plan:
        rows = slice(chunk.q_start * g, chunk.q_stop * g)
        q_c, o_c, l_c, do_c, d_c = (t[:, :, rows] for t in (q_rows, out, lse_b, dout, delta))
        for seg in chunk.segments:
            cols = slice(seg.k_start, seg.k_stop)
            block = chunk_block(call, chunk, seg, q_rows.device)
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


def fold_groups(t: Tensor, hkv: int, g: int) -> Tensor:
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
    q_rows = fold_groups(call.q.to(cd), hkv, g)
    out_rows, lse_rows, dout_rows = (fold_groups(t.to(cd), hkv, g) for t in (out, lse, dout))
    dlse_rows = None if dlse is None else fold_groups(dlse.to(cd), hkv, g)
    strategy = choose(call, native=False)  # the backward needs only whether the fused kernel may run
    plan = chunk_plan(call, query_block(call), strategy)
    dq, dk, dv, _ = _backward_rows(call, strategy, plan, q_rows, call.k.to(cd), call.v.to(cd), out_rows, lse_rows,
                                   dout_rows, dlse_rows)
    return _unfold(dq, hkv, g), dk, dv


def tiled_forward(call: AttentionCall) -> tuple[Tensor, Tensor]:
    cd = call.compute_dtype
    hkv, g = call.kv_heads, call.groups
    k, v = call.k.to(cd), call.v.to(cd)
    strategy = choose(call)  # once per call; it travels into autograd's context
    if strategy.native is not None:  # GQA by index in the kernel: no folded copy of q
        from attnkit.functional.tiled import native

        gd = native.gemm_dtype(call.q.dtype)  # bfloat16/float16 stay so where the CPU has the units
        out, lse = _Native.apply(call, strategy, strategy.native,
                                 *(t.to(gd).contiguous() for t in (call.q, call.k, call.v)))
        return out.to(call.q.dtype), lse
    # Fold query heads by key/value group: rows ordered (i, g).  (B, Hkv, Lq*G, D)
    q_rows = fold_groups(call.q.to(cd), hkv, g)
    bias_tensors = [p.tensor for p in tensor_bias_parts(call.bias)]
    if strategy.forward == "banded":
        q_rows, k, v = q_rows.contiguous(), k.contiguous(), v.contiguous()
        out_rows, lse_rows = _Banded.apply(call, strategy, band_plan(call), q_rows, k, v, *bias_tensors)
    else:
        out_rows, lse_rows = _Tiled.apply(call, strategy, chunk_plan(call, query_block(call), strategy), q_rows, k, v,
                                          *bias_tensors)
    return _unfold(out_rows, hkv, g).to(call.q.dtype), _unfold(lse_rows, hkv, g)
