"""``attnkit lab``: write the attention lab, a self-contained page with sliders for q, k, v,
the scale and masks, and the softmax computed live."""

from __future__ import annotations

import argparse

from attnkit._format import size
from attnkit.cli._common import Console, Parser, Subparsers


def add_parser(sub: Subparsers) -> Parser:
    p = sub.add_parser("lab", help="write the attention lab: sliders for q, k, v, scale, masks; live softmax",
                       description=__doc__)
    p.add_argument("--out", default="lab.html", help="the page to write")
    p.add_argument("--tokens", default=None, help='2 to 12 starting tokens, e.g. "the bank of the river"')
    p.add_argument("--head-dim", type=int, default=4, help="length of each q, k, v vector, 2 to 8")
    p.add_argument("--seed", type=int, default=0, help="chooses the starting vectors")
    p.add_argument("--bench", default=None, metavar="RESULTS.json",
                   help="`attnkit bench --json` output: its timings are shown beside the cost-of-length arithmetic")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from attnkit.viz.lab import write_lab

    path = write_lab(args.out, tokens=args.tokens.split() if args.tokens else None, head_dim=args.head_dim,
                     seed=args.seed, bench=args.bench)
    console = Console()
    console.print(f"wrote {path} ({size(path.stat().st_size)}): open it in a browser; it needs no network")
    if args.tokens:
        console.print(f"the tokens label random vectors (seed {args.seed}), not a model's: the page says so. "
                      "`attnkit explain` shows a real model's attention to a text")
    return 0
