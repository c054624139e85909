"""Core attention against PyTorch SDPA: the figures in the README's benchmark table.

    python benchmarks/core.py                 # full run (~3 min on an idle 2-core machine)
    python benchmarks/core.py --scale 2       # every length halved (the committed run)
    python benchmarks/core.py --quick         # tiny lengths, a smoke test of this script

It prints the markdown table and writes benchmarks/results/core.json and core.md (or
the directory given by ``--out``; ``--quick`` writes nothing unless ``--out`` is given).
Every ratio is taken in one process against SDPA on the same inputs. Peak memory is
measured in a fresh process per case (growth of the peak resident set after the inputs
exist), since CPU PyTorch has no allocator statistics.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import attnkit
from attnkit import biases, masks
from attnkit._timing import interleaved_median_seconds, matmul_gflops, peak_rss_mib

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, machine_info, machine_line, save

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


def render(data: dict) -> str:
    """The markdown table of a core.json result."""
    lines = [machine_line(data["machine"]),
             f"fp32 matmul (2048x2048): {data['matmul_gflops']:.0f} GFLOP/s. B={B}, H={H}, D={D}, fp32; "
             f"median of {data['repeats']} interleaved runs.", "",
             "| case | L | attnkit | ms | SDPA ms | speed vs SDPA | attnkit's goal | GFLOP/s (% of matmul) |"
             " peak MiB: attnkit / SDPA incl. its mask |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in data["cases"]:
        met = "yes" if e["speed_vs_sdpa"] >= e["target"] else "**no**"
        mem_cell = f"{e['peak_mib']:.0f} / {e['sdpa_peak_mib']:.0f}" if e["peak_mib"] is not None else ""
        lines.append(f"| {e['case']}{' fwd+bwd' if e['backward'] else ''} | {e['length']} | {e['backend']} | "
                     f"{e['ms']:.0f} | {e['sdpa_ms']:.0f} | {e['speed_vs_sdpa']:.2f}x | >= {e['target']}x {met} | "
                     f"{e['gflops']:.0f} ({e['pct_of_matmul']:.0f}%) | {mem_cell} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--scale", type=int, default=1, help="divide every length by this")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help=f"results directory (default {RESULTS}; none with --quick)")
    parser.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        name, length, who, grad = args.measure
        _measure(name, int(length), who, grad == "1")
        return

    scale = 64 if args.quick else args.scale
    repeats = 1 if args.quick else args.repeats
    # (case, length, backward, attnkit backends, goals: {backend: min speed vs SDPA})
    plan = [
        ("dense", 4096, False, ("auto", "tiled"), {"auto": 0.95, "tiled": 0.75}),
        ("causal", 4096, False, ("auto", "tiled"), {"auto": 0.95, "tiled": 0.75}),
        ("window", 16384, False, ("tiled",), {"tiled": 8.0}),
        ("causal+alibi", 8192, False, ("tiled",), {"tiled": 1.5}),
        ("window", 8192, True, ("tiled",), {"tiled": 4.0}),
    ]
    peak = matmul_gflops()
    data = {"machine": machine_info(), "matmul_gflops": peak, "repeats": repeats, "scale": scale, "cases": []}
    print(f"{machine_line(data['machine'])} fp32 2048x2048 matmul: {peak:.0f} GFLOP/s", file=sys.stderr)
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
            data["cases"].append({"case": name, "length": length, "backward": grad, "backend": backend,
                                  "ms": 1e3 * t, "sdpa_ms": 1e3 * t_sdpa, "speed_vs_sdpa": t_sdpa / t,
                                  "gflops": rate, "pct_of_matmul": 100 * rate / peak, "target": targets[backend],
                                  "peak_mib": mem.get(backend), "sdpa_peak_mib": mem.get("sdpa")})
            print(data["cases"][-1], file=sys.stderr)
    table = render(data)
    print(table)
    if args.out or not args.quick:
        save("core", data, table, args.out or RESULTS)


if __name__ == "__main__":
    main()
