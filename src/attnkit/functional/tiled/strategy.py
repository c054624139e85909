"""Which kernel the tiled backend runs, decided once per call: :func:`choose` gives a :class:`Strategy`.

The :func:`kernel` context manager pins a kernel; :func:`choose` reads it with the call's dtype, device,
options, mask and bias, and returns the forward kernel, whether the backward may use PyTorch's fused CPU
kernel, and the reasons (:func:`attnkit.explain_call` prints them). The strategy travels with the call into
autograd's context, so the backward never decides again.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from attnkit._checks import require_choice
from attnkit.biases import tensor_bias_parts
from attnkit.functional import tuning
from attnkit.functional._call import AttentionCall

if TYPE_CHECKING:
    from attnkit.functional.tiled.plan import NativeParams

KERNELS = ("auto", "math", "fused", "banded", "native")
_NEG_INF = float("-inf")
_KERNEL: ContextVar[str] = ContextVar("attnkit_tiled_kernel", default="auto")


@contextmanager
def kernel(name: str) -> Iterator[str]:
    """Pin the tiled backend's kernel inside a ``with`` block (this thread/task only).

    ``"auto"`` (default): the kernel ``attnkit backends --tune`` measured fastest on this
    machine for the call's case, where the cache has one and the kernel can run the call
    (:mod:`attnkit.functional.tuning`); else the static policy: the native forward for the
    float32 CPU calls where it measured fastest on the machine it was developed on (sliding
    windows and causal documents; see :func:`native_ok`) once its build is cached, else the
    batched fused CPU kernel where the call allows it (:mod:`attnkit.functional.tiled.plan`'s
    band plan: a bounded number of ops), else the per-chunk math kernel. ``"math"``: the
    per-chunk math kernel only. ``"fused"``: the per-chunk loop with the fused kernel on each
    segment (the v1 engine, kept for comparison and for gradients of the log-sum-exp).
    ``"banded"``: the batched fused engine where the call allows it (else as ``"fused"``),
    never the native kernel. ``"native"``: the optional C++
    forward (:mod:`.native`), built here on first use, for every call it supports (else the
    per-chunk loop, as ``"fused"``).
    """
    token = _KERNEL.set(require_choice("kernel", name, KERNELS))
    try:
        yield name
    finally:
        _KERNEL.reset(token)


def current() -> str:
    """The kernel pinned by the innermost :func:`kernel` block, or ``"auto"``."""
    return _KERNEL.get()


@functools.cache
def _fused_op_available() -> bool:
    return _verify_fused()


def _verify_fused() -> bool:
    """Check the private aten op against plain math once; disable it if it disagrees."""
    try:
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        op_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        g = torch.Generator().manual_seed(0)
        q, k, v, do = (torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64) for _ in range(4))
        mask = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
        mask[..., 1, 3:] = _NEG_INF
        out, lse = op(q, k, v, attn_mask=mask, scale=0.3)
        s = (q @ k.transpose(-1, -2)) * 0.3 + mask
        ref_lse = torch.logsumexp(s, -1)
        p = torch.softmax(s, -1)
        ok = torch.allclose(out, p @ v) and torch.allclose(lse, ref_lse)
        dq, dk, dv = op_bwd(do, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=0.3)
        ok = ok and torch.allclose(dv, p.transpose(-1, -2) @ do)
        return bool(ok) and all(torch.isfinite(t).all() for t in (dq, dk))
    except (AttributeError, RuntimeError, TypeError):
        return False


@dataclass(frozen=True)
class Strategy:
    """How the tiled backend runs one call: chosen once by :func:`choose`, carried into autograd.

    ``forward``: ``"native"`` (the C++ kernel, :mod:`.native`), ``"banded"`` (the batched engine: PyTorch's
    fused CPU kernel on runs of chunks, a number of ops independent of L), ``"fused"`` (the per-chunk loop,
    the fused kernel on each segment) or ``"math"`` (the per-chunk loop in plain PyTorch ops).
    ``fused_backward``: whether the recompute backward may run the fused kernel (batched where a band plan
    exists and the lse needs no gradient, else per chunk); ``fused_forward``: whether the per-chunk forward
    may. ``native``: the native kernel's parameters when ``forward == "native"``. ``reasons``: why, one line
    per decision, as :func:`explain` prints them.
    """

    forward: str
    fused_forward: bool
    fused_backward: bool
    reasons: tuple[str, ...]
    native: NativeParams | None = None

    @property
    def native_backward(self) -> bool:
        """Whether the backward runs in the native kernel: always where the forward does (:mod:`.native`)."""
        return self.native is not None

    def __str__(self) -> str:
        backward = "native" if self.native_backward else "fused" if self.fused_backward else "math"
        return "\n".join([f"tiled forward: {self.forward}; backward: {backward} kernel",
                          *(f"  - {r}" for r in self.reasons)])


def choose(call: AttentionCall, *, native: bool = True) -> Strategy:
    """The tiled kernel for ``call``, with the reasons: the one place this is decided.

    Loading the native kernel is the one step with an effect: under ``kernel("native")`` it builds on first use;
    under ``kernel("auto")`` it loads a cached build (or builds with ``ATTNKIT_NATIVE=1``) for the calls where
    the native kernel measured faster (:func:`_native_faster`). ``native=False`` leaves it out (and loads
    nothing): for a backward of another forward's results (ring attention's :func:`partial_gradients`).
    """
    pinned = current()
    reasons = [f"kernel pinned: {pinned!r}" + (" (the default)" if pinned == "auto" else "")]
    why_not_fused = _why_not_fused(call)
    fused_forward = why_not_fused is None
    reasons.append("PyTorch's fused CPU kernel: usable" if fused_forward else
                   f"PyTorch's fused CPU kernel: not used ({why_not_fused})")
    grad_bias = any(b.tensor.requires_grad for b in tensor_bias_parts(call.bias))
    fused_backward = fused_forward and not grad_bias
    if fused_forward and grad_bias:
        reasons.append("backward: the math kernel (a tensor bias needs its gradient)")
    if pinned == "auto" and native:
        measured = _measured(call, fused_forward, fused_backward, reasons)
        if measured is not None:
            return measured
    params, why_native = _native_choice(call, pinned) if native else (None, "native kernel: not asked")
    reasons.append(why_native)
    if params is not None:
        if call.q.dtype in (torch.bfloat16, torch.float16):
            from attnkit.functional.tiled.native import low_precision_path

            reasons.append("native block GEMMs in {}: {}".format(*low_precision_path(call.q.dtype)))
        reasons.append("backward: the native kernel's (FlashAttention-2: probabilities recomputed from the saved "
                       "lse, O(L) extra memory, in float32, float64 for float64 inputs)")
        return Strategy("native", fused_forward, fused_backward, tuple(reasons), params)
    if pinned in ("auto", "banded") and fused_forward and (not call.requires_grad or fused_backward):
        reasons.append("batched engine: runs of chunks with the same band of keys are one fused call each")
        return Strategy("banded", fused_forward, fused_backward, tuple(reasons))
    forward = "fused" if fused_forward else "math"
    reasons.append(f"per-chunk loop, {forward} kernel on each segment")
    return Strategy(forward, fused_forward, fused_backward, tuple(reasons))


def _measured(call: AttentionCall, fused_forward: bool, fused_backward: bool, reasons: list[str]) -> Strategy | None:
    """The fastest kernel the tuning cache measured for the call's case that can run it, or None (the static
    policy); appends the reason either way. Reads the cache only: nothing is timed here."""
    found, why = tuning.lookup(call)
    reasons.append(why)
    if found is None:
        return None
    for name in found.ranking:
        if name == "native":
            params, why_native = _native_choice(call, "measured")
            if params is not None:
                return Strategy("native", fused_forward, fused_backward, (*reasons, why_native), params)
        elif name in ("banded", "fused") and fused_forward:
            return Strategy(name, fused_forward, fused_backward, (*reasons, f"{name}: the fastest measured kernel "
                                                                             "that can run this call"))
        elif name == "math":
            return Strategy("math", fused_forward, fused_backward, (*reasons, "math: the fastest measured kernel "
                                                                              "that can run this call"))
    reasons.append("kernel policy: static (no measured kernel can run this call)")
    return None


def _why_not_fused(call: AttentionCall) -> str | None:
    """Why PyTorch's fused CPU kernel cannot run this call's segments, or None if it can."""
    checks = (
        (current() == "math", "kernel pinned to 'math'"),
        (call.q.device.type != "cpu", f"device {call.q.device.type}: it is CPU-only"),
        (call.v.shape[-1] != call.q.shape[-1], "Dv != D"),
        (call.softcap is not None, "softcap"),
        (call.dropout_p != 0.0, "dropout"),
        (call.bias is not None and not call.bias.additive, "a score_mod bias"),
    )
    for failed, reason in checks:
        if failed:
            return reason
    return None if _fused_op_available() else "the private aten op is missing or disagreed with plain math"


def _native_choice(call: AttentionCall, pinned: str) -> tuple[NativeParams | None, str]:
    """The native kernel's parameters if it runs this call (loading it, see :func:`choose`), and why."""
    from attnkit.functional.tiled import native
    from attnkit.functional.tiled.plan import native_params

    if pinned not in ("native", "auto", "measured"):
        return None, f"native kernel: not used (kernel pinned to {pinned!r})"
    for failed, reason in ((call.q.device.type != "cpu", "CPU only"), (call.softcap is not None, "softcap"),
                           (call.dropout_p != 0.0, "dropout")):
        if failed:
            return None, f"native kernel: not used ({reason})"
    if pinned != "native" and native.disabled():
        return None, f"native kernel: not used ({native.native_status()})"
    if pinned == "auto" and call.compute_dtype != torch.float32:
        return None, f"native kernel: not used (auto takes it for float32 only; this call computes in " \
                     f"{str(call.compute_dtype).removeprefix('torch.')})"
    params = native_params(call)
    if params is None:
        return None, "native kernel: not used (the mask or bias has no band form: see plan.native_params)"
    if pinned == "auto" and not _native_faster(call, params):
        return None, "native kernel: not used (auto takes it for sliding windows and causal documents, where it " \
                     "measured faster than the batched engine)"
    if native.load(build=pinned == "native" or native.build_wanted()) is None:
        return None, f"native kernel: not available ({native.native_status()})"
    if pinned == "measured":
        return params, "native kernel: the fastest measured kernel that can run this call"
    return params, ("native kernel: pinned" if pinned == "native" else
                    "native kernel: a sliding window or causal documents computed in float32, where it measured "
                    "faster")


def native_ok(call: AttentionCall) -> bool:
    """Whether :func:`choose` runs the call on the native kernel (loading it as ``choose`` does)."""
    return choose(call).forward == "native"


def _native_faster(call: AttentionCall, params: NativeParams) -> bool:
    """The band shapes where the native forward measured faster than the batched fused kernel."""
    window = bool((params.dlo > -(call.q_len - 1)).any())  # some row loses keys on its left
    causal_documents = params.q_ids.numel() > 0 and bool((params.dhi < call.k_len - 1).all())
    return window or causal_documents
