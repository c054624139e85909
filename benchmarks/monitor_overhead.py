"""The wall-time overhead of ``attnkit.monitor()`` on a MiniLM forward at 128 tokens (target: at most 5%).

    python benchmarks/monitor_overhead.py           # writes results/monitor_overhead.json and .md
    python benchmarks/monitor_overhead.py --quick   # 2 blocks of 2 runs, a smoke test of this script

Plain and monitored forwards run in alternating blocks (``--blocks`` of ``--runs`` forwards
each; odd blocks start with the monitored one), so that a change in the machine's load hits
both alike. Reported: the ratio of the medians, the ratio of the minimums (the least disturbed
runs: the cost of the monitor itself), the median of the per-block ratios, and the load
average (``os.getloadavg()``) before and after. The monitor is entered once per block, as an
application would hold it open; each monitored forward must record its 6 attention calls.
``--quick`` writes nothing unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, machine_info, machine_line, save

TARGET = 0.05


def render(data: dict) -> str:
    r = data["result"]

    def pct(x: float) -> str:
        return f"{100 * x:+.1f}%"

    met = "met" if r["min_ratio"] - 1 <= TARGET else "not met"
    load = data["loadavg"]
    return "\n".join([
        machine_line(data["machine"]),
        "",
        f"MiniLM forward at {data['length']} tokens, {data['blocks']} alternating blocks of {data['runs']} runs each; "
        f"load average {load['before'][0]:.2f} before, {load['after'][0]:.2f} after.",
        "",
        "| forward | median ms | min ms |",
        "|---|---:|---:|",
        f"| plain | {r['plain_median_s'] * 1e3:.2f} | {r['plain_min_s'] * 1e3:.2f} |",
        f"| monitored | {r['monitored_median_s'] * 1e3:.2f} | {r['monitored_min_s'] * 1e3:.2f} |",
        "",
        f"Overhead: {pct(r['median_ratio'] - 1)} by medians, {pct(r['min_ratio'] - 1)} by minimums, "
        f"{pct(r['block_ratio'] - 1)} median of per-block ratios; target at most +{100 * TARGET:.0f}% "
        f"({met} by minimums).",
    ])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=20, help="alternating blocks of each kind")
    parser.add_argument("--runs", type=int, default=10, help="forwards per block")
    parser.add_argument("--length", type=int, default=128, help="tokens per forward")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, help=f"results directory (default {RESULTS}; none with --quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.blocks, args.runs = 2, 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from attnkit import models
    from attnkit.profile import monitor

    model, _ = models.load("minilm")
    ids = torch.randint(1000, 20000, (1, args.length), generator=torch.Generator().manual_seed(0))

    def forward() -> float:
        start = time.perf_counter()
        model(input_ids=ids)
        return time.perf_counter() - start

    plain: list[float] = []
    watched: list[float] = []
    block_ratios: list[float] = []
    before = os.getloadavg()
    with torch.inference_mode():
        for _ in range(3):  # warm-up, both ways
            forward()
            with monitor():
                forward()
        for block in range(2 * args.blocks):
            kinds = ("plain", "monitored") if block % 2 == 0 else ("monitored", "plain")
            times: dict[str, list[float]] = {}
            for kind in kinds:
                if kind == "plain":
                    times[kind] = [forward() for _ in range(args.runs)]
                else:
                    with monitor() as m:
                        times[kind] = [forward() for _ in range(args.runs)]
                    if len(m.calls) != 6 * args.runs:
                        raise RuntimeError(f"the monitor recorded {len(m.calls)} calls for {args.runs} forwards; "
                                           f"expected {6 * args.runs}")
            plain += times["plain"]
            watched += times["monitored"]
            block_ratios.append(statistics.median(times["monitored"]) / statistics.median(times["plain"]))
    after = os.getloadavg()
    result = {
        "plain_median_s": statistics.median(plain), "monitored_median_s": statistics.median(watched),
        "plain_min_s": min(plain), "monitored_min_s": min(watched),
        "median_ratio": statistics.median(watched) / statistics.median(plain),
        "min_ratio": min(watched) / min(plain), "block_ratio": statistics.median(block_ratios),
    }
    data = {"machine": machine_info(), "length": args.length, "blocks": args.blocks, "runs": args.runs,
            "target": TARGET, "loadavg": {"before": list(before), "after": list(after)}, "result": result}
    table = render(data)
    print(table)
    if not args.quick or args.out:
        save("monitor_overhead", data, table, args.out or RESULTS)
    return data


if __name__ == "__main__":
    main()
