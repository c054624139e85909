"""``attnkit backends``: list the backends and what each supports, the native kernel's state, and the kernel
choices measured on this machine (the tuning cache, with its age).

``--tune`` measures which kernel is fastest here for a few representative cases (about a minute or two) and
caches the winners, which ``backend="auto"`` then follows (see :mod:`attnkit.functional.tuning`).
``--explain-call CASE`` says which backend and kernel a benchmark case would run on, and why, including whether
the kernel came from the tuning cache or the static policy (see :func:`attnkit.explain_call`)."""

from __future__ import annotations

import argparse
import time

import torch

import attnkit
from attnkit.cli._common import Console, Parser, Subparsers, positive
from attnkit.functional import tiled, tuning
from attnkit.functional.tiled import native


def add_parser(sub: Subparsers) -> Parser:
    p = sub.add_parser("backends", help="list the backends and what each supports", description=__doc__)
    p.add_argument("--build-native", action="store_true",
                   help="build the tiled backend's optional C++ kernel now (about a minute on 2 cores; cached "
                        "afterwards, and then used by default for sliding windows and causal documents)")
    p.add_argument("--tune", action="store_true",
                   help="time each tiled kernel (and compiled Flex) on window, document, causal and dense cases in "
                        "fp32 and bf16 at a few lengths (a minute or two), and cache the fastest for backend='auto'")
    from attnkit.bench.cases import CASES

    call = p.add_argument_group("explain a call", "which backend and kernel a call runs on, and why")
    call.add_argument("--explain-call", metavar="CASE", choices=sorted(CASES),
                      help=f"a benchmark case: {', '.join(sorted(CASES))}")
    call.add_argument("--length", type=positive, default=4096, help="its sequence length")
    call.add_argument("--dtype", choices=["bfloat16", "float16", "float32", "float64"], default="float32",
                      help="its inputs' dtype")
    call.add_argument("--grad", action="store_true", help="with gradients (a training step)")
    call.add_argument("--kernel", choices=list(tiled.KERNELS), default="auto", help="the tiled kernel pinned")
    call.add_argument("--backend", choices=["auto", *sorted(attnkit.backends())], default="auto",
                      help="the backend asked for")
    p.set_defaults(run=run)
    return p


def explain(args: argparse.Namespace, con: Console) -> int:
    from attnkit.bench.cases import make_problem

    problem = make_problem(args.explain_call, args.length, dtype=getattr(torch, args.dtype),
                           requires_grad=args.grad)
    b, h, hkv, lq, lk, d = problem.shape
    con.print(f"{args.explain_call}: B={b}, H={h}, Hkv={hkv}, Lq={lq}, Lk={lk}, D={d}, {args.dtype}"
              f"{', with gradients' if args.grad else ''}")
    with tiled.kernel(args.kernel):
        try:
            plan = attnkit.explain_call(problem.q, problem.k, problem.v, mask=problem.mask, bias=problem.bias,
                                        backend=args.backend)
        except ValueError as e:
            con.print(f"refused: {e}")
            return 1
    con.print(str(plan))
    return 0


def tune(con: Console) -> int:
    tuning.check_writable()  # before the run, not after it
    con.print(f"timing the tiled kernels and compiled Flex on this machine ({tuning.this_machine()['cpu']}): "
              f"{', '.join(tuning.FAMILIES)}; {', '.join(tuning.DTYPES)}; L = "
              f"{', '.join(map(str, tuning.LENGTHS))} (B=1, H=8, D=64, forward; medians of interleaved runs after "
              "warm-up)")
    with con.progress() as progress:
        result = tuning.tune(progress=progress)
    path = tuning.save(result)
    con.print(result.table())
    compiles = [c.first_call_s["flex"] for c in result.cases if "flex" in c.first_call_s]
    if compiles:
        con.print(f"flex: compiled once per shape in its first call ({min(compiles):.1f}-{max(compiles):.1f} s, "
                  "included in this run's time, not in the medians)")
    con.print(f"saved to {path}; backend='auto' follows it (`attnkit backends --explain-call CASE` shows how)")
    return 0


def run(args: argparse.Namespace) -> int:
    con = Console()
    if args.explain_call:
        return explain(args, con)
    if args.tune:
        return tune(con)
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
    if native.disabled():
        state = native.native_status()
    elif native.cached():
        state = "built and cached (used by default for sliding windows and causal documents)"
    else:
        state = f"{native.native_status()}; `attnkit backends --build-native` builds it"
    con.print(f"tiled's native kernel: {state}")
    cache = tuning.load_cache()
    con.print(f"kernel choice: {cache.describe()}")
    if cache.tuning is not None:
        con.print(cache.tuning.table())
    return 0
