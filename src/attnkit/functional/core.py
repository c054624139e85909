"""``attention()``: one exact attention function over interchangeable backends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, overload

import torch
from torch import Tensor

from attnkit._checks import describe
from attnkit.biases import Bias
from attnkit.functional import flex, tuning
from attnkit.functional._call import AttentionCall, make_call
from attnkit.functional.reference import ReferenceBackend, reference_forward
from attnkit.functional.sdpa import SDPABackend
from attnkit.functional.stats import CallStats, StatsOptions, call_stats
from attnkit.functional.tiled import Strategy, TiledBackend, choose
from attnkit.masks import Mask


class Backend(Protocol):
    name: str
    summary: str
    features: tuple[str, ...]

    def supports(self, call: AttentionCall) -> str | None: ...

    def run(self, call: AttentionCall) -> tuple[Tensor, Tensor]: ...


_Result = Tensor | tuple[Tensor, Tensor] | tuple[Tensor, CallStats] | tuple[Tensor, Tensor, CallStats]

_BACKENDS: dict[str, Backend] = {b.name: b for b in (SDPABackend(), flex.FlexBackend(), TiledBackend(),
                                                     ReferenceBackend())}

# Below this many scores (B * H * Lq * Lk), materialising is cheaper than tiling's overhead.
_SMALL = 1 << 14


@dataclass(frozen=True)
class BackendInfo:
    name: str
    summary: str
    features: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.name:<10} {self.summary}\n{'':<10} supports: {', '.join(f for f in self.features if f)}"


def backends() -> dict[str, BackendInfo]:
    """Each backend and what it supports; ``"auto"`` picks among them per call.

    >>> sorted(backends())
    ['flex', 'reference', 'sdpa', 'tiled']
    """
    return {n: BackendInfo(b.name, b.summary, b.features) for n, b in _BACKENDS.items()}


def select_backend(call: AttentionCall, backend: str) -> Backend:
    """The backend that will run ``call``: the one named, or the fastest that supports it."""
    return _select(call, backend)[0]


def _select(call: AttentionCall, backend: str) -> tuple[Backend, tuple[str, ...]]:
    """:func:`select_backend`, with the reasons for its choice."""
    if backend == "auto":
        return _auto(call)
    if backend not in _BACKENDS:
        raise ValueError(
            f"backend must be 'auto' or one of {', '.join(map(repr, _BACKENDS))}; got {backend!r}"
        )
    chosen = _BACKENDS[backend]
    reason = chosen.supports(call)
    if reason is not None:
        raise ValueError(
            f"backend={backend!r} cannot run this call: {reason}. "
            "Use backend='tiled' (exact, O(L) memory, every option) or backend='auto'"
        )
    return chosen, (f"backend pinned: {backend!r}",)


def device_type(call: AttentionCall) -> str:
    """The call's device type (``"cpu"``, ``"cuda"``, ...), on which auto's order depends; tests replace it to
    check CUDA's order on a CPU."""
    return call.q.device.type


def _auto(call: AttentionCall) -> tuple[Backend, tuple[str, ...]]:
    """``backend="auto"``: sdpa where it runs the call without a dense mask; else the reference for tiny calls;
    else, on CUDA, compiled Flex where it can, and on CPU where ``attnkit backends --tune`` measured it fastest;
    else the tiled backend."""
    declined = _BACKENDS["sdpa"].supports(call)
    if declined is None:
        return _BACKENDS["sdpa"], ("auto: PyTorch's fused SDPA kernel runs this call without a dense mask",)
    scores = call.batch * call.heads * call.q_len * call.k_len
    reasons = [f"auto: sdpa declined ({declined})"]
    if scores <= _SMALL:
        return _BACKENDS["reference"], (*reasons, f"auto: {scores:,} scores, at most {_SMALL:,}: materialising is "
                                                  "cheaper than tiling")
    device = device_type(call)
    # on CPU, only where the tuning cache ranks Flex first (asked first: Flex's checks read the mask's repr)
    measured = None if device == "cuda" else tuning.flex_measured_fastest(call)
    if device == "cuda" or measured is not None:
        flex_declined = flex.refusals(call, device)
        if not flex_declined and (too_many := flex.auto_refusal(call)) is not None:
            flex_declined = [too_many]
        if not flex_declined:
            why = measured or "on CUDA, compiled FlexAttention runs the masks and biases SDPA cannot express"
            return _BACKENDS["flex"], (*reasons, f"auto: {why}")
        if device == "cuda":
            reasons.append(f"auto: flex declined ({'; '.join(flex_declined)})")
    return _BACKENDS["tiled"], (*reasons, f"auto: {scores:,} scores, more than {_SMALL:,}: the tiled backend")


@dataclass(frozen=True)
class CallPlan:
    """Which backend (and, for ``tiled``, which kernel) runs a call, and why: :func:`explain_call`."""

    backend: str
    reasons: tuple[str, ...]
    tiled: Strategy | None = None

    def __str__(self) -> str:
        lines = [f"backend: {self.backend}", *(f"  - {r}" for r in self.reasons)]
        return "\n".join(lines + ([str(self.tiled)] if self.tiled is not None else []))


def explain_call(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Mask | Tensor | None = None,
    bias: Bias | Tensor | list[Bias] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    return_lse: bool = False,
) -> CallPlan:
    """Why :func:`attention` with these arguments runs where it runs, without running it.

    Takes :func:`attention`'s arguments and checks them the same way. Returns the backend
    ``backend`` resolves to, each decision's reason, and for the tiled backend its
    :class:`~attnkit.functional.tiled.Strategy` (forward kernel, backward kernel, reasons),
    decided as the call itself would decide it: under the tiled backend's default kernel,
    that loads a cached native build, as the call would.

    Raises ValueError as :func:`attention` does, e.g. for a backend that cannot run the call.

    >>> import torch, attnkit
    >>> q = k = v = torch.randn(1, 4, 2048, 64)
    >>> plan = attnkit.explain_call(q, k, v, mask=attnkit.masks.sliding_window(255), backend="auto")
    >>> plan.backend, plan.tiled.forward in ("banded", "native")
    ('tiled', True)
    >>> print(attnkit.explain_call(q, k, v, mask=attnkit.masks.causal()))
    backend: sdpa
      - auto: PyTorch's fused SDPA kernel runs this call without a dense mask
    """
    call = make_call(q, k, v, mask=mask, bias=bias, scale=scale, softcap=softcap,
                     dropout_p=dropout_p, return_lse=return_lse)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str; got {type(backend).__name__}")
    chosen, reasons = _select(call, backend)
    return CallPlan(chosen.name, reasons, choose(call) if chosen.name == "tiled" else None)


def _empty(call: AttentionCall) -> tuple[Tensor, Tensor]:
    """Lq == 0 or Lk == 0: empty or zero output, connected to the inputs' graph."""
    k = call.k.repeat_interleave(call.groups, 1)
    v = call.v.repeat_interleave(call.groups, 1)
    out = (call.q @ k.transpose(-1, -2)) @ v  # (B, H, Lq, Dv), all zeros
    lse = torch.full(call.q.shape[:3], float("-inf"), dtype=call.compute_dtype, device=call.q.device)
    return out, lse


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Mask | Tensor | None = None,
    bias: Bias | Tensor | list[Bias] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    return_lse: Literal[False] = False,
    stats: Literal[False] = False,
) -> Tensor: ...


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Mask | Tensor | None = None,
    bias: Bias | Tensor | list[Bias] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    return_lse: Literal[True],
    stats: Literal[False] = False,
) -> tuple[Tensor, Tensor]: ...


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Mask | Tensor | None = None,
    bias: Bias | Tensor | list[Bias] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    return_lse: Literal[False] = False,
    stats: Literal[True] | StatsOptions,
) -> tuple[Tensor, CallStats]: ...


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Mask | Tensor | None = None,
    bias: Bias | Tensor | list[Bias] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    return_lse: Literal[True],
    stats: Literal[True] | StatsOptions,
) -> tuple[Tensor, Tensor, CallStats]: ...


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Mask | Tensor | None = None,
    bias: Bias | Tensor | list[Bias] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    return_lse: bool = False,
    stats: bool | StatsOptions = False,
) -> _Result: ...


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Mask | Tensor | None = None,
    bias: Bias | Tensor | list[Bias] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    return_lse: bool = False,
    stats: bool | StatsOptions = False,
) -> _Result:
    """Scaled dot-product attention, exact, with every common variant.

    ``out_i = sum_j softmax_j(mask(bias(softcap(scale * q_i . k_j)))) v_j``

    Args:
        q: queries, (B, H, Lq, D).
        k: keys, (B, Hkv, Lk, D). ``H`` must be a multiple of ``Hkv``: query head ``h``
            reads key/value head ``h // (H // Hkv)`` (GQA; MQA when Hkv = 1). K/V are
            never copied per query head by the tiled backend.
        v: values, (B, Hkv, Lk, Dv). ``Dv`` may differ from ``D``.
        mask: an :mod:`attnkit.masks` mask (composable with ``&``, ``|``, ``~``) or a
            bool tensor broadcastable to (B, H, Lq, Lk), True = may attend.
        bias: an :mod:`attnkit.biases` bias (ALiBi, ``score_mod``), a float tensor
            broadcastable to (B, H, Lq, Lk), or a list of them, applied in order.
        scale: multiplies ``q . k``; default ``1 / sqrt(D)``.
        softcap: if given, scores become ``softcap * tanh(scores / softcap)``, after the
            scale and before the bias (Gemma 2).
        dropout_p: dropout on the probabilities, in [0, 1). The reference and tiled
            backends draw it from a hash of (seed, b, h, i, j), the seed from torch's
            global generator, so both give identical results; sdpa uses its own RNG.
        backend: ``"auto"``, ``"sdpa"``, ``"flex"``, ``"tiled"`` or ``"reference"``; see
            :func:`backends`. A backend that cannot run the call raises ValueError.
        return_lse: also return the log-sum-exp of each row's scores.
        stats: True or a :class:`~attnkit.functional.stats.StatsOptions`: also return the
            exact statistics of the probabilities (received mass per key, entropy, sink
            mass, distance, top-k keys, max logit; see
            :class:`~attnkit.functional.stats.CallStats`), computed after the forward from
            its log-sum-exp, block by block, never holding an (Lq x Lk) tensor. The call
            then runs on a backend that returns the log-sum-exp (not ``"sdpa"``).

    Returns:
        ``out`` (B, H, Lq, Dv) in the input dtype, or ``(out, lse)`` with ``lse``
        (B, H, Lq) in float32 (float64 for float64 inputs); with ``stats``, the
        :class:`~attnkit.functional.stats.CallStats` is appended: ``(out, stats)`` or
        ``(out, lse, stats)``.

    Edges:
        A query row with no allowed key outputs 0, its lse is -inf, and its gradients
        are 0. Lq == 0 gives an empty output; Lk == 0 gives zeros. Scores are
        accumulated in float32 whatever the input dtype; on CPU, float16/bfloat16 are
        computed in float32 and the output is cast back.

    >>> import torch, attnkit
    >>> q, k, v = torch.randn(1, 8, 128, 64), torch.randn(1, 2, 128, 64), torch.randn(1, 2, 128, 64)
    >>> out, lse = attnkit.attention(q, k, v, mask=attnkit.masks.causal(), return_lse=True)
    >>> out.shape, lse.shape
    (torch.Size([1, 8, 128, 64]), torch.Size([1, 8, 128]))
    >>> out, st = attnkit.attention(q, k, v, mask=attnkit.masks.causal(), stats=True)
    >>> st.received.shape, st.top_index.shape, bool(st.top_index[0, 0, 0, 0] == 0)
    (torch.Size([1, 8, 128]), torch.Size([1, 8, 128, 8]), True)
    """
    options = _stats_options(stats)
    call = make_call(q, k, v, mask=mask, bias=bias, scale=scale, softcap=softcap,
                     dropout_p=dropout_p, return_lse=return_lse or options is not None)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str; got {type(backend).__name__}")
    chosen = select_backend(call, backend)
    out, lse = _empty(call) if call.q_len == 0 or call.k_len == 0 else chosen.run(call)
    if options is None:
        return (out, lse) if return_lse else out
    found = call_stats(call, lse, options)
    return (out, lse, found) if return_lse else (out, found)


def _stats_options(stats: object) -> StatsOptions | None:
    if isinstance(stats, StatsOptions):
        return stats
    if not isinstance(stats, bool):
        raise TypeError(f"stats must be a bool or an attnkit.functional.stats.StatsOptions; got {describe(stats)}")
    return StatsOptions() if stats else None


def attention_probs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Mask | Tensor | None = None,
    bias: Bias | Tensor | list[Bias] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> Tensor:
    """The attention probabilities (B, H, Lq, Lk), for inspection.

    Computed by the reference backend in float32 (float64 for float64 inputs). Rows
    with no allowed key are all zero. ``v`` is accepted for symmetry with
    :func:`attention` and checked, but not used.

    >>> import torch, attnkit
    >>> q = k = v = torch.randn(1, 2, 4, 8)
    >>> p = attnkit.attention_probs(q, k, v, mask=attnkit.masks.causal())
    >>> p.shape, torch.allclose(p.sum(-1), torch.ones(1, 2, 4))
    (torch.Size([1, 2, 4, 4]), True)
    """
    call = make_call(q, k, v, mask=mask, bias=bias, scale=scale, softcap=softcap,
                     dropout_p=0.0, return_lse=False)
    if call.q_len == 0 or call.k_len == 0:
        shape = (call.batch, call.heads, call.q_len, call.k_len)
        return torch.zeros(shape, dtype=call.compute_dtype, device=call.q.device)
    return reference_forward(call)[2]
