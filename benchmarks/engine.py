"""The tiled engine against SDPA and compiled FlexAttention: the batched pure-PyTorch kernels and the native one.

    python benchmarks/engine.py                  # forward: window, document, causal, ALiBi, dense; fwd+bwd
    python benchmarks/engine.py --load 2         # also timed under 2 background loads
    python benchmarks/engine.py --quick          # tiny lengths, a smoke test; writes nothing

Each row is one ``attnkit.bench.run`` of the tiled backend (peers timed in the same run,
interleaved). ``pure`` is ``ATTNKIT_NATIVE=0``: the batched pure-PyTorch engine only.
``auto`` is the default with the native kernel built: it takes the native forward for
sliding windows and causal documents, and PyTorch's fused kernel for the rest, so the
causal, ALiBi and dense rows run once, as ``auto``. With ``--load N`` every implementation
is also timed under N background loads (a Python spin loop and a 2-thread torch matmul
loop, alternating); slowdown = loaded / idle. Writes benchmarks/results/engine.json and
engine.md with the load averages before and after. The machine this ran on is shared with
other users, so "idle" is as idle as it was.
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


def _run(kernel: str, cases, lengths, args, backward: bool = False):
    if kernel == "pure":
        os.environ["ATTNKIT_NATIVE"] = "0"
    try:
        return bench.run(cases, lengths, backends=["tiled"], peers=["sdpa"] if backward else ["sdpa", "flex"],
                         heads=8, head_dim=64, window=512, repeats=args.repeats, memory=False, load=args.load,
                         backward=backward)
    finally:
        os.environ.pop("ATTNKIT_NATIVE", None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--load", type=int, default=0)
    ap.add_argument("--window-lengths", default="8192,16384")
    ap.add_argument("--lengths", default="4096,8192", help="for causal, ALiBi and dense")
    ap.add_argument("--backward-lengths", default="2048,8192", help="fwd+bwd: causal; window at the last")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if native.load() is None:
        sys.exit(f"native kernel unavailable: {native.native_status()}")
    window = [256] if args.quick else [int(x) for x in args.window_lengths.split(",")]
    lengths = [256] if args.quick else [int(x) for x in args.lengths.split(",")]
    back = [256] if args.quick else [int(x) for x in args.backward_lengths.split(",")]
    if args.quick:
        args.repeats = 1
    plan = [("pure", ["window"], window, False), ("auto", ["window"], window, False),
            ("pure", ["document"], [max(lengths)], False), ("auto", ["document"], [max(lengths)], False),
            ("auto", ["causal", "alibi", "dense"], lengths, False),
            ("auto", ["causal"], back, True), ("pure", ["window"], back[-1:], True),
            ("auto", ["window"], back[-1:], True)]
    load_before = os.getloadavg()
    runs = [{"kernel": kernel, "backward": backward, "result": _run(kernel, cases, ls, args, backward).to_dict()}
            for kernel, cases, ls, backward in plan]
    load_after = os.getloadavg()
    data = {"loadavg_before": load_before, "loadavg_after": load_after,
            "native": {"block_q": native.BLOCK_Q, "block_k": native.BLOCK_K}, "runs": runs}
    text = render(data)
    print(text)
    if not args.quick:
        info = machine_info("shared: other users' jobs ran meanwhile, so 'idle' is as idle as it was")
        save("engine", {"machine": info, **data}, machine_line(info) + "\n\n" + text)


def render(data: dict) -> str:
    """The markdown table of results/engine.md, from the run's data (as saved in engine.json)."""
    before, after = data["loadavg_before"], data["loadavg_after"]
    first = data["runs"][0]["result"]
    settings = first["settings"]
    lines = [f"Load average (1, 5, 15 min) before: {before[0]:.2f}, {before[1]:.2f}, {before[2]:.2f}; "
             f"after: {after[0]:.2f}, {after[1]:.2f}, {after[2]:.2f}. fp32 matmul (2048x2048): "
             f"{first['matmul_gflops']:.0f} GFLOP/s.", "",
             f"B={settings['batch']}, H={settings['heads']}, Hkv={settings['kv_heads']}, D={settings['head_dim']}, "
             f"window {settings['window']}, {settings['dtype']}, median of {settings['repeats']} interleaved "
             "runs. Speed of the tiled backend vs each peer, taken within one run; % of matmul counts only the "
             "(query, key) pairs the mask allows. SDPA runs its native causal option where the case has one, "
             "else a dense mask (ALiBi: a dense float bias); compiled Flex has no CPU backward.", "",
             "| case | L | pass | kernel | tiled ms | % of matmul | SDPA ms | Flex ms | vs SDPA | vs Flex "
             "| tiled slowdown | SDPA slowdown | Flex slowdown |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in data["runs"]:
        res = run["result"]
        for case in res["settings"]["cases"]:
            for length in res["settings"]["lengths"]:
                rows = {r["impl"]: r for r in res["rows"] if r["case"] == case and r["length"] == length}
                ups = next((u for u in res["speedups"] if u["case"] == case and u["length"] == length), {})
                t, s, f = (rows.get(i) for i in ("attnkit:tiled", "sdpa", "flex"))

                def ms(r: dict | None) -> str:
                    return f"{r['ms']:.0f}" if r and r["ms"] else ""

                def slow(r: dict | None) -> str:
                    return f"{r['slowdown']:.2f}" if r and r.get("slowdown") else ""

                pct = f"{t['pct_of_matmul']:.0f}%" if t and t["pct_of_matmul"] else ""
                cells = [ms(t), pct, ms(s), ms(f), f"{ups['sdpa']:.2f}x" if ups.get("sdpa") else "",
                         f"{ups['flex']:.2f}x" if ups.get("flex") else "", slow(t), slow(s), slow(f)]
                kind = "fwd+bwd" if run["backward"] else "fwd"
                lines.append(f"| {case} | {length} | {kind} | {run['kernel']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
