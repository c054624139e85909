"""Linear attention against exact attention: time and memory against length, the crossover,
and FAVOR+'s error against exact softmax attention. The figures in the README.

    python benchmarks/linear.py                          # lengths 128..16384 (~4 min on an idle 2-core machine)
    python benchmarks/linear.py --max-length 4096        # lengths 128..4096
    python benchmarks/linear.py --quick                  # short lengths, a smoke test of this script

It prints the markdown tables and writes benchmarks/results/linear.json, linear.md (time
and memory) and linear-favor.md (FAVOR+'s error), or into the directory given by
``--out``; ``--quick`` writes nothing unless ``--out`` is given.

Causal, fp32, B=1, H=8, D=Dv=64. Implementations: linear attention with the elu map
(chunk 64) and with FAVOR+ (256 features), attnkit's exact tiled attention, and PyTorch
SDPA with is_causal. Peak memory is the growth of a fresh process's peak RSS during one
call, the inputs already made.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import attnkit
from attnkit import masks
from attnkit._timing import interleaved_median_seconds, peak_rss_mib

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, machine_info, machine_line, save

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


def render(data: dict) -> str:
    """The time and memory table of a linear.json result, with the crossovers."""
    lines = [machine_line(data["machine"]),
             f"Causal, fp32, B={B}, H={H}, D=Dv={D}; median of {data['repeats']} interleaved repeats per length; "
             "peak memory is the growth of a fresh process's peak RSS during one call.", "",
             "| L | " + " | ".join(f"{n} ms" for n in IMPLS) + " | peak MiB: " + " / ".join(IMPLS) + " |",
             "|---" * (len(IMPLS) + 2) + "|"]
    for r in data["rows"]:
        lines.append(f"| {r['length']} | " + " | ".join(f"{r['ms'][n]:.1f}" for n in IMPLS) + " | "
                     + " / ".join(f"{r['peak_mib'][n]:.0f}" for n in IMPLS) + " |")
    lines.append("")
    for fast, slow in (("linear elu", "sdpa (exact)"), ("linear elu", "tiled (exact)"),
                       ("linear favor-256", "sdpa (exact)")):
        at = crossover(data["rows"], fast, slow)
        lines.append(f"- {fast} is faster than {slow} at every measured length from L = {at}." if at else
                     f"- {fast} is not faster than {slow} at the longest length measured.")
    return "\n".join(lines)


def render_favor(data: dict) -> str:
    """The FAVOR+ error table of a linear.json result."""
    errors = data["favor_errors"]
    scales = list(errors)
    lines = [f"FAVOR+ relative error against exact causal softmax attention, L=1024, mean of "
             f"{data['favor_seeds']} seeds; q, k ~ N(0, s^2), so the scores q.k/sqrt(D) have standard "
             "deviation s^2.", "",
             "| features | " + " | ".join(f"s = {s}" for s in scales) + " |",
             "|---" * (len(scales) + 1) + "|"]
    for m in errors[scales[0]]:
        lines.append(f"| {m} | " + " | ".join(f"{errors[s][m]:.3f}" for s in scales) + " |")
    return "\n".join(lines)


def crossover(rows: list[dict], fast: str, slow: str) -> int | None:
    """The shortest length from which ``fast`` beats ``slow`` at every longer length measured."""
    at = None
    for r in reversed(rows):
        if r["ms"][fast] >= r["ms"][slow]:
            break
        at = r["length"]
    return at


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--max-length", type=int, default=16384)
    parser.add_argument("--out", type=Path, help=f"results directory (default {RESULTS}; none with --quick)")
    parser.add_argument("--measure", nargs=2, metavar=("IMPL", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(measure(args.measure[0], int(args.measure[1])))
        return {}
    lengths = [256, 512] if args.quick else [n for n in (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
                                             if n <= args.max_length]
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
    seeds = 4
    errors = favor_errors([16, 64] if args.quick else [16, 64, 256, 1024, 4096], (0.25, 0.5, 1.0), seeds)
    result = {"machine": machine_info(), "repeats": repeats, "rows": rows, "favor_seeds": seeds,
              "favor_errors": {str(s): {str(m): e for m, e in per.items()} for s, per in errors.items()}}
    table, favor = render(result), render_favor(result)
    print(table + "\n\n" + favor)
    if args.out or not args.quick:
        save("linear", result, table, args.out or RESULTS)
        (args.out or RESULTS).joinpath("linear-favor.md").write_text(favor + "\n")
    return result


if __name__ == "__main__":
    main()
