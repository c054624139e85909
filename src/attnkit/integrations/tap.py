"""One tap on attention calls: what capture, generation capture, the profile, the monitor and statistics ride on.

Two implementations of one idea, *after each attention call of a model, tell whoever asked*:

* :func:`attnkit_tap`: attnkit's :class:`~attnkit.nn.MultiHeadAttention` modules, through their attention hook;
* :func:`transformers_tap`: a Hugging Face model, through the functions transformers' ``AttentionInterface`` hands
  its attention modules (eager, sdpa, attnkit, ...), wrapped for the duration of a ``with`` block and restored
  after, behind a process-wide lock; the model itself is never modified.

:func:`tap` picks the one that fits a model. ``route(module)`` says who observes a module's call (None: nobody);
the observer gets ``(q, k, mask, bias, scale, softcap)``: q (B, H, Lq, D), k (B, Hkv, Lk, D) after positions and
the cache, and the attnkit mask and bias the call means. :func:`wrap_attention_functions` is the lower level,
for code that must run around each call (the profile's timers, the monitor).

A model whose attention bypasses transformers' interface (BERT before transformers 5, Bloom, MPT) makes no call
here; :func:`attnkit.inspect.capture` reads such a model's eager ``output_attentions`` instead.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from attnkit import _model_facts as facts
from attnkit import masks
from attnkit.nn.attention import MultiHeadAttention

__all__ = ["Observer", "attnkit_tap", "run_eval", "tap", "transformers_tap", "wrap_attention_functions"]

_PATCH_LOCK = threading.RLock()  # one thread at a time patches transformers' lookup
_PATCHING: list[str] = []  # the kinds the lock's holder patches now (to refuse a nested one of the same kind)
Observer = Callable[[Tensor, Tensor, "masks.Mask | Tensor | None", Any, "float | None", "float | None"], None]
"""Who observes an attention call: ``observer(q, k, mask, bias, scale, softcap)``."""


@contextlib.contextmanager
def tap(model: nn.Module, route: Callable[[nn.Module], Observer | None], *, reader: str = "capture") -> Iterator[None]:
    """For this block, ``route(module)(q, k, mask, bias, scale, softcap)`` after each attention call of ``model``:
    a transformers model through :func:`transformers_tap`, else its attnkit modules through :func:`attnkit_tap`.
    ``reader`` names the caller in errors ("stats cannot read attention with ...")."""
    if facts.is_hf(model):
        with transformers_tap(model, route, reader=reader):
            yield
    else:
        with attnkit_tap([m for m in model.modules() if isinstance(m, MultiHeadAttention)], route):
            yield


def run_eval(model: nn.Module, recording: contextlib.AbstractContextManager, args: tuple, kwargs: dict, *,
             forward: Callable[..., Any] | None = None) -> Any:
    """One forward pass in eval mode without gradients inside ``recording`` (a :func:`tap`, or any context
    manager); every module of ``model`` gets its training mode back after, also when the pass raises.

    ``forward(*args, **kwargs)`` is what runs (default ``model``; e.g. a transformers model's base model, to
    skip its head). Returns its output.

    >>> import torch
    >>> m = torch.nn.Dropout(0.5)
    >>> float(run_eval(m, contextlib.nullcontext(), (torch.ones(4),), {}).sum()), m.training
    (4.0, True)
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), recording:
            return (model if forward is None else forward)(*args, **kwargs)
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def attnkit_tap(modules: Iterable[MultiHeadAttention],
                      route: Callable[[nn.Module], Observer | None]) -> Iterator[None]:
    """Hook ``modules`` (attnkit :class:`~attnkit.nn.MultiHeadAttention`) for this block only.

    After each attention call of a module, ``route(module)`` says who records it (None: nobody);
    that recorder gets ``(q, k, mask, bias, None, None)`` (attnkit modules use the default scale
    and no softcap): q (B, H, Lq, D), k (B, Hkv, Lk, D) after positions and the cache.
    """
    def hook(module: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: masks.Mask | Tensor | None,
             bias: Any) -> None:
        recorder = route(module)
        if recorder is not None:
            recorder(q, k, mask, bias, None, None)

    handles = [m.register_attention_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# -- Hugging Face models -------------------------------------------------------------------------


def _arguments(fn: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[list[Any], dict[str, Any]]:
    """The five leading arguments (module, query, key, value, attention_mask) and every keyword one."""
    sig = inspect.signature(fn)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    named: dict[str, Any] = {}
    leading: list[Any] = []
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            named.update(bound.arguments.get(p.name, {}))
        elif p.kind is p.VAR_POSITIONAL:
            leading.extend(bound.arguments.get(p.name, ()))
        elif len(leading) < 5:
            leading.append(bound.arguments.get(p.name))
        else:
            named[p.name] = bound.arguments.get(p.name)
    return leading[:5], named


@contextlib.contextmanager
def transformers_tap(model: nn.Module, route: Callable[[nn.Module], Observer | None], *,
                     reader: str = "capture") -> Iterator[None]:
    """Wrap the attention functions transformers hands to ``model``'s modules, for this block only.

    After each attention call of a module, ``route(module)`` says who records it (None: nobody);
    that recorder gets ``(q, k, mask, bias, scaling, softcap)``: q (B, H, Lq, D), k (B, Hkv, Lk, D)
    and the attnkit mask and bias the call means (:func:`~attnkit.integrations.transformers.to_attnkit_mask`).
    A call with an argument the tap cannot translate (attention sinks, a head mask) raises ValueError,
    naming ``reader`` (who reads the attention: "capture", "stats", ...).
    """
    from attnkit.integrations.transformers import UNSUPPORTED, to_attnkit_mask  # needs transformers >= 4.57

    # eager gets None where it wants no mask; sdpa, flash and attnkit read None as "causal if is_causal"
    none_is_causal = "eager" not in str(facts.pretrained(model).config._attn_implementation)

    def wrap(fn: Any) -> Any:
        @functools.wraps(fn)
        def recording(*args: Any, **kwargs: Any) -> Any:
            (module, query, key, _, attention_mask), named = _arguments(fn, args, kwargs)
            for name, what in UNSUPPORTED.items():
                if name != "cache" and named.get(name) is not None:
                    raise ValueError(f"{reader} cannot read attention with {what} ({type(module).__name__} passed "
                                     f"{name}=...): the probabilities would differ from what the model computes")
            result = fn(*args, **kwargs)
            recorder = route(module)
            if recorder is not None:
                mask, bias = to_attnkit_mask(attention_mask, query, key, module=module,
                                             is_causal=named.get("is_causal"),
                                             sliding_window=named.get("sliding_window"),
                                             position_bias=named.get("position_bias"), none_is_causal=none_is_causal)
                recorder(query, key, mask, bias, named.get("scaling"), named.get("softcap"))
            return result

        return recording

    with wrap_attention_functions(model, wrap, kind="tap"):
        yield


@contextlib.contextmanager
def wrap_attention_functions(model: nn.Module, wrap: Callable[[Callable[..., Any]], Callable[..., Any]], *,
                                kind: str) -> Iterator[None]:
    """For this block, transformers hands ``model``'s attention modules ``wrap(fn)`` in place of
    each attention function ``fn`` (eager, sdpa, attnkit, ...), whatever the model was loaded with.

    Used by :func:`transformers_tap` and by :mod:`attnkit.profile` (timing, the monitor). ``wrap(fn)`` must call
    ``fn`` with the same arguments and return its result; ``fn``'s leading arguments are
    ``(module, query, key, value, attention_mask)``. The lookup is restored on exit, also on
    error. Wrappers of different ``kind`` nest (each wraps the other's); the same ``kind``
    nested in one thread is refused (RuntimeError). One thread at a time patches: another
    thread entering waits until the first leaves.
    """
    from attnkit.integrations.transformers import AttentionInterface  # needs transformers >= 4.57

    marker = f"_attnkit_wrapped_{kind}"

    def wrapped(fn: Any) -> Any:
        if not callable(fn) or getattr(fn, marker, False):
            return fn
        out = wrap(fn)
        setattr(out, marker, True)
        return out

    undo: list[Callable[[], None]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        own = owner.__dict__ if isinstance(owner, type) else vars(owner)
        if name in own:
            old = own[name]
            undo.append(lambda: setattr(owner, name, old))
        else:
            undo.append(lambda: delattr(owner, name))
        setattr(owner, name, value)

    with _PATCH_LOCK:
        if kind in _PATCHING:
            raise RuntimeError(f"a {kind} of a transformers model was started while another {kind} runs in this "
                               "thread (from a hook?); run one at a time")
        _PATCHING.append(kind)
        try:
            getitem = AttentionInterface.__getitem__
            patch(AttentionInterface, "__getitem__", lambda self, key: wrapped(getitem(self, key)))
            if hasattr(AttentionInterface, "get_interface"):  # transformers 5: also hands out eager
                get_interface = AttentionInterface.get_interface
                patch(AttentionInterface, "get_interface",
                      lambda self, name, default: wrapped(get_interface(self, name, default)))
            for module_name in sorted({type(m).__module__ for m in model.modules()}):
                source = sys.modules.get(module_name)
                eager = getattr(source, "eager_attention_forward", None)
                if callable(eager):  # transformers 4 calls the modeling file's eager function directly
                    patch(source, "eager_attention_forward", wrapped(eager))
            yield
        finally:
            for restore in reversed(undo):
                restore()
            _PATCHING.remove(kind)
