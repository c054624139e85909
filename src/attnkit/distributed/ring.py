"""Exact ring attention over ``torch.distributed``: a sequence split across processes.

Each of W ranks holds a shard of the sequence: its queries, keys and values. Key/value
shards travel around the ring (rank r sends to r + 1 and receives from r - 1) with
``batch_isend_irecv``, overlapped with the attention of the local queries on the shard
in hand. Partial results merge by log-sum-exp in float32, so the result is exact.

Sharding (``W = 2``, 8 chunks of the sequence shown for zigzag)::

    contiguous:  rank 0 = [0 1 2 3]        rank 1 = [4 5 6 7]
    zigzag:      rank 0 = [0 1 | 6 7]      rank 1 = [2 3 | 4 5]

Under a causal mask, contiguous sharding gives the last rank W times the work of the
first; zigzag pairs an early chunk with a late one, so every rank does about equal work.

The backward is a custom autograd function: FlashAttention-2's backward of the core's tiled
backend, run on each shard with the rows' final output and log-sum-exp (O(L) memory).
dK/dV accumulators travel the ring with their shard and return to the owner at the end.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
import torch.distributed as dist
from torch import Tensor

from attnkit._checks import describe, require_choice
from attnkit.biases import Bias, as_bias, tensor_bias_parts
from attnkit.functional import attention
from attnkit.functional._call import make_call
from attnkit.functional._merge import lse_merge
from attnkit.functional.tiled import partial_gradients
from attnkit.masks import Mask, as_mask

__all__ = ["RingStats", "last_stats", "ring_attention", "shard", "unshard"]

_SHARDINGS = ("zigzag", "contiguous")


@dataclass
class RingStats:
    """Bytes this rank sent in the last forward and backward of :func:`ring_attention`."""

    forward_bytes: int = 0
    backward_bytes: int = 0


_STATS = RingStats()


def last_stats() -> RingStats:
    """What this rank sent in its last ring-attention forward and backward."""
    return copy.copy(_STATS)


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring attention needs torch.distributed initialised: call "
                           "torch.distributed.init_process_group('gloo' or 'nccl') first (torchrun does the setup)")
    return dist.get_rank(group), dist.get_world_size(group)


def _segments(rank: int, world: int, local_len: int, sharding: str) -> list[tuple[int, int, int]]:
    """This rank's pieces of the global sequence: (global start, length, local start)."""
    if sharding == "contiguous":
        return [(rank * local_len, local_len, 0)]
    half = local_len // 2
    return [(rank * half, half, 0), ((2 * world - 1 - rank) * half, half, half)]


def _check_length(name: str, length: int, world: int, sharding: str, local: bool) -> None:
    parts = world if sharding == "contiguous" else 2 * world
    per_rank = 1 if sharding == "contiguous" else 2
    if local and length % per_rank:
        raise ValueError(f"{name} has a local length of {length}; zigzag sharding needs an even local length "
                         "(two chunks per rank)")
    if not local and length % parts:
        raise ValueError(f"{name} has length {length}, which {sharding} sharding over {world} ranks cannot split "
                         f"into {parts} equal chunks; pad the sequence to a multiple of {parts}")


# -- masks and biases of one piece of the sequence -----------------------------------------


def _local_mask(mask: Mask | None, qs: int, ks: int, total: int) -> Mask | None:
    """``mask`` (over the global square sequence of ``total`` tokens) on the piece whose
    queries start at ``qs`` and keys at ``ks``."""
    return None if mask is None else mask.shifted(qs, ks, q_total=total, k_total=total)


def _local_bias(bias: Bias | None, qs: int, ks: int, total: int) -> Bias | None:
    return None if bias is None else bias.shifted(qs, ks, q_total=total, k_total=total)


# -- the ring ------------------------------------------------------------------------------


def _exchange(tensors: list[Tensor], rank: int, world: int,
              group: dist.ProcessGroup | None) -> tuple[list[Tensor], list[dist.Work], int]:
    """Start sending ``tensors`` to the next rank and receiving the previous rank's."""
    received = [torch.empty_like(t) for t in tensors]
    ops = []
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    to_global = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
    for t, r in zip(tensors, received):
        ops.append(dist.P2POp(dist.isend, t, to_global(nxt), group))
        ops.append(dist.P2POp(dist.irecv, r, to_global(prv), group))
    requests = dist.batch_isend_irecv(ops)
    return received, requests, sum(t.numel() * t.element_size() for t in tensors)


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Mask | None, bias: Bias | None, scale: float | None,
                sharding: str, group: dist.ProcessGroup | None) -> tuple[Tensor, Tensor]:
        rank, world = _world(group)
        segs = _segments(rank, world, q.shape[2], sharding)
        batch, heads, local_len, _ = q.shape
        total = local_len * world
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        acc_out = torch.zeros(batch, heads, local_len, v.shape[-1], dtype=acc, device=q.device)
        acc_lse = torch.full((batch, heads, local_len), float("-inf"), dtype=acc, device=q.device)
        held = [k.contiguous(), v.contiguous()]
        sent = 0
        for step in range(world):
            src = (rank - step) % world
            if step < world - 1:
                incoming, requests, n = _exchange(held, rank, world, group)
                sent += n
            kh, vh = held
            for qs, qn, ql in segs:
                for ks, kn, kl in _segments(src, world, k.shape[2], sharding):
                    m = _local_mask(mask, qs, ks, total)
                    if m is not None and m.is_empty(qn, kn, batch=batch, heads=heads):
                        continue
                    out, lse = attention(q[:, :, ql:ql + qn], kh[:, :, kl:kl + kn], vh[:, :, kl:kl + kn],
                                         mask=m, bias=_local_bias(bias, qs, ks, total), scale=scale, return_lse=True)
                    o, l_ = lse_merge(acc_out[:, :, ql:ql + qn], acc_lse[:, :, ql:ql + qn], out, lse)
                    acc_out[:, :, ql:ql + qn], acc_lse[:, :, ql:ql + qn] = o, l_
            if step < world - 1:
                for r in requests:
                    r.wait()
                held = incoming
        _STATS.forward_bytes = sent
        ctx.set_materialize_grads(False)  # an unused lse then sends None, not zeros to multiply
        ctx.save_for_backward(q, k, v, acc_out, acc_lse)
        ctx.args = (mask, bias, scale, sharding, group)
        return acc_out.to(q.dtype), acc_lse

    @staticmethod
    def backward(ctx: Any, d_out: Tensor | None, d_lse: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        mask, bias, scale, sharding, group = ctx.args
        rank, world = _world(group)
        segs = _segments(rank, world, q.shape[2], sharding)
        batch, heads, total = q.shape[0], q.shape[1], q.shape[2] * world
        acc = out.dtype
        d_out = torch.zeros_like(out) if d_out is None else d_out.to(acc)
        has_dlse = d_lse is not None
        d_lse = torch.zeros_like(lse) if d_lse is None else d_lse.to(acc)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        # k, v and their gradient accumulators travel together
        held = [k.contiguous(), v.contiguous(), torch.zeros(k.shape, dtype=acc, device=k.device),
                torch.zeros(v.shape, dtype=acc, device=v.device)]
        sent = 0
        for step in range(world):
            src = (rank - step) % world
            kh, vh, dkh, dvh = held
            if step < world - 1:  # K and V move on while this step computes; dK, dV follow it
                kv_in, kv_requests, n = _exchange([kh, vh], rank, world, group)
                sent += n
            for qs, qn, ql in segs:
                rows = slice(ql, ql + qn)
                for ks, kn, kl in _segments(src, world, k.shape[2], sharding):
                    m = _local_mask(mask, qs, ks, total)
                    if m is not None and m.is_empty(qn, kn, batch=batch, heads=heads):
                        continue
                    cols = slice(kl, kl + kn)
                    call = make_call(q[:, :, rows], kh[:, :, cols], vh[:, :, cols], mask=m,
                                     bias=_local_bias(bias, qs, ks, total), scale=scale, softcap=None, dropout_p=0.0,
                                     return_lse=True)
                    # FlashAttention-2's backward with the final out and lse of these rows gives
                    # exactly this shard's share of the gradients
                    gq, gk, gv = partial_gradients(call, out[:, :, rows], lse[:, :, rows], d_out[:, :, rows],
                                                   d_lse[:, :, rows] if has_dlse else None)
                    dq[:, :, rows] += gq.to(acc)
                    dkh[:, :, cols] += gk.to(acc)
                    dvh[:, :, cols] += gv.to(acc)
            if world == 1:
                held = [dkh, dvh]
                break
            # the gradients follow their shard; after the last step they go home to the owner
            grad_in, grad_requests, n = _exchange([dkh, dvh], rank, world, group)
            sent += n
            for r in grad_requests:
                r.wait()
            if step < world - 1:
                for r in kv_requests:
                    r.wait()
                held = [*kv_in, *grad_in]
            else:
                held = grad_in
        _STATS.backward_bytes = sent
        dk, dv = held
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


@overload
def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, group: dist.ProcessGroup | None = None,
                   mask: Mask | None = None, bias: Bias | None = None, scale: float | None = None,
                   sharding: str = "zigzag", return_lse: Literal[False] = False) -> Tensor: ...


@overload
def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, group: dist.ProcessGroup | None = None,
                   mask: Mask | None = None, bias: Bias | None = None, scale: float | None = None,
                   sharding: str = "zigzag", return_lse: Literal[True]) -> tuple[Tensor, Tensor]: ...


@overload
def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, group: dist.ProcessGroup | None = None,
                   mask: Mask | None = None, bias: Bias | None = None, scale: float | None = None,
                   sharding: str = "zigzag", return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]: ...


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, group: dist.ProcessGroup | None = None,
                   mask: Mask | None = None, bias: Bias | None = None, scale: float | None = None,
                   sharding: str = "zigzag", return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention over a sequence sharded across the ranks of ``group``.

    Args:
        q: this rank's queries, (B, H, L/W, D), as :func:`shard` lays them out.
        k, v: this rank's keys and values, (B, Hkv, L/W, D) and (B, Hkv, L/W, Dv); GQA/MQA
            as in :func:`attnkit.attention`.
        group: the process group (default: the whole world). Gloo on CPU, NCCL on GPU.
        mask: any mask over the *global* (L x L) sequence (per-token masks such as
            ``document`` take global ids of length L). Each piece uses
            ``mask.shifted(q0, k0, q_total=L, k_total=L)``; pieces the mask rules out
            entirely are skipped. Causal alignment is moot: the global sequence is square.
        bias: any bias over the global sequence (ALiBi, ``score_mod``, a tensor that needs
            no gradient), shifted the same way; or None.
        scale: as :func:`attnkit.attention`.
        sharding: ``"zigzag"`` (balanced under a causal mask) or ``"contiguous"``; must
            match how the inputs were sharded.
        return_lse: also return the log-sum-exp (B, H, L/W): float32, float64 for float64
            inputs.

    Returns:
        This rank's output rows (B, H, L/W, Dv), equal to the matching rows of
        ``attnkit.attention`` on the whole sequence; and the lse if asked.

    Every rank must call it, and backpropagate through its output, in step: both passes
    are collective. float16/bfloat16 inputs are rounded once per piece before the float32
    merge (within 5e-3 of the single-process result in a check with W = 3).

    Raises:
        RuntimeError if torch.distributed is not initialised; ValueError (on every rank)
        for shapes, dtypes or sharding that differ between ranks, and for masks and biases
        it cannot shard.
    """
    require_choice("sharding", sharding, _SHARDINGS)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, heads, local length, head_dim); got {describe(t)}")
    if q.shape[2] != k.shape[2] or k.shape[2] != v.shape[2]:
        raise ValueError(f"q, k and v must hold the same local length (a shard of one sequence); got "
                         f"{q.shape[2]}, {k.shape[2]}, {v.shape[2]}")
    _, world = _world(group)
    _check_length("q", q.shape[2], world, sharding, local=True)
    # every rank must bring the same shapes, or the ring would deadlock or abort mid-way
    mine = (tuple(q.shape), tuple(k.shape), tuple(v.shape), str(q.dtype), sharding)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    if any(other != mine for other in everyone):
        raise ValueError("every rank must call ring_attention with the same shapes, dtype and sharding; got "
                         + "; ".join(f"rank {r}: q {o[0]}, k {o[1]}, v {o[2]}, {o[3]}, {o[4]}"
                                     for r, o in enumerate(everyone)))
    mask_ = None if mask is None else as_mask("mask", mask)
    bias_ = None if bias is None else as_bias("bias", bias)
    # validate against the global sequence, so bad input fails before any send
    total = q.shape[2] * world
    if any(b.tensor.requires_grad for b in tensor_bias_parts(bias_)):
        raise ValueError("ring_attention returns no gradient for a bias tensor; pass one that does not require grad")
    for name, what in (("mask", mask_), ("bias", bias_)):
        if what is not None:
            try:
                what.check(q.shape[0], q.shape[1], total, total, q.device)
            except ValueError as e:
                raise ValueError(f"ring_attention's {name} is over the global sequence (L={total}): {e}") from e
    out, lse = _Ring.apply(q, k, v, mask_, bias_, scale, sharding, group)
    return (out, lse) if return_lse else out


def shard(x: Tensor, group: dist.ProcessGroup | None = None, dim: int = 2, sharding: str = "zigzag") -> Tensor:
    """This rank's part of ``x`` (the whole sequence, the same on every rank) along ``dim``.

    With zigzag sharding, rank r of W gets chunks r and 2W-1-r of 2W equal chunks; with
    contiguous sharding, chunk r of W. The length must split evenly (ValueError otherwise).
    """
    require_choice("sharding", sharding, _SHARDINGS)
    rank, world = _world(group)
    length = x.shape[dim]
    _check_length("x", length, world, sharding, local=False)
    local = length // world
    pieces = [x.narrow(dim, start, n) for start, n, _ in _segments(rank, world, local, sharding)]
    return torch.cat(pieces, dim=dim).contiguous()


def unshard(x: Tensor, group: dist.ProcessGroup | None = None, dim: int = 2, sharding: str = "zigzag") -> Tensor:
    """The whole sequence from every rank's part (an all-gather), in global order."""
    require_choice("sharding", sharding, _SHARDINGS)
    _, world = _world(group)
    _check_length("x", x.shape[dim], world, sharding, local=True)
    gathered = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(gathered, x.contiguous(), group=group)
    local = x.shape[dim]
    chunks: list[tuple[int, Tensor]] = []
    for r, part in enumerate(gathered):
        for start, n, local_start in _segments(r, world, local, sharding):
            chunks.append((start, part.narrow(dim, local_start, n)))
    chunks.sort(key=lambda c: c[0])
    return torch.cat([c for _, c in chunks], dim=dim)
