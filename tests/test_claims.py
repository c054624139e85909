"""The README's and docs' figures against the committed results files in benchmarks/results/.

Every table between ``<!-- results:NAME -->`` markers must be the rendering of its results
file by the benchmark script's own ``render``, every results .md must be the rendering of
its JSON, and every figure the prose quotes must be the one computed from the files
(benchmarks/published.py). ``python benchmarks/published.py --write`` refreshes the
tables after a new run.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def published():
    spec = importlib.util.spec_from_file_location("_attnkit_published", ROOT / "benchmarks" / "published.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_published_figures_match_the_results_files(published):
    assert published.problems() == []


def test_every_results_block_is_checked(published):
    names = set()
    for doc in published.DOCS:
        names |= set(re.findall(r"<!-- results:([\w-]+) -->", doc.read_text(encoding="utf-8")))
    assert names == set(published.VIEWS)


def test_a_changed_figure_is_caught(published, tmp_path, monkeypatch):
    """The check itself can fail: one digit changed in a published table is reported."""
    page = ROOT / "docs" / "benchmarks.md"
    text = page.read_text(encoding="utf-8")
    block = re.search(r"<!-- results:core -->\n(.*?)<!-- /results:core -->", text, re.S)[1]
    row = next(line for line in block.splitlines() if line.startswith("| dense"))
    digit = re.search(r"\| (\d)", row[2:])
    changed = row.replace(digit[0], f"| {(int(digit[1]) + 1) % 10}", 1)
    fake = tmp_path / "benchmarks.md"
    fake.write_text(text.replace(row, changed), encoding="utf-8")
    monkeypatch.setattr(published, "DOCS", [fake if doc == page else doc for doc in published.DOCS])
    monkeypatch.setattr(published, "ROOT", ROOT)
    assert any("block 'core' differs" in p for p in published.problems())


def test_the_prose_quotes_no_stale_figures():
    """Figures that an earlier README quoted without a results file behind them."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    for stale in ("86-178 GFLOP/s", "119-141", "0.3-10 s", "passes SDPA at about 4096", "passes SDPA at about L = 1024",
                  "45 bytes per value", "425 MB"):
        assert stale not in text


def test_the_docs_use_no_internal_words():
    text = "\n".join(p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    for word in ("the issue", "mission", "**Targets**", "the target is"):
        assert word.lower() not in text.lower(), word
