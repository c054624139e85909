"""Ring attention over torch.distributed (gloo) with 1, 2 and 4 processes: per-rank peak
memory, time per forward+backward step, and bytes sent per rank against the formula.

    python benchmarks/ring.py                 # L = 16384 (~3 min on an idle 2-core machine)
    python benchmarks/ring.py --length 4096   # shorter
    python benchmarks/ring.py --quick         # L = 1024, a smoke test of this script

It prints the markdown table and writes benchmarks/results/ring.json and ring.md (or the
directory given by ``--out``; ``--quick`` writes nothing unless ``--out`` is given).

Causal, zigzag sharding, fp32, B=1, H=8, D=64. Each rank makes its own shard (no rank
holds the whole sequence) and uses max(1, cores / W) threads. Peak memory is the growth
of the rank's peak RSS over its first forward+backward, the inputs already made; the
time is that of the second step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnkit import masks
from attnkit._timing import peak_rss_mib
from attnkit.distributed import last_stats, ring_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, machine_info, machine_line, save

B, H, D = 1, 8, 64


def _rank(rank: int, world: int, store: str, length: int, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    g = torch.Generator().manual_seed(rank)
    local = length // world
    q, k, v = (torch.randn(B, H, local, D, generator=g).requires_grad_(True) for _ in range(3))
    mask = masks.causal()
    before = peak_rss_mib()
    ring_attention(q, k, v, mask=mask).sum().backward()  # the first step: its peak is the memory figure
    peak = peak_rss_mib() - before
    dist.barrier()
    start = time.perf_counter()
    ring_attention(q, k, v, mask=mask).sum().backward()  # the second step: the time figure
    dist.barrier()
    seconds = time.perf_counter() - start
    stats = last_stats()
    row = {"rank": rank, "seconds": seconds, "peak_mib": peak,
           "forward_bytes": stats.forward_bytes, "backward_bytes": stats.backward_bytes}
    rows: list = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def run(world: int, length: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.start_processes(_rank, args=(world, os.path.join(tmp, "store"), length, out), nprocs=world,
                           start_method="spawn")
        return json.loads(Path(out).read_text())


def render(data: dict) -> str:
    """The markdown table of a ring.json result: per world size, the slowest rank's time,
    the largest rank's peak, the most any rank sent, and the formula's bytes per rank."""
    length = data["length"]
    shard_bytes = 2 * B * H * length * D * 4  # K and V of the whole sequence, fp32
    lines = [machine_line(data["machine"]),
             f"Causal, zigzag sharding, fp32, B={B}, H={H}, D={D}, L={length}, gloo processes on this one machine.",
             "", "| processes W | time per fwd+bwd step (s) | peak MiB per rank (max) | sent per rank fwd / bwd (MiB) "
             "| formula fwd / bwd (MiB) |", "|---|---|---|---|---|"]
    for world, rows in data["results"].items():
        w = int(world)
        per = shard_bytes / w  # this rank's K and V
        # forward: W-1 hops of K, V; backward: W-1 hops of K, V, dK, dV, then dK, dV home
        fwd = (w - 1) * per
        bwd = (w - 1) * 2 * per + per if w > 1 else 0
        sent_fwd = max(r["forward_bytes"] for r in rows) / 2**20
        sent_bwd = max(r["backward_bytes"] for r in rows) / 2**20
        lines.append(f"| {w} | {max(r['seconds'] for r in rows):.2f} | {max(r['peak_mib'] for r in rows):.0f} | "
                     f"{sent_fwd:.1f} / {sent_bwd:.1f} | {fwd / 2**20:.1f} / {bwd / 2**20:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, help=f"results directory (default {RESULTS}; none with --quick)")
    args = parser.parse_args(argv)
    length = 1024 if args.quick else args.length
    results = {}
    for world in (1, 2, 4):
        print(f"W={world} ...", file=sys.stderr, flush=True)
        results[str(world)] = run(world, length)
    data = {"machine": machine_info(), "length": length, "results": results}
    table = render(data)
    print(table)
    if args.out or not args.quick:
        save("ring", data, table, args.out or RESULTS)
    return data


if __name__ == "__main__":
    main()
