"""``attnkit translate-demo``: train a small encoder-decoder to translate template English into
French on a CPU, and test whether its cross-attention reads "river" when it writes "rive" for
"bank": the heads' attention on the context word against controls, and an intervention
(hide the context word from cross-attention: does the sense flip?). ``--encoder none``
removes the encoder's self-attention, so the decoder must find the context word itself.
Writes translate.json, the page translate.html and the alignment heatmap translate.png
into ``--out``."""

from __future__ import annotations

import argparse
from pathlib import Path

from attnkit.cli._common import Column, Console, Parser, Subparsers, positive

STEPS, FAST_STEPS = 400, 120
ENCODERS = ("mixing", "none")  # attnkit.demos.translate.ENCODERS, without importing torch for --help


def add_parser(sub: Subparsers) -> Parser:
    p = sub.add_parser("translate-demo", help="train a tiny English->French translator, see its cross-attention",
                       description=__doc__)
    p.add_argument("--steps", type=positive, default=None,
                   help=f"training steps (default: {STEPS}; --fast: {FAST_STEPS})")
    p.add_argument("--fast", action="store_true", help=f"the quick setting ({FAST_STEPS} steps), as run in CI")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split, the weights and the batches")
    p.add_argument("--encoder", choices=ENCODERS, default="mixing",
                   help="the encoder's self-attention: 'mixing' (every source word reads every other, so 'bank' "
                        "can read 'river' before the decoder does) or 'none' (each source position keeps only its "
                        "own token and position, so cross-attention must find the context word) (default: mixing)")
    p.add_argument("--out", default="translate-demo",
                   help="directory for translate.json, translate.html and translate.png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    p.add_argument("--threads", type=positive, default=1,
                   help="torch threads while training (a model this small is fastest on one)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from attnkit._plot import pyplot
    from attnkit.demos.translate import TranslateConfig, train_translation, write_example_report

    steps = args.steps if args.steps is not None else (FAST_STEPS if args.fast else STEPS)
    config = TranslateConfig(steps=steps, seed=args.seed, eval_every=max(1, steps // 20), encoder=args.encoder)
    if not args.no_plot:
        pyplot()  # fail now, not after training, when matplotlib is missing
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    con = Console()
    con.rule(f"cross-attention: a small encoder-decoder learns English -> French (encoder: {args.encoder})")
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
    for line in result.findings():
        con.print(line)
    html = write_example_report(result, out / "translate.html")
    con.print(f"wrote {html}: the cross-attention of the example, opened on layer {result.rive_head()[0]} head "
              f"{result.rive_head()[1]} at the step that writes the sense; no network")
    path = out / "translate.json"
    path.write_text(json.dumps(result.to_dict(), indent=1, allow_nan=False) + "\n")
    con.print(f"wrote {path}")
    if not args.no_plot:
        con.print(f"wrote {result.plot(out / 'translate.png')}")
    return 0
