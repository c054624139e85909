"""The README's and docs' figures, from the committed results files (wherever in them the figures move).

    python benchmarks/published.py           # report every marked block or quoted figure that disagrees
    python benchmarks/published.py --write   # rewrite the marked blocks from benchmarks/results/

A table in README.md or docs/*.md sits between ``<!-- results:NAME -->`` and
``<!-- /results:NAME -->``; :data:`VIEWS` says which results file NAME renders and with
which script's ``render``. Figures quoted in the prose are listed in :func:`quoted`, each
computed from the files. tests/test_claims.py runs :func:`problems` and fails on any.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"<!-- results:(?P<name>[\w-]+) -->\n(?P<body>(?:.*?\n)?)<!-- /results:(?P=name) -->", re.S)
PEER_FILES = ("targets-window", "targets-document", "targets-dense", "forward", "backward")


def script(name: str):
    """The benchmark script ``benchmarks/<name>.py`` as a module (its ``main`` is not run)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    module_name = f"_attnkit_bench_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[module_name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules[module_name]


def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def bench_markdown(data: dict) -> str:
    """``attnkit bench --markdown`` of a saved ``--json`` result, by attnkit's own renderer."""
    from attnkit.bench import BenchResult, Row, markdown

    return markdown(BenchResult(data["machine"], data["settings"], data["matmul_gflops"],
                                [Row(**r) for r in data["rows"]]))


def goals() -> str:
    """attnkit's own goals against SDPA and FlexAttention, and whether the committed peer
    runs meet them, from the targets-* files."""
    lines = ["| attnkit's goal | measured | met? |", "|---|---|---|"]

    def ups(data: dict, case: str, length: int, impl: str) -> dict:
        return next(s for s in data["speedups"] if (s["case"], s["length"], s["impl"]) == (case, length, impl))

    def cell(x: float, goal: float) -> tuple[str, str]:
        return f"{x:.2f}x", "yes" if x >= goal else "**no**"

    window, document, dense = (load(n) for n in ("targets-window", "targets-document", "targets-dense"))
    for length in sorted({r["length"] for r in window["rows"]}):
        lines.append("| window 512, L={}: tiled >= 1.3x compiled Flex | {} | {} |".format(
            length, *cell(ups(window, "window", length, "attnkit:tiled")["flex"], 1.3)))
    for length in sorted({r["length"] for r in window["rows"]}):
        lines.append("| window 512, L={}: tiled >= 8x SDPA with the dense mask | {} | {} |".format(
            length, *cell(ups(window, "window", length, "attnkit:tiled")["sdpa"], 8.0)))
    for impl in ("attnkit:auto", "attnkit:tiled"):
        lines.append("| document (8 docs), L=8192: {} >= 3x SDPA with the dense mask | {} | {} |".format(
            impl.split(":")[1], *cell(ups(document, "document", 8192, impl)["sdpa"], 3.0)))
    for case in ("dense", "causal"):
        for length in sorted({r["length"] for r in dense["rows"]}):
            lines.append("| {}, L={}: auto >= 0.95x SDPA | {} | {} |".format(
                case, length, *cell(ups(dense, case, length, "attnkit:auto")["sdpa"], 0.95)))
    return "\n".join(lines)


# NAME -> function rendering the block's text from the results files
VIEWS: dict[str, Callable[[], str]] = {
    "core": lambda: script("core").render(load("core")),
    "targets-window": lambda: bench_markdown(load("targets-window")),
    "targets-document": lambda: bench_markdown(load("targets-document")),
    "targets-dense": lambda: bench_markdown(load("targets-dense")),
    "goals": goals,
    "forward-summary": lambda: script("summarize").render(load("forward")),
    "backward-summary": lambda: script("summarize").render(load("backward")),
    "decode": lambda: script("decode").render(load("decode")),
    "linear": lambda: script("linear").render(load("linear")),
    "linear-favor": lambda: script("linear").render_favor(load("linear")),
    "ring": lambda: script("ring").render(load("ring")),
    "capture": lambda: script("capture").render(load("capture")),
    "long_stats": lambda: script("long_stats").render(load("long_stats")),
    "long_stats_quick": lambda: script("long_stats").render(load("long_stats_quick")),
    "long_stats_lm": lambda: script("long_stats").render(load("long_stats_lm")),
    "report": lambda: script("report").render(load("report")),
    "bertviz_size": lambda: script("bertviz_size").render(load("bertviz_size")),
    "profile": lambda: script("profile_models").render(load("profile")),
    "translate": lambda: script("translate").render(load("translate")),
    "monitor_overhead": lambda: script("monitor_overhead").render(load("monitor_overhead")),
    "polysemy": lambda: script("polysemy").render(load("polysemy")),
    "engine": lambda: script("engine").render(load("engine")),
    "flex_functions": lambda: script("flex_functions").render(load("flex_functions")),
    "long_page": lambda: script("long_page").render(load("long_page")),
    **{f"findings-{part}": (lambda part=part: script("findings").RENDER[part](load(f"findings-{part}")))
       for part in ("clark", "sinks", "streaming")},
}
# results files whose table is linked from the prose rather than pasted into it
LINKED: dict[str, Callable[[], str]] = {
    "specificity": lambda: script("specificity").render(load("specificity")),
}

# results/<name>.md -> how it is rendered from results/<name>.json
FILES: dict[str, Callable[[], str]] = {
    **{n: (lambda n=n: bench_markdown(load(n))) for n in PEER_FILES},
    **{n: VIEWS[n] for n in ("core", "decode", "linear", "ring", "capture", "report", "bertviz_size", "profile",
                                  "translate", "monitor_overhead", "polysemy", "flex_functions", "findings-clark",
                                  "findings-sinks", "findings-streaming", "long_page")},
    "engine": lambda: script("_results").machine_line(load("engine")["machine"]) + "\n\n" + VIEWS["engine"](),
    "linear-favor": VIEWS["linear-favor"],
    **LINKED,
}


def _span(values: list[float], fmt: str) -> str:
    return f"{format(min(values), fmt)}–{format(max(values), fmt)}"


def quoted() -> list[tuple[str, str]]:
    """(document, text) pairs: each figure the prose quotes, as computed from the files.
    Each text must appear in its document."""
    peers = [load(n) for n in PEER_FILES]
    every = [*peers, load("core")]
    compile_s = [r["compile_s"] for d in peers for r in d["rows"] if r["compile_s"] is not None]
    viz = load("bertviz_size")
    bytes_per_value = viz["rows"][-1]["marginal_bytes_per_value"]
    report = load("report")
    long = next(r for r in report["rows"] if r["case"] == "2000 tokens")
    ring = load("ring")
    peak = {w: max(r["peak_mib"] for r in rows) for w, rows in ring["results"].items()}
    flex_vs_tiled = [s["flex"] for s in load("targets-window")["speedups"] if s["impl"] == "attnkit:tiled"]
    heads = {tuple(map(int, line.split()[:2])): tuple(map(float, line.split()[2:4]))
             for line in (RESULTS / "coreference.txt").read_text().splitlines() if re.match(r"\s+\d+\s+\d+\s", line)}
    cat, mat = heads[(5, 11)]
    prefer = re.search(r"(\d+) of 72 heads give 'cat' more weight", (RESULTS / "coreference.txt").read_text())[1]
    shift_text = (RESULTS / "finetune_shift.txt").read_text()
    shift = {tuple(map(int, line.split()[:2])): float(line.split()[2])
             for line in shift_text.splitlines() if re.match(r"\s+\d+\s+\d+\s+[+-]", line)}
    gained = re.search(r"(\d+) heads gained more than 0.05", shift_text)[1]
    induction = load("induction")
    clark, sinks, stream = (load(f"findings-{p}") for p in ("clark", "sinks", "streaming"))
    rope = next(r for r in sinks["rows"] if r["model"].startswith("TransformerLM (rope), trained"))
    late = {p: sum(v[256:]) / len(v[256:]) for p, v in stream["results"]["rope"].items()}
    spec = load("specificity")
    lead, big, read = spec["specific"][0], spec["heaviest"], spec["readings"]
    return [
        ("docs/findings.md", f"layers 2 to 5 give it {_span(clark['by_layer']['cls'][1:5], '.2f')} of all their "
                             f"attention, and {len(clark['heads_over_half']['cls'])} of its 72 heads"),
        ("docs/findings.md", f"the RoPE LM {_span(rope['by_layer'], '.3f')} by layer against "
                             f"{sinks['uniform'][str(rope['length'])]:.3f}"),
        ("docs/findings.md", f"the dense cache loses {late['dense']:.3f} nats per byte and the window "
                             f"{late['window']:.3f}"),
        ("docs/findings.md", f"keeping 4 sink bytes does not help: {late['sinks']:.3f} nats per byte"),
        ("README.md", f"layer {lead['layer']} head {lead['head']}: {lead['weight']:.3f} of `it`'s attention on "
                      f"`{lead['key']}`, against a column mean of {lead['column_mean']:.3f}"),
        ("README.md", f"Layer {big['layer']} head {big['head']} gives `{big['key']}` more ({big['weight']:.3f}), but "
                      f"its column mean is {big['column_mean']:.3f}: it is a column head, where "
                      f"{100 * big['column_fraction']:.0f}% of the queries put half their weight or more on "
                      f"`{big['column_key']}`"),
        ("README.md", f"it points to `{read[2]['points_to']}` "
                      + ("both times" if read[2]["points_to"] == read[3]["points_to"] else "in one of them")
                      + f" ({read[2]['meant_weight']:.3f} and {read[3]['other_weight']:.3f}), and to "
                      f"`{read[4]['points_to']}` "
                      + ("whether" if read[4]["points_to"] == read[5]["points_to"] else "only when")),
        ("docs/benchmarks.md", f"layer 3 head 1, {heads[(3, 1)][0]:.3f} vs {heads[(3, 1)][1]:.3f}"),
        ("docs/benchmarks.md", f"heads 10 and 8 move {shift[(5, 10)]:+.2f} and {shift[(5, 8)]:+.2f} of their "
                               f"attention onto the domain terms, and {gained} heads gain more than 0.05"),
        ("docs/inspect.md", f"{gained} heads gained more than 0.05 of their attention"),
        ("docs/benchmarks.md", f"layer 5 head 11 sends {cat:.3f} of `it`'s attention to `cat` and {mat:.3f} to"),
        ("docs/benchmarks.md", f"{prefer} of the 72 heads prefer `cat`"),
        ("docs/inspect.md", f"{prefer} of the 72 heads give `cat` more weight"),
        ("docs/benchmarks.md", f"to {induction['second_half_loss'][-1]:.2f} nats while the random half stays at "
                      f"{induction['first_half_loss'][-1]:.2f}"),
        ("docs/benchmarks.md", f"`attnkit induction` ({induction['seconds']:.0f} s in the committed run"),
        ("docs/inspect.md", f"3000 steps, {induction['seconds']:.0f} s on 2 cores in the committed run"),
        ("docs/benchmarks.md", "each with its own matmul yardstick, "
                               f"{_span([d['matmul_gflops'] for d in peers], '.0f')} GFLOP/s"),
        ("docs/benchmarks.md", f"Flex took {_span(compile_s, '.2g')} s"),
        ("docs/limits.md", f"the matmul yardstick itself by more ({_span([d['matmul_gflops'] for d in every], '.0f')} "
                      "GFLOP/s"),
        ("docs/explorer.md", f"about {bytes_per_value:.0f} bytes per value"),
        ("docs/explorer.md", f"{script('bertviz_size').extrapolated_gb(viz):.0f} GB for the 2,000-token maps"),
        ("docs/explorer.md", f"about {bytes_per_value:.0f} bytes a value"),
        ("README.md", f"2,000 tokens in {long['bytes'] / 1e6:.1f} MB"),
        ("docs/distributed.md", f"from {peak['1']:.0f} MiB with one process to {peak['4']:.0f} MiB with four"),
        ("docs/benchmarks.md", f"tiled path runs at {_span(flex_vs_tiled, '.2f')}x Flex's speed"),
    ]


def problems() -> list[str]:
    """Every disagreement between the published figures and the results files."""
    found = []
    for name, render in FILES.items():
        if not (RESULTS / f"{name}.md").exists() or not (RESULTS / f"{name.replace('-favor', '')}.json").exists():
            found.append(f"benchmarks/results/{name}.md or its JSON is missing")
            continue
        committed = (RESULTS / f"{name}.md").read_text().strip()
        if committed != render().strip():
            found.append(f"benchmarks/results/{name}.md is not the rendering of its JSON")
    seen = set()
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in BLOCK.finditer(text):
            name = m["name"]
            seen.add(name)
            if name not in VIEWS:
                found.append(f"{doc.name}: unknown results block {name!r}")
            elif _rendered(name) is None:
                found.append(f"{doc.name}: block {name!r} has no results file")
            elif m["body"].strip() != _rendered(name):
                found.append(f"{doc.name}: block {name!r} differs from its results file")
        opened = set(re.findall(r"<!-- results:([\w-]+) -->", text))
        closed = set(re.findall(r"<!-- /results:([\w-]+) -->", text))
        if opened != closed or len(re.findall(r"<!-- /?results:", text)) != 2 * len(list(BLOCK.finditer(text))):
            found.append(f"{doc.name}: unbalanced results markers")
    found += [f"views never published: {sorted(set(VIEWS) - seen)}"] if set(VIEWS) - seen else []
    try:
        claims = quoted()
    except FileNotFoundError as e:
        return [*found, f"a quoted figure's results file is missing: {e.filename}"]
    for doc, text in claims:  # line breaks in the prose are spaces
        if " ".join(text.split()) not in " ".join((ROOT / doc).read_text(encoding="utf-8").split()):
            found.append(f"{doc}: does not say {text!r}")
    return found


def _rendered(name: str) -> str | None:
    """View ``name`` rendered from its results files, or None when one is missing."""
    try:
        return VIEWS[name]().strip()
    except FileNotFoundError:
        return None


def write() -> None:
    """Rewrite every marked block in README.md and docs/*.md whose results files exist."""
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        new = BLOCK.sub(lambda m: m[0] if m["name"] not in VIEWS or _rendered(m["name"]) is None else
                        f"<!-- results:{m['name']} -->\n{_rendered(m['name'])}\n<!-- /results:{m['name']} -->", text)
        if new != text:
            doc.write_text(new, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the marked blocks from the results files")
    args = parser.parse_args()
    if args.write:
        write()
    found = problems()
    print("\n".join(found) or "every published figure matches benchmarks/results/")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
