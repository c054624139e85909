"""Core attention against PyTorch SDPA: the figures in the README's benchmark table.

    python benchmarks/core.py                 # full run, prints a markdown table (~3 min)
    python benchmarks/core.py --json out.json # also write the raw figures
    python benchmarks/core.py --quick         # tiny lengths, a smoke test of this script

Every ratio is taken in one process against SDPA on the same inputs. Peak memory is
measured in a fresh process per case (growth of the peak resident set after the inputs
exist), since CPU PyTorch has no allocator statistics.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
import torch.nn.functional as F

import attnkit
from attnkit import biases, masks
from attnkit._timing import interleaved_median_seconds, machine, matmul_gflops, peak_rss_mib

B, H, D = 1, 8, 64


def inputs(length: int, grad: bool = False):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, length, D, generator=g).requires_grad_(grad) for _ in range(3))


def case_fns(name: str, length: int, grad: bool):
    """(attnkit_fn(backend), make_sdpa_fn()) for one case; each runs forward (and
    backward if grad). SDPA's dense mask or bias is built by make_sdpa_fn, so that a
    memory measurement of attnkit never includes it and one of SDPA does."""
    q, k, v = inputs(length, grad)
    if name in ("dense", "causal"):
        ours = {"mask": masks.causal() if name == "causal" else None}

        def theirs():
            return {"is_causal": name == "causal"}
    elif name == "window":
        ours = {"mask": masks.sliding_window(511)}

        def theirs():
            return {"attn_mask": ours["mask"].to_dense(length, length)}
    elif name == "causal+alibi":
        ours = {"mask": masks.causal(), "bias": biases.alibi(H)}

        def theirs():
            dense = biases.alibi(H).to_dense(length, length)
            dense.masked_fill_(~masks.causal().to_dense(length, length), float("-inf"))
            return {"attn_mask": dense}
    else:
        raise ValueError(f"unknown case {name!r}")

    def run(out):
        if grad:
            out.sum().backward()
        return out

    def make_sdpa():
        kwargs = theirs()
        return lambda: run(F.scaled_dot_product_attention(q, k, v, **kwargs))

    return lambda backend: run(attnkit.attention(q, k, v, backend=backend, **ours)), make_sdpa


def peak_extra_mib(name: str, length: int, who: str, grad: bool) -> float:
    """Peak memory growth of one call, in a fresh process."""
    cmd = [sys.executable, __file__, "--measure", name, str(length), who, str(int(grad))]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def _measure(name: str, length: int, who: str, grad: bool) -> None:
    ours, make_sdpa = case_fns(name, length, grad)
    base = peak_rss_mib()
    if who == "sdpa":
        make_sdpa()()  # the dense mask it needs counts towards its peak
    else:
        ours(who)
    print(peak_rss_mib() - base)


def flops(name: str, length: int) -> float:
    """Multiply-adds x 2 of QK^T and PV on the pairs the mask allows."""
    pairs = length * length
    if name in ("causal", "causal+alibi"):
        pairs = length * (length + 1) / 2
    elif name == "window":
        pairs = sum(min(i + 1, 512) for i in range(length))
    return 4 * B * H * pairs * D


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        name, length, who, grad = args.measure
        _measure(name, int(length), who, grad == "1")
        return

    scale = 64 if args.quick else 1
    repeats = 1 if args.quick else 5
    # (case, length, backward, attnkit backends, targets: {backend: min speed vs SDPA})
    plan = [
        ("dense", 4096, False, ("auto", "tiled"), {"auto": 0.95, "tiled": 0.75}),
        ("causal", 4096, False, ("auto", "tiled"), {"auto": 0.95, "tiled": 0.75}),
        ("window", 16384, False, ("tiled",), {"tiled": 8.0}),
        ("causal+alibi", 8192, False, ("tiled",), {"tiled": 1.5}),
        ("window", 8192, True, ("tiled",), {"tiled": 4.0}),
    ]
    peak = matmul_gflops()
    rows, raw = [], {"machine": machine(), "matmul_gflops": peak, "cases": []}
    print(f"machine: {raw['machine']}; fp32 2048x2048 matmul: {peak:.0f} GFLOP/s", file=sys.stderr)
    for name, length, grad, backends, targets in plan:
        length //= scale
        ours, make_sdpa = case_fns(name, length, grad)
        fns = {"sdpa": make_sdpa(), **{b: (lambda b=b, ours=ours: ours(b)) for b in backends}}
        times = interleaved_median_seconds(fns, repeats)
        t_sdpa = times["sdpa"]
        mem = {}
        if name == "window":
            mem = {"sdpa": peak_extra_mib(name, length, "sdpa", grad),
                   "tiled": peak_extra_mib(name, length, "tiled", grad)}
        for backend in backends:
            t = times[backend]
            rate = flops(name, length) * (3.5 if grad else 1) / t / 1e9  # backward ~2.5x forward
            entry = {"case": name, "length": length, "backward": grad, "backend": backend,
                     "ms": 1e3 * t, "sdpa_ms": 1e3 * t_sdpa, "speed_vs_sdpa": t_sdpa / t,
                     "gflops": rate, "pct_of_matmul": 100 * rate / peak, "target": targets[backend],
                     "peak_mib": mem.get(backend), "sdpa_peak_mib": mem.get("sdpa")}
            raw["cases"].append(entry)
            met = "yes" if entry["speed_vs_sdpa"] >= entry["target"] else "**no**"
            mem_cell = f"{entry['peak_mib']:.0f} / {entry['sdpa_peak_mib']:.0f}" if mem else ""
            rows.append(f"| {name}{' fwd+bwd' if grad else ''} | {length} | {backend} | {entry['ms']:.0f} | "
                        f"{entry['sdpa_ms']:.0f} | {entry['speed_vs_sdpa']:.2f}x | >= {entry['target']}x {met} | "
                        f"{rate:.0f} ({entry['pct_of_matmul']:.0f}%) | {mem_cell} |")
            print(rows[-1], file=sys.stderr)
    print(f"Machine: {raw['machine']}. fp32 matmul (2048x2048): {peak:.0f} GFLOP/s. B=1, H=8, D=64, fp32.\n")
    print("| case | L | attnkit | ms | SDPA ms | speed vs SDPA | target | GFLOP/s (% of matmul) |"
          " peak MiB: attnkit / SDPA incl. its mask |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=2)


if __name__ == "__main__":
    main()
