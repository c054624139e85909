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
from attnkit.inspect._patterns import visible_all
from attnkit.inspect.maps import AttentionMaps
from attnkit.inspect.roles import ROLES, column_heads, column_mean, specificity
from attnkit.inspect.tokens import special_mask
from attnkit.viz.report import _check_maps

__all__ = ["PROBES", "SpecificHead", "Summary", "explain", "find_tokens", "opening", "probe", "special_positions",
           "specific_heads", "summarize", "uniform_score"]


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
class SpecificHead:
    """One head, from one query token: the key it gives the most weight beyond that key's column mean.

    Attributes:
        query: the query token's position.
        layer, head: the model's layer and head.
        key: the key's position.
        weight: the query's weight on the key.
        column_mean: the key's weight from the average query of this head (its column mean).
        difference, ratio: ``weight - column_mean`` (what the heads are ranked by) and
            ``weight / column_mean`` (NaN when the column mean is 0), as
            :class:`attnkit.inspect.roles.Specificity` computes them.
        column_head: True when most of this head's queries put most of their weight on one key
            (:func:`attnkit.inspect.roles.column_heads`): its weight says little about this query.
        column_key: that one key's position, for a column head (else the head's most voted key).
    """

    query: int
    layer: int
    head: int
    key: int
    weight: float
    column_mean: float
    difference: float
    ratio: float
    column_head: bool
    column_key: int

    def why(self, tokens: Sequence[str]) -> str:
        """Why a page opens on this head, in words, naming the tokens (``tokens``: the maps' tokens)."""
        keys = f"keys more than {FAR} tokens away" if abs(self.key - self.query) > FAR else "keys"
        text = (f"Opened on layer {self.layer} head {self.head}, query '{tokens[self.query]}': of all heads and "
                f"{keys}, it gives '{tokens[self.key]}' the most weight from '{tokens[self.query]}' beyond what the "
                f"average query gives it ({self.weight:.2f} against a column mean of {self.column_mean:.2f}, "
                f"{self.ratio:.1f}x).")
        if self.column_head and self.column_key == self.key:
            text += (f" It is a column head: most of its queries look at '{tokens[self.key]}', so its weight says "
                     f"little about '{tokens[self.query]}'.")
        elif self.column_head:
            text += (f" Most of its queries look at '{tokens[self.column_key]}' (a column head there), not at "
                     f"'{tokens[self.key]}'.")
        return text


FAR = 2  # keys this close to the query (|i - j| <= FAR) are left out of the specific ranking


def specific_heads(maps: AttentionMaps, query: int, input_index: int = 0, *, n: int = 5,
                   skip_keys: Sequence[int] = ()) -> list[SpecificHead]:
    """The ``n`` heads whose weight from ``query`` on one key stands furthest above that key's
    column mean (the weight the average query gives it), best first.

    Each head's key is the one with the largest difference, among keys more than :data:`FAR`
    tokens from the query and not in ``skip_keys`` (special tokens): a previous-token head is
    specific to every query's neighbour, which says little about this one. When no key is that
    far (a short input), every key but the query itself and ``skip_keys`` is a candidate. Column
    heads are flagged, not dropped: their weight on a key is shared by every query, which the
    difference shows.

    Args:
        maps: self-attention maps (Lq == Lk); cross-attention has no query-key distance and is
            refused.
        query: the query token's position, in [0, L).
        input_index: which input of ``maps`` to read (default 0).
        n: how many heads to return (default 5), >= 1; fewer if the model has fewer.
        skip_keys: key positions never picked (default none), e.g. :func:`special_positions`.

    Returns:
        Up to ``n`` :class:`SpecificHead`, by ``difference``, largest first (ties: lower layer,
        then lower head); [] when no key is left to pick (a one-token input, or every key skipped).

    >>> import torch
    >>> from attnkit.inspect import AttentionMaps
    >>> a = torch.full((1, 2, 6, 6), 0.1)           # two heads over 6 tokens
    >>> a[0, 0, :, 1] = 0.5                          # head 0: every query looks at token 1
    >>> a[0, 1, 5, 1] = 0.5                          # head 1: only query 5 does
    >>> maps = AttentionMaps([a], [list("abcdef")], None, "toy", (0,), (0, 1))
    >>> best = specific_heads(maps, 5, n=1)[0]
    >>> best.head, best.key, round(best.weight, 3), round(best.column_mean, 3)
    (1, 1, 0.5, 0.167)
    """
    if maps.is_cross:
        raise ValueError("maps must be self-attention maps: specific_heads ranks keys by their distance from the "
                         "query, which cross-attention (queries and keys from different sequences) does not have")
    input_index = _check_maps(maps, input_index)
    count = require_int("n", n, minimum=1)
    attn = maps.attentions[input_index]
    spec = specificity(attn, query)  # (layers, heads, Lk)
    column = column_heads(attn)
    far = _candidates(query, attn.shape[-1], skip_keys)
    if not bool(far.any()):
        return []
    diff = spec.difference.masked_fill(~far, -torch.inf)
    best, key = diff.max(-1)  # (layers, heads)
    order = torch.sort(best.flatten(), descending=True, stable=True).indices[:count]
    n_heads = attn.shape[1]
    out = []
    for o in order.tolist():
        li, hi = divmod(o, n_heads)
        j = int(key[li, hi])
        out.append(SpecificHead(query, maps.layers[li], maps.heads[hi], j, float(spec.weight[li, hi, j]),
                                float(spec.column_mean[li, hi, j]), float(spec.difference[li, hi, j]),
                                float(spec.ratio[li, hi, j]), bool(column.flagged[li, hi]), int(column.key[li, hi])))
    return out


def _candidates(query: int, n_keys: int, skip_keys: Sequence[int]) -> torch.Tensor:
    """(Lk,) bool: the keys :func:`specific_heads` may pick for ``query`` (far ones; all but itself if none)."""
    j = torch.arange(n_keys)
    allowed = torch.ones(n_keys, dtype=torch.bool)
    allowed[list(skip_keys)] = False
    far = allowed & ((j - query).abs() > FAR)
    return far if bool(far.any()) else allowed & (j != query)


def opening(maps: AttentionMaps, input_index: int = 0, *, focus: int | None = None) -> SpecificHead | None:
    """The head and query a page opens on: for ``focus``, its most specific head (the first of
    :func:`specific_heads`); without one, the query token (special tokens left out) whose most
    specific head stands furthest above its key's column mean, and that head. None for
    cross-attention maps or an input with nothing to pick.

    Args:
        maps: the maps (L tokens); every layer and head is searched, one (L, L) map at a time.
        input_index: which input of ``maps`` (default 0).
        focus: a query position in [0, L), or None (default) to pick the query too.

    >>> import torch
    >>> from attnkit.inspect import AttentionMaps
    >>> a = torch.full((1, 1, 6, 6), 0.1)
    >>> a[0, 0, 4, 0] = 0.6                          # only query 4 looks hard at token 0
    >>> maps = AttentionMaps([a], [list("abcdef")], None, "toy", (0,), (0,))
    >>> best = opening(maps)
    >>> best.query, best.key
    (4, 0)
    """
    input_index = _check_maps(maps, input_index)
    if maps.is_cross:
        return None
    special = _special_keys(maps, input_index)
    if focus is not None:
        found = specific_heads(maps, focus, input_index, n=1, skip_keys=special)
        return found[0] if found else None
    attn = maps.attentions[input_index]  # (layers, heads, L, L)
    n = attn.shape[-1]
    allowed = torch.stack([_candidates(i, n, special) for i in range(n)])  # (Lq, Lk)
    best = torch.full((n,), -torch.inf, dtype=torch.float64)
    for li in range(attn.shape[0]):  # one (L, L) map at a time: a long input's layer would not fit at once
        for hi in range(attn.shape[1]):
            a = attn[li, hi]
            diff = (a.double() - column_mean(a)).masked_fill(~allowed, -torch.inf)
            best = torch.maximum(best, diff.amax(-1))
    best[special] = -torch.inf
    if not bool(torch.isfinite(best).any()):
        return None
    return opening(maps, input_index, focus=int(best.argmax()))


@dataclass(frozen=True)
class Summary:
    """What ``attnkit explain`` prints.

    Attributes:
        rows: per token of interest: (index, token, per layer: [(key index, key token, weight)]).
        shown, total: tokens of interest listed, and how many there were.
        skipped_keys: key positions left out of the lists (special tokens), if any.
        heads: for up to 8 tokens of interest, when they were chosen: the 5 most specific
            heads of each (:func:`specific_heads`), best first.
        roles: every head's role scores.
    """

    rows: list[tuple[int, str, list[list[tuple[int, str, float]]]]]
    shown: int
    total: int
    skipped_keys: list[int]
    heads: list[SpecificHead]
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
    heads: list[SpecificHead] = []
    if tokens is not None and not maps.is_cross:
        for i in wanted[:8]:
            heads.extend(specific_heads(maps, i, input_index, skip_keys=_special_keys(maps, input_index)))
    return Summary(rows, len(rows), len(wanted), skipped, heads, head_roles(maps, input_index=input_index))


# The standard probe of each self-attention role: random word tokens, repeated once for the roles that
# read repeats (Olsson et al. 2022's induction probe), else never repeated, so no repeat confounds them.
PROBES = {role: ("repeated random tokens" if role in ("induction", "duplicate_token") else "random tokens")
          for role in ROLES}


def uniform_score(maps: AttentionMaps, role: str, input_index: int = 0) -> float:
    """The score ``role`` gives a head that spreads each query's weight evenly over the keys it
    sees (the keys any head of ``maps`` gives weight to: all of them in an encoder, the earlier
    ones in a causal decoder), on the same tokens: the baseline a head's score must beat.

    Args:
        maps: self-attention maps (L tokens), with ``token_ids`` for ``duplicate_token`` and
            ``induction``.
        role: one of :data:`attnkit.inspect.roles.ROLES`.
        input_index: which input of ``maps`` (default 0).

    Returns:
        The score. ValueError, with the reason, where the role has no score on these tokens
        (``induction`` without a repeated token or without ``token_ids``).

    >>> import torch
    >>> from attnkit.inspect import AttentionMaps
    >>> a = torch.softmax(torch.randn(1, 2, 4, 4), -1)  # an encoder's maps over 4 tokens: every key seen
    >>> maps = AttentionMaps([a], [list("abab")], [[1, 2, 1, 2]], "toy", (0,), (0, 1))
    >>> uniform_score(maps, "induction")              # one key in four is the induction target
    0.25
    """
    input_index = _check_maps(maps, input_index)
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
    attn = maps.attentions[input_index]
    seen = visible_all(attn).double()  # (L, L): keys any head gives weight to, as head_roles reads them
    even = (seen / seen.sum(-1, keepdim=True).clamp(min=1))[None, None]
    ids = None if maps.token_ids is None else [list(maps.token_ids[input_index])]
    flat = AttentionMaps([even], [list(maps.tokens[input_index])], ids, "uniform", (0,), (0,))
    found = head_roles(flat, roles=[role], min_evidence=1)
    if role in found.skipped:
        raise ValueError(f"{role} has no score on these tokens: {found.skipped[role]}")
    return float(found[role][0, 0])


def probe(role: str, model: tuple[Any, Any], *, length: int = 40, seed: int = 0) -> tuple[AttentionMaps, HeadRoles]:
    """Run ``model`` on ``role``'s standard probe (:data:`PROBES`) and score every head on it.

    The probe is ``length`` random word tokens of the tokenizer's vocabulary (letters only, no
    special token), seeded by ``seed``; for ``induction`` and ``duplicate_token`` the same
    tokens follow once more, so the second half has ``length`` repeated tokens to score on. The
    tokenizer adds its special tokens ([CLS] ... [SEP]) around them as for a text.

    Args:
        role: one of :data:`attnkit.inspect.roles.ROLES`.
        model: a ``(model, tokenizer)`` pair.
        length: random tokens (default 40), >= 5; the model must take 2 * length + its special tokens.
        seed: the random tokens' seed (default 0).

    Returns:
        The probe's maps and their :func:`~attnkit.inspect.head_roles` (with the default
        evidence minimum, which the repeated probe passes).
    """
    if role not in PROBES:
        raise ValueError(f"role must be one of {', '.join(PROBES)} (the self-attention roles with a standard probe); "
                         f"got {role!r}")
    length = require_int("length", length, minimum=5)
    seed = require_int("seed", seed)
    net, tokenizer = model
    vocab = tokenizer.get_vocab()
    words = sorted(i for t, i in vocab.items() if t.isalpha() and i not in set(tokenizer.all_special_ids))
    if len(words) < length:
        raise ValueError(f"the tokenizer has {len(words)} word tokens; the probe needs length={length} distinct ones")
    generator = torch.Generator().manual_seed(seed)
    picked = [words[i] for i in torch.randperm(len(words), generator=generator)[:length].tolist()]
    body = picked + picked if PROBES[role] == "repeated random tokens" else picked
    empty = list(tokenizer("")["input_ids"])  # the special tokens of an empty text: [CLS] [SEP], <s>, or none
    lead = empty[:1] if empty and empty[0] in (tokenizer.cls_token_id, tokenizer.bos_token_id) else []
    ids = lead + body + empty[len(lead):]
    maps = capture(net, torch.tensor(ids), tokenizer=tokenizer)
    if not isinstance(maps, AttentionMaps):
        raise TypeError(f"probe takes an encoder or a decoder model; {type(net).__name__} is an encoder-decoder")
    return maps, head_roles(maps)
