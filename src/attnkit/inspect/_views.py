"""Reading attention for the roles and comparisons: a tensor or one input of an ``AttentionMaps``,
checked and cast to float64, with what the maps know about it (tokens, ids, special flags, the
model's layer and head counts); and the arguments that index it (token ids, key sets, layers,
heads).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnkit._checks import describe, int_vector, require_int, require_tensor

__all__ = ["View", "key_mask", "position", "probabilities", "require_square", "resolve", "token_ids_of", "top_heads"]


@dataclass(frozen=True)
class View:
    """One input's attention, checked and in float64, with what the maps knew about it."""

    attn: Tensor  # (..., Lq, Lk) float64
    tokens: list[str] | None
    token_ids: Sequence[int] | Tensor | None
    layers: tuple[int, ...] | None
    heads: tuple[int, ...] | None
    model_name: str | None
    key_tokens: list[str] | None = None  # cross-attention maps: the key side's tokens
    special: list[bool] | None = None  # per query token: one of the tokenizer's special tokens
    key_special: list[bool] | None = None  # per key token, for cross-attention maps
    model_layers: int | None = None  # how many layers and heads the model has (None: unknown)
    model_heads: int | None = None

    @property
    def keys(self) -> list[str] | None:
        """The key tokens: ``key_tokens`` for cross-attention maps, else ``tokens``."""
        return self.tokens if self.key_tokens is None else self.key_tokens

    @property
    def keys_special(self) -> list[bool] | None:
        """Per key token, whether it is special: ``key_special`` for cross maps, else ``special``."""
        return self.special if self.key_tokens is None else self.key_special


def _entry(maps: object, field: str, index: int) -> list | None:
    """``maps.<field>[index]`` as a list, or None where the maps (or a stand-in) lack the field."""
    value = getattr(maps, field, None)
    return None if value is None or value[index] is None else list(value[index])


def resolve(name: str, attn: object, input_index: object, *, dims: int | None = None, cast: bool = True) -> View:
    """Read a tensor or one input of an AttentionMaps (duck-typed), check it, cast to float64
    (with ``cast=False`` the caller casts and checks the values, a piece at a time)."""
    index = require_int("input_index", input_index, minimum=0)
    if isinstance(attn, Tensor):
        if index != 0:
            raise ValueError(
                f"input_index applies to AttentionMaps, which hold several inputs; {name} is a tensor "
                f"(one input), so leave input_index at 0; got {index}"
            )
        t, tokens, ids, layers, heads, model_name = attn, None, None, None, None, None
        facts: dict = {}
    elif hasattr(attn, "attentions"):
        maps: Any = attn  # an AttentionMaps, or a stand-in with its fields (duck-typed)
        n = len(maps.attentions)
        if index >= n:
            raise ValueError(f"input_index must be in [0, {n}) for {name} holding {n} inputs; got {index}")
        if getattr(maps, "query_positions", None) is not None:
            maps.require_full(f"{name}: per-head scores, rollout and comparisons")
        t = require_tensor(f"{name}.attentions[{index}]", maps.attentions[index])
        tokens = list(maps.tokens[index]) if maps.tokens else None
        ids = maps.token_ids[index] if maps.token_ids is not None else None
        layers, heads = tuple(maps.layers), tuple(maps.heads)
        model_name = getattr(maps, "model_name", None)
        facts = {"key_tokens": _entry(maps, "key_tokens", index), "special": _entry(maps, "special", index),
                 "key_special": _entry(maps, "key_special", index),
                 "model_layers": getattr(maps, "model_layers", None), "model_heads": getattr(maps, "model_heads", None)}
        if t.dim() != 4 or tuple(t.shape[:2]) != (len(layers), len(heads)):
            raise ValueError(
                f"{name}.attentions[{index}] must be (layers, heads, Lq, Lk) with {len(layers)} layers and "
                f"{len(heads)} heads, as {name}.layers and {name}.heads say; got {describe(t)}"
            )
    else:
        raise TypeError(
            f"{name} must be a torch.Tensor of attention probabilities (..., Lq, Lk) or an AttentionMaps "
            f"from attnkit.inspect.capture; got {describe(attn)}"
        )
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must hold floating-point attention probabilities; got {describe(t)}")
    if dims is not None and t.dim() != dims:
        shape = "(Lq, Lk)" if dims == 2 else "(layers, heads, Lq, Lk)"
        raise ValueError(f"{name} must be {dims}-D, {shape}; got {describe(t)}")
    if t.dim() < 2:
        raise ValueError(f"{name} must be at least 2-D, (..., Lq, Lk); got {describe(t)}")
    return View(probabilities(name, t) if cast else t, tokens, ids, layers, heads, model_name, **facts)


def probabilities(name: str, t: Tensor, where: str = "") -> Tensor:
    """``t`` as float64, checked to hold probabilities; ``where`` says which part of ``name`` it is."""
    t = t.detach().to(torch.float64)
    low, high = torch.aminmax(t) if t.numel() else (t.new_zeros(()), t.new_zeros(()))
    if not (bool(low >= 0) and bool(high < math.inf)):  # NaN fails both: min/max propagate it
        part = where or describe(t)
        raise ValueError(
            f"{name} must hold attention probabilities (finite, >= 0); got negative or non-finite values in "
            f"{part}. Pass the softmax output, not the scores"
        )
    return t


def require_square(name: str, t: Tensor, what: str) -> int:
    if t.shape[-2] != t.shape[-1]:
        raise ValueError(
            f"{what} needs self-attention, where query i and key i are the same token (Lq == Lk); "
            f"{name} has shape {tuple(t.shape)}, Lq = {t.shape[-2]}, Lk = {t.shape[-1]}"
        )
    return t.shape[-1]


def token_ids_of(view: View, token_ids: object, length: int, what: str) -> Tensor:
    if token_ids is None:
        token_ids = view.token_ids
    if token_ids is None:
        raise ValueError(
            f"token_ids is required for {what}: got None, and attn carries no token ids. Pass "
            f"token_ids=[...] with one id per token ({length})"
        )
    ids = int_vector("token_ids", token_ids, device=torch.device("cpu"))  # the patterns are built on the CPU
    if ids.numel() != length:
        raise ValueError(f"token_ids must have one id per token, {length}; got {ids.numel()}")
    return ids


def key_mask(key_set: object, k_len: int) -> Tensor:
    """A bool (Lk,) mask from a bool tensor or a sequence of key indices."""
    if isinstance(key_set, Tensor) and key_set.dtype == torch.bool:
        if tuple(key_set.shape) != (k_len,):
            raise ValueError(f"key_set as a bool mask must be (Lk,) = ({k_len},); got {describe(key_set)}")
        return key_set
    if isinstance(key_set, (list, tuple)) and any(isinstance(x, bool) for x in key_set):
        raise TypeError(
            "key_set must be a bool tensor or a list of key indices; got a list of bools. "
            "Pass torch.tensor(key_set) for a mask"
        )
    index = int_vector("key_set", key_set)
    if index.numel() and (index.min() < 0 or index.max() >= k_len):
        raise ValueError(f"key_set indices must be in [0, {k_len}) (Lk = {k_len}); got {index.tolist()}")
    mask = torch.zeros(k_len, dtype=torch.bool)
    mask[index] = True
    return mask


def position(name: str, value: object, held: tuple[int, ...], what: str) -> int:
    """Position on the tensor's axis of a model layer/head index held there."""
    index = require_int(name, value)
    if index not in held:
        raise ValueError(f"{name} must be one of the {what} held, {held}; got {index}")
    return held.index(index)


def top_heads(
    scores: Tensor, layers: tuple[int, ...], heads: tuple[int, ...], n: int, largest: bool
) -> list[tuple[int, int, float]]:
    flat = scores.flatten()
    index = (~flat.isnan()).nonzero().flatten()
    order = torch.sort(flat[index], descending=largest, stable=True).indices[:n]
    width = len(heads)
    return [(layers[i // width], heads[i % width], flat[i].item()) for i in index[order].tolist()]
