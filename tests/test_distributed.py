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


class EvenDistance(masks.Mask):
    """A user's own mask, written only as ``allowed``: keys at an even distance within 6."""

    def allowed(self, block):
        d = block.i - block.j
        return (d % 2 == 0) & (d.abs() < 6)


def _case(name: str, length: int):
    ids = torch.arange(length) * 3 // length  # three documents
    batch_ids = torch.stack([ids, torch.arange(length) * 5 // length])  # per-batch documents, (B, L)
    return {
        "float64-causal": dict(mask=masks.causal(), dtype=torch.float64),
        "bfloat16-causal-alibi": dict(mask=masks.causal(), bias=biases.alibi(4), dtype=torch.bfloat16),
        "batch-documents-gqa": dict(mask=masks.document(batch_ids) & masks.causal(), kv_heads=2),
        "window-both-sides": dict(mask=masks.sliding_window(3, 4), sharding="contiguous"),
        "not-causal-or-window": dict(mask=~masks.causal() | masks.sliding_window(0, 3)),
        "rows-without-keys": dict(mask=masks.document(ids) & ~masks.causal()),
        "scale": dict(mask=masks.causal(), scale=0.37),
        "user-mask-prefix-lm": dict(mask=EvenDistance() | masks.prefix_lm(5)),
        "chunked-or-strided": dict(mask=(masks.chunked(10) & masks.causal()) | masks.strided(7)),
        "dilated-or-bigbird-alibi": dict(mask=masks.dilated(12, 3) | masks.bigbird(1, 2, 1, 4, seed=3),
                                         bias=biases.alibi(4)),
        "function-docs": dict(mask=masks.from_function(lambda b, h, q_idx, kv_idx: ids[q_idx] == ids[kv_idx])
                              & masks.causal()),
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
MORE_CASES = ["float64-causal", "bfloat16-causal-alibi", "batch-documents-gqa", "window-both-sides",
              "not-causal-or-window", "rows-without-keys", "scale", "user-mask-prefix-lm",
              "function-docs", "chunked-or-strided", "dilated-or-bigbird-alibi"]


def _close(name, got, want, factor=1.0):
    if want.dtype in (torch.float16, torch.bfloat16):  # rounding of each piece differs; see ring_attention
        got, want, factor = got.float(), want.float(), 5e3
    err = torch.where(got == want, 0.0, (got - want).abs())  # rows with no key: lse -inf on both sides
    bound = factor * ATOL + RTOL * want.abs().nan_to_num(posinf=0.0)
    assert bool((err <= bound).all()), f"{name}: max error {err.max().item():.3g}"


def _worker(rank: int, world: int, init_file: str, length: int, cases: list[str] = CASES, group_ranks=None):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        group = None
        if group_ranks is not None:  # a subgroup: the ring runs over its ranks only
            group = dist.new_group(group_ranks)
            if rank not in group_ranks:
                return
            world = len(group_ranks)
            rank = group_ranks.index(rank)
        for name in cases:
            kw = dict(_case(name, length))
            kv_heads, sharding = kw.pop("kv_heads", 4), kw.pop("sharding", "zigzag")
            dtype = kw.pop("dtype", torch.float32)
            g = torch.Generator().manual_seed(0)
            q = torch.randn(2, 4, length, 16, generator=g).to(dtype)
            k = torch.randn(2, kv_heads, length, 16, generator=g).to(dtype)
            v = torch.randn(2, kv_heads, length, 12, generator=g).to(dtype)
            w_out = torch.randn(2, 4, length, 12, generator=g).to(dtype)
            w_lse = torch.randn(2, 4, length, generator=g)
            full = [t.clone().requires_grad_(True) for t in (q, k, v)]
            ref_out, ref_lse = attnkit.attention(*full, return_lse=True, **kw)
            ((ref_out * w_out).sum() + (ref_lse * w_lse).sum()).backward()

            local = [shard(t, group, dim=2, sharding=sharding).requires_grad_(True) for t in (q, k, v)]
            out, lse = ring_attention(*local, group=group, return_lse=True, sharding=sharding, **kw)
            loss = ((out * shard(w_out, group, sharding=sharding)).sum()
                    + (lse * shard(w_lse, group, sharding=sharding)).sum())
            loss.backward()
            got = {"out": unshard(out.detach(), group, sharding=sharding),
                   "lse": unshard(lse.detach(), group, sharding=sharding)}
            for i, t in enumerate("qkv"):
                got[f"d{t}"] = unshard(local[i].grad, group, sharding=sharding)
            _close(f"{name} out", got["out"], ref_out.detach())
            _close(f"{name} lse", got["lse"], ref_lse.detach())
            for i, t in enumerate("qkv"):
                _close(f"{name} d{t}", got[f"d{t}"], full[i].grad, factor=5.0)
            # bytes sent: (W - 1) hops of this rank's K and V shards forward; W hops of K, V
            # and their float32 gradient accumulators backward (the last hop sends only dK, dV)
            itemsize, acc = local[1].element_size(), 8 if dtype == torch.float64 else 4
            shard_elems = local[1].numel() + local[2].numel()
            stats = last_stats()
            assert stats.forward_bytes == (world - 1) * shard_elems * itemsize, (name, stats)
            backward = (world - 1) * shard_elems * (itemsize + acc) + shard_elems * acc  # K, V, then dK, dV
            assert stats.backward_bytes == backward, (name, stats)
        if group_ranks is not None or list(cases) != CASES:  # the layout and error checks run once per world
            return
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
        with pytest.raises(ValueError, match="global sequence"):
            t = torch.randn(1, 1, length // world, 4)
            ring_attention(t, t, t, mask=masks.document(torch.zeros(length // world, dtype=torch.long)))
        uneven = torch.randn(1, 2, 8 if rank == 0 else 10, 4)
        with pytest.raises(ValueError, match="every rank must call ring_attention with the same shapes"):
            ring_attention(uneven, uneven, uneven)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, length: int, tmp_path, limit: float = 240.0, cases=CASES, group_ranks=None):
    ctx = mp.start_processes(_worker, args=(world, str(tmp_path / "store"), length, cases, group_ranks),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + limit
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ring attention with {world} processes did not finish in {limit:.0f} s")


@pytest.mark.parametrize(("world", "length"), [(2, 44), pytest.param(4, 56, marks=pytest.mark.slow)])
def test_ring_attention_equals_single_process(world, length, tmp_path):
    _spawn(world, length, tmp_path)


@pytest.mark.slow
def test_world_of_three_more_cases(tmp_path):
    """W = 3 (next and previous ranks differ) with dtypes, per-batch documents, two-sided
    windows, ~ and |, rows with no allowed key, and a non-default scale."""
    _spawn(3, 48, tmp_path, cases=MORE_CASES)


@pytest.mark.slow
def test_subgroup(tmp_path):
    """A ring over ranks 1..3 of 4: sends must go to the subgroup's neighbours' global ranks."""
    _spawn(4, 48, tmp_path, cases=["causal-zigzag", "mqa-causal-alibi"], group_ranks=[1, 2, 3])


def test_shifted_pieces_leave_the_mask_alone_and_sdpa_declines_them():
    from attnkit.distributed.ring import _local_bias, _local_mask
    from attnkit.functional import select_backend
    from attnkit.functional._call import make_call

    mask, bias = masks.causal(), biases.alibi(2)
    piece, piece_bias = _local_mask(mask, 8, 0, 16), _local_bias(bias, 8, 0, 16)
    assert repr(mask) == "causal(align='top_left')" and repr(bias) == "alibi(2 heads, align='top_left')"
    assert repr(piece) == "causal(shift=8)" and repr(piece_bias) == "alibi(2 heads, align='top_left').shifted(8, 0)"
    assert piece.to_dense(4, 4).all()  # keys 0..3 lie wholly before queries 8..11
    # the piece's ALiBi is the whole's, rows 8..11 and columns 0..3
    whole = bias.to_dense(16, 16, heads=2)
    assert torch.equal(piece_bias.to_dense(4, 4, heads=2), whole[:, :, 8:12, 0:4])
    q = torch.randn(1, 2, 4, 8)
    call = make_call(q, q, q, mask=_local_mask(mask, 0, 4, 16), bias=None, scale=None, softcap=None,
                     dropout_p=0.0, return_lse=False)
    assert select_backend(call, "auto").name != "sdpa"
    assert not _local_mask(mask, 0, 4, 16).to_dense(4, 4).any()  # keys 4..7 lie after queries 0..3


def test_needs_an_initialised_process_group():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_attention(q, q, q)
