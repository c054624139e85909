"""Ring attention over torch.distributed (gloo, 2 and 4 CPU processes on this machine)
against single-process attnkit.attention on the whole sequence: output, lse and the
gradients of q, k and v."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnkit
from attnkit import biases, masks
from attnkit.distributed import last_stats, ring_attention, shard, unshard

# fp32 tolerance of PyTorch's own context-parallel tests; gradients get 5x the atol
ATOL, RTOL = 2e-6, 1e-5


def _case(name: str, length: int):
    ids = torch.arange(length) * 3 // length  # three documents
    return {
        "dense-contiguous": dict(sharding="contiguous"),
        "dense-zigzag": dict(),
        "causal-zigzag": dict(mask=masks.causal()),
        "causal-contiguous": dict(mask=masks.causal(), sharding="contiguous"),
        "gqa-causal": dict(mask=masks.causal(), kv_heads=2),
        "mqa-causal-alibi": dict(mask=masks.causal(), bias=biases.alibi(4), kv_heads=1),
        "window": dict(mask=masks.sliding_window(left=5)),
        "document-causal": dict(mask=masks.document(ids) & masks.causal(), kv_heads=2),
    }[name]


CASES = ["dense-contiguous", "dense-zigzag", "causal-zigzag", "causal-contiguous", "gqa-causal",
         "mqa-causal-alibi", "window", "document-causal"]


def _close(name, got, want, factor=1.0):
    err = (got - want).abs()
    bound = factor * ATOL + RTOL * want.abs()
    assert bool((err <= bound).all()), f"{name}: max error {err.max().item():.3g}"


def _worker(rank: int, world: int, init_file: str, length: int):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        for name in CASES:
            kw = dict(_case(name, length))
            kv_heads, sharding = kw.pop("kv_heads", 4), kw.pop("sharding", "zigzag")
            g = torch.Generator().manual_seed(0)
            q = torch.randn(2, 4, length, 16, generator=g)
            k = torch.randn(2, kv_heads, length, 16, generator=g)
            v = torch.randn(2, kv_heads, length, 12, generator=g)
            w_out, w_lse = torch.randn(2, 4, length, 12, generator=g), torch.randn(2, 4, length, generator=g)
            full = [t.clone().requires_grad_(True) for t in (q, k, v)]
            ref_out, ref_lse = attnkit.attention(*full, return_lse=True, **kw)
            ((ref_out * w_out).sum() + (ref_lse * w_lse).sum()).backward()

            local = [shard(t, dim=2, sharding=sharding).requires_grad_(True) for t in (q, k, v)]
            out, lse = ring_attention(*local, return_lse=True, sharding=sharding, **kw)
            loss = (out * shard(w_out, sharding=sharding)).sum() + (lse * shard(w_lse, sharding=sharding)).sum()
            loss.backward()
            got = {"out": unshard(out.detach(), sharding=sharding), "lse": unshard(lse.detach(), sharding=sharding)}
            for i, t in enumerate("qkv"):
                got[f"d{t}"] = unshard(local[i].grad, sharding=sharding)
            _close(f"{name} out", got["out"], ref_out.detach())
            _close(f"{name} lse", got["lse"], ref_lse.detach())
            for i, t in enumerate("qkv"):
                _close(f"{name} d{t}", got[f"d{t}"], full[i].grad, factor=5.0)
            # bytes sent: (W - 1) hops of this rank's K and V shards forward; W hops of K, V
            # and their float32 gradient accumulators backward (the last hop sends only dK, dV)
            shard_bytes = (local[1].numel() + local[2].numel()) * 4
            stats = last_stats()
            assert stats.forward_bytes == (world - 1) * shard_bytes, (name, stats)
            assert stats.backward_bytes == (world - 1) * 2 * shard_bytes + shard_bytes, (name, stats)
        x = torch.arange(2 * 3 * length, dtype=torch.float32).view(2, 3, length)
        for sharding in ("zigzag", "contiguous"):
            assert torch.equal(unshard(shard(x, sharding=sharding), sharding=sharding), x)
        mine = shard(x, sharding="zigzag")
        half = length // (2 * world)
        want = torch.cat([x[..., rank * half:(rank + 1) * half],
                          x[..., (2 * world - 1 - rank) * half:(2 * world - rank) * half]], dim=-1)
        assert torch.equal(mine, want)
        with pytest.raises(ValueError, match="cannot split"):
            shard(x[..., :-1])
        with pytest.raises(ValueError, match="supports causal, sliding_window and document masks"):
            t = torch.randn(1, 1, length // world, 4)
            ring_attention(t, t, t, mask=masks.prefix_lm(3))
    finally:
        dist.destroy_process_group()


def _spawn(world: int, length: int, tmp_path, limit: float = 240.0):
    ctx = mp.start_processes(_worker, args=(world, str(tmp_path / "store"), length), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + limit
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ring attention with {world} processes did not finish in {limit:.0f} s")


@pytest.mark.parametrize(("world", "length"), [(2, 44), (4, 56)])
def test_ring_attention_equals_single_process(world, length, tmp_path):
    _spawn(world, length, tmp_path)


def test_needs_an_initialised_process_group():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_attention(q, q, q)
