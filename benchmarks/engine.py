"""The tiled engine against SDPA and compiled FlexAttention, idle and under background load.

    python benchmarks/engine.py                # window 512 and causal at L=4096, 8192, load 2
    python benchmarks/engine.py --quick        # tiny lengths, a smoke test; writes nothing

Uses ``attnkit.bench.run(..., load=N)``: every implementation is timed idle, then again
with N background loads (a Python spin loop and a 2-thread torch matmul loop, alternating);
the slowdown is loaded / idle time. Writes benchmarks/results/engine.json and engine.md.
The machine this ran on is shared with other users, so "idle" is as idle as it was.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from attnkit import bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine_info, machine_line, save


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--load", type=int, default=2)
    ap.add_argument("--lengths", default="4096,8192")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    lengths = [256, 512] if args.quick else [int(x) for x in args.lengths.split(",")]
    result = bench.run(["window", "causal"], lengths, backends=["tiled"], peers=["sdpa", "flex"], heads=8,
                       head_dim=64, window=512, repeats=1 if args.quick else args.repeats, memory=False,
                       load=args.load)
    table = bench.markdown(result)
    lines = [table, "", "Ratios (this run): speed of tiled vs each peer, and tiled's slowdown / SDPA's slowdown.", "",
             "| case | L | vs SDPA idle | vs Flex idle | tiled slowdown | SDPA slowdown | ratio |",
             "|---|---|---|---|---|---|---|"]
    for case in ("window", "causal"):
        for length in lengths:
            t, s = (result.row(case, length, i) for i in ("attnkit:tiled", "sdpa"))
            ups = result.speedups(case, length, "attnkit:tiled")
            ratio = t.slowdown / s.slowdown if t and s and t.slowdown and s.slowdown else None
            cells = [f"{ups['sdpa']:.2f}x" if "sdpa" in ups else "", f"{ups['flex']:.2f}x" if "flex" in ups else "",
                     f"{t.slowdown:.2f}" if t and t.slowdown else "", f"{s.slowdown:.2f}" if s and s.slowdown else "",
                     f"{ratio:.2f}" if ratio else ""]
            lines.append(f"| {case} | {length} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        info = machine_info("shared: other users' jobs ran meanwhile, so 'idle' is as idle as it was")
        save("engine", {"machine": info, **result.to_dict()}, machine_line(info) + "\n\n" + text)


if __name__ == "__main__":
    main()
