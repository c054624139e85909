"""The long-document explorer at 32K tokens: what it costs to build, how big the page is, how fast Chromium opens it.

    python benchmarks/long_page.py            # 32,768 tokens: the statistics take minutes to tens of minutes on 2 cores
    python benchmarks/long_page.py --quick    # 2,048 tokens, a smoke test (about a minute)

Builds attnkit's demo model (:func:`attnkit.demos.long_document.tiny_long_model`: a random Llama-style model, 2 layers
x 4 heads, head_dim 16, context window 32,768, MiniLM's tokenizer), a document of exactly ``--tokens`` tokens
(:func:`~attnkit.demos.long_document.demo_text`), its statistics and the static page (``attnkit explain --long``'s
report, top 5 keys per query). Then opens the page in headless Chromium (/usr/bin/chromium, Playwright) ``--loads``
times, and reports the median of: the time from navigation to the page being drawn and its top-k decoded
(``attnkitLong.ready``), the time to select another head (every canvas redrawn), and to zoom on 64 queries; and the
page's DOM element count (it holds no node per token). Writes benchmarks/results/long_page.json and .md (or into
``--out``), with the machine, its load average before and after, and a note (``ATTNKIT_BENCH_NOTE``). Timings depend on
the load of the machine; the sizes do not. ``--html PATH`` keeps the page; ``--png PATH`` saves a screenshot of it
(docs/img/long-explorer.png is one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from attnkit import models
from attnkit._format import size
from attnkit.demos.long_document import demo_text, tiny_long_model
from attnkit.viz.long import LongDocument, write_long_report

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, machine_info, machine_line, save

CHROMIUM = "/usr/bin/chromium"


def build(tokens: int, folder: Path, html: Path) -> dict:
    """Write the page of a ``tokens``-token document to ``html``; return what it took."""
    tiny_long_model(folder)
    model, tokenizer = models.load(folder)
    ids = tokenizer(demo_text(tokens, seed=0), verbose=False)["input_ids"]
    if len(ids) < tokens:
        raise ValueError(f"the demo text gave {len(ids)} tokens, fewer than --tokens {tokens}")
    ids = ids[:tokens]
    start = time.perf_counter()
    doc = LongDocument(model, tokenizer, ids, top_k=5, progress=lambda what, done, total: print(
        f"  {what}: layer {done}/{total} ({time.perf_counter() - start:.0f} s)", flush=True))
    stats_seconds = time.perf_counter() - start
    start = time.perf_counter()
    data = doc.data()
    write_long_report(data, html)
    page_seconds = time.perf_counter() - start
    return {"tokens": tokens, "layers": len(data["layers"]), "heads": len(data["heads"]), "top_k": 5,
            "context_window": data["context_window"], "stats_seconds": round(stats_seconds, 1),
            "page_seconds": round(page_seconds, 1), "page_bytes": html.stat().st_size,
            "parts_bytes": {"top_k": len(data["top"]["blob"]), "received": len(data["received"]["blob"])}}


def browse(html: Path, loads: int) -> dict:
    """Open the page ``loads`` times in Chromium; the median of each timing (ms)."""
    from playwright.sync_api import sync_playwright

    timings: dict[str, list[float]] = {"load_ms": [], "select_head_ms": [], "zoom_64_ms": []}
    elements = errors = 0
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        for _ in range(loads):
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            seen: list[str] = []
            page.on("console", lambda m, seen=seen: m.type == "error" and seen.append(m.text))
            page.on("pageerror", lambda e, seen=seen: seen.append(str(e)))
            page.goto(html.as_uri(), timeout=600_000)
            timings["load_ms"].append(page.evaluate(
                "window.attnkitLong.ready.then(() => performance.now())"))
            timings["select_head_ms"].append(page.evaluate(
                "(() => { const t = performance.now(); attnkitLong.select(1, 3); return performance.now() - t; })()"))
            timings["zoom_64_ms"].append(page.evaluate(
                "(async () => { const t = performance.now(); await attnkitLong.zoomTo(20000 % attnkitLong.data.tokens"
                ".length, 20000 % attnkitLong.data.tokens.length + 64); return performance.now() - t; })()"))
            elements = page.evaluate("document.getElementsByTagName('*').length")
            errors += len(seen)
            page.close()
        version = browser.version
        browser.close()
    return {"chromium": version, "loads": loads, "console_errors": errors, "dom_elements": elements,
            **{name: round(statistics.median(values), 1) for name, values in timings.items()}}


def screenshot(html: Path, png: Path) -> None:
    """A 1400 x 1000 screenshot of the page, zoomed on 24 queries two thirds into the document."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(html.as_uri(), timeout=600_000)
        page.evaluate("(async () => { await window.attnkitLong.ready; const n = attnkitLong.data.tokens.length;"
                      " const q = Math.floor(2 * n / 3); await attnkitLong.zoomTo(q, q + 24); })()")
        page.screenshot(path=str(png))
        browser.close()


def render(data: dict) -> str:
    """The markdown of a long_page.json result."""
    b, c = data["build"], data["browser"]
    return "\n".join([
        machine_line(data["machine"]),
        f"A {b['tokens']:,}-token document, a random Llama-style model ({b['layers']} layers x {b['heads']} heads, "
        f"context window {b['context_window']:,}), top {b['top_k']} keys per query; Chromium {c['chromium']}, "
        f"median of {c['loads']} loads.", "",
        "| what | value |", "|---|---|",
        f"| statistics (attnkit.inspect.stats, CPU) | {b['stats_seconds']:.0f} s |",
        f"| page file | {size(b['page_bytes'])} (top-k {size(b['parts_bytes']['top_k'])}, received mass "
        f"{size(b['parts_bytes']['received'])}) |",
        f"| open until drawn and decoded | {c['load_ms']:.0f} ms |",
        f"| select another head (all canvases redrawn) | {c['select_head_ms']:.0f} ms |",
        f"| zoom on 64 queries | {c['zoom_64_ms']:.0f} ms |",
        f"| DOM elements on the page | {c['dom_elements']} |",
        f"| console errors | {c['console_errors']} |",
    ])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768, help="tokens of the document (default 32,768)")
    parser.add_argument("--quick", action="store_true", help="2,048 tokens, 1 load: a smoke test")
    parser.add_argument("--loads", type=int, default=3, help="times the page is opened (default 3)")
    parser.add_argument("--html", type=Path, default=None, help="keep the page here")
    parser.add_argument("--png", type=Path, default=None, help="save a screenshot of the page here")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    tokens, loads = (2048, 1) if args.quick else (args.tokens, args.loads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        html = args.html or Path(tmp) / "long.html"
        built = build(tokens, Path(tmp) / "long-model", html)
        seen = browse(html, loads)
        if args.png:
            screenshot(html, args.png)
    data = {"machine": machine_info(), "load_average": {"before": load_before, "after": os.getloadavg()},
            "torch_threads": torch.get_num_threads(), "build": built, "browser": seen}
    markdown = render(data)
    print(markdown)
    if not args.quick:
        save("long_page", data, markdown, args.out)
    return data


if __name__ == "__main__":
    main()
