"""Run the cases on attnkit's backends and on the peers, side by side in one process.

Every implementation of a (case, length) is first run once and checked against
attnkit's output (and gradients with ``backward``); only those that agree are timed,
interleaved, median of ``repeats``. Peak memory is measured afterwards, one call at a
time, so that the timing runs keep the allocator's normal behaviour.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

import attnkit
from attnkit._checks import require_int, require_real
from attnkit._timing import interleaved_median_seconds, machine, matmul_gflops, peak_memory_mib
from attnkit.bench.cases import CASES, DEFAULT_CASES, Problem, make_problem
from attnkit.bench.load import background_load

__all__ = ["BACKENDS", "PEERS", "BenchResult", "Row", "run"]

BACKENDS = ("auto", "tiled", "reference")
PEERS = {
    "sdpa": "torch.nn.functional.scaled_dot_product_attention: native flags where they fit, else a dense mask/bias",
    "flex": "FlexAttention compiled with torch.compile (compile time reported apart)",
    "naive": "eager matmul-softmax-matmul with a dense additive mask, as in many model files",
}
_MATERIALISING = {"attnkit:reference", "naive"}


@dataclass
class Row:
    """One implementation on one case at one length."""

    case: str
    length: int
    impl: str  # "attnkit:<backend>" or a peer name
    status: str  # ok | wrong | failed | skipped | unchecked (no attnkit output to check against)
    ms: float | None = None
    peak_mib: float | None = None
    gflops: float | None = None
    pct_of_matmul: float | None = None
    max_err: float | None = None
    compile_s: float | None = None  # FlexAttention: first call minus a timed call
    note: str = ""
    loaded_ms: float | None = None  # with ``load`` background processes running
    slowdown: float | None = None  # loaded_ms / ms


@dataclass
class BenchResult:
    """All rows of a run, with the machine, settings and matmul yardstick."""

    machine: str
    settings: dict
    matmul_gflops: float
    rows: list[Row] = field(default_factory=list)

    def row(self, case: str, length: int, impl: str) -> Row | None:
        return next((r for r in self.rows if (r.case, r.length, r.impl) == (case, length, impl)), None)

    def speedups(self, case: str, length: int, impl: str) -> dict[str, float]:
        """Peer time / this implementation's time, for each peer that ran correctly."""
        mine = self.row(case, length, impl)
        if mine is None or mine.status != "ok":
            return {}
        out = {}
        for peer in self.settings["peers"]:
            theirs = self.row(case, length, peer)
            if theirs is not None and theirs.status == "ok":
                out[peer] = theirs.ms / mine.ms  # type: ignore[operator]
        return out

    def exponent(self, case: str, impl: str) -> float | None:
        """Least-squares slope of log(time) against log(length): ~2 dense, ~1 for a window."""
        pts = [(math.log(r.length), math.log(r.ms)) for r in self.rows
               if r.case == case and r.impl == impl and r.status == "ok" and r.ms]
        if len(pts) < 2:
            return None
        mx = sum(x for x, _ in pts) / len(pts)
        my = sum(y for _, y in pts) / len(pts)
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else None

    def impls(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.rows:
            seen.setdefault(r.impl, None)
        return list(seen)

    def to_dict(self) -> dict:
        cases = list(dict.fromkeys(r.case for r in self.rows))
        return {"machine": self.machine, "settings": self.settings, "matmul_gflops": self.matmul_gflops,
                "rows": [asdict(r) for r in self.rows],
                "speedups": [{"case": r.case, "length": r.length, "impl": r.impl,
                              **self.speedups(r.case, r.length, r.impl)}
                             for r in self.rows if r.impl.startswith("attnkit:")],
                "exponents": {c: {i: self.exponent(c, i) for i in self.impls()} for c in cases}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _repeat_kv(t: Tensor, groups: int) -> Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _naive(p: Problem) -> Callable[[], Tensor]:
    """The eager attention of many model files: scores, add the mask, softmax in fp32, matmul."""
    additive = p.additive_mask()
    groups = p.q.shape[1] // p.k.shape[1]
    scale = p.q.shape[-1] ** -0.5
    softmax_dtype = torch.float64 if p.q.dtype == torch.float64 else torch.float32

    def run() -> Tensor:
        k, v = _repeat_kv(p.k, groups), _repeat_kv(p.v, groups)
        scores = torch.matmul(p.q, k.transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
        if additive is not None:
            scores = scores + additive
        probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(p.q.dtype)
        return torch.matmul(probs, v)

    return run


def _sdpa(p: Problem) -> tuple[Callable[[], Tensor], str]:
    """SDPA with its native options where the case has them, else the dense mask or bias."""
    if p.dense_bias is None and (p.sdpa_native or p.dense_mask is None):
        kwargs = dict(p.sdpa_native)
        return (lambda: F.scaled_dot_product_attention(p.q, p.k, p.v, **kwargs),
                "native " + ", ".join(kwargs) if kwargs else "no mask")
    attn_mask = p.additive_mask() if p.dense_bias is not None else p.dense_mask()  # type: ignore[misc]
    gqa = {"enable_gqa": True} if p.q.shape[1] != p.k.shape[1] else {}
    return (lambda: F.scaled_dot_product_attention(p.q, p.k, p.v, attn_mask=attn_mask, **gqa),
            "dense float mask+bias" if p.dense_bias is not None else "dense bool mask")


class _Flex:
    """FlexAttention, compiled afresh per problem so that its compile time is its own."""

    def __init__(self) -> None:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self.create_block_mask, self.flex_attention = create_block_mask, flex_attention

    def prepare(self, p: Problem) -> tuple[Callable[[], Tensor], float, str]:
        torch._dynamo.reset()
        _, h, hkv, lq, lk, _ = p.shape
        start = time.perf_counter()
        block_mask = None
        if p.mask_mod is not None:
            block_mask = self.create_block_mask(p.mask_mod, None, None, lq, lk, device=str(p.q.device))
        build_s = time.perf_counter() - start
        compiled = torch.compile(self.flex_attention, dynamic=False)
        return (lambda: compiled(p.q, p.k, p.v, block_mask=block_mask, score_mod=p.score_mod, enable_gqa=h != hkv),
                build_s, "block mask" if block_mask is not None else "")


def _agrees(got: Tensor, expected: Tensor) -> tuple[bool, float]:
    """Whether ``got`` matches attnkit's ``expected`` to the input dtype's precision, relative
    to the largest expected value, and the max absolute error."""
    rtol = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 4e-3}.get(expected.dtype, 3e-2)
    err = float((got.double() - expected.double()).abs().max()) if got.numel() else 0.0
    scale = float(expected.double().abs().max()) if expected.numel() else 0.0
    return math.isfinite(err) and got.shape == expected.shape and err <= rtol * max(1.0, scale), err


def run(cases: Sequence[str] = DEFAULT_CASES, lengths: Sequence[int] = (1024, 2048, 4096), *,
        backends: Sequence[str] = BACKENDS, peers: Sequence[str] = tuple(PEERS), backward: bool = False,
        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", batch: int = 1,
        heads: int = 8, kv_heads: int = 2, head_dim: int = 64, window: int = 512, repeats: int = 5,
        memory: bool = True, max_dense_gib: float = 4.0, load: int = 0, load_seconds: float = 1800.0,
        progress: Callable[[str, int, int], None] | None = None) -> BenchResult:
    """Time and check every (case, length, implementation).

    Args:
        cases: keys of :data:`attnkit.bench.cases.CASES`.
        lengths: sequence lengths L (queries and keys, except for ``cross`` and ``decode``).
        backends: attnkit backends to time: ``auto``, ``tiled``, ``reference``.
        peers: any of ``sdpa``, ``flex``, ``naive``.
        backward: time forward + backward (gradients of q, k, v) instead of forward only.
        max_dense_gib: implementations that hold (B, H, Lq, Lk) float32 scores (the reference
            backend, naive) or a dense float bias (SDPA with ALiBi) are skipped, and say so,
            past this size.
        repeats: timed calls per implementation, interleaved; the median is reported.
        memory: also measure each implementation's peak memory (one more call each).
        load: after the idle run, time everything again with this many background loads
            (:func:`attnkit.bench.load.background_load`: spin and 2-thread matmul, alternating)
            and report each row's ``loaded_ms`` and ``slowdown`` (loaded / idle).
        load_seconds: deadline of each load process; they are killed when the run ends anyway.
        progress: called with (description, done, total) as the run advances.

    Returns a :class:`BenchResult`.
    """
    device = torch.device(device)
    _check_run_args(cases, lengths, backends, peers, dtype, max_dense_gib, batch=batch, heads=heads,
                    kv_heads=kv_heads, head_dim=head_dim, window=window, repeats=repeats)
    load = require_int("load", load, minimum=0)
    flex: _Flex | ImportError | None = None
    settings = {"cases": list(cases), "lengths": list(lengths), "backends": list(backends), "peers": list(peers),
                "backward": backward, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
                "batch": batch, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "window": window,
                "repeats": repeats, "load": load}
    result = BenchResult(machine(), settings, matmul_gflops(device))
    if "flex" in peers:
        try:
            flex = _Flex()
        except ImportError as err:  # torch < 2.5
            flex = err
    shared = _Settings(tuple(backends), tuple(peers), backward, dtype, device, batch, heads, kv_heads, head_dim,
                       window, repeats, max_dense_gib, result.matmul_gflops, flex)
    total, done = len(cases) * len(lengths) * (2 if load else 1), 0

    def one_pass(label: str, with_memory: bool) -> list[Row]:
        nonlocal done
        rows = []
        for case in cases:
            for length in lengths:
                if progress:
                    progress(f"{case} L={length}{label}", done, total)
                rows.extend(_run_one(case, length, shared, with_memory))
                done += 1
        return rows

    result.rows = one_pass("", memory)
    if load:
        with background_load(load, load_seconds):
            loaded = {(r.case, r.length, r.impl): r for r in one_pass(f" under load {load}", False)}
        for r in result.rows:
            other = loaded.get((r.case, r.length, r.impl))
            if r.ms is not None and other is not None and other.ms is not None:
                r.loaded_ms, r.slowdown = other.ms, other.ms / r.ms
    if progress:
        progress("done", done, total)
    return result


def _check_run_args(cases: Sequence[str], lengths: Sequence[int], backends: Sequence[str], peers: Sequence[str],
                    dtype: torch.dtype, max_dense_gib: float, **sizes: int) -> None:
    for name, given, allowed in (("cases", cases, CASES), ("backends", backends, BACKENDS), ("peers", peers, PEERS)):
        bad = [x for x in given if x not in allowed]
        if bad:
            raise ValueError(f"{name}: unknown {bad}; expected any of {', '.join(allowed)}")
    if not cases or not lengths or not backends:
        raise ValueError("cases, lengths and backends must each name at least one entry")
    if any(not isinstance(n, int) or n < 1 for n in lengths):
        raise ValueError(f"lengths must be positive integers; got {list(lengths)}")
    for name, value in sizes.items():
        require_int(name, value, minimum=1)
    if sizes["heads"] % sizes["kv_heads"]:
        raise ValueError(f"heads ({sizes['heads']}) must be a multiple of kv_heads ({sizes['kv_heads']})")
    if require_real("max_dense_gib", max_dense_gib) < 0:
        raise ValueError(f"max_dense_gib must be >= 0; got {max_dense_gib}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating point dtype; got {dtype}")


@dataclass(frozen=True)
class _Settings:
    """What every case of one :func:`run` shares."""

    backends: Sequence[str]
    peers: Sequence[str]
    backward: bool
    dtype: torch.dtype
    device: torch.device
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    window: int
    repeats: int
    max_dense_gib: float
    peak_gflops: float  # the matmul yardstick, for % of matmul
    flex: _Flex | ImportError | None


def _run_one(case: str, length: int, settings: _Settings, memory: bool) -> list[Row]:
    """One case at one length: every implementation built and run once, checked against attnkit's first output,
    then timed interleaved, then (``memory``) its peak memory measured. A peer that cannot run is reported."""
    one = _Case(case, length, settings)
    impls = list(one.builders) + (["flex"] if "flex" in settings.peers else [])
    for impl in impls:
        one.first_run(impl)
    one.time()
    if memory:
        one.measure_memory()
    return [one.rows[i] for i in impls]


class _Case:
    """The state of :func:`_run_one`: the problem, each implementation's row, and the calls to time."""

    def __init__(self, case: str, length: int, settings: _Settings):
        s = self.settings = settings
        self.p = p = make_problem(case, length, batch=s.batch, heads=s.heads, kv_heads=s.kv_heads,
                                  head_dim=s.head_dim, window=s.window, dtype=s.dtype, device=s.device,
                                  requires_grad=s.backward)
        self.grad_out = torch.randn((*p.q.shape[:-1], p.v.shape[-1]), generator=torch.Generator().manual_seed(1)).to(
            device=s.device, dtype=s.dtype)
        self.builders: dict[str, Callable[[], tuple[Callable[[], Tensor], str]]] = {}
        for b in s.backends:
            self.builders[f"attnkit:{b}"] = partial(self._ours, b)
        if "sdpa" in s.peers:
            self.builders["sdpa"] = lambda: _sdpa(p)
        if "naive" in s.peers:
            self.builders["naive"] = lambda: (_naive(p), "dense additive mask" if p.mask or p.bias else "")
        self.rows: dict[str, Row] = {}
        self.calls: dict[str, Callable[[], object]] = {}
        self.expected: tuple[Tensor, ...] | None = None

    def _ours(self, backend: str) -> tuple[Callable[[], Tensor], str]:
        p = self.p
        return (lambda: attnkit.attention(p.q, p.k, p.v, mask=p.mask, bias=p.bias, backend=backend)), ""

    def step(self, fn: Callable[[], Tensor]) -> Callable[[], tuple[Tensor, ...]]:
        """One timed call: ``fn``'s output, and with ``backward`` the gradients of q, k and v."""
        p, device = self.p, self.settings.device

        def go() -> tuple[Tensor, ...]:
            out = fn()
            result: tuple[Tensor, ...]
            if self.settings.backward:
                for t in (p.q, p.k, p.v):
                    t.grad = None
                out.backward(self.grad_out)
                dq, dk, dv = p.q.grad, p.k.grad, p.v.grad
                assert dq is not None and dk is not None and dv is not None  # the problem's inputs require grad
                result = (out.detach(), dq, dk, dv)
            else:
                result = (out,)
            _sync(device)
            return result
        return go

    def first_run(self, impl: str) -> None:
        """Build ``impl``, run it once and check it; a checked one joins the calls to time."""
        row = self.rows[impl] = Row(self.p.case, self.p.length, impl, "ok")
        needs_dense = impl in _MATERIALISING or (impl == "sdpa" and self.p.dense_bias is not None)
        if needs_dense and self.p.dense_bytes() > self.settings.max_dense_gib * 2**30:
            row.status = "skipped"
            row.note = f"needs {self.p.dense_bytes() / 2**30:.1f} GiB of dense scores/bias > max_dense_gib"
            return
        try:
            fn, outs = self._flex(row) if impl == "flex" else self._built(impl, row)
        except _Skip as skip:
            row.status, row.note = "skipped", str(skip)
            return
        except Exception as err:  # a peer that cannot run this case is reported, not timed
            row.status = "failed"
            row.note = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
            return
        self._check(row, outs)
        if row.status == "ok":
            self.calls[impl] = self.step(fn)

    def _built(self, impl: str, row: Row) -> tuple[Callable[[], Tensor], tuple[Tensor, ...]]:
        fn, row.note = self.builders[impl]()
        return fn, self.step(fn)()

    def _flex(self, row: Row) -> tuple[Callable[[], Tensor], tuple[Tensor, ...]]:
        flex = self.settings.flex
        if isinstance(flex, Exception):
            raise flex
        assert flex is not None  # run() sets it whenever "flex" is in peers
        if self.settings.backward and self.settings.device.type == "cpu":
            raise _Skip("FlexAttention has no CPU backward")
        fn, build_s, note = flex.prepare(self.p)
        start = time.perf_counter()
        outs = self.step(fn)()
        row.compile_s = time.perf_counter() - start  # the first call; less one steady call in time()
        row.note = f"{note}, built in {build_s * 1e3:.0f} ms".lstrip(", ")
        return fn, outs

    def _check(self, row: Row, outs: tuple[Tensor, ...]) -> None:
        """Against the first attnkit output (the yardstick): max error, and "wrong" where it disagrees."""
        if self.expected is None:
            if row.impl.startswith("attnkit:"):  # only attnkit's output is the yardstick
                self.expected = tuple(t.detach().clone() for t in outs)
            else:
                row.status, row.note = "unchecked", "no attnkit backend ran to check it against"
            return
        checks = [_agrees(a, e) for a, e in zip(outs, self.expected)]
        row.max_err = max(err for _, err in checks)
        if not all(ok for ok, _ in checks):
            row.status = "wrong"

    def time(self) -> None:
        """Interleaved medians of the checked calls; FLOP/s and % of the matmul yardstick."""
        times = interleaved_median_seconds(self.calls, self.settings.repeats, warmup=1) if self.calls else {}
        work = 4 * self.p.pairs * self.p.q.shape[-1] * (3.5 if self.settings.backward else 1.0)  # bwd ~ 2.5x fwd
        for impl, seconds in times.items():
            row = self.rows[impl]
            row.ms = 1e3 * seconds
            row.gflops = work / seconds / 1e9
            row.pct_of_matmul = 100 * row.gflops / self.settings.peak_gflops
            if row.compile_s is not None:
                row.compile_s = max(0.0, row.compile_s - seconds)

    def measure_memory(self) -> None:
        """Each timed call's peak memory growth; SDPA's and eager's dense masks are built inside the call."""
        device = self.settings.device
        for impl in list(self.calls):
            if impl in ("sdpa", "naive"):
                # their dense mask is built inside the measured call: they need it, attnkit does not
                del self.calls[impl]  # and the copy built for the timing is freed first

                def call(impl: str = impl) -> object:
                    return self.step(self.builders[impl]()[0])()

                self.rows[impl].peak_mib = peak_memory_mib(call, device)
            else:
                self.rows[impl].peak_mib = peak_memory_mib(self.calls[impl], device)


class _Skip(Exception):
    """An implementation that does not run this case, with the reason (reported as "skipped")."""


def print_progress(description: str, done: int, total: int) -> None:
    """A plain progress line on stderr, for when rich is not installed."""
    print(f"[{done}/{total}] {description}", file=sys.stderr, flush=True)
