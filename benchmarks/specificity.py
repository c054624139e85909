"""Which MiniLM head links "it" to "cat", ranked by specificity, and whether it follows the meaning.

    python benchmarks/specificity.py           # writes results/specificity.json and .md (a few seconds)
    python benchmarks/specificity.py --quick   # the seed sentence only, printed, nothing written

On "The cat sat on the mat because it was tired.", every head is ranked as ``attnkit explain
--token it`` ranks them (:func:`attnkit.viz.explainer.specific_heads`): by how far the weight from
"it" on one key stands above that key's column mean, the weight the average query gives it. The
head with the largest raw weight is shown beside it with its column-head flag
(:func:`attnkit.inspect.roles.column_heads`). The most specific head is then read on more
sentences, Winograd pairs among them, where one word flips which noun the pronoun means:
its weights from the pronoun on both candidates, with their column means.

Deterministic: no timing; the same numbers on any machine up to float rounding (the machine
is recorded all the same).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, machine_info, machine_line, save

SEED = "The cat sat on the mat because it was tired."
# (sentence, pronoun, the noun it means, the other noun)
SENTENCES = [
    (SEED, "it", "cat", "mat"),
    ("The animal didn't cross the street because it was too tired.", "it", "animal", "street"),
    ("The trophy did not fit in the suitcase because it was too big.", "it", "trophy", "suitcase"),
    ("The trophy did not fit in the suitcase because it was too small.", "it", "suitcase", "trophy"),
    ("The city councilmen refused the demonstrators a permit because they feared violence.", "they",
     "council", "demonstrators"),
    ("The city councilmen refused the demonstrators a permit because they advocated violence.", "they",
     "demonstrators", "council"),
]
PAIRS = [(2, 3), (4, 5)]  # Winograd pairs: indices into SENTENCES


def _head_row(h, tokens) -> dict:
    return {"layer": h.layer, "head": h.head, "key": tokens[h.key], "weight": h.weight,
            "column_mean": h.column_mean, "ratio": h.ratio, "difference": h.difference,
            "column_head": h.column_head, "column_key": tokens[h.column_key]}


def measure(model, sentences=SENTENCES) -> dict:
    from attnkit.inspect.roles import column_heads, specificity
    from attnkit.viz.explainer import explain, find_tokens, special_positions, specific_heads

    maps = explain(SEED, model)
    tokens = [str(t) for t in maps.tokens[0]]
    it = find_tokens(tokens, "it")[0]
    ranked = specific_heads(maps, it, n=5, skip_keys=special_positions(tokens))
    attn = maps.attentions[0].double()
    special = special_positions(tokens)
    far = [j for j in range(len(tokens)) if abs(j - it) > 2 and j not in special]  # the ranking's keys
    rows = attn[:, :, it, far]  # (layers, heads, far keys)
    flat = int(rows.amax(-1).flatten().argmax())
    heaviest = divmod(flat, attn.shape[1])
    key = far[int(rows[heaviest].argmax())]
    column = column_heads(attn)
    spec = specificity(attn, it)
    top = ranked[0]
    readings = []
    for text, pronoun, meant, other in sentences:
        m = explain(text, model)
        toks = [str(t) for t in m.tokens[0]]
        q = find_tokens(toks, pronoun)[0]
        s = specificity(m.attentions[0][top.layer, top.head], q)
        row = {"text": text, "pronoun": pronoun, "meant": meant, "other": other}
        for name, word in (("meant", meant), ("other", other)):
            j = find_tokens(toks, word)[0]
            row[f"{name}_weight"], row[f"{name}_column_mean"] = float(s.weight[j]), float(s.column_mean[j])
        row["points_to"] = meant if row["meant_weight"] > row["other_weight"] else other
        readings.append(row)
    return {"model": maps.model_name, "text": SEED, "tokens": tokens, "query": it,
            "specific": [_head_row(h, tokens) for h in ranked],
            "heaviest": {"layer": maps.layers[heaviest[0]], "head": maps.heads[heaviest[1]], "key": tokens[key],
                         "weight": float(attn[heaviest][it, key]),
                         "column_mean": float(spec.column_mean[heaviest][key]),
                         "column_head": bool(column.flagged[heaviest]),
                         "column_key": tokens[int(column.key[heaviest])],
                         "column_fraction": float(column.fraction[heaviest])},
            "head": {"layer": top.layer, "head": top.head}, "readings": readings, "pairs": PAIRS}


def render(data: dict) -> str:
    big = data["heaviest"]
    lead = data["head"]
    lines = [machine_line(data["machine"]),
             f"{data['model']}: \"{data['text']}\", query \"it\". Heads ranked by specificity "
             "(the weight from \"it\" on a key more than 2 tokens away, minus that key's column mean):", "",
             "| layer.head | key | weight | column mean | ratio | difference | column head? |",
             "|---|---|---:|---:|---:|---:|---|"]
    for h in data["specific"]:
        flag = f"yes ({h['column_key']})" if h["column_head"] else "no"
        lines.append(f"| L{h['layer']}.H{h['head']} | {h['key']} | {h['weight']:.3f} | {h['column_mean']:.3f} | "
                     f"{h['ratio']:.1f}x | {h['difference']:+.3f} | {flag} |")
    lines += ["", f"The largest raw weight from \"it\" on such a key is layer {big['layer']} head {big['head']}'s "
              f"{big['weight']:.3f} on \"{big['key']}\", against a column mean of {big['column_mean']:.3f}: "
              f"{100 * big['column_fraction']:.0f}% of its queries put half their weight or more on "
              f"\"{big['column_key']}\"" + (" (a column head)." if big["column_head"] else "."), "",
              f"Layer {lead['layer']} head {lead['head']} on more sentences (weight from the pronoun; column mean "
              "in brackets):", "",
              "| sentence | the pronoun means | weight on it | on the other noun | head points to |",
              "|---|---|---:|---:|---|"]
    for r in data["readings"]:
        lines.append(f"| {r['text']} | {r['meant']} | {r['meant_weight']:.3f} ({r['meant_column_mean']:.3f}) | "
                     f"{r['other']} {r['other_weight']:.3f} ({r['other_column_mean']:.3f}) | {r['points_to']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help=f"results directory (default {RESULTS})")
    parser.add_argument("--quick", action="store_true", help="the seed sentence only; print, write nothing")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from attnkit import models

    data = measure(models.load("minilm"), SENTENCES[:1] if args.quick else SENTENCES)
    data["machine"] = machine_info("deterministic figures, no timing")
    table = render(data)
    print(table)
    if not args.quick:
        save("specificity", data, table, args.out or RESULTS)
    return data


if __name__ == "__main__":
    main()
