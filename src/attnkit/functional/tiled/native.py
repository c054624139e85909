"""The optional native kernel: a C++ forward and backward built once, cached, never required.

``csrc/attention.cpp`` runs one parallel loop over (batch, head, query block) work items
with block GEMMs (oneDNN's micro-kernels for float32) and an online softmax, masking only
the blocks on a mask's edge, arithmetically (see :func:`.plan.native_params` for the masks
it understands). bfloat16 and float16 inputs run their block GEMMs in that dtype with fp32
accumulation where the CPU has the units for it (AMX, AVX512-BF16, AVX512-FP16: oneDNN
picks the micro-kernel), and in float32 elsewhere; :func:`low_precision_path` says which,
and why. The softmax statistics are fp32 either way, and the output has the input's dtype.

It is compiled with :func:`torch.utils.cpp_extension.load` and cached in torch's extension
folder (``TORCH_EXTENSIONS_DIR``) under a name that carries a hash of the source, the flags
and the torch version, so a stale build is never loaded.

When it is used:

* ``tiled.kernel("native")``, :func:`load`, or ``attnkit backends --build-native`` build
  it if needed (about a minute on 2 cores) and use it;
* ``kernel("auto")`` (the default) uses it for the calls where it measured fastest
  (:func:`.strategy.choose`) once a build is cached, loading it in well under a second,
  and never starts a compile by itself unless ``ATTNKIT_NATIVE=1`` asks it to.

It is never required. Without a compiler or ninja, or if the build fails, or with
``ATTNKIT_NATIVE=0`` in the environment, the pure-PyTorch paths run; the reason is logged
once at debug level and :func:`native_status` says it. A failed build is not retried in
the same process.

The backward is native too, FlashAttention-2 style: one parallel loop over (batch, kv
head, key block) work items that recomputes the probabilities from the forward's ``lse``
(five block GEMMs per block pair, in float32 or float64 whatever the forward's dtype), so
its extra memory is O(L): transposed copies of q, k and dO, and dq's float accumulator.
dq is summed under a lock per query block; under ``torch.use_deterministic_algorithms(True)``
in key-block order whatever the threads' schedule, so the gradients are the same bits on
every run and at every thread count.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

_LOG = logging.getLogger("attnkit.native")
_SOURCE = Path(__file__).with_name("csrc") / "attention.cpp"
# at::parallel_for is a header template: without -fopenmp its OpenMP branch compiles out and every "parallel" loop
# runs on the calling thread. On Linux the extension's libgomp.so.1 resolves to the one torch ships and has loaded,
# so it shares torch's thread pool and torch.set_num_threads.
_OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []
_CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-std=c++17", *_OPENMP]

BLOCK_Q = 64  # query rows per work item
BLOCK_K = 64  # keys per block GEMM (key blocks start at multiples of it); see docs/core.md for the sweep

_lock = threading.Lock()
_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")
_state: dict[str, object] = {"module": None, "reason": "not built yet", "tried": False}


def _setting() -> str:
    return os.environ.get("ATTNKIT_NATIVE", "").strip().lower()


def disabled() -> str | None:
    """Why the native kernel is switched off (``ATTNKIT_NATIVE=0``), or None."""
    if _setting() in _OFF:
        return "disabled by ATTNKIT_NATIVE=0"
    return None


def build_wanted() -> bool:
    """Whether ``kernel("auto")`` may start a build by itself (``ATTNKIT_NATIVE=1``)."""
    return _setting() in _ON


@functools.cache
def _name() -> str:
    """The extension's name: a hash of the source, the flags, torch and Python, so an edit or an upgrade rebuilds."""
    key = b"\0".join([_SOURCE.read_bytes(), " ".join(_CFLAGS).encode(), torch.__version__.encode(),
                      sys.version.encode()])
    return "attnkit_native_" + hashlib.sha256(key).hexdigest()[:16]


@functools.cache
def _folder() -> Path | None:
    """The build's folder in torch's extension folder (torch creates it), looked up once per process."""
    try:
        from torch.utils import cpp_extension

        return Path(cpp_extension._get_build_directory(_name(), verbose=False))
    except Exception:  # a private helper of torch's: if it moves, say no and let the caller build
        return None


def cached() -> bool:
    """Whether a finished build for this source, these flags and this torch is in the extension folder."""
    folder = _folder()
    return folder is not None and (folder / f"{_name()}.so").is_file() and not (folder / "lock").exists()


def load(build: bool = True) -> ModuleType | None:
    """The compiled extension; None if unavailable (see :func:`native_status`).

    With ``build=False`` it is only loaded from a cached build (:func:`cached`), never
    compiled; a missing cache is not remembered as a failure. Thread-safe: concurrent
    first calls wait for one build. Across processes torch's own file lock in the
    extension folder serialises builds.
    """
    if disabled():
        return None
    if _state["tried"]:
        return _state["module"]  # type: ignore[return-value]
    if not build and not cached():
        return None
    with _lock:
        if not _state["tried"]:
            _state["module"], _state["reason"] = _build()
            _state["tried"] = True
            if _state["module"] is None:
                _LOG.debug("attnkit native kernel unavailable: %s", _state["reason"])
    return _state["module"]  # type: ignore[return-value]


def _build() -> tuple[ModuleType | None, str]:
    try:
        from torch.utils import cpp_extension

        with _ninja_on_path(), _no_stale_lock():
            module = cpp_extension.load(name=_name(), sources=[str(_SOURCE)], extra_cflags=_CFLAGS,
                                        extra_ldflags=_OPENMP, verbose=False)
    except Exception as exc:  # no compiler, no ninja, a compile error: the pure-PyTorch path runs
        first = str(exc).strip().splitlines()
        return None, f"build failed: {type(exc).__name__}: {first[0] if first else ''}"[:300]
    return module, "built"


@contextlib.contextmanager
def _no_stale_lock() -> Iterator[None]:
    """Hold an OS lock on the build folder for the build, and remove torch's ``lock`` file
    when it is stale.

    torch marks a build in progress with a plain ``lock`` file and waits, for ever, while it
    exists; a build killed midway (Ctrl-C, a timeout) leaves it behind, and every later build
    of this source would hang. Every attnkit build holds ``attnkit.lock`` (an ``fcntl`` lock,
    which the OS drops when its process dies), so a ``lock`` file found while holding it was
    left by a dead build. Where ``fcntl`` is missing (Windows) torch's own lock alone applies.
    """
    folder = _folder()
    try:
        import fcntl
    except ImportError:
        fcntl = None  # type: ignore[assignment]
    if folder is None or fcntl is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "attnkit.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        stale = folder / "lock"
        if stale.exists():
            warnings.warn(f"attnkit: removing {stale}, left by a build of the native kernel that did not finish",
                          RuntimeWarning, stacklevel=4)
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch builds with the ``ninja`` on PATH; without one, use the pip package's (the ``test``
    extra installs it) for the duration of the build."""
    path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        try:
            import ninja  # the pip package: it ships the binary
        except ImportError:
            pass
        else:
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path


# The CPU units oneDNN's bfloat16/float16 micro-kernels run on, best first, named as torch.cpu.get_capabilities() does.
_GEMM_UNITS = {
    "bfloat16": (("amx_bf16", "AMX-BF16 tiles"), ("avx512_bf16", "AVX512-BF16 instructions")),
    "float16": (("amx_fp16", "AMX-FP16 tiles"), ("avx512_fp16", "AVX512-FP16 instructions")),
}


def low_precision_path(dtype: torch.dtype = torch.bfloat16) -> tuple[str, str]:
    """The dtype the native kernel's block GEMMs take for ``dtype`` inputs on this CPU, and why.

    ``dtype``: ``torch.bfloat16`` (default) or ``torch.float16``. Returns ``(path, reason)``: ``path`` is
    ``dtype``'s name when the block GEMMs run in it, with fp32 accumulation, on oneDNN's micro-kernels for
    the CPU's AMX tiles or AVX-512 low-precision instructions (taken from ``torch.cpu.get_capabilities()``
    and ``torch.backends.cpu.get_cpu_capability()``), and ``"float32"`` where the CPU has none of them, oneDNN
    is off (``torch.backends.mkldnn``), or the kernel, once loaded, failed its check against its own float32
    path: the inputs are then cast to float32 as for the other kernels. The softmax statistics are float32
    on both paths and the output has the input's dtype.

    >>> import torch
    >>> path, reason = low_precision_path(torch.bfloat16)
    >>> path in ("bfloat16", "float32") and bool(reason)
    True
    """
    name = str(dtype).removeprefix("torch.")
    if name not in _GEMM_UNITS:
        raise ValueError(f"low_precision_path: dtype={dtype} is not a low-precision dtype; expected torch.bfloat16 "
                         f"or torch.float16 (float32 and float64 always compute in their own dtype)")
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return "float32", "oneDNN is unavailable or disabled (torch.backends.mkldnn): float32 block GEMMs"
    capability = torch.backends.cpu.get_cpu_capability()
    found = torch.cpu.get_capabilities()
    units = [label for flag, label in _GEMM_UNITS[name] if found.get(flag)]
    if not units:
        flags = " or ".join(flag for flag, _ in _GEMM_UNITS[name])
        return "float32", (f"torch reports CPU capability {capability} without {flags}: {name} block GEMMs "
                           f"would be emulated, so they run in float32")
    failure = _self_check(name) if available() else None
    if failure:
        return "float32", f"{name} block GEMMs failed their check against float32 ({failure}): float32 instead"
    return name, (f"torch reports CPU capability {capability} with {units[0]}: oneDNN's {name} micro-kernels, "
                  f"fp32 accumulation")


def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to hand the native kernel for inputs of ``dtype``: itself for float32, float64 and the
    low-precision dtypes this CPU runs natively (:func:`low_precision_path`), else float32."""
    if dtype in (torch.float32, torch.float64):
        return dtype
    if dtype in (torch.bfloat16, torch.float16) and low_precision_path(dtype)[0] != "float32":
        return dtype
    return torch.float32


_checked: dict[str, str | None] = {}
_check_lock = threading.Lock()


def _self_check(name: str) -> str | None:
    """Run the loaded kernel once in ``name`` against its float32 path on the same rounded inputs (odd sizes,
    two key blocks, a window): None if they agree to the dtype's rounding, else what went wrong. Once per dtype
    and process (concurrent first calls wait for one check); a failure is also warned about, with its reason,
    since it means the low-precision path has a bug on this CPU and every such call now runs in float32."""
    with _check_lock:
        if name not in _checked:
            _checked[name] = failure = _run_check(name)
            if failure:
                warnings.warn(f"attnkit's native {name} block GEMMs failed their check against float32 ({failure}); "
                              f"{name} calls compute in float32 instead. Please report this with `attnkit backends`'s "
                              f"output.", RuntimeWarning, stacklevel=3)
        return _checked[name]


def _run_check(name: str) -> str | None:
    module: Any = _state["module"]
    dtype = getattr(torch, name)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, d, generator=g, dtype=torch.float32).to(dtype)
               for n, d in ((67, 5), (71, 5), (71, 3)))
    bands = (torch.tensor([-40]), torch.tensor([3]), torch.tensor([71]))
    rest = (torch.empty(0, 0, dtype=torch.int64), torch.empty(0, 0, dtype=torch.int64), torch.empty(0),
            torch.zeros(1, dtype=torch.int64), BLOCK_Q, BLOCK_K)
    try:
        low, _ = module.forward(q, k, v, 0.4, *bands, *rest)
        full, _ = module.forward(q.float(), k.float(), v.float(), 0.4, *bands, *rest)
        err = float((low.float() - full).abs().max())
    except Exception as exc:  # any failure (a TORCH_CHECK in ATen's brgemm, an older build) means: not this path
        first = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {first[0][:200] if first else ''}"
    return None if err <= 8 * torch.finfo(dtype).eps else f"max difference {err:.3g}"


def native_status() -> str:
    """Why the native kernel is or is not in use: ``"built"``, ``"not built yet ..."``, or the reason it is off."""
    return disabled() or str(_state["reason"])


def available() -> bool:
    """Whether the native kernel is ready now, without building it."""
    return not disabled() and _state["module"] is not None
