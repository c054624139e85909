"""Kernel choice measured on this machine, once: ``attnkit backends --tune`` (:func:`tune`) and its cache.

The fastest tiled kernel differs between CPUs (an AMD EPYC without bf16 units and an Intel Xeon with AMX
disagree), so a rule measured on one CPU is a guess on the next. :func:`tune` times each kernel on a small set
of representative cases, interleaved, median of 3 after a warm-up call, and :func:`save` writes each case's medians to
``tuning.json`` in the user's cache folder (:func:`cache_path`), as FFTW's wisdom does. ``backend="auto"`` reads
it (:func:`lookup`) and never times anything inside a call; without a usable cache it keeps the static policy
of :func:`attnkit.functional.tiled.choose`.

The kernels (simplest first; a kernel within :data:`TIE` of the fastest median counts as tied, and a tie goes to
the simpler): ``math`` (plain PyTorch ops, per chunk), ``fused`` (PyTorch's fused CPU kernel, per chunk),
``banded`` (the same kernel on the batched band plan), ``native`` (the C++ kernel built on this machine) and
``flex`` (compiled FlexAttention, a backend of its own; its first call compiles, once per shape, and is kept
out of the medians).

How a call maps to a tuned case (:func:`case_of`):

* mask family, from the mask's band form (:func:`attnkit.functional.tiled.translate.band_form`): ``document``
  if it carries document ids; else ``window`` if some row loses keys on its left (``lo > -(Lk - 1)``); else
  ``causal`` if some row loses keys on its right (``hi < Lk - 1``); else ``dense`` (no mask, key padding). A
  mask with no band form (prefix-LM, global tokens, tensors, functions, ``|``, ``~``) has no case.
* dtype: float32 is ``float32``; bfloat16 and float16 are ``bfloat16`` (the same kernels run both); float64 has
  no case.
* length: the tuned length nearest to max(Lq, Lk) on a log scale (a tie goes to the longer).
* forward passes only: a call that needs gradients keeps the static policy (the tuner times forwards).

Batch, heads and head dim are not part of the case (tuned at B=1, H=Hkv=8, D=64). The cache is keyed by CPU
model, torch version and attnkit version: one made under another is ignored, and ``attnkit backends`` says so.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnkit._timing import cpu_model, interleaved_median_seconds
from attnkit.functional import flex
from attnkit.functional._call import AttentionCall

SIMPLICITY = ("math", "fused", "banded", "native", "flex")  # simplest first: ties go to the earlier
TIE = 0.03  # medians within 3% of the fastest are tied
SLOW = 4.0  # a kernel whose probe call (after the warm-up) takes this many times the fastest's is not timed further
FAMILIES = ("window", "document", "causal", "dense")
DTYPES = ("float32", "bfloat16")
LENGTHS = (1024, 4096)
_FORMAT = 1


def cache_dir() -> Path:
    """Where attnkit keeps its measurements: ``$ATTNKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/attnkit``, else
    ``~/.cache/attnkit``."""
    if os.environ.get("ATTNKIT_CACHE_DIR"):
        return Path(os.environ["ATTNKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "attnkit"


def cache_path() -> Path:
    """The tuning cache: ``tuning.json`` in :func:`cache_dir`."""
    return cache_dir() / "tuning.json"


def this_machine() -> dict[str, str]:
    """What a tuning cache is keyed by: CPU model, torch version and attnkit version."""
    import attnkit

    return {"cpu": cpu_model(), "torch": torch.__version__, "attnkit": attnkit.__version__}


def rank(medians: dict[str, float], tie: float = TIE) -> tuple[str, ...]:
    """Kernels fastest first, where a kernel within ``tie`` (a fraction) of the fastest remaining median counts
    as tied with it and ties go to the simpler kernel (:data:`SIMPLICITY`).

    >>> rank({"native": 10.0, "fused": 10.2, "math": 30.0})
    ('fused', 'native', 'math')
    """
    order, left = [], dict(medians)
    while left:
        best = min(left.values())
        tied = [k for k, ms in left.items() if ms <= best * (1 + tie)]
        pick = min(tied, key=lambda k: SIMPLICITY.index(k) if k in SIMPLICITY else len(SIMPLICITY))
        order.append(pick)
        del left[pick]
    return tuple(order)


@dataclass(frozen=True)
class TunedCase:
    """One measured case: each kernel's median in ms, its first call in s (a compile for ``flex``), and why
    the kernels that were not timed were not."""

    family: str
    dtype: str
    length: int
    medians_ms: dict[str, float]
    first_call_s: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ranking(self) -> tuple[str, ...]:
        return rank(self.medians_ms)

    def describe(self) -> str:
        times = ", ".join(f"{k} {self.medians_ms[k]:.1f} ms" for k in self.ranking)
        return f"{self.family}, {self.dtype}, L={self.length}: {times}"


@dataclass(frozen=True)
class Tuning:
    """A tuner's run: the machine it measured (:func:`this_machine`), when (Unix time), its threads, its cases."""

    machine: dict[str, str]
    created: float
    threads: int
    cases: tuple[TunedCase, ...]

    def find(self, family: str, dtype: str, length: int) -> TunedCase | None:
        """The case of this family and dtype whose length is nearest ``length`` on a log scale (ties: longer)."""
        same = [c for c in self.cases if (c.family, c.dtype) == (family, dtype) and c.medians_ms]
        if not same:
            return None
        return min(same, key=lambda c: (abs(math.log2(c.length / max(length, 1))), -c.length))

    def table(self) -> str:
        """The cases as a text table: the winner, then each kernel's median in ms (``-`` where not timed)."""
        kernels = [k for k in SIMPLICITY if any(k in c.medians_ms for c in self.cases)]
        lines = [f"{'case':<25} {'winner':<7}" + "".join(f"{k:>8}" for k in kernels)]  # 72 columns
        for c in self.cases:
            name = f"{c.family} {c.dtype} L={c.length}"
            winner = c.ranking[0] if c.medians_ms else "-"
            cells = "".join(f"{c.medians_ms[k]:>8.1f}" if k in c.medians_ms else f"{'-':>8}" for k in kernels)
            lines.append(f"{name:<25} {winner:<7}{cells}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"format": _FORMAT, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Tuning:
        data = json.loads(text)
        if data.get("format") != _FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {_FORMAT}")
        cases = tuple(TunedCase(c["family"], c["dtype"], int(c["length"]),
                                {k: float(v) for k, v in c["medians_ms"].items()},
                                {k: float(v) for k, v in c.get("first_call_s", {}).items()},
                                dict(c.get("skipped", {}))) for c in data["cases"])
        for c in cases:  # what auto computes with: a NaN median or a length of 0 would fail inside a user's call
            bad = [f"{k} {ms!r}" for k, ms in c.medians_ms.items() if not (math.isfinite(ms) and ms > 0)]
            if c.length < 1 or bad:
                raise ValueError(f"case {c.family} {c.dtype}: length {c.length} (expected >= 1), medians "
                                 f"{', '.join(bad) or 'fine'} (expected finite ms > 0)")
        return cls(dict(data["machine"]), float(data["created"]), int(data["threads"]), cases)


@dataclass(frozen=True)
class CacheState:
    """The tuning cache as ``auto`` sees it: the usable :class:`Tuning` or None, and a line saying why."""

    path: Path
    tuning: Tuning | None
    note: str

    def describe(self) -> str:
        """The note, with the cache's age when it is used."""
        if self.tuning is None:
            return self.note
        return f"{self.note}, measured {age(self.tuning.created)} ago with {self.tuning.threads} threads"


def age(created: float, now: float | None = None) -> str:
    """How long ago ``created`` (Unix time) was, in the largest whole unit: ``"3 h"``.

    >>> age(0.0, now=7200.0)
    '2 h'
    """
    seconds = max(0.0, (time.time() if now is None else now) - created)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f} {unit}"
    return f"{seconds:.0f} s"


def load_cache() -> CacheState:
    """The tuning cache at :func:`cache_path`, read once per version of the file. A file that cannot be read
    warns once (RuntimeWarning) and is ignored; one made on another CPU, torch or attnkit is ignored."""
    path = cache_path()
    try:
        stat = path.stat()
    except OSError:
        return CacheState(path, None, f"no tuning cache at {path}; `attnkit backends --tune` measures this machine")
    return _read(path, stat.st_mtime_ns, stat.st_size, _machine_key())


@functools.cache
def _machine_key() -> tuple[tuple[str, str], ...]:
    """:func:`this_machine`, read once per process (it reads /proc/cpuinfo: 30-40 us, twice per auto call)."""
    return tuple(sorted(this_machine().items()))


@functools.lru_cache(maxsize=8)
def _read(path: Path, mtime_ns: int, size: int, machine: tuple[tuple[str, str], ...]) -> CacheState:
    try:
        tuning = Tuning.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        warnings.warn(f"attnkit: ignoring the tuning cache {path}: it cannot be read ({type(e).__name__}: {e}); "
                      "`attnkit backends --tune` writes a new one", RuntimeWarning, stacklevel=2)
        return CacheState(path, None, f"tuning cache {path} ignored: it cannot be read ({type(e).__name__})")
    wanted = dict(machine)
    differ = [f"{k} {tuning.machine.get(k)!r} (this is {v!r})" for k, v in wanted.items()
              if tuning.machine.get(k) != v]
    if differ:
        return CacheState(path, None, f"tuning cache {path} ignored: it was measured with another "
                                      f"{', '.join(differ)}; `attnkit backends --tune` measures this machine")
    return CacheState(path, tuning, f"tuning cache {path}")


def check_writable(folder: Path | None = None) -> Path:
    """Make ``folder`` (default :func:`cache_dir`) and check that a file can be written there, before a
    minute-long :func:`tune`; returns it. Raises OSError naming the folder, where it came from and the fix."""
    folder = cache_dir() if folder is None else folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tuning.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        source = "$ATTNKIT_CACHE_DIR" if os.environ.get("ATTNKIT_CACHE_DIR") else "the default cache folder"
        raise OSError(f"cannot write the tuning cache in {folder} ({source}): {e.strerror or e}; set "
                      "ATTNKIT_CACHE_DIR to a folder you can write") from e
    return folder


def save(tuning: Tuning, path: Path | None = None) -> Path:
    """Write ``tuning`` to ``path`` (default :func:`cache_path`) atomically: to a temporary file of its own in the
    same folder, then ``os.replace``, so a reader (or a second ``--tune`` writing at once) sees a whole file,
    the old or the new, never part of one. Returns the path."""
    path = cache_path() if path is None else path
    check_writable(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(tuning.to_json() + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def case_of(call: AttentionCall) -> tuple[str, str, int] | str:
    """The tuned case ``(family, dtype, length)`` a call maps to (see the module's docstring), or why none."""
    from attnkit.functional.tiled.translate import band_form

    if call.q.dtype == torch.float64:
        return "float64 calls are not tuned"
    dtype = "float32" if call.q.dtype == torch.float32 else "bfloat16"
    length = max(call.q_len, call.k_len)
    if call.mask is None:
        return "dense", dtype, length
    form = band_form(call.mask, call.q_len, call.k_len)
    if form is None:
        return f"the mask {call.mask!r} is none of the tuned families (window, document, causal, dense)"
    if form.q_ids is not None:
        return "document", dtype, length
    if bool((form.lo > -(call.k_len - 1)).any()):
        return "window", dtype, length
    if bool((form.hi < call.k_len - 1).any()):
        return "causal", dtype, length
    return "dense", dtype, length


def lookup(call: AttentionCall) -> tuple[TunedCase | None, str]:
    """The tuned case for ``call`` from the cache, or None; and a reason line saying which, or why none."""
    if call.requires_grad:
        return None, "kernel policy: static (the tuning cache times forward passes; this call needs gradients)"
    state = load_cache()  # first: without a cache (one stat), nothing more is computed
    if state.tuning is None:
        return None, f"kernel policy: static ({state.note})"
    case = case_of(call)
    if isinstance(case, str):
        return None, f"kernel policy: static ({case})"
    found = state.tuning.find(*case)
    if found is None:
        return None, f"kernel policy: static (the tuning cache has no {case[0]} {case[1]} case)"
    return found, (f"kernel policy: measured on this machine ({state.path}, {age(state.tuning.created)} old): "
                   f"this {case[0]} {case[1]} call at L={case[2]} is the tuned case {found.describe()}")


def flex_measured_fastest(call: AttentionCall) -> str | None:
    """Why ``auto`` takes compiled Flex for ``call`` on CPU (the cache ranks it first for the call's case), or
    None."""
    found, _ = lookup(call)
    if found is None or found.ranking[0] != "flex":
        return None
    return f"the tuning cache measured compiled Flex fastest for {found.describe()}"


def time_kernels(runners: dict[str, Callable[[], object]], repeats: int = 3,
                 clock: Callable[[], float] = time.perf_counter
                 ) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
    """Time each runner, reading ``clock`` (seconds): its first call (the warm-up: a compile for Flex, JIT
    kernels and caches for the others), then one probe call each, then ``repeats`` calls interleaved with the
    others. A kernel whose probe takes more than :data:`SLOW` times the fastest probe cannot win and is not
    timed further. Returns the medians, the first calls, and the kernels dropped after their probe, with why."""
    first = {name: _seconds(fn, clock) for name, fn in runners.items()}
    probe = {name: _seconds(fn, clock) for name, fn in runners.items()}
    fastest = min(probe.values(), default=0.0)
    dropped = {k: f"its probe call took {s / fastest:.1f}x the fastest's: not timed further"
               for k, s in probe.items() if fastest > 0 and s > SLOW * fastest}
    kept = {k: fn for k, fn in runners.items() if k not in dropped}
    return interleaved_median_seconds(kept, repeats, warmup=0, clock=clock), first, dropped


def _seconds(fn: Callable[[], object], clock: Callable[[], float]) -> float:
    start = clock()
    fn()
    return clock() - start


def _runners(family: str, dtype: str, length: int, kernels: Sequence[str], heads: int,
             head_dim: int) -> tuple[dict[str, Callable[[], object]], dict[str, str]]:
    """A call per kernel for one case, and why each kernel left out cannot run it here."""
    import attnkit
    from attnkit.bench.cases import make_problem
    from attnkit.functional.tiled import native

    p = make_problem(family, length, heads=heads, kv_heads=heads, head_dim=head_dim, dtype=getattr(torch, dtype))
    args: dict[str, Any] = dict(mask=p.mask, bias=p.bias)
    runners: dict[str, Callable[[], object]] = {}
    skipped = {}
    for name in kernels:
        if name == "native" and not (native.available() or (native.disabled() is None and native.cached())):
            skipped[name] = f"{native.native_status()} (`attnkit backends --build-native` builds it)"
            continue
        backend = "flex" if name == "flex" else "tiled"
        try:
            with _pin(name):
                plan = attnkit.explain_call(p.q, p.k, p.v, backend=backend, **args)
        except ValueError as e:
            skipped[name] = str(e)
            continue
        if plan.tiled is not None and plan.tiled.forward != name:
            skipped[name] = f"it runs as {plan.tiled.forward} on this case"
            continue
        runners[name] = functools.partial(_pinned, name, backend, p.q, p.k, p.v, args)
    return runners, skipped


def _pin(name: str) -> AbstractContextManager[object]:
    """The tiled kernel ``name`` pinned; nothing for ``flex``, a backend of its own."""
    from attnkit.functional import tiled

    return contextlib.nullcontext() if name == "flex" else tiled.kernel(name)


def _pinned(name: str, backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            args: dict[str, Any]) -> None:
    import attnkit

    with torch.no_grad(), _pin(name):
        attnkit.attention(q, k, v, backend=backend, **args)


def tune(families: Sequence[str] = FAMILIES, dtypes: Sequence[str] = DTYPES, lengths: Sequence[int] = LENGTHS,
         *, kernels: Sequence[str] = SIMPLICITY, repeats: int = 3, heads: int = 8, head_dim: int = 64,
         progress: Callable[[str, int, int], None] | None = None,
         clock: Callable[[], float] = time.perf_counter) -> Tuning:
    """Time each kernel on every (family, dtype, length) case on this machine; returns the :class:`Tuning`
    (:func:`save` writes it where ``auto`` reads it).

    Each case is a benchmark problem (:func:`attnkit.bench.cases.make_problem`: B=1, H=Hkv=``heads``,
    D=``head_dim``, window 512, 8 causal documents), forward only. Every kernel that runs the case runs once as
    warm-up (Flex compiles there, once per shape), then ``repeats`` times interleaved with the others
    (:func:`time_kernels`); the medians decide. ``progress(description, done, total)`` is called before
    each case and at the end. Before each case that times Flex it resets ``torch.compile``'s caches
    (:func:`attnkit.functional.flex.reset_compiles`): sixteen shapes would pass dynamo's recompile limit,
    past which Flex runs eager and materialises the scores.

    >>> t = tune(["window"], ["float32"], [256], kernels=["math", "fused"], repeats=1)  # doctest: +SKIP
    >>> t.cases[0].ranking  # doctest: +SKIP
    ('fused', 'math')
    """
    grid = [(family, dtype, length) for dtype in dtypes for length in lengths for family in families]
    cases = []
    for n, (family, dtype, length) in enumerate(grid):
        if progress is not None:
            progress(f"{family} {dtype} L={length}", n, len(grid))
        runners, skipped = _runners(family, dtype, length, kernels, heads, head_dim)
        if "flex" in runners:  # each case compiles Flex afresh: past dynamo's recompile limit it would run eager
            flex.reset_compiles()
        medians, first, dropped = time_kernels(runners, repeats, clock)
        cases.append(TunedCase(family, dtype, length, {k: 1e3 * s for k, s in medians.items()}, first,
                               {**skipped, **dropped}))
    if progress is not None:
        progress("done", len(grid), len(grid))
    return Tuning(this_machine(), time.time(), torch.get_num_threads(), tuple(cases))
