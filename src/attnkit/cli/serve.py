"""``attnkit serve``: a local web app. Type a text and see the explorer; the lab in a tab.
Serves until Ctrl-C."""

from __future__ import annotations

import argparse

from attnkit.cli._common import Console, Parser, Subparsers, quiet_transformers


def add_parser(sub: Subparsers) -> Parser:
    p = sub.add_parser("serve", help="a local web app: type text, see the explorer; the lab in a tab",
                       description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    p.add_argument("--model", default="minilm", help="'minilm' or a local Hugging Face model folder")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="longest input accepted, in tokens (default: the model's maximum positions)")
    p.add_argument("--long", default=None, metavar="FILE",
                   help="also serve the long-document explorer of this UTF-8 text file at /long, its zoom computing "
                        "exact weights (statistics computed once, at start; see docs/long-explorer.md)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Call :func:`attnkit.viz.server.serve`, which checks the options before loading the model."""
    from attnkit.viz import server

    quiet_transformers()
    server.serve(args.model, host=args.host, port=args.port, max_tokens=args.max_tokens, long=args.long,
                 progress=Console().progress)
    return 0
