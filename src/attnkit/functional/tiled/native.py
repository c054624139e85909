"""The optional native kernel: a C++ forward built on first use, never required.

``csrc/attention.cpp`` runs one parallel loop over (batch, head, query block) work items
with block GEMMs and an online softmax, masking only the blocks on a mask's edge,
arithmetically (see :func:`.plan.native_params` for the masks it understands). It is
compiled with :func:`torch.utils.cpp_extension.load` the first time it is wanted and
cached in torch's extension folder (``TORCH_EXTENSIONS_DIR``); later processes reuse it.

It is never required. Without a compiler or ninja, or if the build fails, or with
``ATTNKIT_NATIVE=0`` in the environment, the pure-PyTorch paths run; the reason is logged
once at debug level and :func:`native_status` says it. A failed build is not retried in
the same process. The backward stays the pure-PyTorch recompute backward, from the
native forward's ``out`` and ``lse``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

_LOG = logging.getLogger("attnkit.native")
_SOURCE = Path(__file__).with_name("csrc") / "attention.cpp"
_CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-std=c++17"]

BLOCK_Q = 64  # query rows per work item
BLOCK_K = 64  # keys per block GEMM
BLAS = False  # block GEMMs by hand-written vector loops (False) or ATen's mm (True); see docs/core.md

_lock = threading.Lock()
_state: dict[str, object] = {"module": None, "reason": "not built yet (built on first use)", "tried": False}


def _disabled() -> str | None:
    if os.environ.get("ATTNKIT_NATIVE", "").strip().lower() in ("0", "false", "no", "off"):
        return "disabled by ATTNKIT_NATIVE=0"
    return None


def load() -> ModuleType | None:
    """The compiled extension, building it on the first call; None if unavailable (see :func:`native_status`).

    Thread-safe: concurrent first calls wait for one build. Across processes torch's own
    file lock in the extension folder serialises builds.
    """
    if _disabled():
        return None
    if _state["tried"]:
        return _state["module"]  # type: ignore[return-value]
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

        with _ninja_on_path():
            module = cpp_extension.load(name="attnkit_native_attention", sources=[str(_SOURCE)],
                                        extra_cflags=_CFLAGS, verbose=False)
    except Exception as exc:  # no compiler, no ninja, a compile error: the pure-PyTorch path runs
        first = str(exc).strip().splitlines()
        return None, f"build failed: {type(exc).__name__}: {first[0] if first else ''}"[:300]
    return module, "built"


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


def native_status() -> str:
    """Why the native kernel is or is not in use: ``"built"``, ``"not built yet ..."``, or the reason it is off."""
    return _disabled() or str(_state["reason"])


def available() -> bool:
    """Whether the native kernel is ready now, without building it."""
    return not _disabled() and _state["module"] is not None
