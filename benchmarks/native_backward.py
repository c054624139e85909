"""Forward + backward through the native kernel's FlashAttention-2 backward, against SDPA with the dense mask.

    python benchmarks/native_backward.py            # writes benchmarks/results/native_backward.json and .md
    python benchmarks/native_backward.py --load 2   # also timed under 2 background loads
    python benchmarks/native_backward.py --quick    # L=512, one repeat: a smoke run; writes nothing

The issue-25 target: a sliding window of 512 (causal), L=8192, B=1, H=8, D=64, float32, forward and backward
(gradients of q, k and v) at least 10x SDPA with its dense mask, with a lower peak memory. Each row is one
``attnkit.bench.run`` of the tiled backend with SDPA timed in the same run, interleaved, and every
implementation's peak memory measured (one more call each). ``native`` is the default with the native kernel
built (its forward and, now, its backward); ``pure`` is ``ATTNKIT_NATIVE=0``, the batched pure-PyTorch engine
and its backward, for comparison. Causal documents (8 per sequence) are timed the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from attnkit import bench
from attnkit.functional.tiled import native

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine_info, machine_line, save


def _run(kernel: str, lengths: list[int], args: argparse.Namespace) -> bench.BenchResult:
    if kernel == "pure":
        os.environ["ATTNKIT_NATIVE"] = "0"
    try:
        return bench.run(["window", "document"], lengths, backends=["tiled"], peers=["sdpa"], heads=8, kv_heads=8,
                         head_dim=64, window=512, repeats=args.repeats, memory=True, load=args.load, backward=True)
    finally:
        os.environ.pop("ATTNKIT_NATIVE", None)


def _rows(kernel: str, result: bench.BenchResult) -> list[dict]:
    rows = []
    for r in result.rows:
        if r.impl == "sdpa" and kernel == "pure":
            continue  # timed again beside the native kernel: one SDPA row per case
        rows.append({"kernel": kernel if r.impl.startswith("attnkit:") else "sdpa", "case": r.case,
                     "length": r.length, "status": r.status, "ms": r.ms, "peak_mib": r.peak_mib,
                     "loaded_ms": r.loaded_ms, "note": r.note,
                     "vs_sdpa": result.speedups(r.case, r.length, r.impl).get("sdpa") if r.impl != "sdpa" else None})
    return rows


def render(data: dict) -> str:
    lines = [f"{machine_line(data['machine'])} Matmul yardstick: {data['matmul_gflops']:.0f} GFLOP/s (fp32). "
             f"Forward + backward, B=1, H=8, D=64, float32, window 512 (causal) and causal documents; median of "
             f"{data['repeats']} interleaved runs" + (f", and under {data['load']} background loads" if data["load"]
                                                       else "") + ".", "",
             "| case | L | implementation | fwd+bwd (ms) | SDPA / this | peak memory (MiB) |"
             + (" under load (ms) |" if data["load"] else ""),
             "|---|---|---|---|---|---|" + ("---|" if data["load"] else "")]
    for r in data["rows"]:
        name = {"native": "attnkit native (fwd + FA-2 bwd)", "pure": "attnkit pure PyTorch",
                "sdpa": "SDPA, dense mask"}[r["kernel"]]
        ms = f"{r['ms']:.0f}" if r["ms"] else r["status"]
        ratio = f"{r['vs_sdpa']:.1f}x" if r["vs_sdpa"] else ""
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else ""
        loaded = (f" {r['loaded_ms']:.0f} |" if r["loaded_ms"] else " |") if data["load"] else ""
        lines.append(f"| {r['case']} | {r['length']} | {name} | {ms} | {ratio} | {peak} |{loaded}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="L=512, one repeat; writes nothing")
    ap.add_argument("--load", type=int, default=0)
    ap.add_argument("--lengths", default="8192")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if native.load() is None:
        sys.exit(f"native kernel unavailable: {native.native_status()}")
    lengths = [512] if args.quick else [int(x) for x in args.lengths.split(",")]
    if args.quick:
        args.repeats = 1
    results = {kernel: _run(kernel, lengths, args) for kernel in ("native", "pure")}
    data = {"machine": machine_info(), "matmul_gflops": results["native"].matmul_gflops, "repeats": args.repeats,
            "load": args.load, "rows": [row for kernel, result in results.items() for row in _rows(kernel, result)]}
    print(render(data))
    if not args.quick:
        save("native_backward", data, render(data))


if __name__ == "__main__":
    main()
