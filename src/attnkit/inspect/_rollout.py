"""Attention rollout (Abnar & Zuidema, 2020)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attnkit._checks import describe
from attnkit.inspect._views import probabilities, require_square, resolve

if TYPE_CHECKING:
    from attnkit.inspect.maps import AttentionMaps

__all__ = ["rollout"]


def rollout(
    attn: Tensor | AttentionMaps, *, input_index: int = 0, every_layer: bool = False, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): how much each token draws on each input token.

    For each layer: average the heads, add the residual path ``0.5 * A + 0.5 * I``,
    renormalise the rows; then multiply from the first layer to the last,
    ``R = A_L ... A_2 A_1``. Row ``i`` of ``R`` is how output ``i`` of the last layer
    mixes the input tokens; rows sum to 1. A fully masked row becomes an identity row.

    Rollout is defined over the whole model: every layer from 0, in order, and every
    head. An ``AttentionMaps`` must hold ``layers == (0, ..., n-1)`` and
    ``heads == (0, ..., h-1)``, and, where the maps know the model's counts
    (``model_layers``, ``model_heads``), all of them, or this raises: capture every layer
    and head, and don't ``select`` a subset. A tensor is taken to hold all of them. (Maps
    without ``model_heads``, such as files saved before it existed, can't tell a leading
    subset of heads, such as ``select(heads=[0, 1])``, from all heads; don't roll one out.)

    Args:
        attn: probabilities (layers, heads, L, L), or an ``AttentionMaps``; Lq == Lk.
        input_index: which input of an ``AttentionMaps`` to read (default 0).
        every_layer: also return the rollout up to each layer: (layers, L, L), whose
            entry ``l`` is ``A_l ... A_1`` and whose last entry is the whole rollout.
        dtype: torch.float64 (default) or torch.float32 (about 3x faster on a CPU for
            thousands of tokens, for pictures).

    Returns:
        (L, L) in ``dtype`` (``every_layer``: (layers, L, L)), rows summing to 1.

    >>> import torch
    >>> A = torch.tensor([[1.0, 0.0], [1.0, 0.0]])[None, None]  # one layer, one head: all on token 0
    >>> rollout(A)
    tensor([[1.0000, 0.0000],
            [0.5000, 0.5000]], dtype=torch.float64)
    """
    view = resolve("attn", attn, input_index, dims=4, cast=False)
    t = view.attn
    n_layers, n_heads = t.shape[:2]
    if view.layers is not None and view.layers != tuple(range(n_layers)):
        raise ValueError(
            f"rollout needs every layer of the model, from 0 in order; attn holds layers {view.layers}. "
            "Capture all layers, and don't select a subset"
        )
    if view.heads is not None and view.heads != tuple(range(n_heads)):
        raise ValueError(
            f"rollout needs every head of the model, from 0 in order; attn holds heads {view.heads}. "
            "Capture all heads, and don't select a subset"
        )
    for what, held, model in (("layers", n_layers, view.model_layers), ("heads", n_heads, view.model_heads)):
        if model is not None and held != model:
            raise ValueError(f"rollout needs every {what[:-1]} of the model; attn holds {held} of its {model} {what} "
                             f"(model_{what}). Capture all {what}, and don't select a subset")
    if n_layers == 0:
        raise ValueError(f"rollout needs at least one layer; got {describe(t)}")
    length = require_square("attn", t, "rollout")
    if not isinstance(every_layer, bool):
        raise TypeError(f"every_layer must be a bool; got {describe(every_layer)}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64; got {dtype!r}")
    eye = torch.eye(length, dtype=dtype, device=t.device)
    result, steps = eye, []
    for n, layer in enumerate(t):  # (heads, L, L); layers are 0..n-1 here
        mixed = 0.5 * probabilities("attn", layer, f"layer {n} (of {describe(t)})").mean(0).to(dtype) + 0.5 * eye
        result = (mixed / mixed.sum(-1, keepdim=True)) @ result
        if every_layer:
            steps.append(result)
    return torch.stack(steps) if every_layer else result
