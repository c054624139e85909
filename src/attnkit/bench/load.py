"""Background load for ``attnkit bench --load N``: how each implementation copes with a busy machine.

A kernel that dispatches many small parallel ops waits at a barrier after each one; when
other processes hold the cores, every barrier waits for a descheduled thread. The loads
here are what a shared machine runs: a pure-Python spin loop (one busy core) and a
2-thread torch matmul loop (OpenMP threads competing for the same cores), alternating.

Each load is a child process that stops by itself at its deadline and when its parent
disappears; :func:`background_load` also kills them on leaving its block, whatever the
reason (error, Ctrl-C), and at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from attnkit._checks import require_int, require_real

__all__ = ["LOAD_KINDS", "background_load"]

LOAD_KINDS = ("spin", "matmul")

_CHILD = """
import os, sys, time
kind, deadline, parent = sys.argv[1], time.monotonic() + float(sys.argv[2]), os.getppid()
if kind == "matmul":
    import torch
    torch.set_num_threads(2)
    a = torch.randn(256, 256)
    while time.monotonic() < deadline and os.getppid() == parent:
        for _ in range(20):
            a = torch.tanh(a @ a)
else:
    x = 0
    while time.monotonic() < deadline and os.getppid() == parent:
        for _ in range(100000):
            x = (x * 31 + 7) % 1000003
"""


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):  # a killed child that will not die
            p.wait(timeout=10)


@contextmanager
def background_load(n: int, seconds: float = 600.0, *, settle: float = 2.0) -> Iterator[list[subprocess.Popen]]:
    """Run ``n`` load processes (spin, matmul, spin, ...) for the duration of the block.

    Args:
        n: how many loads; 0 runs none.
        seconds: each load's own deadline: it exits after this long even if never killed.
        settle: seconds to wait after starting them, so that the matmul loads are running.

    Yields the child processes. On leaving the block (normally, by an exception or by
    KeyboardInterrupt) every child is killed and reaped.
    """
    n = require_int("n", n, minimum=0)
    seconds = require_real("seconds", seconds)
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0 (each load's deadline); got {seconds}")
    procs: list[subprocess.Popen] = []
    stop = functools.partial(_stop, procs)
    atexit.register(stop)
    try:
        for i in range(n):
            kind = LOAD_KINDS[i % len(LOAD_KINDS)]
            procs.append(subprocess.Popen([sys.executable, "-c", _CHILD, kind, str(seconds)],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        if n:
            time.sleep(settle)
        yield procs
    finally:
        stop()
        atexit.unregister(stop)
