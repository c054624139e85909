"""``attnkit backends``: list the backends and what each supports, and the native kernel's state."""

from __future__ import annotations

import argparse
import time

import attnkit
from attnkit.cli._common import Console, Parser, Subparsers
from attnkit.functional.tiled import native


def add_parser(sub: Subparsers) -> Parser:
    p = sub.add_parser("backends", help="list the backends and what each supports", description=__doc__)
    p.add_argument("--build-native", action="store_true",
                   help="build the tiled backend's optional C++ kernel now (about a minute on 2 cores; cached "
                        "afterwards, and then used by default for sliding windows and causal documents)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    con = Console()
    for info in attnkit.backends().values():
        con.print(str(info))
    if args.build_native:
        con.print("building the native kernel (once; cached in torch's extension folder) ...")
        start = time.perf_counter()
        if native.load() is None:
            con.print(f"native kernel: {native.native_status()}")
            return 1
        con.print(f"native kernel: built in {time.perf_counter() - start:.0f} s")
        return 0
    if native._disabled():
        state = native.native_status()
    elif native.cached():
        state = "built and cached (used by default for sliding windows and causal documents)"
    else:
        state = f"{native.native_status()}; `attnkit backends --build-native` builds it"
    con.print(f"tiled's native kernel: {state}")
    return 0
