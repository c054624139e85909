"""The "cost" section of the explorer report: what attention costs in this model for this input.

:func:`cost_data` runs :func:`attnkit.profile.profile` at the input's length and a few longer
ones (quickly: one or two timed runs each) and adds the arithmetic that does not need a clock:
attention's FLOPs at the input's length, and the KV cache a decoder of this shape holds for it
(:func:`attnkit.kv_cache_bytes`). The report draws the split at the input's length and
attention's share of the forward against length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from attnkit._checks import describe, require_int
from attnkit.nn.cache import kv_cache_bytes
from attnkit.profile import profile
from attnkit.profile.core import max_length
from attnkit.profile.generation import cache_shape, is_decoder

__all__ = ["cost_data", "growth_lengths"]

GROWTH_CAP = 1024  # the report measures up to this many tokens (or the model's maximum), so it stays fast


def growth_lengths(length: int, limit: int, cap: int = GROWTH_CAP) -> list[int]:
    """The lengths at which the report measures attention's share: the input's ``length``,
    the powers of two from 64 up to ``min(limit, cap)``, and that bound itself.

    >>> growth_lengths(13, 512)
    [13, 64, 128, 256, 512]
    >>> growth_lengths(300, 8192)
    [64, 128, 256, 300, 512, 1024]
    """
    top = min(limit, cap)
    grid = {n for n in (2 ** k for k in range(6, 31)) if n <= top} | {top, length}
    return sorted(n for n in grid if n <= max(top, length))


def cost_data(model: nn.Module, length: int, *, lengths: Sequence[int] | None = None, repeats: int = 1,
              batch: int = 1) -> dict[str, Any]:
    """What attention costs in ``model`` for an input of ``length`` tokens, as the report's JSON.

    Args:
        model: as for :func:`attnkit.profile.profile` (a Hugging Face model or an attnkit module).
        length: the input's length in tokens (>= 1, at most the model's maximum).
        lengths: where to measure attention's share (default :func:`growth_lengths`); ``length``
            is always added.
        repeats: timed runs per length (default 1: the section is a sketch, not a benchmark;
            ``attnkit profile`` measures properly).
        batch: sequences per forward (default 1).

    Returns:
        ``{"model", "machine", "repeats", "length", "split": {total_s, attention_s, projections_s,
        feed_forward_s, rest_s, overhead, noisy}, "attention_flops", "attention_calls",
        "feed_forward_flops", "kv_cache": {bytes, layers, kv_heads, head_dim, dtype, decoder},
        "growth": [{length, attention_share, total_s}], "crossover": {measured, predicted}}``.
        ``attention_flops`` is ``sum over calls of 4 B H Lq Lk D`` (QK^T and PV, 2 FLOPs per
        multiply-add); shares are of the instrumented forward's time.

    Raises ValueError for a bad ``length`` or a model :func:`~attnkit.profile.profile` cannot time.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {describe(model)}")
    length = require_int("length", length, minimum=1)
    batch = require_int("batch", batch, minimum=1)
    limit = max_length(model)
    if length > limit:
        raise ValueError(f"length must be at most the model's maximum of {limit} positions; got {length}")
    wanted = sorted(set(growth_lengths(length, limit) if lengths is None else list(lengths)) | {length})
    measured = profile(model, wanted, batch=batch, repeats=repeats, warmup=1)
    at = next(r for r in measured.lengths if r.length == length)
    layers, kv_heads, head_dim = cache_shape(model)
    dtype = next(model.parameters()).dtype
    return {
        "model": measured.model, "machine": measured.machine, "repeats": measured.repeats, "length": length,
        "split": {"total_s": at.instrumented_s, "attention_s": at.attention_s, "projections_s": at.projections_s,
                  "feed_forward_s": at.feed_forward_s, "rest_s": at.rest_s, "overhead": at.overhead,
                  "noisy": at.noisy},
        "attention_flops": at.attention_flops, "attention_calls": at.attention_calls,
        "feed_forward_flops": at.feed_forward_flops,
        "kv_cache": {"bytes": kv_cache_bytes(layers, kv_heads, head_dim, length, dtype, batch), "layers": layers,
                     "kv_heads": kv_heads, "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch."),
                     "decoder": is_decoder(model)},
        "growth": [{"length": r.length, "attention_share": r.attention_s / r.instrumented_s,
                    "total_s": r.instrumented_s} for r in measured.lengths],
        "crossover": {"measured": measured.crossover(), "predicted": measured.predicted_crossover()},
    }
