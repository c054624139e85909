"""The README's screenshots, taken from the real pages in Debian's chromium.

    python benchmarks/screenshots.py        # writes docs/img/explorer-*.png and docs/img/lab*.png

The explorer shows the bundled MiniLM on the seed sentence, focused on "it".
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from attnkit.viz import explain, write_lab, write_report

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "img"
SEED = "The cat sat on the mat because it was tired."


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from playwright.sync_api import sync_playwright

    from conftest import CHROMIUM, CHROMIUM_ARGS

    maps = explain(SEED)
    it = maps.tokens[0].index("it")
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        report = write_report(maps, Path(tmp) / "report.html", focus=it)
        lab = write_lab(Path(tmp) / "lab.html")
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 760})
        page.goto(report.as_uri())
        page.evaluate("window.attnkitExplorer.ready")
        shots = {
            "explorer-head": "{tab: 'head', layer: 5, heads: [0,1,2,3,4,5,6,7,8,9,10,11]}",
            "explorer-matrix": "{tab: 'matrix', layer: 5, heads: [11]}",
            "explorer-model": "{tab: 'model'}",
        }
        for name, state in shots.items():
            page.evaluate(f"attnkitExplorer.set({state})")
            if name == "explorer-model":
                page.wait_for_selector('.akx-grid[data-done="1"]')
            page.screenshot(path=OUT / f"{name}.png", full_page=True)
            print("wrote", OUT / f"{name}.png")
        lab_shots(browser, lab)
        browser.close()


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
