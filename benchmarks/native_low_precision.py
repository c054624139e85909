"""Whether the native kernel's bfloat16 block GEMMs beat computing bfloat16 in float32 on this CPU.

    python benchmarks/native_low_precision.py           # writes benchmarks/results/native_low_precision.json and .md
    python benchmarks/native_low_precision.py --quick   # a smoke run: L=2048, 3 repeats, idle only

The same native forward (``tiled.kernel("native")``) on bfloat16 inputs two ways: its block GEMMs in
bfloat16 with fp32 accumulation (oneDNN's micro-kernels, where :func:`native.low_precision_path` takes them),
and the inputs cast to float32, computed, and the output cast back (the path on CPUs without bf16 units).
A sliding window of 512 (causal), B=1, H=8, D=64; medians of interleaved runs, idle and under
``attnkit.bench.load``. The matmul rates (2048 x 2048, float32 and bfloat16) say what the CPU's units give.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

import attnkit
from attnkit import masks
from attnkit._timing import interleaved_median_seconds, median_seconds
from attnkit.bench.load import background_load
from attnkit.functional import tiled
from attnkit.functional.tiled import native

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine_info, machine_line, save


def matmul_rate(dtype: torch.dtype) -> float:
    """GFLOP/s of a 2048 x 2048 matmul in ``dtype``."""
    a, b = (torch.randn(2048, 2048, generator=torch.Generator().manual_seed(s)).to(dtype) for s in (0, 1))
    return 2 * 2048**3 / median_seconds(lambda: a @ b, 5) / 1e9


def _calls(length: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, length, 64, generator=g).bfloat16() for _ in range(3))
    mask = masks.sliding_window(511)

    def run(cast: bool) -> torch.Tensor:
        with tiled.kernel("native"):
            if cast:
                return attnkit.attention(q.float(), k.float(), v.float(), mask=mask, backend="tiled").bfloat16()
            return attnkit.attention(q, k, v, mask=mask, backend="tiled")

    return {"bf16 GEMMs": lambda: run(False), "fp32 compute": lambda: run(True)}


def measure(lengths: list[int], loads: list[int], repeats: int) -> list[dict]:
    rows = []
    for load in loads:
        with background_load(load, 600) if load else contextlib.nullcontext():
            for length in lengths:
                times = interleaved_median_seconds(_calls(length), repeats, warmup=1)
                rows.append({"length": length, "load": load, "bf16_gemm_ms": 1e3 * times["bf16 GEMMs"],
                             "fp32_compute_ms": 1e3 * times["fp32 compute"],
                             "speedup": times["fp32 compute"] / times["bf16 GEMMs"]})
    return rows


def render(data: dict) -> str:
    lines = [f"{machine_line(data['machine'])} Matmul 2048^2: {data['matmul_fp32_gflops']:.0f} GFLOP/s float32, "
             f"{data['matmul_bf16_gflops']:.0f} GFLOP/s bfloat16. bfloat16 path: {data['path']} ({data['reason']}).",
             "", "Native forward, bfloat16 inputs, window 512, B=1, H=8, D=64, median of "
             f"{data['repeats']} interleaved runs; load = background processes.", "",
             "| L | load | bf16 block GEMMs (ms) | fp32 compute (ms) | fp32 / bf16 |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['length']} | {r['load']} | {r['bf16_gemm_ms']:.1f} | {r['fp32_compute_ms']:.1f} | "
                     f"{r['speedup']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,8192")
    parser.add_argument("--loads", default="0,2", help="background loads to measure under, comma-separated")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="L=2048, 3 repeats, idle only (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.loads, args.repeats = "2048", "0", 3
    if native.load() is None:
        raise SystemExit(f"the native kernel is unavailable: {native.native_status()}")
    path, reason = native.low_precision_path(torch.bfloat16)
    if path != "bfloat16":
        raise SystemExit(f"this CPU computes bfloat16 in float32 ({reason}): nothing to compare")
    data = {"machine": machine_info(), "path": path, "reason": reason, "repeats": args.repeats,
            "matmul_fp32_gflops": matmul_rate(torch.float32), "matmul_bf16_gflops": matmul_rate(torch.bfloat16),
            "rows": measure([int(n) for n in args.lengths.split(",")], [int(n) for n in args.loads.split(",")],
                            args.repeats)}
    save("native_low_precision", data, render(data))
    print(render(data))


if __name__ == "__main__":
    main()
