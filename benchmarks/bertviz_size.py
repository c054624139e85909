"""How many bytes bertviz's own head view writes per attention value, on the bundled MiniLM.

    pip install bertviz
    HF_HUB_OFFLINE=1 python benchmarks/bertviz_size.py                 # 13 to 256 tokens (~1 min)
    HF_HUB_OFFLINE=1 python benchmarks/bertviz_size.py --lengths 64,512

For each input (the seed sentence, then Python's LICENSE.txt cut to each of ``--lengths``
tokens) it runs MiniLM with ``output_attentions=True`` (eager attention, as bertviz's
examples do), passes the maps to ``bertviz.head_view(..., html_action="return")`` and
counts the bytes of the returned HTML (UTF-8). "Per value" divides by the number of
attention values, layers x heads x n^2; "marginal" is the growth in bytes per added value
between consecutive inputs, which leaves out the fixed script and markup. "Copies" counts
how often the maps' JSON appears in the page: bertviz 1.4.1 replaces its ``PYTHON_PARAMS``
marker both where the data goes and in the comment next to it, so the data is written
twice. It writes
benchmarks/results/bertviz_size.json and bertviz_size.md (or into ``--out``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, machine_info, machine_line, save
from report import SEED, long_text

BIG = 2000  # the long report's length in the README, for the extrapolated size


def render(data: dict) -> str:
    """The markdown table of a bertviz_size.json result."""
    rows = data["rows"]
    lines = [machine_line(data["machine"]),
             f"bertviz {data['bertviz']}, `head_view(..., html_action=\"return\")`, bundled MiniLM "
             f"({data['layers']} layers x {data['heads']} heads).", "",
             "| tokens n | attention values | HTML bytes | copies of the maps | bytes per value "
             "| marginal bytes per value |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        marginal = "" if r["marginal_bytes_per_value"] is None else f"{r['marginal_bytes_per_value']:.1f}"
        lines.append(f"| {r['tokens']} | {r['values']:,} | {r['bytes']:,} | {r['copies']} | "
                     f"{r['bytes_per_value']:.1f} | {marginal} |")
    lines += ["", f"At {rows[-1]['marginal_bytes_per_value']:.1f} bytes per value, a {BIG:,}-token head view of "
              f"this model ({data['layers']} x {data['heads']} x {BIG:,}^2 values) would be "
              f"{extrapolated_gb(data):.1f} GB."]
    return "\n".join(lines)


def extrapolated_gb(data: dict) -> float:
    """The head view's size for a BIG-token input, from the last marginal bytes per value."""
    return data["layers"] * data["heads"] * BIG**2 * data["rows"][-1]["marginal_bytes_per_value"] / 1e9


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="64,128,256", help="comma-separated token counts of the long inputs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import bertviz
    from bertviz import head_view

    from attnkit import models

    model, tokenizer = models.load("minilm", attn_implementation="eager")
    model.eval()
    ids = tokenizer(long_text(), add_special_tokens=False)["input_ids"]
    texts = [SEED] + [tokenizer.decode(ids[: n - 2]) for n in (int(x) for x in args.lengths.split(","))]
    rows: list[dict] = []
    for text in texts:
        enc = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            attentions = model(**enc, output_attentions=True).attentions  # per layer (1, H, n, n)
        tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
        html = head_view(list(attentions), tokens, html_action="return").data
        n = len(tokens)
        values = len(attentions) * attentions[0].shape[1] * n * n
        size = len(html.encode("utf-8"))
        marginal = (size - rows[-1]["bytes"]) / (values - rows[-1]["values"]) if rows else None
        rows.append({"tokens": n, "values": values, "bytes": size, "copies": html.count('"attn": '),
                     "bytes_per_value": size / values,
                     "marginal_bytes_per_value": marginal})
        print(rows[-1], file=sys.stderr, flush=True)
    data = {"machine": machine_info(), "bertviz": bertviz.__version__ if hasattr(bertviz, "__version__") else
            _version("bertviz"), "layers": len(attentions), "heads": attentions[0].shape[1], "rows": rows}
    table = render(data)
    print(table)
    save("bertviz_size", data, table, args.out)
    return data


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    main()
