"""How big the explorer report is and how long it takes to build and to render.

    python benchmarks/report.py --tokens 2000 --stretch linear --random   # the committed run (~3 min idle)
    python benchmarks/report.py --tokens 500 --stretch none               # MiniLM as it is

It writes benchmarks/results/report.json and report.md (or into ``--out``).

Inputs: the seed sentence, and a long English text (Python's own LICENSE.txt, which every
Python install ships) cut to ``--tokens`` tokens. The bundled MiniLM (6 layers x 12 heads)
has 512 positions. ``--stretch linear`` (the default) gives it ``--tokens`` positions by
linear interpolation of its position table (:func:`stretch_positions`), so the maps are
the real model's weights on a longer text, not a random model's (whose near-uniform rows
would be the worst case for the encoding; ``--random`` measures that too).
``--stretch none`` keeps the 512 positions and refuses longer inputs.

Build: capture + report (rollout, head roles, encoding, HTML) in this process. Render:
Debian's chromium (Playwright), from navigation until the explorer has decoded the maps
and drawn the head view, then each other tab's first drawing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from attnkit import models
from attnkit._timing import machine
from attnkit.inspect import capture
from attnkit.viz.report import report_html

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, machine_line, save

ROOT = Path(__file__).resolve().parent.parent
SEED = "The cat sat on the mat because it was tired."


def long_text() -> str:
    for path in (Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "LICENSE.txt",
                 Path(sys.base_prefix) / "LICENSE.txt", ROOT / "README.md"):
        if path.exists():
            return path.read_text(encoding="utf-8", errors="replace")
    raise FileNotFoundError("no long text found")


def stretch_positions(model: torch.nn.Module, length: int) -> None:
    """Give a BERT-style model ``length`` positions by interpolating its position table."""
    emb = model.embeddings.position_embeddings
    old = emb.weight.data  # (P, D)
    if length <= old.shape[0]:
        return
    grid = torch.linspace(0, old.shape[0] - 1, length)
    lo = grid.floor().long().clamp(max=old.shape[0] - 2)
    frac = (grid - lo)[:, None]
    new = torch.nn.Embedding(length, old.shape[1])
    new.weight.data = old[lo] * (1 - frac) + old[lo + 1] * frac
    model.embeddings.position_embeddings = new
    model.embeddings.register_buffer("position_ids", torch.arange(length)[None], persistent=False)
    if hasattr(model.embeddings, "token_type_ids"):
        model.embeddings.register_buffer("token_type_ids", torch.zeros(1, length, dtype=torch.long), persistent=False)
    model.config.max_position_embeddings = length


def render_in_browser(html_path: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from playwright.sync_api import sync_playwright

    from conftest import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        t0 = time.perf_counter()
        page.goto(html_path.as_uri())
        page.evaluate("window.attnkitExplorer.ready")
        load = time.perf_counter() - t0
        tabs = {}
        for tab in ("matrix", "roles", "head"):
            tabs[tab] = page.evaluate(
                f"(() => {{ const t = performance.now(); attnkitExplorer.set({{tab: '{tab}'}}); "
                "return (performance.now() - t) / 1000; })()")
        t0 = time.perf_counter()  # the model view draws its thumbnails a few at a time
        page.evaluate("attnkitExplorer.set({tab: 'model'})")
        page.wait_for_selector('.akx-grid[data-done="1"]', timeout=600_000)
        tabs["model (all thumbnails)"] = time.perf_counter() - t0
        layer = page.evaluate("(() => { const t = performance.now(); attnkitExplorer.set({tab: 'matrix', layer: 0}); "
                              "return (performance.now() - t) / 1000; })()")
        heap = page.evaluate("performance.memory ? performance.memory.usedJSHeapSize : null")
        browser.close()
    if errors:
        raise RuntimeError(f"the page raised: {errors}")
    return {"load_and_first_draw_s": round(load, 3), "tab_s": {k: round(v, 3) for k, v in tabs.items()},
            "matrix_layer_change_s": round(layer, 3), "js_heap_mib": heap and round(heap / 2**20, 1)}


def measure(name: str, model, tokenizer, text: str, tokens: int | None) -> dict:
    if tokens is not None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: tokens - 2]
        text = tokenizer.decode(ids)
    t0 = time.perf_counter()
    maps = capture(model, text, tokenizer=tokenizer)
    t_capture = time.perf_counter() - t0
    t0 = time.perf_counter()
    page = report_html(maps)
    t_report = time.perf_counter() - t0
    n = maps.attentions[0].shape[-1]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.html"
        path.write_text(page, encoding="utf-8")
        size = path.stat().st_size
        shown = render_in_browser(path)
    data = json.loads(page.split('id="attnkit-data">', 1)[1].split("</script>", 1)[0])
    enc = data["encoding"]
    row = {"case": name, "tokens": n, "bytes": size, "capture_s": round(t_capture, 2), "report_s": round(t_report, 2),
           "tolerance": enc["tolerance"], "kept": enc["kept"], "entries": enc["entries"],
           "dropped_max": max(enc["dropped_max"]), "peaks": enc["peaks"], "blocks": enc["blocks"],
           "block_keys": enc["block"], "blurred_max": max(enc["blurred_max"]),
           "blurred_mean": round(sum(enc["blurred_mean"]) / len(enc["blurred_mean"]), 5),
           "raw_bytes": enc["raw_bytes"], **shown}
    print(json.dumps(row), flush=True)
    return row


def _stored(r: dict) -> str:
    """How the report stored the rows of one input, from its encoding figures."""
    if r["blocks"] == 0:
        return (f"all but {r['tolerance']:.1%} of each row exactly, to 1/65535 ({r['kept']:,} of {r['entries']:,} "
                f"values; the most a row left out: {r['dropped_max']:.2%})")
    return (f"{r['peaks']} peaks per row exactly, the rest as sums over {r['blocks']} blocks of {r['block_keys']} "
            f"keys: no weight lost, a blurred value off by at most {r['blurred_max']:.3f} "
            f"({r['blurred_mean']:.4f} on average)")


def render(data: dict) -> str:
    """The markdown table of a report.json result."""
    lines = [machine_line(data["machine"]) + " Rendered in Debian's chromium (headless) through Playwright.", "",
             "| input | report size | capture | report build | load and first draw | all 78 thumbnails | matrix tab "
             "| layer change in the matrix | JS heap | how rows are stored |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        name = f"{r['case']}, {r['tokens']} tokens" if r["case"] == "seed sentence" else r["case"].replace(
            f"{r['tokens']} tokens", f"{r['tokens']:,} tokens, MiniLM" if "random" not in r["case"]
            else f"{r['tokens']:,} tokens")
        size = f"{r['bytes'] / 1e3:.0f} KB" if r["bytes"] < 1e6 else f"{r['bytes'] / 1e6:.1f} MB"
        lines.append(f"| {name} | {size} | {r['capture_s']:.2f} s | {r['report_s']:.2f} s | "
                     f"{r['load_and_first_draw_s']:.2f} s | {r['tab_s']['model (all thumbnails)']:.2f} s | "
                     f"{r['tab_s']['matrix']:.2f} s | {r['matrix_layer_change_s']:.3f} s | "
                     f"{r['js_heap_mib']:.1f} MiB | {_stored(r)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--stretch", choices=("linear", "none"), default="linear",
                    help="give MiniLM --tokens positions by linear interpolation of its 512 (default), or not")
    ap.add_argument("--random", action="store_true", help="also a random-weight model of the same shape")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tokenizer = models.load("minilm")
    positions = model.config.max_position_embeddings
    if args.stretch == "none" and args.tokens > positions:
        ap.error(f"--tokens {args.tokens} needs more than MiniLM's {positions} positions; use --stretch linear")
    rows = [measure("seed sentence", model, tokenizer, SEED, None)]
    if args.stretch == "linear":
        stretch_positions(model, args.tokens)
    rows.append(measure(f"{args.tokens} tokens", model, tokenizer, long_text(), args.tokens))
    if args.random:
        from transformers import BertModel

        rnd = BertModel(model.config).eval()
        rows.append(measure(f"{args.tokens} tokens, random weights", rnd, tokenizer, long_text(), args.tokens))
    result = {"machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "stretch": args.stretch, "rows": rows}
    table = render(result)
    print(table)
    save("report", result, table, args.out)


if __name__ == "__main__":
    main()
