"""``attnkit bench``: time attnkit's backends against PyTorch SDPA, FlexAttention and eager
attention on the benchmark cases; check every output against the reference.

The defaults (8 cases x L = 1024, 2048, 4096, 3 backends and 3 peers, 5 repeats and a memory
pass) took 53 minutes on a 2-core AMD EPYC shared with other work (load 8; 22 minutes of CPU
time). --quick took 24 s there when idle and 43 s under the same load."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TypedDict

import torch

from attnkit.bench import BACKENDS, CASES, DEFAULT_CASES, PEERS, BenchResult
from attnkit.cli._common import Column, Console, Parser, Subparsers, csv, write_outputs

LENGTHS = [1024, 2048, 4096]
REPEATS = 5
class _Quick(TypedDict):
    lengths: list[int]
    repeats: int
    peers: list[str]


QUICK: _Quick = {"lengths": [128, 256], "repeats": 2, "peers": ["sdpa", "naive"]}
"""--quick: short lengths, 2 repeats, no FlexAttention (its compilation alone takes a minute on
a small CPU), no memory pass. Each option given explicitly wins."""


def add_parser(sub: Subparsers) -> Parser:
    p = sub.add_parser("bench", help="attnkit's backends vs SDPA, FlexAttention and eager attention",
                       description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help=f"a preset that runs in under a minute: lengths {','.join(map(str, QUICK['lengths']))}, "
                        f"{QUICK['repeats']} repeats, peers {','.join(QUICK['peers'])}, no memory pass")
    extra = [c for c in CASES if c not in DEFAULT_CASES]
    p.add_argument("--cases", type=csv(str, list(CASES)), default=list(DEFAULT_CASES),
                   help=f"comma-separated cases (default: {', '.join(DEFAULT_CASES)}; also: {', '.join(extra)})")
    p.add_argument("--lengths", type=csv(int), default=None, help=f"comma-separated L (default: "
                   f"{','.join(map(str, LENGTHS))}; --quick: {','.join(map(str, QUICK['lengths']))})")
    p.add_argument("--backends", type=csv(str, BACKENDS), default=list(BACKENDS), help="attnkit backends to time")
    p.add_argument("--peers", type=csv(str, list(PEERS)), default=None, help=f"other implementations to time "
                   f"(default: {','.join(PEERS)}; --quick: {','.join(QUICK['peers'])})")
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32", "float64"], default="float32",
                   help="element type of q, k, v")
    p.add_argument("--device", default="cpu", help="torch device to run on")
    p.add_argument("--batch", type=int, default=1, help="batch size")
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads of the gqa case")
    p.add_argument("--head-dim", type=int, default=64, help="dimension of each head")
    p.add_argument("--window", type=int, default=512, help="keys per query in the window case")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed calls per implementation; the median is shown (default: {REPEATS}; "
                        f"--quick: {QUICK['repeats']})")
    p.add_argument("--max-dense-gib", type=float, default=4.0,
                   help="skip implementations that would hold dense scores larger than this")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements (--quick does)")
    p.add_argument("--json", help="write every figure to this file")
    p.add_argument("--plot", help="write a PNG of time and memory against L (needs matplotlib)")
    p.add_argument("--markdown", action="store_true", help="print a markdown table (alone on stdout)")
    p.add_argument("--load", type=int, default=0, metavar="N",
                   help="time each case again with N background loads (a spin loop and a 2-thread matmul loop, "
                        "alternating; bounded in time, always stopped) and report each slowdown")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from attnkit import bench as bench_lib

    lengths = args.lengths or (QUICK["lengths"] if args.quick else LENGTHS)
    repeats = args.repeats if args.repeats is not None else (QUICK["repeats"] if args.quick else REPEATS)
    peers = args.peers or (QUICK["peers"] if args.quick else list(PEERS))
    con = Console(stderr=args.markdown)  # with --markdown, stdout holds the table alone
    con.rule("attnkit bench")
    with con.progress() as progress:
        result = bench_lib.run(args.cases, lengths, progress=progress, backends=args.backends, peers=peers,
                               backward=args.backward, dtype=getattr(torch, args.dtype), device=args.device,
                               batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                               window=args.window, repeats=repeats,
                               memory=not (args.no_memory or args.quick), max_dense_gib=args.max_dense_gib,
                               load=args.load)
    if args.markdown:
        print(bench_lib.markdown(result))
    else:
        con.print(f"{result.machine}; fp32 matmul {result.matmul_gflops:.0f} GFLOP/s. Rows without 'sdpa', 'flex' "
                  "or 'naive' in the impl column are attnkit backends; %mm: share of that matmul rate; 'vs sdpa': "
                  "that peer's time over ours.")
        columns: list[str | Column] = ["case", Column("L", right=True), "impl", Column("ms", right=True),
                   Column("peak MiB", right=True), Column("GFLOP/s (%mm)", right=True),
                   *(Column(f"vs {p}", right=True) for p in peers), Column("status", wrap=True)]
        table = rows(result, peers)
        if all(r.peak_mib is None for r in result.rows):  # no memory pass: no empty column
            columns.pop(4)
            table = [row[:4] + row[5:] for row in table]
        con.table("attention, " + ("forward+backward" if args.backward else "forward"), columns, table, keep=3)
    write_outputs(con, args.json, result.to_dict(), args.plot, lambda path: bench_lib.plot(result, path))
    return 0


def rows(result: BenchResult, peers: Sequence[str]) -> list[tuple[str, ...]]:
    """One row per (case, length, implementation): every figure whole, blank where absent."""
    out: list[tuple[str, ...]] = []
    for r in result.rows:
        ups = result.speedups(r.case, r.length, r.impl) if r.impl.startswith("attnkit:") else {}
        out.append((r.case, str(r.length), r.impl.removeprefix("attnkit:"),
                    ("" if r.ms is None else f"{r.ms:.2f}")
                    + ("" if r.slowdown is None else f" (x{r.slowdown:.1f} loaded)"),
                    "" if r.peak_mib is None else f"{r.peak_mib:.0f}",
                    "" if r.gflops is None else f"{r.gflops:.1f} ({r.pct_of_matmul:.0f}%)",
                    *(f"{ups[p]:.2f}x" if p in ups else "" for p in peers),
                    r.status + (f": {r.note}" if r.note and r.status != "ok" else "")
                    + (f", max error {r.max_err:.2g}" if r.status == "wrong" else "")))
    return out
