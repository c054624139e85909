""""bank" in two contexts on the bundled MiniLM: the per-layer cosine of its hidden state between
"She went to the bank to fish in the river." and "She went to the bank to deposit her pay check.",
against every other word the two sentences share.

    python benchmarks/polysemy.py    # writes results/polysemy.json, .md and docs/img/polysemy.png

The same as ``attnkit explain "She went to the bank to fish in the river." --compare "She went to
the bank to deposit her pay check." --token bank --png DIR``. Deterministic: no timing, the same numbers on any machine
up to float rounding.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, save

TEXTS = ("She went to the bank to fish in the river.", "She went to the bank to deposit her pay check.")
FIGURE = Path(__file__).resolve().parents[1] / "docs" / "img" / "polysemy.png"


def render(data: dict) -> str:
    tok, shared = data["token"], data["shared"]
    lines = [f"{data['model']}: \"{tok}\" in \"{data['texts'][0]}\" and in \"{data['texts'][1]}\", "
             "against the other words both share.", "",
             f"| hidden state | cos {tok} | " + " | ".join(f"cos {w}" for w in shared) + " |",
             "|---|---:|" + "---:|" * len(shared)]
    names = ["embeddings", *(f"after layer {n}" for n in data["layers"])]
    for n, name in enumerate(names):
        lines.append(f"| {name} | {data['token_cosine'][n]:.3f} | "
                     + " | ".join(f"{c[n]:.3f}" for c in shared.values()) + " |")
    return "\n".join([*lines, "", data["rule"], "", data["summary"]])


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
