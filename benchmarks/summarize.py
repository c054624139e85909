"""Condense an `attnkit bench --json` file into the README's one-row-per-case table.

    python benchmarks/summarize.py benchmarks/results/forward.json
    python benchmarks/summarize.py benchmarks/results/forward.json --length 2048

For each case at one length (default: the largest): the time of attnkit's ``auto``
backend and of each peer, the speed ratios, peak memory of attnkit's best and of each peer,
and the fitted exponent of time against L. A peer that was wrong, failed or skipped shows
its status instead of a time. The full rows are in the matching .md file.
"""

from __future__ import annotations

import argparse
import json

PEERS = ("sdpa", "flex", "naive")
NAMES = {"sdpa": "SDPA", "flex": "Flex", "naive": "eager"}


def render(data: dict, length: int | None = None) -> str:
    """The one-row-per-case table of an ``attnkit bench --json`` result at ``length``
    (default: the largest measured)."""
    rows = data["rows"]
    length = length or max(r["length"] for r in rows)
    peers = [p for p in PEERS if p in data["settings"]["peers"]]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    lines = [f"Machine: {data['machine']}; fp32 matmul {data['matmul_gflops']:.0f} GFLOP/s. L = {length}, "
             f"{data['settings']['dtype']}, {'forward+backward' if data['settings']['backward'] else 'forward'}, "
             f"median of {data['settings']['repeats']} interleaved runs. "
             "attnkit = backend='auto', what a call gets by default.", "",
             "| case | attnkit ms | " + " | ".join(f"{NAMES[p]} ms" for p in peers) + " | "
             + " | ".join(f"vs {NAMES[p]}" for p in peers)
             + " | peak MiB attnkit / " + " / ".join(NAMES[p] for p in peers) + " | exponent attnkit / SDPA |",
             "|---|---|" + "---|" * (2 * len(peers)) + "---|---|"]
    for case in cases:
        here = {r["impl"]: r for r in rows if r["case"] == case and r["length"] == length}
        best = here.get("attnkit:auto")
        if best is None or best["status"] != "ok":
            continue
        cells = [f"{best['ms']:.1f}"]
        ratios, memory = [], [f"{best['peak_mib']:.0f}" if best["peak_mib"] is not None else "-"]
        for p in peers:
            r = here.get(p)
            if r is None or r["status"] != "ok":
                cells.append(r["status"] if r else "-")
                ratios.append("-")
                memory.append("-")
                continue
            cells.append(f"{r['ms']:.1f}")
            x = r["ms"] / best["ms"]
            ratios.append(f"{x:.2f}x" if x >= 1 else f"**{x:.2f}x**")
            memory.append(f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-")
        exps = data["exponents"].get(case, {})
        exp_cell = " / ".join("-" if e is None else f"{e:.2f}" for e in (exps.get(best["impl"]), exps.get("sdpa")))
        lines.append(f"| {case} | " + " | ".join(cells) + " | " + " | ".join(ratios) + f" | {' / '.join(memory)} | "
                     f"{exp_cell} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("json_file")
    parser.add_argument("--length", type=int)
    args = parser.parse_args()
    with open(args.json_file) as f:
        print(render(json.load(f), args.length))


if __name__ == "__main__":
    main()
