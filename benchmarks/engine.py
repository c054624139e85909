"""The tiled engine against SDPA and compiled FlexAttention, in fp32 and bf16: auto and each tiled kernel.

    attnkit backends --tune                      # first: let auto measure this machine (a minute or two)
    python benchmarks/engine.py                  # idle: window, document, causal, ALiBi, dense; fwd+bwd
    python benchmarks/engine.py --load 2         # also timed under 2 background loads
    python benchmarks/engine.py --quick          # tiny lengths, a smoke test; writes nothing

Each row is one ``attnkit.bench.run`` of the tiled backend. ``auto`` rows time the backend's own choice, with
the peers (SDPA, compiled Flex) timed in the same run, interleaved; the kernel column says which kernel auto
chose and whether it came from the tuning cache (``attnkit backends --tune``) or the static policy. For window
and document, the same cases also run with each tiled kernel pinned (native, banded, fused; separate
runs, no peers), and the auto rows say how auto compares with the fastest of them (the goal: within 5%). Every
row names its CPU model, and the header gives the fp32 and bf16 matmul yardsticks (2048 x 2048) measured at the
start of this run: bf16 runs at the fp32 rate or below on a CPU without bf16 units, and several times faster
with AMX. With ``--load N`` every implementation is also timed under N background loads (a Python spin loop and
a 2-thread torch matmul loop, alternating); slowdown = loaded / idle. Writes benchmarks/results/engine.json and
engine.md with the load averages before and after. The machine this ran on is shared with other users, so
"idle" is as idle as it was.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import attnkit
from attnkit import bench
from attnkit._timing import cpu_model, matmul_gflops
from attnkit.bench.cases import make_problem
from attnkit.functional import tiled
from attnkit.functional.tiled import native

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine_info, machine_line, save

# Pinned, beside auto, for window and document. The math kernel (plain PyTorch ops, the fallback for calls the
# fused kernel cannot take) is left out: it is several times slower on every case here (`attnkit backends --tune`
# times it), and it would double the run.
KERNELS = ("native", "banded", "fused")
SETTINGS = dict(heads=8, kv_heads=2, head_dim=64, window=512)


@dataclass(frozen=True)
class Step:
    """One bench run: ``kernel`` ("auto" or one pinned), cases, lengths, dtype, pass, peers."""

    kernel: str
    cases: list[str]
    lengths: list[int]
    dtype: str
    backward: bool
    peers: list[str]


def plan(window: list[int], lengths: list[int], back: list[int], dtypes: list[str]) -> list[Step]:
    """The runs, in order: per dtype, window and document under auto and each pinned kernel, then causal, ALiBi
    and dense under auto; then fp32 fwd+bwd (causal, and window under auto and the batched engine)."""
    steps = []
    for dtype in dtypes:
        for case, ls in (("window", window), ("document", [max(lengths)])):
            steps.append(Step("auto", [case], ls, dtype, False, ["sdpa", "flex"]))
            steps.extend(Step(k, [case], ls, dtype, False, []) for k in KERNELS)
        steps.append(Step("auto", ["causal", "alibi", "dense"], lengths, dtype, False, ["sdpa", "flex"]))
    return [*steps, Step("auto", ["causal"], back, "float32", True, ["sdpa"]),
            Step("auto", ["window"], back[-1:], "float32", True, ["sdpa"]),
            Step("banded", ["window"], back[-1:], "float32", True, ["sdpa"])]


def chosen(step: Step, case: str, length: int) -> str:
    """The kernel that runs ``case`` at ``length`` in this step, and for auto where the choice came from."""
    p = make_problem(case, length, dtype=getattr(torch, step.dtype), requires_grad=step.backward, **SETTINGS)
    with tiled.kernel(step.kernel):
        strategy = attnkit.explain_call(p.q, p.k, p.v, mask=p.mask, bias=p.bias, backend="tiled").tiled
    assert strategy is not None
    if step.kernel != "auto":
        return step.kernel if strategy.forward == step.kernel else f"{step.kernel}: ran {strategy.forward}"
    source = "measured" if any(r.startswith("kernel policy: measured") for r in strategy.reasons) else "static"
    return f"auto: {strategy.forward} ({source})"


def run_step(step: Step, args: argparse.Namespace) -> dict:
    with tiled.kernel(step.kernel):
        result = bench.run(step.cases, step.lengths, backends=["tiled"], peers=step.peers, repeats=args.repeats,
                           memory=False, load=args.load, backward=step.backward, dtype=getattr(torch, step.dtype),
                           **SETTINGS)
    return {"kernel": step.kernel, "backward": step.backward, "dtype": step.dtype,
            "chosen": {f"{c}@{n}": chosen(step, c, n) for c in step.cases for n in step.lengths},
            "result": result.to_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny lengths, one repeat, fp32 and bf16; writes nothing")
    ap.add_argument("--load", type=int, default=0)
    ap.add_argument("--window-lengths", default="8192,16384")
    ap.add_argument("--lengths", default="4096,8192", help="for causal, ALiBi and dense (document: the longest)")
    ap.add_argument("--backward-lengths", default="2048,8192", help="fwd+bwd: causal; window at the last")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (median)")
    args = ap.parse_args()
    if native.load() is None:
        sys.exit(f"native kernel unavailable: {native.native_status()}")
    window, lengths, back = ([int(x) for x in s.split(",")] for s in
                             (args.window_lengths, args.lengths, args.backward_lengths))
    if args.quick:
        window, lengths, back, args.repeats = [1024], [512], [512], 1
    steps = plan(window, lengths, back, args.dtypes.split(","))
    yardsticks = {d: matmul_gflops(dtype=getattr(torch, d)) for d in ("float32", "bfloat16")}
    load_before = os.getloadavg()
    runs = []
    for n, step in enumerate(steps):
        print(f"[{n + 1}/{len(steps)}] {step.kernel}: {', '.join(step.cases)} {step.dtype}"
              f"{' fwd+bwd' if step.backward else ''}", file=sys.stderr)
        runs.append(run_step(step, args))
    load_after = os.getloadavg()
    data = {"cpu": cpu_model(), "yardsticks": yardsticks, "loadavg_before": load_before, "loadavg_after": load_after,
            "native": {"block_q": native.BLOCK_Q, "block_k": native.BLOCK_K}, "runs": runs}
    text = render(data)
    print(text)
    if not args.quick:
        info = machine_info("shared: other users' jobs ran meanwhile, so 'idle' is as idle as it was")
        save("engine", {"machine": info, **data}, machine_line(info) + "\n\n" + text)


def _fastest_pinned(data: dict) -> dict[tuple, float]:
    """The fastest pinned kernel's ms per (case, length, dtype, pass), from the runs that pinned one."""
    best: dict[tuple, float] = {}
    for run in data["runs"]:
        if run["kernel"] not in KERNELS:
            continue
        for r in run["result"]["rows"]:
            key = (r["case"], r["length"], run.get("dtype", "float32"), run["backward"])
            if r["impl"] == "attnkit:tiled" and r["ms"] and not run.get("chosen", {}).get(
                    f"{r['case']}@{r['length']}", "").startswith(f"{run['kernel']}: ran"):
                best[key] = min(best.get(key, r["ms"]), r["ms"])
    return best


def render(data: dict) -> str:
    """The markdown table of results/engine.md, from the run's data (as saved in engine.json). Older files (fp32
    only, no bf16 yardstick, no record of auto's choice) leave those cells empty."""
    before, after = data["loadavg_before"], data["loadavg_after"]
    first = data["runs"][0]["result"]
    settings = first["settings"]
    yard = data.get("yardsticks")
    cpu = data.get("cpu") or data.get("machine", {}).get("description", first["machine"]).split(",")[0]
    sticks = ", ".join(f"{d.replace('bfloat', 'bf').replace('float', 'fp')} {g:.0f} GFLOP/s"
                       for d, g in (yard or {"float32": first["matmul_gflops"]}).items())
    lines = [f"Load average (1, 5, 15 min) before: {before[0]:.2f}, {before[1]:.2f}, {before[2]:.2f}; "
             f"after: {after[0]:.2f}, {after[1]:.2f}, {after[2]:.2f}. Matmul yardstick (2048x2048) on {cpu}: "
             f"{sticks}.", "",
             f"B={settings['batch']}, H=Hkv={settings['heads']}, D={settings['head_dim']}, "
             f"window {settings['window']}, median of {settings['repeats']} interleaved runs. Speed of the tiled "
             "backend vs each peer, taken within one run; % of matmul counts only the (query, key) pairs the mask "
             "allows, against the matmul rate in the row's dtype. kernel: the one pinned, or auto's choice and "
             "whether the tuning cache (measured) or the static policy made it; vs fastest: the fastest pinned "
             "kernel's time / auto's (separate runs). SDPA runs its native causal option where the case has one, "
             "else a dense mask (ALiBi: a dense float bias); compiled Flex has no CPU backward.", "",
             "| CPU | case | L | dtype | pass | kernel | tiled ms | % of matmul | SDPA ms | Flex ms | vs SDPA "
             "| vs Flex | vs fastest | tiled slowdown | SDPA slowdown | Flex slowdown |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fastest = _fastest_pinned(data)
    for run in data["runs"]:
        lines.extend(_rows(run, cpu, yard, fastest))
    return "\n".join(lines)


def _rows(run: dict, cpu: str, yard: dict | None, fastest: dict) -> list[str]:
    res, dtype = run["result"], run.get("dtype", "float32")
    lines = []
    for case in res["settings"]["cases"]:
        for length in res["settings"]["lengths"]:
            rows = {r["impl"]: r for r in res["rows"] if r["case"] == case and r["length"] == length}
            ups = next((u for u in res["speedups"] if u["case"] == case and u["length"] == length), {})
            t, s, f = (rows.get(i) for i in ("attnkit:tiled", "sdpa", "flex"))

            def ms(r: dict | None) -> str:
                return f"{r['ms']:.0f}" if r and r["ms"] else ""

            def slow(r: dict | None) -> str:
                return f"{r['slowdown']:.2f}" if r and r.get("slowdown") else ""

            if yard is None:  # an older file: the run's own fp32 yardstick
                pct = f"{t['pct_of_matmul']:.0f}%" if t and t.get("pct_of_matmul") else ""
            else:
                pct = f"{100 * t['gflops'] / yard[dtype]:.0f}%" if t and t.get("gflops") and dtype in yard else ""
            best = fastest.get((case, length, dtype, run["backward"]))
            vs_best = f"{best / t['ms']:.2f}x" if best and t and t["ms"] and run["kernel"] == "auto" else ""
            cells = [ms(t), pct, ms(s), ms(f), f"{ups['sdpa']:.2f}x" if ups.get("sdpa") else "",
                     f"{ups['flex']:.2f}x" if ups.get("flex") else "", vs_best, slow(t), slow(s), slow(f)]
            kernel = run.get("chosen", {}).get(f"{case}@{length}", run["kernel"])
            kind = "fwd+bwd" if run["backward"] else "fwd"
            lines.append(f"| {cpu} | {case} | {length} | {dtype} | {kind} | {kernel} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
