"""``attnkit translate-demo``: train a small encoder-decoder to translate template English into
French on a CPU, and show that its cross-attention reads "river" when it writes "rive" for
"bank". Prints the held-out accuracy and the heads' cross-attention on the context word;
writes translate.json and the alignment heatmap translate.png into ``--out``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from attnkit.cli._common import Column, Console, Parser, Subparsers, positive

if TYPE_CHECKING:  # imported where used, so that `attnkit --help` stays fast
    from attnkit.demos.translate import TranslateResult

STEPS, FAST_STEPS = 400, 120
_SENSES = {"bank": ("rive", "banque"), "bat": ("chauve-souris", "batte")}


def add_parser(sub: Subparsers) -> Parser:
    p = sub.add_parser("translate-demo", help="train a tiny English->French translator, see its cross-attention",
                       description=__doc__)
    p.add_argument("--steps", type=positive, default=None,
                   help=f"training steps (default: {STEPS}; --fast: {FAST_STEPS})")
    p.add_argument("--fast", action="store_true", help=f"the quick setting ({FAST_STEPS} steps), as run in CI")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split, the weights and the batches")
    p.add_argument("--out", default="translate-demo", help="directory for translate.json and translate.png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    p.add_argument("--threads", type=positive, default=1,
                   help="torch threads while training (a model this small is fastest on one)")
    p.set_defaults(run=run)
    return p


def _percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def summary(result: TranslateResult) -> list[str]:
    """The findings in words, one paragraph per line."""
    acc, counts = result.accuracy, result.counts
    layer, head, mass = result.rive_head()
    banque = float(result.banque_mass[layer, head])
    lines = [f"held-out translations (sense, context word and template never seen together in training): "
             f"{_percent(acc['all'])} exact of {counts['all']} sentences."]
    for word in ("bank", "bat"):
        parts = ", ".join(f"{s} {_percent(acc[s])} of {counts[s]}" for s in _SENSES[word] if s in acc)
        lines.append(f"'{word}' translated with the right sense in {_percent(acc[word])} of {counts[word]} ({parts}).")
    also = ("so it reads the deciding word for either sense" if banque > 2 * result.banque_uniform
            else "so it reads the context word mainly for 'rive'")
    lines.append(f"while producing 'rive', layer {layer} head {head} puts {mass:.3f} of its cross-attention on the "
                 f"context word (river, stream or shore): {mass / result.uniform:.1f}x uniform attention "
                 f"({result.uniform:.3f} = 1/source length). Producing 'banque', the same head puts {banque:.3f} on "
                 f"the context word (money, loan or account; uniform {result.banque_uniform:.3f}), {also}.")
    for example in result.examples:
        note = "held out of training" if example["held_out"] else "in the training set"
        lines.append(f"'{' '.join(example['source'])}' -> '{example['translation']}' ({note}).")
    return lines



def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from attnkit._plot import pyplot
    from attnkit.demos.translate import TranslateConfig, train_translation

    steps = args.steps if args.steps is not None else (FAST_STEPS if args.fast else STEPS)
    config = TranslateConfig(steps=steps, seed=args.seed, eval_every=max(1, steps // 20))
    if not args.no_plot:
        pyplot()  # fail now, not after training, when matplotlib is missing
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    con = Console()
    con.rule("cross-attention: a small encoder-decoder learns English -> French")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with con.progress() as progress:
            result = train_translation(config, progress=lambda step, total: progress("training", step, total))
    finally:
        torch.set_num_threads(threads)
    con.print(f"corpus: {result.corpus_sizes['train']} training pairs, {result.corpus_sizes['held_out']} held out; "
              f"{steps} steps in {result.seconds:.0f} s; held-out loss {result.held_out_loss[0]:.2f} -> "
              f"{result.held_out_loss[-1]:.3f} nats")
    rows = [(f"{layer}", f"{head}", f"{float(result.rive_mass[layer, head]):.3f}",
             f"{float(result.banque_mass[layer, head]):.3f}")
            for layer in range(result.rive_mass.shape[0]) for head in range(result.rive_mass.shape[1])]
    con.table("cross-attention mass on the context word, per head", [Column("layer", right=True),
              Column("head", right=True), Column("producing 'rive'", right=True),
              Column("producing 'banque'", right=True)], rows)
    for line in summary(result):
        con.print(line)
    from attnkit.demos.translate import example_maps
    from attnkit.viz import write_report

    html = write_report(example_maps(result), out / "translate.html", tolerance=0.0)
    con.print(f"wrote {html}: the cross-attention of 'the bank of the river' and its translation; no network")
    path = out / "translate.json"
    path.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    con.print(f"wrote {path}")
    if not args.no_plot:
        con.print(f"wrote {result.plot(out / 'translate.png')}")
    return 0
