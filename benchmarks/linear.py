"""Linear attention against exact attention: time and memory against length, the crossover,
and FAVOR+'s error against exact softmax attention. The figures in the README.

    python benchmarks/linear.py               # lengths 512..16384 (~4 min)
    python benchmarks/linear.py --json l.json # also write the raw figures
    python benchmarks/linear.py --quick       # short lengths, a smoke test of this script

Causal, fp32, B=1, H=8, D=Dv=64. Implementations: linear attention with the elu map
(chunk 64) and with FAVOR+ (256 features), attnkit's exact tiled attention, and PyTorch
SDPA with is_causal. Peak memory is the growth of a fresh process's peak RSS during one
call, the inputs already made.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import attnkit
from attnkit import masks
from attnkit._timing import interleaved_median_seconds, machine, peak_rss_mib

B, H, D = 1, 8, 64
IMPLS = ("linear elu", "linear favor-256", "tiled (exact)", "sdpa (exact)")


def runner(name: str, length: int):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, length, D, generator=g) for _ in range(3))
    if name == "linear elu":
        return lambda: attnkit.linear_attention(q, k, v, causal=True)
    if name == "linear favor-256":
        return lambda: attnkit.linear_attention(q, k, v, causal=True, feature_map="favor", num_features=256)
    if name == "tiled (exact)":
        return lambda: attnkit.attention(q, k, v, mask=masks.causal(), backend="tiled")
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)


def measure(name: str, length: int) -> float:
    fn = runner(name, length)
    before = peak_rss_mib()
    with torch.no_grad():
        fn()
    return peak_rss_mib() - before


def favor_errors(features: list[int], scales: tuple[float, ...], seeds: int = 4) -> dict[float, dict[int, float]]:
    """Relative error of FAVOR+ against exact causal softmax attention, L=1024, with q and k
    drawn N(0, s^2): the scores q.k/sqrt(D) then have standard deviation s^2."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, H, 1024, D, generator=g) for _ in range(3))
    out: dict[float, dict[int, float]] = {}
    for s in scales:
        exact = attnkit.attention(q * s, k * s, v, mask=masks.causal())
        out[s] = {}
        for m in features:
            errs = [((attnkit.linear_attention(q * s, k * s, v, causal=True, feature_map="favor", num_features=m,
                                               seed=seed) - exact).norm() / exact.norm()).item()
                    for seed in range(seeds)]
            out[s][m] = sum(errs) / len(errs)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--measure", nargs=2, metavar=("IMPL", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(measure(args.measure[0], int(args.measure[1])))
        return {}
    lengths = [256, 512] if args.quick else [128, 256, 512, 1024, 2048, 4096, 8192, 16384]
    repeats = 1 if args.quick else 3
    rows = []
    for length in lengths:
        print(f"L={length} ...", file=sys.stderr, flush=True)
        with torch.no_grad():
            times = interleaved_median_seconds({n: runner(n, length) for n in IMPLS}, repeats=repeats)
        mem = {}
        for n in IMPLS:
            done = subprocess.run([sys.executable, __file__, "--measure", n, str(length)],
                                  capture_output=True, text=True, check=True)
            mem[n] = float(done.stdout.strip().splitlines()[-1])
        rows.append({"length": length, "ms": {n: 1e3 * t for n, t in times.items()}, "peak_mib": mem})

    def crossover(fast: str, slow: str) -> int | None:
        return next((r["length"] for r in rows if r["ms"][fast] < r["ms"][slow]), None)

    scales = (0.25, 0.5, 1.0)
    errors = favor_errors([16, 64] if args.quick else [16, 64, 256, 1024, 4096], scales)
    result = {"machine": machine(), "rows": rows, "favor_errors": errors,
              "crossover_vs_sdpa": crossover("linear elu", "sdpa (exact)"),
              "crossover_vs_tiled": crossover("linear elu", "tiled (exact)")}
    print(f"Machine: {result['machine']}. Causal, fp32, B={B}, H={H}, D={D}.\n")
    print("| L | " + " | ".join(f"{n} ms" for n in IMPLS) + " | peak MiB: " + " / ".join(IMPLS) + " |")
    print("|---" * (len(IMPLS) + 2) + "|")
    for r in rows:
        print(f"| {r['length']} | " + " | ".join(f"{r['ms'][n]:.1f}" for n in IMPLS) + " | "
              + " / ".join(f"{r['peak_mib'][n]:.0f}" for n in IMPLS) + " |")
    for key, label in (("crossover_vs_sdpa", "SDPA"), ("crossover_vs_tiled", "tiled")):
        at = result[key]
        print(f"\nlinear elu is faster than {label} from L = {at}" if at else
              f"\nlinear elu is not faster than {label} at any length measured")
    print("\nFAVOR+ relative error against exact causal softmax attention, L=1024, mean of 4 seeds;")
    print("q, k ~ N(0, s^2), so the scores q.k/sqrt(D) have standard deviation s^2.\n")
    print("| features | " + " | ".join(f"s = {s}" for s in scales) + " |")
    print("|---" * (len(scales) + 1) + "|")
    for m in errors[scales[0]]:
        print(f"| {m} | " + " | ".join(f"{errors[s][m]:.3f}" for s in scales) + " |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
