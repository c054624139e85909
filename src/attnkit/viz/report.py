"""The explorer report: one self-contained HTML page of one input's attention maps.

The page has a head view (lines from each token to the tokens it attends to, one colour
per head), a model view (every layer x head as a thumbnail; click to enlarge), a matrix
heatmap with values on hover (windowed, with an overview, for long inputs), and a table
of head-role scores, and (when given) what attention costs in the model at this length
(:mod:`attnkit.viz.cost`); controls choose the layer, heads, threshold and aggregation (mean of
the selected heads, or attention rollout up to the layer). It loads nothing from the
network: its script, style and data are inline, and its Content-Security-Policy forbids
every request. The maps are stored compactly (:mod:`attnkit.viz.encode`); the page says
what that leaves out.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from attnkit._checks import describe, require_int
from attnkit.inspect import HeadRoles, head_roles
from attnkit.inspect import rollout as roll_out
from attnkit.inspect.generation import GenerationMaps
from attnkit.inspect.maps import AttentionMaps, Seq2SeqMaps
from attnkit.viz import encode as _encode
from attnkit.viz._html import page

_T = TypeVar("_T")
__all__ = ["report_data", "report_html", "write_report"]

_BODY = '<div id="attnkit-explorer"></div>'


def _check_maps(maps: object, input_index: object) -> int:
    """The input's index, after checking that it holds maps with tokens the pages can show."""
    if not isinstance(maps, AttentionMaps):
        raise TypeError(f"maps must be an AttentionMaps (from attnkit.inspect.capture); got {describe(maps)}")
    maps.require_full("the explorer page (its matrix, lines and head grid draw row i as token i)")
    index = require_int("input_index", input_index, minimum=0)
    if index >= len(maps):
        raise ValueError(f"input_index must be in [0, {len(maps)}) for maps of {len(maps)} inputs; got {index}")
    for name, side in (("tokens", maps.tokens), ("key_tokens", maps.key_tokens or [[]] * len(maps))):
        for i, token in enumerate(side[index]):
            try:
                str(token).encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"maps.{name}[{index}][{i}] is not valid text (a lone surrogate): "
                                 f"{token!r}") from None
    return index


def _sides(maps: AttentionMaps, index: int) -> tuple[list[str], list[str] | None]:
    """Input ``index``'s query tokens, and its key tokens where they differ (cross-attention).

    Maps without ``key_tokens`` whose query count differs from their tokens (files written
    before cross-attention) name their queries ``#0``, ``#1``, ...
    """
    lq, lk = maps.attentions[index].shape[-2:]
    if maps.key_tokens is not None:
        return [str(t) for t in maps.tokens[index]], [str(t) for t in maps.key_tokens[index]]
    tokens = [str(t) for t in maps.tokens[index]]
    if lq == lk:
        return tokens, None
    return [f"#{i}" for i in range(lq)], tokens


def _check_progress(progress: object) -> None:
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable progress(description, done, total) or None; "
                        f"got {describe(progress)}")


def has_whole_model(maps: AttentionMaps) -> bool:
    """Whether the maps' indices are 0..n-1 for layers and heads, as rollout needs. A
    leading subset of heads (heads 0..k-1 of a bigger model) looks the same: pass
    ``rollout=False`` to the report for those."""
    n_layers, n_heads = len(maps.layers), len(maps.heads)
    return maps.layers == tuple(range(n_layers)) and maps.heads == tuple(range(n_heads))


def _scores(roles: Any) -> dict[str, Any]:
    def clean(x: float) -> float | None:
        return None if math.isnan(x) else round(x, 5)

    return {
        "names": list(roles.scores),
        "scores": {name: [[clean(v) for v in row] for row in t.tolist()] for name, t in roles.scores.items()},
        "skipped": dict(roles.skipped),
        "evidence": {name: roles.evidence_text(name) for name in roles.evidence},
    }


def report_data(
    maps: AttentionMaps,
    input_index: int = 0,
    *,
    title: str | None = None,
    focus: int | None = None,
    view: tuple[int, Sequence[int]] | None = None,
    view_reason: str | None = None,
    tolerance: float = 0.001,
    plan: tuple[int | None, int] | str = "auto",
    max_bytes: int = 20_000_000,
    rollout: bool = True,
    roles: HeadRoles | None = None,
    cost: dict[str, Any] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """The JSON the explorer page reads: tokens, encoded maps, rollout, head roles.

    Args:
        maps: from :func:`attnkit.inspect.capture`.
        input_index: which input of ``maps`` (default 0).
        title: shown at the top of the page, cut to 160 characters (default: the input's
            text, rebuilt from its tokens; ``attnkit explain`` passes the text as typed).
        focus: a query token index to open the page on, or None.
        view: ``(layer, heads)``, model indices of the layer and heads to open the page on
            (default: every head of the last layer).
        view_reason: why the page opens on ``view``, shown above the views (e.g.
            :meth:`attnkit.viz.explainer.SpecificHead.why`); None (default) shows nothing.
        tolerance, plan, max_bytes: how the maps are stored (:func:`attnkit.viz.encode.encode`);
            by default the page's data stays under 20 MB whatever the input's length.
        rollout: include attention rollout (default True) when the maps hold every layer
            and head. The maps cannot tell heads 0..k-1 of a bigger model from a whole
            model: pass False when you captured such a subset.
        roles: this input's :func:`~attnkit.inspect.head_roles`, when already computed.
        cost: :func:`attnkit.viz.cost.cost_data` for the model at this input's length, drawn as
            the page's "cost" section; None (default) leaves the section out.
        progress: called as ``progress(description, done, total)``.
    """
    index = _check_maps(maps, input_index)
    focus = _check_report_args(maps, index, title, focus, rollout, roles, cost, progress, view_reason)
    attn = maps.attentions[index]
    tokens, key_tokens = _sides(maps, index)
    n_layers, n_heads = attn.shape[:2]
    opening = None if view is None else _view(maps, view)
    matrices = [attn[li, hi] for li in range(n_layers) for hi in range(n_heads)]
    why_not = _why_no_rollout(maps, key_tokens, rollout)
    if why_not is None:
        matrices.extend(_step(progress, "rollout",
                              lambda: roll_out(maps, input_index=index, every_layer=True, dtype=torch.float32)))
    if roles is None:
        roles = _step(progress, "head roles", lambda: head_roles(maps, input_index=index))

    def step(done: int, total: int) -> None:
        if progress:
            progress("encoding", done, total)

    enc = _encode.encode(matrices, tolerance=tolerance, plan=plan, max_bytes=max_bytes, progress=step)
    del matrices
    return {
        "format": 1,
        "title": _text(tokens) if title is None else title if len(title) <= 160 else title[:159] + "…",
        "model": maps.model_name,
        "tokens": tokens,
        "key_tokens": key_tokens,
        "layers": list(maps.layers),
        "heads": list(maps.heads),
        "rollout": why_not is None,
        "rollout_missing": why_not,
        "focus": focus,
        "view": opening,
        "view_reason": view_reason,
        "roles": _scores(roles),
        "encoding": enc.to_json(),
        "cost": cost,
    }


def _check_report_args(maps: AttentionMaps, index: int, title: object, focus: object, rollout: object,
                       roles: object, cost: object, progress: object, view_reason: object = None) -> int | None:
    """:func:`report_data`'s arguments checked against the maps; the focus as an int or None."""
    lq = maps.attentions[index].shape[-2]
    if roles is not None and (not isinstance(roles, HeadRoles) or (roles.layers, roles.heads, roles.n_tokens) != (
            maps.layers, maps.heads, lq)):
        raise ValueError(f"roles must be head_roles of these maps (layers {list(maps.layers)}, heads "
                         f"{list(maps.heads)}); got {describe(roles)}")
    _check_progress(progress)
    if cost is not None and not (isinstance(cost, dict) and cost.get("length") == lq):
        raise ValueError(f"cost must be attnkit.viz.cost.cost_data(model, length) at this input's length "
                         f"({lq} tokens); got {describe(cost)}"
                         + (f" for {cost.get('length')!r} tokens" if isinstance(cost, dict) else ""))
    if not isinstance(rollout, bool):
        raise TypeError(f"rollout must be a bool; got {describe(rollout)}")
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title must be a str or None; got {describe(title)}")
    if view_reason is not None and not isinstance(view_reason, str):
        raise TypeError(f"view_reason must be a str or None; got {describe(view_reason)}")
    if focus is None:
        return None
    focus = require_int("focus", focus, minimum=0)
    if focus >= lq:
        raise ValueError(f"focus must be a query token index in [0, {lq}); got {focus}")
    return focus


def _why_no_rollout(maps: AttentionMaps, key_tokens: list[str] | None, rollout: bool) -> str | None:
    """Why the page has no rollout, or None when it has one."""
    if key_tokens is not None:
        return ("rollout composes the layers of a self-attention over one token list; these maps name their rows and "
                "columns by different token lists (cross-attention: target tokens reading source tokens; or a "
                "decoder's self-attention whose rows are named by the token each step produces)")
    if not rollout:
        return "rollout was turned off for these maps (they hold a subset of the model's heads)"
    if not has_whole_model(maps):
        return ("rollout needs every layer and head of the model; these maps hold layers "
                f"{list(maps.layers)}, heads {list(maps.heads)}")
    return None


def _step(progress: Callable[[str, int, int], None] | None, what: str, work: Callable[[], _T]) -> _T:
    """``work()``, reported to ``progress`` as one step named ``what``."""
    if progress:
        progress(what, 0, 1)
    result = work()
    if progress:
        progress(what, 1, 1)
    return result


def _view(maps: AttentionMaps, view: object) -> dict[str, Any]:
    """``(layer, heads)`` in model indices -> positions in ``maps``' layers and heads."""
    if not (isinstance(view, tuple) and len(view) == 2 and isinstance(view[1], (list, tuple))):
        raise TypeError(f"view must be a (layer, heads) tuple, e.g. (5, [11]); got {describe(view)}")
    layer, heads = view
    if layer not in maps.layers:
        raise ValueError(f"view's layer must be one of the maps' layers {list(maps.layers)}; got {layer!r}")
    missing = [h for h in heads if h not in maps.heads]
    if not heads or missing:
        raise ValueError(f"view's heads must be a non-empty list of the maps' heads {list(maps.heads)}; got {heads!r}")
    return {"layer": maps.layers.index(layer), "heads": sorted({maps.heads.index(h) for h in heads})}


def _text(tokens: list[str], limit: int = 160) -> str:
    """A readable title from WordPiece/BPE tokens (special tokens left out)."""
    words: list[str] = []
    for t in tokens:
        if (t.startswith("[") and t.endswith("]")) or (t.startswith("<") and t.endswith(">")):
            continue
        if t.startswith("##") and words:
            words[-1] += t[2:]
        elif t.startswith(("Ġ", "▁")):
            words.append(t[1:])
        else:
            words.append(t)
    text = " ".join(words)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def report_html(maps: AttentionMaps | Seq2SeqMaps | GenerationMaps, input_index: int = 0, **kwargs: Any) -> str:
    """The explorer page as one HTML string.

    ``maps`` may be an :class:`~attnkit.inspect.AttentionMaps` (arguments as for
    :func:`report_data`; self- or cross-attention), a :class:`~attnkit.inspect.Seq2SeqMaps`
    (the cross-attention, encoder and decoder explorers on one page; arguments as for
    :func:`attnkit.viz.seq2seq.seq2seq_data`) or a :class:`~attnkit.inspect.GenerationMaps`
    (the text growing token by token; :func:`attnkit.viz.seq2seq.generation_data`).

    >>> import torch
    >>> from attnkit.inspect import AttentionMaps
    >>> p = torch.softmax(torch.randn(2, 2, 3, 3), -1)
    >>> maps = AttentionMaps([p], [["<b>", "</script>", "&"]], None, "toy", (0, 1), (0, 1))
    >>> text = report_html(maps)
    >>> "<b>" in text, text.count("</script>") == text.count("<script"), "://" in text
    (False, True, False)
    """
    from attnkit.viz import seq2seq

    if isinstance(maps, Seq2SeqMaps):
        data = seq2seq.seq2seq_data(maps, input_index, **kwargs)
        return page(f"attnkit · {data['title']}", css=["explorer.css"], js=["explorer.js", "seq2seq.js"],
                    body='<div id="attnkit-seq2seq"></div>', data=data)
    if isinstance(maps, GenerationMaps):
        data = seq2seq.generation_data(maps, input_index, **kwargs)
        return page(f"attnkit · {data['title']}", css=["explorer.css"], js=["explorer.js", "generation.js"],
                    body='<div id="attnkit-generation"></div>', data=data)
    data = report_data(maps, input_index, **kwargs)
    return page(f"attnkit · {data['title']}", css=["explorer.css"], js=["units.js", "report_cost.js", "explorer.js"],
                body=_BODY, data=data)


def write_report(maps: AttentionMaps | Seq2SeqMaps | GenerationMaps, path: str | os.PathLike, input_index: int = 0,
                 **kwargs: Any) -> Path:
    """Write :func:`report_html` of ``maps`` (any of its kinds) to ``path`` (UTF-8) and return the path."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {describe(path)}")
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"path must be a file to write, not a folder; got {str(out)!r}")
    text = report_html(maps, input_index, **kwargs)
    out.write_text(text, encoding="utf-8")
    return out


def iframe(maps: AttentionMaps, input_index: int = 0, *, height: int = 900, **kwargs: Any) -> str:
    """The report inside an ``<iframe srcdoc>``, for notebooks: its script and style stay
    inside the frame, and several outputs in one notebook do not clash."""
    height = require_int("height", height, minimum=100)
    doc = report_html(maps, input_index, **kwargs)
    return (f'<iframe srcdoc="{html.escape(doc, quote=True)}" style="width:100%;height:{int(height)}px;'
            'border:1px solid #e5e7eb;border-radius:8px" sandbox="allow-scripts"></iframe>')


INLINE_BYTES = 2_500_000  # the most attention data a notebook output shows inline (Jupyter's iopub rate limit)


def notebook_html(maps: AttentionMaps) -> str:
    """What Jupyter shows for ``maps`` (``AttentionMaps._repr_html_`` delegates here): input
    0's :func:`iframe`, its data capped at :data:`INLINE_BYTES`; for maps too large for that
    (:class:`~attnkit.viz.encode.BudgetError`), or that the report cannot draw, their repr and
    why, never an exception."""
    if not len(maps):
        return f"<pre>{html.escape(repr(maps))}</pre>"
    note = "" if len(maps) == 1 else (
        f"<p>Input 0 of {len(maps)}; <code>attnkit.viz.report.iframe(maps, i)</code> shows input i.</p>")
    try:
        return note + iframe(maps, 0, max_bytes=INLINE_BYTES)
    except _encode.BudgetError as err:
        return (f"<pre>{html.escape(repr(maps))}</pre><p>Too large to show inline ({html.escape(str(err))}). "
                "Write a report instead: <code>attnkit.viz.write_report(maps, 'report.html')</code>.</p>")
    except (ValueError, TypeError) as err:
        return f"<pre>{html.escape(repr(maps))}</pre><p>Cannot show these maps: {html.escape(str(err))}</p>"
