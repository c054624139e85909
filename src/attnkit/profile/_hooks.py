"""Where a model spends its forward: hooks that time its attention function, its Q/K/V/O
projections and its feed-forward layers, and that are installed only for a ``with`` block.

How each part is found:

- attnkit modules: every :class:`~attnkit.nn.MultiHeadAttention`; its attention function
  runs from its attention hook (just before :func:`attnkit.attention`) to its ``o_proj``
  (just after); its ``q/k/v/o_proj`` are the projections; each ``TransformerBlock.mlp`` is
  a feed-forward layer (found by its name, ``mlp``).
- Hugging Face models: the attention function (eager, sdpa, attnkit, ...) is wrapped where
  transformers hands it out (:func:`attnkit.integrations.tap.wrap_attention_functions`);
  the outermost modules whose class name ends in ``Attention`` hold the projections (every
  ``nn.Linear`` inside them); the feed-forward layers are the modules named ``mlp``,
  ``feed_forward``, ``ffn`` or ``intermediate``, and an ``output`` beside an ``intermediate``
  (BERT's second feed-forward Linear, with its LayerNorm).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from attnkit._model_facts import is_hf
from attnkit.nn.attention import MultiHeadAttention

COMPONENTS = ("attention", "projections", "feed_forward")
_FFN_NAMES = ("mlp", "feed_forward", "ffn", "intermediate")


def parts(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The modules of each timed component: ``{"projections": [...], "feed_forward": [...]}``.

    Raises ValueError naming the model when either is not found.
    """
    named = dict(model.named_modules())
    attention: list[nn.Module] = []
    ffn: list[nn.Module] = []
    for name, module in named.items():
        if not name or any(name.startswith(p + ".") for p in _names(named, attention + ffn)):
            continue  # the model itself, or inside a part already found: its outermost module is timed
        last = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if isinstance(module, MultiHeadAttention) or (is_hf(model) and type(module).__name__.endswith("Attention")):
            attention.append(module)
        elif last in _FFN_NAMES or (last == "output" and f"{parent}.intermediate".lstrip(".") in named):
            ffn.append(module)
    projections: list[nn.Module] = [m for a in attention for m in a.modules() if isinstance(m, nn.Linear)]
    if not projections:
        raise ValueError(f"cannot find the attention projections of {type(model).__name__} (no nn.Linear inside "
                         "modules named *Attention or attnkit MultiHeadAttention); it cannot be profiled")
    return {"projections": projections, "feed_forward": ffn}


def _names(named: dict[str, nn.Module], modules: list[nn.Module]) -> list[str]:
    ids = {id(m) for m in modules}
    return [n for n, m in named.items() if id(m) in ids and n]


def linear_macs(modules: list[nn.Module]) -> int:
    """Multiply-adds per token of every ``nn.Linear`` in ``modules``."""
    return sum(m.in_features * m.out_features for root in modules for m in root.modules() if isinstance(m, nn.Linear))


@dataclass
class Clock:
    """Seconds per component accumulated by :func:`timed`, with the attention calls' shapes."""

    sync: Callable[[], None]
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COMPONENTS, 0.0))
    attention_calls: list[tuple[int, int, int, int, int]] = field(default_factory=list)  # (B, H, Lq, Lk, D)
    keep_call: bool = False
    kept: Callable[[], object] | None = None  # one attention call, re-runnable alone (for its memory)
    _starts: dict[int, float] = field(default_factory=dict)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def reset(self) -> None:
        self.seconds = dict.fromkeys(COMPONENTS, 0.0)
        self.attention_calls = []

    def note(self, q: Tensor, k: Tensor) -> None:
        self.attention_calls.append((q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3]))


@contextlib.contextmanager
def timed(model: nn.Module, clock: Clock) -> Iterator[None]:
    """Time ``model``'s components into ``clock`` for this block; every hook is removed on exit."""
    handles: list[Any] = []

    def start(module: nn.Module, *_: Any) -> None:
        clock._starts[id(module)] = clock.now()

    def stop(component: str) -> Callable[..., None]:
        def hook(module: nn.Module, *_: Any) -> None:
            clock.seconds[component] += clock.now() - clock._starts.pop(id(module))
        return hook

    # attnkit: attention runs from its attention hook to o_proj's pre-hook, registered before o_proj's own timer
    for mha in (m for m in model.modules() if isinstance(m, MultiHeadAttention)):
        handles += [mha.register_attention_hook(_attnkit_start(clock)),
                    mha.o_proj.register_forward_pre_hook(_attnkit_stop(clock, mha))]
    for component, modules in parts(model).items():
        for m in modules:
            handles += [m.register_forward_pre_hook(start), m.register_forward_hook(stop(component))]
    try:
        if is_hf(model):
            from attnkit.integrations.tap import wrap_attention_functions

            with wrap_attention_functions(model, lambda fn: _timed_function(fn, clock), kind="profile"):
                yield
        else:
            yield
    finally:
        for h in handles:
            h.remove()


def _attnkit_start(clock: Clock) -> Callable[..., None]:
    def hook(module: MultiHeadAttention, q: Tensor, k: Tensor, v: Tensor, mask: Any, bias: Any) -> None:
        clock.note(q, k)
        if clock.keep_call and clock.kept is None:
            from attnkit.functional import attention

            clock.kept = lambda: attention(q, k, v, mask=mask, bias=bias, backend=module.config.backend)
        clock._starts[-id(module)] = clock.now()
    return hook


def _attnkit_stop(clock: Clock, attention_module: MultiHeadAttention) -> Callable[..., None]:
    def hook(module: nn.Module, *_: Any) -> None:
        started = clock._starts.pop(-id(attention_module), None)
        if started is not None:  # None: o_proj called outside attention (never in attnkit's own forward)
            clock.seconds["attention"] += clock.now() - started
    return hook


def _timed_function(fn: Callable[..., Any], clock: Clock) -> Callable[..., Any]:
    def timed_attention(*args: Any, **kwargs: Any) -> Any:
        q = args[1] if len(args) > 1 else kwargs["query"]
        k = args[2] if len(args) > 2 else kwargs["key"]
        clock.note(q, k)
        if clock.keep_call and clock.kept is None:
            clock.kept = lambda: fn(*args, **kwargs)
        started = clock.now()
        result = fn(*args, **kwargs)
        clock.seconds["attention"] += clock.now() - started
        return result
    return timed_attention


def synchronizer(model: nn.Module) -> Callable[[], None]:
    """Waits for the model's device (a no-op on CPU), so that wall times are the device's."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None
