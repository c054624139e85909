"""``attnkit explain``'s pieces: run a model on a text, pick tokens of interest, summarise.

>>> find_tokens(["[CLS]", "the", "cat", "##s", "it", "It"], "it")
[4, 5]
>>> find_tokens(["[CLS]", "the", "cat", "##s"], "cats")
[]
>>> find_tokens(["[CLS]", "the", "cat", "##s"], "#2")
[2]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from attnkit._checks import describe, require_int
from attnkit.inspect import HeadRoles, capture, head_roles
from attnkit.inspect.maps import AttentionMaps
from attnkit.inspect.tokens import special_mask
from attnkit.viz.report import _check_maps

__all__ = ["Summary", "explain", "find_tokens", "special_positions", "summarize"]


def _bare(token: str) -> str:
    for prefix in ("##", "Ġ", "▁"):
        if token.startswith(prefix):
            return token[len(prefix):]
    return token


def find_tokens(tokens: Sequence[str], query: str) -> list[int]:
    """Indices of the tokens that ``query`` names: a token's text (case-insensitive, without
    WordPiece ``##`` or BPE ``Ġ``/``▁`` markers; every occurrence), or ``#N`` for position N."""
    if not isinstance(query, str):
        raise TypeError(f"query must be a str (a token's text, or #N for position N); got {describe(query)}")
    if query.startswith("#") and query[1:].isdigit():
        i = int(query[1:])
        if i >= len(tokens):
            raise ValueError(f"token position {query} is out of range: the input has {len(tokens)} tokens (#0..#"
                             f"{len(tokens) - 1})")
        return [i]
    want = query.strip().lower()
    return [i for i, t in enumerate(tokens) if _bare(t).lower() == want or t.lower() == want]


def explain(
    text: str,
    model: str | os.PathLike | tuple[Any, Any] = "minilm",
    *,
    layers: Iterable[int] | None = None,
    heads: Iterable[int] | None = None,
    progress: bool | Callable[[int, int], None] = False,
) -> AttentionMaps:
    """Run ``model`` on ``text`` and capture every (or the chosen) layer's and head's attention.

    Args:
        text: the input.
        model: ``"minilm"`` (the bundled model), a local folder of a Hugging Face model, or
            a ``(model, tokenizer)`` pair already loaded.
        layers, heads: which to capture (default all).
        progress: as for :func:`attnkit.inspect.capture`.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str; got {describe(text)}")
    if not text.strip():
        raise ValueError("text must hold at least one non-blank character; got an empty text")
    if isinstance(model, tuple):
        if len(model) != 2:
            raise ValueError(f"model must be a name, a folder, or a (model, tokenizer) pair; got a {len(model)}-tuple")
        net, tokenizer = model
    else:
        from attnkit import models

        net, tokenizer = models.load(model)
    maps = capture(net, text, layers, heads, tokenizer=tokenizer, progress=progress)
    if not isinstance(maps, AttentionMaps):  # an encoder-decoder records Seq2SeqMaps
        raise TypeError(f"explain takes an encoder or a decoder model; {type(net).__name__} is an encoder-decoder: "
                        "use attnkit.inspect.capture(model, text, target=...) for its maps")
    return maps


def special_positions(tokens: Sequence[str], special: Sequence[bool] | None = None) -> list[int]:
    """Positions of the special tokens (``[CLS]``, ``[SEP]``, ``<s>``, ``<|endoftext|>``...).

    ``special``: the tokenizer's answer, one bool per token (the maps' ``special`` flags),
    used when given; else the spelling decides (:func:`attnkit.inspect.tokens.special_mask`).

    >>> special_positions(["[CLS]", "the", "[SEP]", "</s>"])
    [0, 2, 3]
    >>> special_positions(["<s>", "the", "</s>"], [True, False, False])  # the tokenizer's flags win
    [0]
    """
    return [i for i, flag in enumerate(special_mask(tokens, special)) if flag]


def _special_keys(maps: AttentionMaps, input_index: int) -> list[int]:
    """The key positions of one input's special tokens: the maps' flags where they have them."""
    flags = maps.key_special if maps.is_cross else maps.special
    return special_positions(maps.keys[input_index], None if flags is None else flags[input_index])


@dataclass(frozen=True)
class Summary:
    """What ``attnkit explain`` prints.

    Attributes:
        rows: per token of interest: (index, token, per layer: [(key index, key token, weight)]).
        shown, total: tokens of interest listed, and how many there were.
        skipped_keys: key positions left out of the lists (special tokens), if any.
        heads: for up to 8 tokens of interest, when they were chosen: the 5 single heads
            that put the most weight on one key, as (query, layer, head, key, weight).
        roles: every head's role scores.
    """

    rows: list[tuple[int, str, list[list[tuple[int, str, float]]]]]
    shown: int
    total: int
    skipped_keys: list[int]
    heads: list[tuple[int, int, int, int, float]]
    roles: HeadRoles


def summarize(
    maps: AttentionMaps,
    input_index: int = 0,
    *,
    tokens: Sequence[int] | None = None,
    k: int = 3,
    max_rows: int = 64,
    skip_special: bool = True,
) -> Summary:
    """Top ``k`` keys per layer (mean over the captured heads) for each token of interest
    (``tokens``; default all, listing at most ``max_rows``), and the head roles.

    With ``skip_special`` (default), special tokens (``[CLS]``, ``[SEP]``, ...: the maps'
    ``special`` flags, else :func:`special_positions`'s spelling rule) are left out of the
    key lists: many heads park most of their weight there, which says little
    about the text. The weights listed are the model's, not renormalised.
    """
    input_index = _check_maps(maps, input_index)
    k = require_int("k", k, minimum=1)
    max_rows = require_int("max_rows", max_rows, minimum=1)
    names = [str(t) for t in maps.tokens[input_index]]
    if tokens is None:
        wanted = list(range(len(names)))
    else:
        if hasattr(tokens, "tolist"):  # a tensor or an array of positions
            tokens = tokens.tolist()
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Iterable):
            raise TypeError(f"tokens must be a sequence of token positions (ints) or None; got {describe(tokens)}")
        wanted = [require_int(f"tokens[{n}]", i, minimum=0) for n, i in enumerate(tokens)]
        bad = [i for i in wanted if i >= len(names)]
        if bad:
            raise ValueError(f"tokens must be positions in [0, {len(names)}); got {bad}")
    shown = wanted[:max_rows]
    attn = maps.attentions[input_index]
    skipped = _special_keys(maps, input_index) if skip_special else []
    per_layer = []
    for li in range(attn.shape[0]):
        grid = attn[li][:, shown].float().mean(0)  # (rows, Lk)
        grid[:, skipped] = -1.0
        weights, keys = torch.sort(grid, dim=-1, descending=True, stable=True)
        per_layer.append([[(j, names[j], w) for j, w in zip(kr[:k].tolist(), wr[:k].tolist()) if w > 0]
                          for kr, wr in zip(keys, weights)])
    rows = [(i, names[i], [tops[n] for tops in per_layer]) for n, i in enumerate(shown)]
    heads: list[tuple[int, int, int, int, float]] = []
    if tokens is not None:
        for i in wanted[:8]:
            grid = attn[:, :, i].float().clone()  # (layers, heads, Lk)
            grid[..., skipped] = -1.0
            best, key = grid.max(-1)
            order = torch.sort(best.flatten(), descending=True, stable=True).indices[:5]
            n_heads = attn.shape[1]
            heads.extend((i, maps.layers[o // n_heads], maps.heads[o % n_heads], int(key.flatten()[o]),
                          float(best.flatten()[o])) for o in order.tolist() if float(best.flatten()[o]) > 0)
    return Summary(rows, len(rows), len(wanted), skipped, heads, head_roles(maps, input_index=input_index))
