"""``AttentionMaps``: the attention probabilities of one forward pass, per input, with their tokens.

File format of :meth:`AttentionMaps.save`: one safetensors file (written and read with the
``safetensors`` package). Input ``i``'s maps are the tensor ``"attentions.{i}"``,
(layers, heads, Lq, Lk) in the stored dtype (F32, F16, BF16 or F64). The file's
``__metadata__`` holds one key, ``"attnkit.maps"``, a JSON object::

    {"format": 1, "model_name": str, "layers": [int], "heads": [int],
     "tokens": [[str]], "token_ids": [[int]] or null}

with one list of tokens (and of ids) per input, one token per query. Optional keys (files
written before they existed load without them): ``"key_tokens"``, ``"key_token_ids"``
(cross-attention: one list per input, one per key), ``"special"``, ``"key_special"``
([[bool]]), ``"word_ids"``, ``"key_word_ids"`` ([[int or null]]), ``"model_layers"``,
``"model_heads"`` (int), ``"query_positions"`` ([[int]]: maps captured with ``queries=``,
the token index of each stored row). Without ``"key_tokens"`` the keys are the query
tokens, and ``"tokens"`` holds one token per key.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from attnkit import _tensorfile
from attnkit._checks import describe
from attnkit._format import size

__all__ = ["AttentionMaps", "Seq2SeqMaps"]

_KEY = "attnkit.maps"
_FORMAT = 1
_OPTIONAL = ("key_tokens", "key_token_ids", "model_layers", "model_heads", "special", "key_special", "word_ids",
             "key_word_ids", "query_positions")


def _indices(name: str, given: Iterable[int] | int | None, available: tuple[int, ...]) -> list[int]:
    """Positions in ``available`` of the model indices ``given`` (all of them for None)."""
    if given is None:
        return list(range(len(available)))
    wanted = [given] if isinstance(given, int) else list(given)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in wanted):
        raise TypeError(f"{name} must be an int or a sequence of ints; got {given!r}")
    missing = [i for i in wanted if i not in available]
    if missing:
        raise ValueError(f"{name} {missing} were not captured; these maps hold {name} {list(available)}")
    return [available.index(i) for i in wanted]


@dataclass
class AttentionMaps:
    """Attention probabilities of one forward pass, one tensor per input.

    Attributes:
        attentions: one (layers, heads, Lq, Lk) CPU tensor per input, cut to its real
            (non-padding) tokens; each row sums to 1 over the keys its query may attend to.
            A row whose query sees no key is all zeros.
        tokens: one list per input of its query tokens as strings (the tokenizer's, such as
            ``'[CLS]'`` or ``'##ing'``; ``str(id)`` without a tokenizer).
        token_ids: one list of ids per input, or None where inputs were not ids.
        model_name: the model's name or path.
        layers, heads: the model's layer and (query) head indices that the first two axes
            hold, in that order.
        key_tokens, key_token_ids: the key side (Lk tokens per input) where it differs from
            the query side (cross-attention: queries are target tokens, keys source tokens);
            None for self-attention, where the keys are ``tokens``. See :attr:`keys`.
        model_layers, model_heads: how many layers and (query) heads per layer the model
            has, so a consumer knows whether these maps hold all of them; None = unknown.
        special, key_special: per input, one bool per token, True for the tokenizer's
            special tokens (``[CLS]``, ``</s>``, padding...); None = unknown (no tokenizer).
        word_ids, key_word_ids: per input, the index of the word each token belongs to
            (the fast tokenizer's ``word_ids()``; None for special tokens); None = unknown.
        query_positions: per input, which query token each stored row is (an index into
            ``tokens``, increasing), for maps that hold only some rows
            (``capture(..., queries=...)``); None = every row, row i is token i. ``tokens``
            and the other per-query lists still hold every token. See :attr:`is_partial`.

    With ``key_tokens`` None and a map whose query count differs from ``len(tokens)``,
    ``tokens`` are the keys (what files and code before cross-attention wrote).

    ``len(maps)`` is the number of inputs and ``maps[i]`` is input ``i``'s tensor.

    >>> import torch
    >>> maps = AttentionMaps([torch.full((2, 3, 4, 4), 0.25)], [["a", "b", "c", "d"]], None, "toy", (0, 5), (0, 1, 2))
    >>> maps
    AttentionMaps(model='toy', 1 input of 4 tokens, layers [0, 5], heads 0..2, float32, 384 B)
    >>> maps.select(layers=5, heads=[2, 0])[0].shape
    torch.Size([1, 2, 4, 4])
    """

    attentions: list[Tensor]
    tokens: list[list[str]]
    token_ids: list[list[int]] | None
    model_name: str
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    key_tokens: list[list[str]] | None = None
    key_token_ids: list[list[int]] | None = None
    model_layers: int | None = None
    model_heads: int | None = None
    special: list[list[bool]] | None = None
    key_special: list[list[bool]] | None = None
    word_ids: list[list[int | None]] | None = None
    key_word_ids: list[list[int | None]] | None = None
    query_positions: list[list[int]] | None = None

    def __post_init__(self) -> None:
        self.layers, self.heads = tuple(self.layers), tuple(self.heads)
        for name in ("model_layers", "model_heads"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise TypeError(f"{name} must be None or an int >= 1; got {value!r}")
        if self.model_layers is not None and self.layers and self.layers[-1] >= self.model_layers:
            raise ValueError(f"layers {list(self.layers)} do not fit a model of model_layers={self.model_layers}")
        if self.model_heads is not None and self.heads and max(self.heads) >= self.model_heads:
            raise ValueError(f"heads {list(self.heads)} do not fit a model of model_heads={self.model_heads}")
        if len(self.tokens) != len(self.attentions):
            raise ValueError(f"tokens has {len(self.tokens)} lists but attentions has {len(self.attentions)} "
                             "tensors; expected one of each per input")
        if self.key_tokens is not None and len(self.key_tokens) != len(self.tokens):
            raise ValueError(f"key_tokens has {len(self.key_tokens)} lists; expected one per input "
                             f"({len(self.tokens)})")
        for name, side in (("token_ids", self.tokens), ("special", self.tokens), ("word_ids", self.tokens),
                           ("key_token_ids", self.keys), ("key_special", self.keys), ("key_word_ids", self.keys)):
            value = getattr(self, name)
            if value is not None and [len(t) for t in value] != [len(t) for t in side]:
                raise ValueError(f"{name} must hold one entry per {'key' if name.startswith('key') else 'query'} "
                                 "token of each input (or be None)")
        for i, (a, toks) in enumerate(zip(self.attentions, self.tokens)):
            if not isinstance(a, Tensor) or a.dim() != 4:
                raise TypeError(f"attentions[{i}] must be a 4-D tensor (layers, heads, Lq, Lk); got {describe(a)}")
            if a.shape[:2] != (len(self.layers), len(self.heads)):
                raise ValueError(f"attentions[{i}] has shape {tuple(a.shape)}; expected (layers, heads, Lq, Lk) with "
                                 f"{len(self.layers)} layers and {len(self.heads)} heads")
            if self.key_tokens is None:
                if a.shape[3] != len(toks):
                    raise ValueError(f"attentions[{i}] has {a.shape[3]} keys but tokens[{i}] has {len(toks)} tokens")
            elif a.shape[3] != len(self.key_tokens[i]) or (self.query_positions is None and a.shape[2] != len(toks)):
                raise ValueError(f"attentions[{i}] has {a.shape[2]} queries and {a.shape[3]} keys but tokens[{i}] has "
                                 f"{len(toks)} and key_tokens[{i}] {len(self.key_tokens[i])} tokens")
        if self.query_positions is not None:
            self._check_query_positions()

    def _check_query_positions(self) -> None:
        rows = self.query_positions
        if not isinstance(rows, list) or len(rows) != len(self.attentions):
            raise ValueError(f"query_positions must hold one list per input ({len(self.attentions)}); got {rows!r:.80}")
        for i, (a, kept, toks) in enumerate(zip(self.attentions, rows, self.tokens)):
            if not (isinstance(kept, list) and all(type(p) is int for p in kept)
                    and all(0 <= p < len(toks) for p in kept) and all(p < q for p, q in itertools.pairwise(kept))):
                raise ValueError(f"query_positions[{i}] must be increasing token indices in [0, {len(toks)}); "
                                 f"got {kept!r:.80}")
            if len(kept) != a.shape[2]:
                raise ValueError(f"attentions[{i}] has {a.shape[2]} query rows but query_positions[{i}] names "
                                 f"{len(kept)}; expected one position per row")

    @property
    def is_partial(self) -> bool:
        """True when the maps hold only some query rows (see ``query_positions``)."""
        return self.query_positions is not None

    def rows(self, index: int = 0) -> list[int]:
        """The query token of each stored row of input ``index``: ``query_positions[index]``, or
        every token's index for full maps."""
        return list(self.query_positions[index]) if self.query_positions is not None else \
            list(range(self.attentions[index].shape[2]))

    def require_full(self, what: str) -> None:
        """Raise ValueError if these maps hold only some query rows: ``what`` (a view, a score,
        a comparison) reads every row, and would draw or score the kept rows as if they were all."""
        if self.query_positions is not None:
            kept = self.query_positions[0] if self.query_positions else []
            shown = ", ".join(map(str, kept[:8])) + (", ..." if len(kept) > 8 else "")
            raise ValueError(f"{what} needs every query row, but these maps hold only some (captured with queries=; "
                             f"input 0 keeps rows of tokens {shown} of {len(self.tokens[0]) if self.tokens else 0}). "
                             "Capture again without queries= for this, or read the kept rows with maps[i] and "
                             "maps.rows(i)")

    @property
    def keys(self) -> list[list[str]]:
        """The key tokens per input: ``key_tokens``, or ``tokens`` for self-attention."""
        return self.tokens if self.key_tokens is None else self.key_tokens

    @property
    def is_cross(self) -> bool:
        """True when queries and keys are different sequences (``key_tokens`` is set)."""
        return self.key_tokens is not None

    def _facts(self) -> dict:
        """The optional fields, copied (the per-input lists are new lists)."""
        def copy(value: list[list[Any]] | None) -> list[list[Any]] | None:
            return None if value is None else [list(v) for v in value]

        return {"key_tokens": copy(self.key_tokens), "key_token_ids": copy(self.key_token_ids),
                "model_layers": self.model_layers, "model_heads": self.model_heads, "special": copy(self.special),
                "key_special": copy(self.key_special), "word_ids": copy(self.word_ids),
                "key_word_ids": copy(self.key_word_ids), "query_positions": copy(self.query_positions)}

    def __len__(self) -> int:
        return len(self.attentions)

    def __getitem__(self, i: int) -> Tensor:
        return self.attentions[i]

    @property
    def nbytes(self) -> int:
        """Bytes held by the attention tensors."""
        return sum(a.numel() * a.element_size() for a in self.attentions)

    def select(self, layers: Iterable[int] | int | None = None,
               heads: Iterable[int] | int | None = None) -> AttentionMaps:
        """The maps of some layers and heads, given by model index (None = all captured).

        Raises ValueError naming the captured indices if one was not captured.
        """
        li = _indices("layers", layers, self.layers)
        hi = _indices("heads", heads, self.heads)
        return AttentionMaps(
            attentions=[a[li][:, hi] for a in self.attentions], tokens=[list(t) for t in self.tokens],
            token_ids=None if self.token_ids is None else [list(t) for t in self.token_ids],
            model_name=self.model_name, layers=tuple(self.layers[i] for i in li),
            heads=tuple(self.heads[i] for i in hi), **self._facts(),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the maps to one safetensors file at ``path`` (the format is in this module's docstring).

        The file is written anew and renamed over ``path``, so maps loaded from ``path`` stay
        valid while it is overwritten.
        """
        meta = {"format": _FORMAT, "model_name": self.model_name, "layers": list(self.layers),
                "heads": list(self.heads), "tokens": self.tokens, "token_ids": self.token_ids}
        meta.update({k: v for k, v in self._facts().items() if v is not None})
        tensors = {f"attentions.{i}": a for i, a in enumerate(self.attentions)}
        _tensorfile.save(path, tensors, metadata={_KEY: json.dumps(meta, ensure_ascii=False)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> AttentionMaps:
        """Read maps written by :meth:`save`, or by any writer of the same format.

        The metadata and every tensor's dtype and shape are checked before any data is read.
        The tensors are memory-mapped: pages are read from the file when first used, and
        writing to a tensor copies its page (the file never changes). Do not truncate or
        rewrite the file in place while the maps are in use; :meth:`save` to the same path is
        safe.

        Raises:
            ValueError: naming the file and the field or tensor, for a file that is not valid
                safetensors or that does not hold attention maps of this format.
            OSError: the file cannot be opened.
        """
        with _tensorfile.open_file(path) as file:
            meta = _read_metadata(path, file)
            attentions = [file.tensor(f"attentions.{i}") for i in range(len(meta["tokens"]))]
        return cls(attentions=attentions, tokens=meta["tokens"], token_ids=meta["token_ids"],
                   model_name=meta["model_name"], layers=tuple(meta["layers"]), heads=tuple(meta["heads"]),
                   **{k: meta.get(k) for k in _OPTIONAL})

    def _repr_html_(self) -> str:
        """Jupyter shows the explorer inline: :func:`attnkit.viz.report.notebook_html` (input 0)."""
        from attnkit.viz.report import notebook_html  # viz depends on inspect, never the other way round

        return notebook_html(self)

    def __repr__(self) -> str:
        n = len(self)
        lengths = sorted({len(t) for t in self.tokens})
        spread = (f"{lengths[0]} tokens" if len(lengths) == 1 else f"{lengths[0]}..{lengths[-1]} tokens") if n else ""
        dtype = str(self.attentions[0].dtype).removeprefix("torch.") if n else "empty"
        rows = "" if self.query_positions is None or not n else \
            f", query rows {_span(tuple(self.query_positions[0]))}{' (input 0)' if n > 1 else ''}"
        return (f"AttentionMaps(model={self.model_name!r}, {n} input{'' if n == 1 else 's'}"
                f"{' of ' + spread if spread else ''}{rows}, layers {_span(self.layers)}, heads {_span(self.heads)}, "
                f"{dtype}, {size(self.nbytes)})")


@dataclass
class Seq2SeqMaps:
    """The attention maps of one encoder-decoder forward pass (:func:`~attnkit.inspect.capture`).

    Attributes:
        encoder: the encoder's self-attention, (layers, heads, S, S) per input.
        decoder: the decoder's (causal) self-attention, (layers, heads, T, T) per input.
        cross: the decoder's attention to the encoder, (layers, heads, T, S) per input:
            ``tokens`` are the target tokens (queries), ``key_tokens`` the source tokens.
        sequences: ``{"source": ids per input, "target": ids per input}``, each cut to its
            real tokens; ``"source"`` is None where the encoder read no token ids (Whisper's
            audio features).

    ``len(maps)`` is the number of inputs.
    """

    encoder: AttentionMaps
    decoder: AttentionMaps
    cross: AttentionMaps
    sequences: dict[str, list[list[int]] | None]

    def __post_init__(self) -> None:
        for name in ("encoder", "decoder", "cross"):
            if not isinstance(getattr(self, name), AttentionMaps):
                raise TypeError(f"{name} must be an AttentionMaps; got {describe(getattr(self, name))}")
        if not len(self.encoder) == len(self.decoder) == len(self.cross):
            raise ValueError(f"encoder, decoder and cross hold {len(self.encoder)}, {len(self.decoder)} and "
                             f"{len(self.cross)} inputs; expected the same number")
        if [len(t) for t in self.cross.tokens] != [len(t) for t in self.decoder.tokens] or \
                [len(t) for t in self.cross.keys] != [len(t) for t in self.encoder.tokens]:
            raise ValueError("cross's query tokens must be the decoder's and its key tokens the encoder's")

    def __len__(self) -> int:
        return len(self.cross)

    @property
    def nbytes(self) -> int:
        """Bytes held by the three parts' tensors."""
        return self.encoder.nbytes + self.decoder.nbytes + self.cross.nbytes

    def __repr__(self) -> str:
        return (f"Seq2SeqMaps(model={self.cross.model_name!r}, {len(self)} input{'' if len(self) == 1 else 's'}, "
                f"encoder {_span(self.encoder.layers)} x {_span(self.encoder.heads)}, "
                f"decoder {_span(self.decoder.layers)} x {_span(self.decoder.heads)}, "
                f"cross {_span(self.cross.layers)} x {_span(self.cross.heads)}, {size(self.nbytes)})")


def _ints(value: object) -> bool:
    return isinstance(value, list) and all(type(i) is int for i in value)


def _word_id(value: object) -> bool:
    return value is None or (type(value) is int and value >= 0)


def _read_metadata(path: str | os.PathLike, file: _tensorfile.Contents) -> dict:
    """The ``"attnkit.maps"`` metadata of ``file``, checked field by field, and checked
    against the tensors' names, dtypes and shapes."""
    if _KEY not in file.metadata:
        raise ValueError(f"{path} holds no attention maps: its safetensors metadata has no {_KEY!r} entry")
    meta = _tensorfile.parse_json(path, _KEY, file.metadata[_KEY])
    version = meta.get("format") if isinstance(meta, dict) else None
    if version != _FORMAT:
        raise ValueError(f"{path}: attention maps format {version!r}; this attnkit reads format {_FORMAT}")
    missing = [k for k in ("tokens", "token_ids", "model_name", "layers", "heads") if k not in meta]
    if missing:
        raise ValueError(f"{path}: the {_KEY!r} metadata lacks {', '.join(missing)}")

    def bad(field: str, expected: str) -> ValueError:
        return ValueError(f"{path}: {_KEY!r} field {field!r} must be {expected}; got {meta[field]!r:.80}")

    tokens, ids = meta["tokens"], meta["token_ids"]
    if not isinstance(meta["model_name"], str):
        raise bad("model_name", "a string")
    for field in ("layers", "heads"):
        if not _ints(meta[field]):
            raise bad(field, "a list of ints")
    if not (isinstance(tokens, list) and all(isinstance(t, list) and all(isinstance(s, str) for s in t)
                                             for t in tokens)):
        raise bad("tokens", "a list of lists of strings, one per input")
    if ids is not None and not (isinstance(ids, list) and len(ids) == len(tokens)
                                and all(_ints(i) and len(i) == len(t) for i, t in zip(ids, tokens))):
        raise bad("token_ids", "null or a list of lists of ints, one id per token")
    keys = meta.get("key_tokens")
    if keys is not None and not (isinstance(keys, list) and len(keys) == len(tokens) and all(
            isinstance(t, list) and all(isinstance(s, str) for s in t) for t in keys)):
        raise bad("key_tokens", "null or a list of lists of strings, one per input")
    for name, side, ok in (("special", tokens, lambda v: type(v) is bool), ("word_ids", tokens, _word_id),
                           ("key_token_ids", keys, lambda v: type(v) is int),
                           ("key_special", keys, lambda v: type(v) is bool), ("key_word_ids", keys, _word_id)):
        value = meta.get(name)
        if value is not None and not (side is not None and isinstance(value, list) and len(value) == len(side) and all(
                isinstance(v, list) and len(v) == len(t) and all(ok(x) for x in v) for v, t in zip(value, side))):
            raise bad(name, f"null or a list per input with one entry per {'key' if name[:3] == 'key' else 'query'}")
    for name in ("model_layers", "model_heads"):
        if meta.get(name) is not None and not (type(meta[name]) is int and meta[name] >= 1):
            raise bad(name, "null or an int >= 1")
    rows = meta.get("query_positions")
    if rows is not None and not (isinstance(rows, list) and len(rows) == len(tokens) and all(_ints(r) for r in rows)):
        raise bad("query_positions", "null or a list per input of the token index of each stored row")
    names = [f"attentions.{i}" for i in range(len(tokens))]
    if sorted(file.shapes) != sorted(names):
        lacking = [n for n in names if n not in file.shapes]
        unexpected = sorted(set(file.shapes) - set(names))
        raise ValueError(f"{path}: expected one tensor 'attentions.{{i}}' per input in 'tokens' ({len(names)}); "
                         f"missing {lacking[:5]}, unexpected {unexpected[:5]}")
    for i, name in enumerate(names):
        dtype, shape = file.dtypes[name], file.shapes[name]
        if dtype not in _tensorfile.FLOATS:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}; expected one of "
                             f"{', '.join(_tensorfile.FLOATS)}")
        want = (len(meta["layers"]), len(meta["heads"]), len(tokens[i] if keys is None else keys[i]))
        if len(shape) != 4 or (shape[0], shape[1], shape[3]) != want:
            raise ValueError(f"{path}: tensor {name!r} has shape {list(shape)}; expected (layers, heads, Lq, Lk) "
                             f"with {want[0]} layers, {want[1]} heads and {want[2]} keys, as the metadata's "
                             f"'layers', 'heads' and '{'tokens' if keys is None else 'key_tokens'}'[{i}] say")
        queries = len(tokens[i]) if rows is None else len(rows[i])
        if (keys is not None or rows is not None) and shape[2] != queries:
            raise ValueError(f"{path}: tensor {name!r} has {shape[2]} queries; "
                             f"{'tokens' if rows is None else 'query_positions'}[{i}] has {queries}")
    return meta


def _span(indices: tuple[int, ...]) -> str:
    """``0..11`` for a run of three or more consecutive indices, else the list."""
    if len(indices) >= 3 and list(indices) == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}..{indices[-1]}"
    return str(list(indices))


