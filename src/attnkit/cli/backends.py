"""``attnkit backends``: list the backends and what each supports."""

from __future__ import annotations

import argparse

import attnkit
from attnkit.cli._common import Console, Parser, Subparsers


def add_parser(sub: Subparsers) -> Parser:
    p = sub.add_parser("backends", help="list the backends and what each supports", description=__doc__)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    con = Console()
    for info in attnkit.backends().values():
        con.print(str(info))
    return 0
