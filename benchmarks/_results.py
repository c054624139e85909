"""Where the benchmark scripts keep their figures: one JSON file (every number) and the
markdown table rendered from it, under benchmarks/results/.

Each script renders its table with a ``render(data)`` function of its own and writes both
files with :func:`save`. The README and docs paste those tables between marker comments
(``<!-- results:NAME -->``); ``benchmarks/published.py`` re-renders every marked block from
the JSON and tests/test_claims.py checks that they agree.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import torch

from attnkit._timing import machine

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info(note: str = "") -> dict:
    """The machine a run was measured on: CPU model, cores, torch version, threads, the
    date (UTC) and a free-text note about its load (``ATTNKIT_BENCH_NOTE`` if set)."""
    return {"description": machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "note": note or os.environ.get("ATTNKIT_BENCH_NOTE", "")}


def machine_line(info: dict | str) -> str:
    """One line that says where and when the figures were measured (older results files
    hold only the description, a string)."""
    if isinstance(info, str):
        return f"Machine: {info}."
    line = f"Machine: {info['description']}; measured {info['date']}"
    return line + (f" ({info['note']})." if info.get("note") else ".")


def save(name: str, data: dict, markdown: str, directory: Path = RESULTS) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` (``markdown`` plus a final newline) under
    ``directory``; returns both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    js, md = directory / f"{name}.json", directory / f"{name}.md"
    js.write_text(json.dumps(data, indent=1) + "\n")
    md.write_text(markdown.rstrip("\n") + "\n")
    return js, md


def load(name: str, directory: Path = RESULTS) -> dict:
    """The JSON of results file ``name``."""
    return json.loads((directory / f"{name}.json").read_text())
