""""bank" in two contexts on the bundled MiniLM: the per-layer cosine of its hidden state between
"The bank of the river was muddy." and "The bank raised its interest rates.", against "the".

    python benchmarks/polysemy.py    # writes results/polysemy.json, .md and docs/img/polysemy.png

The same as ``attnkit explain "The bank of the river was muddy." --compare "The bank raised its
interest rates." --token bank --png DIR``. Deterministic: no timing, the same numbers on any machine
up to float rounding.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, save

TEXTS = ("The bank of the river was muddy.", "The bank raised its interest rates.")
FIGURE = Path(__file__).resolve().parents[1] / "docs" / "img" / "polysemy.png"


def render(data: dict) -> str:
    tok, anc = data["token"], data["anchor"]
    lines = [f"{data['model']}: \"{tok}\" in \"{data['texts'][0]}\" and in \"{data['texts'][1]}\", "
             f"against \"{anc}\" (in both).", "",
             f"| hidden state | cos {tok} | cos {anc} |", "|---|---:|---:|"]
    names = ["embeddings", *(f"after layer {n}" for n in data["layers"])]
    rows = zip(names, data["token_cosine"], data["anchor_cosine"])
    lines += [f"| {name} | {t:.3f} | {a:.3f} |" for name, t, a in rows]
    return "\n".join([*lines, "", data["summary"]])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help=f"results directory (default {RESULTS})")
    parser.add_argument("--figure", type=Path, default=FIGURE, help="the PNG to write")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from attnkit import models
    from attnkit.viz.contexts import compare_contexts

    found = compare_contexts(*TEXTS, "bank", models.load("minilm"))
    data = found.to_dict()
    table = render(data)
    print(table)
    save("polysemy", data, table, args.out or RESULTS)
    print(f"wrote {found.plot(args.figure)}")
    return data


if __name__ == "__main__":
    main()
