"""The README's screenshots, taken from the real pages in Debian's chromium.

    python benchmarks/screenshots.py                  # writes docs/img/explorer-*.png, compare.png and lab*.png
    python benchmarks/screenshots.py --only explorer  # only the explorer's (explorer-*.png, compare.png)

The explorer shows the bundled MiniLM on the seed sentence as ``attnkit explain --token it`` writes
it: focused on "it", opened on its most specific head (:func:`attnkit.viz.explainer.opening`).
compare.png is the top of the ``explain --compare`` page of benchmarks/polysemy.py's two sentences.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from attnkit import models
from attnkit.viz import explain, write_lab, write_report
from attnkit.viz.contexts import compare_contexts, write_compare_report
from attnkit.viz.explainer import opening

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "img"
SEED = "The cat sat on the mat because it was tired."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("explorer", "lab"), help="take only these pages' screenshots")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from playwright.sync_api import sync_playwright

    from conftest import CHROMIUM, CHROMIUM_ARGS

    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        if args.only != "lab":
            explorer_shots(browser, Path(tmp))
        if args.only != "explorer":
            lab_shots(browser, write_lab(Path(tmp) / "lab.html"))
        browser.close()


def explorer_shots(browser, tmp: Path) -> None:
    """docs/img/explorer-head.png, explorer-matrix.png and explorer-model.png (the report on "it", opened on its
    most specific head), and compare.png (the top of the compare page), at 1280 wide."""
    model = models.load("minilm")
    maps = explain(SEED, model)
    best = opening(maps, focus=maps.tokens[0].index("it"))
    report = write_report(maps, tmp / "report.html", title=SEED, focus=best.query, view=(best.layer, [best.head]),
                          view_reason=best.why(maps.tokens[0]))
    page = browser.new_page(viewport={"width": 1280, "height": 760})
    page.goto(report.as_uri())
    page.evaluate("window.attnkitExplorer.ready")
    shots = {
        "explorer-head": "{tab: 'head'}",
        "explorer-matrix": f"{{tab: 'matrix', layer: {best.layer}, heads: [{best.head}]}}",
        "explorer-model": "{tab: 'model'}",
    }
    for name, state in shots.items():
        page.evaluate(f"attnkitExplorer.set({state})")
        if name == "explorer-model":
            page.wait_for_selector('.akx-grid[data-done="1"]')
        page.screenshot(path=OUT / f"{name}.png", full_page=True)
        print("wrote", OUT / f"{name}.png")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from polysemy import TEXTS

    compare = write_compare_report(compare_contexts(*TEXTS, "bank", model), tmp / "compare.html")
    page.goto(compare.as_uri())
    page.evaluate("window.attnkitCompare.ready")
    page.screenshot(path=OUT / "compare.png")
    print("wrote", OUT / "compare.png")
    page.close()


def lab_shots(browser, lab: Path) -> None:
    """docs/img/lab.png (the top of the page), lab-heads.png (the roles preset), lab-flash.png (its
    default view: a row whose max rises, at its first rescale) and lab-cost.png, at 1280 wide."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(lab.as_uri())
    page.screenshot(path=OUT / "lab.png")
    page.locator('[data-akl="heads-panel"]').screenshot(path=OUT / "lab-heads.png")
    page.locator('[data-akl="flash"]').screenshot(path=OUT / "lab-flash.png")
    page.evaluate("attnkitLab.panels.cost.set({length: 131072, preset: 'llama-3-8b'})")
    page.locator('[data-akl="cost"]').screenshot(path=OUT / "lab-cost.png")
    for name in ("lab", "lab-heads", "lab-flash", "lab-cost"):
        print("wrote", OUT / f"{name}.png")


if __name__ == "__main__":
    main()
