"""``with attnkit.monitor() as m:``: one record per attention call of any code that runs
Hugging Face models or attnkit modules inside the block.

While the block runs (and only then; nothing is installed outside it):

- attnkit: :class:`~attnkit.nn.MultiHeadAttention.forward` and the :func:`attnkit.attention`
  it calls are wrapped, so that each call is timed and knows its module and KV cache.
- Hugging Face: the attention functions transformers hands out are wrapped
  (:func:`attnkit.integrations.tap.wrap_attention_functions`), for models loaded with any
  implementation that goes through its attention interface (eager, sdpa, attnkit, ...).
  Only when transformers was imported before the block starts.
- Every outermost module call that makes attention calls is a *step* (a forward; one per
  generated token under ``generate``): its wall time against its context length, the most
  keys any of its attention calls saw. Steps come from torch's global module hooks.

Records from any thread go to the same monitor, under a lock. Blocks do not nest
(RuntimeError). While a block watches transformers models it holds the lock that
:func:`attnkit.inspect.capture` takes to patch transformers, so a capture started in another
thread waits for the block to end (in the same thread, it runs inside it). The KV-cache length is the
keys a call saw beyond its queries (``Lk - Lq``) when the call used a cache (attnkit) or had
more keys than queries (transformers); else None. On CUDA, times are wall times without
synchronizing (the launch cost), unless ``synchronize=True``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from attnkit.nn import attention as attention_module
from attnkit.nn.attention import MultiHeadAttention

SUPERLINEAR = 1.25  # a log-log slope of step latency against context above this is "faster than linear"


@dataclass(frozen=True)
class Call:
    """One attention call. ``seconds``: the attention function alone."""

    module: str
    layer: int | None
    implementation: str
    batch: int
    heads: int
    kv_heads: int
    query_length: int
    key_length: int
    cache_length: int | None
    seconds: float
    thread: int
    step: int | None


@dataclass(frozen=True)
class Step:
    """One outermost forward that made attention calls."""

    index: int
    context_length: int
    query_length: int
    seconds: float
    attention_seconds: float
    calls: int


class Monitor:
    """What :func:`monitor` recorded: ``calls`` and ``steps``, in the order they ended."""

    def __init__(self, synchronize: bool = False) -> None:
        self.calls: list[Call] = []
        self.steps: list[Step] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._sync = torch.cuda.synchronize if synchronize and torch.cuda.is_available() else None
        self.seconds = 0.0  # wall time of the block

    # -- recording ------------------------------------------------------------------------------

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()

    def _state(self) -> Any:
        s = self._local
        if not hasattr(s, "depth"):
            s.depth, s.modules, s.step_calls, s.step_attention, s.step_keys, s.step_queries = 0, [], 0, 0.0, 0, 0
        return s

    def _record(self, module: Any, layer: int | None, implementation: str, q: torch.Tensor, k: torch.Tensor,
                cached: bool, seconds: float) -> None:
        s = self._state()
        lq, lk = q.shape[-2], k.shape[-2]
        call = Call(module=type(module).__name__, layer=layer, implementation=implementation, batch=q.shape[0],
                    heads=q.shape[1], kv_heads=k.shape[1], query_length=lq, key_length=lk,
                    cache_length=lk - lq if cached else None, seconds=seconds, thread=threading.get_ident(),
                    step=None)
        s.step_calls += 1
        s.step_attention += seconds
        s.step_keys, s.step_queries = max(s.step_keys, lk), max(s.step_queries, lq)
        with self._lock:
            self.calls.append(call)
            s.pending = [*getattr(s, "pending", []), len(self.calls) - 1]

    def _enter_module(self, module: nn.Module, *_: Any) -> None:
        s = self._state()
        if s.depth == 0:
            s.step_start, s.step_calls, s.step_attention, s.step_keys, s.step_queries = self._now(), 0, 0.0, 0, 0
            s.pending = []
        s.depth += 1

    def _leave_module(self, module: nn.Module, *_: Any) -> None:
        s = self._state()
        s.depth -= 1
        if s.depth == 0 and s.step_calls:
            seconds = self._now() - s.step_start
            with self._lock:
                index = len(self.steps)
                self.steps.append(Step(index, s.step_keys, s.step_queries, seconds, s.step_attention, s.step_calls))
                for i in s.pending:
                    self.calls[i] = Call(**{**asdict(self.calls[i]), "step": index})

    # -- results --------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Attention latency percentiles (ms) per context-length bucket (keys, rounded up to a
        power of 2), the share of the steps' time (else the block's) spent in attention, and
        ``superlinear_from``: the context length from which step latency grows faster than
        linearly (a log-log slope over 1.25 between successive buckets), or None."""
        buckets: dict[int, list[float]] = {}
        for c in self.calls:
            buckets.setdefault(_bucket(c.key_length), []).append(c.seconds * 1e3)
        attention = sum(c.seconds for c in self.calls)
        whole = sum(s.seconds for s in self.steps) or self.seconds
        return {
            "calls": len(self.calls), "steps": len(self.steps),
            "attention_share": attention / whole if whole else None,
            "buckets": {str(b): {"calls": len(v), "p50_ms": _pct(v, 50), "p90_ms": _pct(v, 90), "p99_ms": _pct(v, 99)}
                        for b, v in sorted(buckets.items())},
            "superlinear_from": self.superlinear_from(),
        }

    def superlinear_from(self) -> int | None:
        """The first context bucket after which the median step latency grows faster than linearly."""
        by: dict[int, list[float]] = {}
        for s in self.steps:
            by.setdefault(_bucket(s.context_length), []).append(s.seconds)
        points = [(b, statistics.median(v)) for b, v in sorted(by.items())]
        for (x0, y0), (x1, y1) in itertools.pairwise(points):
            if y0 > 0 and y1 > 0 and math.log(y1 / y0) / math.log(x1 / x0) > SUPERLINEAR:
                return x0
        return None

    def to_jsonl(self, path_or_file: str | Path | IO[str]) -> None:
        """Write one JSON object per attention call (the fields of :class:`Call`)."""
        with contextlib.ExitStack() as stack:
            f = path_or_file if hasattr(path_or_file, "write") else stack.enter_context(open(path_or_file, "w"))
            for c in list(self.calls):
                f.write(json.dumps(asdict(c)) + "\n")

    def plot(self, path: str | Path) -> str:
        """A PNG: attention call latency, and step latency, against context length."""
        from attnkit._plot import pyplot

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.5, 4))
        ax.scatter([c.key_length for c in self.calls], [c.seconds * 1e3 for c in self.calls], s=6, label="attention")
        if self.steps:
            ax.scatter([s.context_length for s in self.steps], [s.seconds * 1e3 for s in self.steps], s=10,
                       marker="x", label="step (forward)")
        flagged = self.superlinear_from()
        if flagged is not None:
            ax.axvline(flagged, color="red", linestyle="--", label=f"faster than linear from {flagged}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (keys)")
        ax.set_ylabel("ms")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return str(path)


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pct(values: list[float], q: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


@contextlib.contextmanager
def monitor(*, synchronize: bool = False) -> Iterator[Monitor]:
    """Record every attention call made inside the block; see this module's docstring.

    >>> import torch, attnkit
    >>> from attnkit.nn import TransformerConfig, TransformerLM
    >>> lm = TransformerLM(TransformerConfig(vocab_size=50, dim=32, depth=3, num_heads=4))
    >>> with attnkit.monitor() as m:
    ...     _ = lm(torch.randint(0, 50, (1, 8)))
    >>> len(m.calls), m.calls[0].query_length, len(m.steps)
    (3, 8, 1)
    """
    m = Monitor(synchronize)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.callback(_patch_attnkit(m))
        if "transformers" in sys.modules:
            from attnkit.integrations.tap import wrap_attention_functions

            stack.enter_context(wrap_attention_functions(nn.Module(), lambda fn: _hf_wrapper(m, fn),
                                                            kind="monitor"))
        stack.enter_context(torch.nn.modules.module.register_module_forward_pre_hook(m._enter_module))
        stack.enter_context(torch.nn.modules.module.register_module_forward_hook(m._leave_module, always_call=True))
        try:
            yield m
        finally:
            m.seconds = time.perf_counter() - started


_ATTNKIT_LOCK = threading.Lock()


def _patch_attnkit(m: Monitor) -> Callable[[], None]:
    """Wrap MultiHeadAttention.forward and the attention it calls; return the undo."""
    original_forward, original_attention = MultiHeadAttention.forward, attention_module.attention

    def forward(self: MultiHeadAttention, *args: Any, **kwargs: Any) -> Any:
        s = m._state()
        s.modules.append((self, kwargs.get("cache") is not None))
        try:
            return original_forward(self, *args, **kwargs)
        finally:
            s.modules.pop()

    def attention(q: torch.Tensor, k: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        s = m._state()
        start = m._now()
        out = original_attention(q, k, *args, **kwargs)
        seconds = m._now() - start
        module, cached = s.modules[-1] if s.modules else (None, False)
        m._record(module, getattr(module, "layer_index", None), f"attnkit:{kwargs.get('backend', 'auto')}", q, k,
                  cached, seconds)
        return out

    with _ATTNKIT_LOCK:
        if getattr(MultiHeadAttention.forward, "_attnkit_monitor", False):
            raise RuntimeError("attnkit.monitor() blocks cannot nest; use one monitor")
        forward._attnkit_monitor = True  # type: ignore[attr-defined]
        MultiHeadAttention.forward = forward  # type: ignore[method-assign]
        attention_module.attention = attention

    def undo() -> None:
        with _ATTNKIT_LOCK:
            MultiHeadAttention.forward = original_forward  # type: ignore[method-assign]
            attention_module.attention = original_attention

    return undo


def _hf_wrapper(m: Monitor, fn: Callable[..., Any]) -> Callable[..., Any]:
    def monitored(*args: Any, **kwargs: Any) -> Any:
        module = args[0] if args else kwargs.get("module")
        q = args[1] if len(args) > 1 else kwargs["query"]
        k = args[2] if len(args) > 2 else kwargs["key"]
        start = m._now()
        out = fn(*args, **kwargs)
        seconds = m._now() - start
        config = getattr(module, "config", None)
        implementation = str(getattr(config, "_attn_implementation", None) or getattr(fn, "__name__", "?"))
        m._record(module, getattr(module, "layer_idx", None), implementation, q, k, k.shape[-2] > q.shape[-2],
                  seconds)
        return out
    return monitored
