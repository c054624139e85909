"""Which kernel the tiled backend runs: the :func:`kernel` context manager and the fused op's check."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch

from attnkit._checks import require_choice
from attnkit.biases import tensor_bias_parts
from attnkit.functional._call import AttentionCall

if TYPE_CHECKING:
    from attnkit.functional.tiled.plan import NativeParams

KERNELS = ("auto", "math", "fused", "native")
_NEG_INF = float("-inf")
_KERNEL: ContextVar[str] = ContextVar("attnkit_tiled_kernel", default="auto")


@contextmanager
def kernel(name: str) -> Iterator[str]:
    """Pin the tiled backend's kernel inside a ``with`` block (this thread/task only).

    ``"auto"`` (default): the native forward for the float32 CPU calls where it measured
    fastest (sliding windows and causal documents; see :func:`native_ok`) once its build is
    cached, else the batched fused CPU kernel where the call allows it
    (:mod:`attnkit.functional.tiled.plan`'s band plan: a bounded number of ops), else the
    per-chunk math kernel. ``"math"``: the per-chunk math kernel only. ``"fused"``: the
    per-chunk loop with the fused kernel on each segment (the v1 engine, kept for
    comparison and for gradients of the log-sum-exp). ``"native"``: the optional C++
    forward (:mod:`.native`), built here on first use, for every call it supports (else as
    ``"auto"``).
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


def _fused_forward_ok(call: AttentionCall) -> bool:
    return (
        current() != "math"
        and call.q.device.type == "cpu"
        and call.v.shape[-1] == call.q.shape[-1]
        and call.softcap is None
        and call.dropout_p == 0.0
        and (call.bias is None or call.bias.additive)
        and _fused_op_available()
    )


def _fused_backward_ok(call: AttentionCall) -> bool:
    return _fused_forward_ok(call) and not any(
        b.tensor.requires_grad for b in tensor_bias_parts(call.bias)
    )


def banded(call: AttentionCall) -> bool:
    """Whether the call runs on the batched fused path."""
    return current() == "auto" and _fused_forward_ok(call) and (not call.requires_grad or _fused_backward_ok(call))


def native_ok(call: AttentionCall) -> bool:
    """Whether the call runs on the native forward (:mod:`.native`).

    Supported: CPU, no softcap or dropout, a mask and bias :func:`.plan.native_params` can
    describe. The backward is the pure-PyTorch one, from the native ``out`` and ``lse``.

    Pinned with ``kernel("native")``: every supported call, building the kernel on demand.
    Under ``kernel("auto")``: float32 calls whose mask cuts keys off on the left (a sliding
    window: ``lo`` binds) or is causal within documents, where the native kernel measured
    1.1-1.7x the batched one at L=1024-8192; causal, dense, padded and causal-ALiBi calls
    stay on PyTorch's fused kernel, which measured faster there (docs/core.md). ``auto``
    loads a cached build but compiles only when ``ATTNKIT_NATIVE=1``.
    """
    from attnkit.functional.tiled import native
    from attnkit.functional.tiled.plan import native_params

    pinned = current()
    if pinned not in ("native", "auto") or call.q.device.type != "cpu" or call.softcap is not None \
            or call.dropout_p != 0.0:
        return False
    if pinned == "auto" and (call.compute_dtype != torch.float32 or native._disabled()):
        return False
    params = native_params(call)
    if params is None or (pinned == "auto" and not _native_faster(call, params)):
        return False
    return native.load(build=pinned == "native" or native.build_wanted()) is not None


def _native_faster(call: AttentionCall, params: NativeParams) -> bool:
    """The band shapes where the native forward measured faster than the batched fused kernel."""
    window = bool((params.dlo > -(call.q_len - 1)).any())  # some row loses keys on its left
    causal_documents = params.q_ids.numel() > 0 and bool((params.dhi < call.k_len - 1).all())
    return window or causal_documents
