"""Reports of encoder-decoder maps and of generation: the data the pages read.

- :func:`seq2seq_data`: a :class:`~attnkit.inspect.Seq2SeqMaps` input as three explorers
  (:mod:`attnkit.viz.report`) on one page: cross-attention (target tokens on the left, the
  source tokens they attend to on the right, line opacity = weight; its matrix tab is the
  alignment heatmap, rows = target tokens, columns = source tokens), the encoder's
  self-attention and the decoder's (causal) self-attention.
- :func:`generation_data`: a :class:`~attnkit.inspect.GenerationMaps` input as the text
  growing token by token; each generated token shows the attention that produced it.

:func:`attnkit.viz.report.report_html` and :func:`~attnkit.viz.report.write_report` take
either kind of maps and call these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from attnkit._checks import describe, require_int
from attnkit.inspect.generation import GenerationMaps
from attnkit.inspect.maps import AttentionMaps, Seq2SeqMaps
from attnkit.viz import encode as _encode

__all__ = ["PARTS", "generation_data", "seq2seq_data"]

PARTS = ("cross", "encoder", "decoder")


def _input(maps: Any, input_index: object, kind: type[Any]) -> int:
    if not isinstance(maps, kind):
        raise TypeError(f"maps must be a {kind.__name__}; got {describe(maps)}")
    index = require_int("input_index", input_index, minimum=0)
    if index >= len(maps):
        raise ValueError(f"input_index must be in [0, {len(maps)}) for maps of {len(maps)} inputs; got {index}")
    return index


def seq2seq_data(maps: Seq2SeqMaps, input_index: int = 0, *, title: str | None = None, tolerance: float = 0.001,
                 max_bytes: int = 20_000_000, progress: Callable[[str, int, int], None] | None = None,
                 focus: int | None = None, view: tuple[int, Sequence[int]] | None = None,
                 figures: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON of the encoder-decoder page: one :func:`~attnkit.viz.report.report_data` per part.

    Args:
        maps: from ``attnkit.inspect.capture(model, source, target=...)``.
        input_index: which input (default 0).
        title: shown at the top (default: the source text rebuilt from its tokens, an arrow,
            and the target's).
        tolerance, max_bytes: how the maps are stored (:func:`attnkit.viz.encode.encode`);
            ``max_bytes`` is the budget of the three parts together (a third each).
        progress: called as ``progress(description, done, total)``.
        focus: a target token index (a row of the cross and decoder maps) to open both on,
            or None (default).
        view: ``(layer, heads)`` of the cross-attention to open on (model indices;
            default: every head of the last layer).
        figures: lines of text shown under the title (the findings behind the picture);
            none by default. Shown through ``textContent``, never as HTML.

    Returns:
        ``{"format": 1, "kind": "seq2seq", "title", "model", "source", "target", "figures",
        "parts": {"cross", "encoder", "decoder"}}``; the cross part's ``tokens`` are the
        target tokens (its rows) and ``key_tokens`` the source tokens (its columns).

    >>> import torch
    >>> from attnkit.inspect import AttentionMaps, Seq2SeqMaps
    >>> src, tgt = ["the", "bank"], ["la", "rive", "</s>"]
    >>> p = lambda q, k: torch.softmax(torch.randn(1, 2, q, k), -1)
    >>> maps = Seq2SeqMaps(AttentionMaps([p(2, 2)], [src], None, "toy", (0,), (0, 1)),
    ...                    AttentionMaps([p(3, 3)], [tgt], None, "toy", (0,), (0, 1)),
    ...                    AttentionMaps([p(3, 2)], [tgt], None, "toy", (0,), (0, 1), key_tokens=[src]),
    ...                    {"source": None, "target": None})
    >>> data = seq2seq_data(maps, focus=1, view=(0, [1]), figures=["head 1 reads 'bank'"])
    >>> data["parts"]["cross"]["focus"], data["parts"]["cross"]["view"], data["figures"]
    (1, {'layer': 0, 'heads': [1]}, ["head 1 reads 'bank'"])
    """
    from attnkit.viz.report import _text, report_data

    index = _input(maps, input_index, Seq2SeqMaps)
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title must be a str or None; got {describe(title)}")
    lines = None if isinstance(figures, str) else list(figures)  # a generator is read once, here
    if lines is None or not all(isinstance(line, str) for line in lines):
        raise TypeError(f"figures must be a sequence of str lines; got {describe(figures)}")
    budget = require_int("max_bytes", max_bytes, minimum=3)
    source = [str(t) for t in maps.encoder.tokens[index]]
    target = [str(t) for t in maps.decoder.tokens[index]]
    if title is None:
        title = f"{_text(source, 78)} → {_text(target, 78)}"
    parts = {}
    for name in PARTS:
        part: AttentionMaps = getattr(maps, name)

        def step(what: str, done: int, total: int, name: str = name) -> None:
            if progress:
                progress(f"{name}: {what}", done, total)

        parts[name] = report_data(part, index, title=title, tolerance=tolerance, max_bytes=budget // 3,
                                  progress=step, focus=None if name == "encoder" else focus,
                                  view=view if name == "cross" else None)
    return {"format": 1, "kind": "seq2seq", "title": parts["cross"]["title"], "model": maps.cross.model_name,
            "source": source, "target": target, "figures": lines, "parts": parts}


def generation_data(maps: GenerationMaps, input_index: int = 0, *, new_tokens: int | None = None,
                    tokenizer: Any = None, title: str | None = None, tolerance: float = 0.001,
                    max_bytes: int = 20_000_000) -> dict[str, Any]:
    """The JSON of the generation page: the tokens, where generation began, the encoded maps.

    ``maps.decoder`` covers every token of ``maps.sequences`` (as :func:`capture_generation`
    records them), or every token but the last generated one (which generation never reads;
    its name is then appended). Generated token ``p`` was produced by the step that read token
    ``p - 1``, so the page shows row ``p - 1`` (over tokens ``0..p-1``, every earlier token)
    of the decoder's maps and, for an encoder-decoder, of the cross maps (over the source).

    Args:
        maps: from :func:`attnkit.inspect.capture_generation`.
        input_index: which input (default 0).
        new_tokens: how many tokens at the end of ``maps.sequences`` were generated (for a
            decoder-only model: ``sequences.shape[1] - prompt_ids.shape[1]``). Default for an
            encoder-decoder: every decoder token after the start token; a decoder-only
            model needs it (the maps cannot tell the prompt from the generated tokens).
        tokenizer: names the last generated token when the maps hold no row for it;
            without one it shows as its id.
        title: shown at the top (default: the text rebuilt from the tokens).
        tolerance, max_bytes: how the maps are stored (:func:`attnkit.viz.encode.encode`).

    Returns:
        ``{"format": 1, "kind": "generation", "title", "model", "tokens" (T), "prompt" (the
        tokens before the first generated one), "layers", "heads", "decoder" (encoded
        (layers * heads, R, R), layer-major, R = T or T - 1 rows as the maps hold them),
        "cross" (encoded (layers * heads, R, S)) or None, "source" (S tokens) or None}``.
    """
    from attnkit.viz.report import _text

    index = _input(maps, input_index, GenerationMaps)
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title must be a str or None; got {describe(title)}")
    read = [str(t) for t in maps.decoder.tokens[index]]
    ids = maps.decoder.token_ids[index] if maps.decoder.token_ids is not None else None
    sequence = [int(i) for i in maps.sequences[index]]
    # capture_generation gives every token of sequences a row (the last one too); maps without
    # the last token's row (T - 1 rows) get its name appended.
    covered = len(read) == len(sequence) or (ids is not None and [int(i) for i in ids] == sequence[-len(ids):])
    if covered:
        tokens = read
    else:
        last_id = sequence[-1]
        tokens = [*read, str(tokenizer.convert_ids_to_tokens(last_id)) if tokenizer is not None else str(last_id)]
    if new_tokens is None:
        if maps.cross is None:
            raise ValueError("new_tokens must be given for a decoder-only model's maps (how many tokens at the end "
                             "of maps.sequences were generated: sequences.shape[1] - prompt length); got None")
        new_tokens = len(tokens) - 1
    new_tokens = require_int("new_tokens", new_tokens, minimum=1)
    if new_tokens >= len(tokens):
        raise ValueError(f"new_tokens must leave at least one token of prompt: at most {len(tokens) - 1} for input "
                         f"{index} of {len(tokens)} tokens; got {new_tokens}")

    def encoded(part: AttentionMaps) -> dict[str, Any]:
        attn = part.attentions[index]
        matrices = [attn[li, hi] for li in range(attn.shape[0]) for hi in range(attn.shape[1])]
        return _encode.encode(matrices, tolerance=tolerance, max_bytes=max_bytes // 2).to_json()

    cross = maps.cross
    return {
        "format": 1, "kind": "generation", "model": maps.decoder.model_name,
        "title": _text(tokens) if title is None else title if len(title) <= 160 else title[:159] + "…",
        "tokens": tokens, "prompt": len(tokens) - new_tokens,
        "layers": list(maps.decoder.layers), "heads": list(maps.decoder.heads),
        "decoder": encoded(maps.decoder),
        "cross": None if cross is None else encoded(cross),
        "cross_layers": None if cross is None else list(cross.layers),
        "cross_heads": None if cross is None else list(cross.heads),
        "source": None if cross is None else [str(t) for t in cross.keys[index]],
    }
