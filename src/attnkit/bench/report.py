"""A benchmark result as a markdown table and as a log-log plot."""

from __future__ import annotations

from pathlib import Path

from attnkit._plot import pyplot
from attnkit.bench.cases import CASES
from attnkit.bench.runner import BenchResult

__all__ = ["markdown", "plot"]

_PEER_NAMES = {"sdpa": "SDPA", "flex": "Flex", "naive": "eager"}


def _num(x: float | None, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def markdown(result: BenchResult) -> str:
    """The run as markdown: the settings, one row per (case, length, implementation) with
    time, peak memory, FLOP/s and speed against each peer, then the fitted exponents.

    Rows that were wrong, failed or skipped stay in the table with the reason.
    """
    s = result.settings
    peers = list(s["peers"])
    load = s.get("load", 0)
    load_head = f" ms, load {load} | slowdown |" if load else ""
    lines = [
        f"Machine: {result.machine}. fp32 matmul (2048x2048): {result.matmul_gflops:.0f} GFLOP/s.",
        f"B={s['batch']}, H={s['heads']}, D={s['head_dim']}, {s['dtype']} on {s['device']}, "
        f"{'forward+backward' if s['backward'] else 'forward'}, median of {s['repeats']} interleaved runs. "
        f"GFLOP/s counts only the (query, key) pairs the mask allows"
        f"{' (backward as 2.5x forward)' if s['backward'] else ''}.",
        "",
        "| case | L | implementation | ms | peak MiB | GFLOP/s (% of matmul) | "
        + " | ".join(f"speed vs {_PEER_NAMES[p]}" for p in peers) + " | status |" + load_head,
        "|---|---|---|---|---|---|" + "---|" * len(peers) + "---|" + "---|---|" * bool(load),
    ]
    for r in result.rows:
        rate = f"{r.gflops:.1f} ({r.pct_of_matmul:.0f}%)" if r.gflops is not None else ""
        ups = result.speedups(r.case, r.length, r.impl) if r.impl.startswith("attnkit:") else {}
        ratio_cells = [_ratio(ups.get(p)) for p in peers]
        status = r.status
        notes = [r.note] if r.note else []
        if r.compile_s is not None:
            notes.append(f"compile {r.compile_s:.1f} s")
        if r.max_err is not None and r.status == "wrong":
            notes.append(f"max error {r.max_err:.2g}")
        if notes:
            status += ": " + "; ".join(notes)
        lines.append(f"| {r.case} | {r.length} | {r.impl} | {_num(r.ms, '.2f')} | {_num(r.peak_mib, '.0f')} | "
                     f"{rate} | " + " | ".join(ratio_cells) + f" | {status} |"
                     + (f" {_num(r.loaded_ms, '.2f')} | {_num(r.slowdown, '.1f')}x |" if load else ""))
    if load:
        lines += ["", f"Slowdown: time with {load} background loads (a Python spin loop and a 2-thread torch "
                  "matmul loop, alternating) over the idle time."]
    cases = list(dict.fromkeys(r.case for r in result.rows))
    impls = result.impls()
    if len(s["lengths"]) > 1:
        lines += ["", "Fitted exponent of time against L (about 2 for dense work, 1 for a fixed window):", "",
                  "| case | " + " | ".join(impls) + " |", "|---|" + "---|" * len(impls)]
        for case in cases:
            cells = [_num(result.exponent(case, i), ".2f") or "-" for i in impls]
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:.2f}x" if x >= 1 else f"**{x:.2f}x**"


def plot(result: BenchResult, path: str | Path) -> Path:
    """Save time and peak memory against L (log-log), one line per implementation and a
    row of two panels per case, as a PNG. Needs matplotlib (``pip install attnkit[plot]``)."""
    plt = pyplot()
    path = Path(path)
    cases = list(dict.fromkeys(r.case for r in result.rows))
    fig, axes = plt.subplots(len(cases), 2, figsize=(11, 3.2 * len(cases)), squeeze=False)
    for (ax_t, ax_m), case in zip(axes, cases):
        for impl in result.impls():
            pts = [r for r in result.rows if r.case == case and r.impl == impl and r.status == "ok"]
            if not pts:
                continue
            style = "-o" if impl.startswith("attnkit:") else "--s"
            ax_t.plot([r.length for r in pts], [r.ms for r in pts], style, label=impl, markersize=4)
            mem = [(r.length, r.peak_mib) for r in pts if r.peak_mib is not None]
            if mem:
                ax_m.plot([n for n, _ in mem], [max(mib, 0.1) for _, mib in mem], style, label=impl, markersize=4)
        for ax, ylabel in ((ax_t, "time (ms)"), (ax_m, "peak memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("L")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.set_title(f"{case}: {CASES[case]}", fontsize=9, loc="left")
        ax_t.legend(fontsize=7)
    s = result.settings
    fig.suptitle(f"attnkit bench: B={s['batch']} H={s['heads']} D={s['head_dim']} {s['dtype']} "
                 f"{'fwd+bwd' if s['backward'] else 'fwd'}\n{result.machine}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
