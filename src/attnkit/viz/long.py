"""The long-document explorer: one model's attention over a document of up to 65,535 tokens, without (L x L) maps.

A page (:func:`long_html`, :func:`write_long_report`; ``attnkit explain --long FILE``) built from the exact
streamed statistics of :func:`attnkit.inspect.stats`:

- **Overview.** A layers x heads grid each of sink mass (mean mass on the first ``sink_tokens`` tokens),
  entropy (mean over queries, nats) and mean attention distance (tokens), so heads compare at a glance;
  click a head to select it. Under it, the mass each key receives from all queries along the document for
  the selected head, drawn on a canvas (one column of pixels aggregates the tokens it covers: the bar is
  their largest value, the line their mean), and a text view of a window of the document, tokens shaded by
  the mass they receive. Nothing on the page is a DOM node per token: the strip and the text are canvases,
  and the text view draws only the window on screen.
- **Zoom.** Drag over the text to select a span of queries. The static page shows each query's top-k keys
  with their weights (to 1/65535), and the rest of the row summarised ("other keys: 0.31"). Under
  ``attnkit serve --long FILE`` the page asks the server instead, which computes the span's exact weights
  over the whole document, or over a window of keys (:meth:`LongDocument.zoom`): a dense computation over
  only the selected query rows, with attnkit's own :func:`~attnkit.inspect.recording.probabilities`, on
  the query and key vectors of one layer that a forward pass of the cached input hands the attention tap.
- The page states the model's context window (``max_positions``), and the stored sizes.

The data: the tokens as JSON, the grids as numbers, the received mass per head as little-endian float32
(base64), and the top-k keys per query in the compact layout of :mod:`attnkit.viz.encode`
(:func:`~attnkit.viz.encode.encode_peaks`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnkit import _model_facts as facts
from attnkit._checks import describe, require_int
from attnkit.inspect.stats import AttentionStats, stats
from attnkit.integrations.tap import run_eval, tap
from attnkit.viz._html import page
from attnkit.viz.encode import MAX_LENGTH, encode_peaks
from attnkit.viz.service import RequestError

__all__ = ["LongDocument", "Overview", "long_data", "long_html", "read_text", "write_long_report"]

MAX_ZOOM_ROWS = 64  # query rows one zoom request may ask for
MAX_ZOOM_COLUMNS = 4096  # columns (keys, or sums over adjacent keys) one zoom answer holds per row
ZOOM_TOP = 8  # exact top keys per row a zoom answer lists
_ZOOM_FIELDS = ("layer", "head", "q0", "q1", "k0", "k1", "columns")
_BODY = '<div id="attnkit-long"></div>'
_TITLE = 160  # characters of the document the page's title shows


@dataclass(frozen=True)
class Overview:
    """The statistics the long page draws, for one input (real tokens only).

    Attributes:
        layers, heads: the model's layer and head numbers the tensors hold, in order.
        received: (layers, heads, L) mass each key receives, summed over queries.
        entropy: (layers, heads) mean over queries of each row's entropy (nats).
        sink: (layers, heads) mean over queries of the mass on the first ``sink_tokens`` keys.
        distance: (layers, heads) mean over queries of the weighted mean |i - j|.
        max_logit: (layers, heads) the largest score, or None.
        top_keys, top_weights: (layers, heads, L, k) each query's k heaviest keys and their weights.
        sink_tokens: how many first tokens ``sink`` counts.
        distance_share: (layers, heads, bins) the share of all the weight at distances
            ``distance_edges[t] <= |i - j| < distance_edges[t + 1]``, or None.
        distance_edges: (bins + 1) bin edges (0, 1, 2, 4, 8, ...), or None.
    """

    layers: list[int]
    heads: list[int]
    received: Tensor
    entropy: Tensor
    sink: Tensor
    distance: Tensor
    max_logit: Tensor | None
    top_keys: Tensor
    top_weights: Tensor
    sink_tokens: int
    distance_share: Tensor | None = None
    distance_edges: list[int] | None = None

    def __post_init__(self) -> None:
        n_layers, n_heads = len(self.layers), len(self.heads)
        if self.received.dim() != 3 or tuple(self.received.shape[:2]) != (n_layers, n_heads):
            raise ValueError(f"received must be (layers, heads, L) = ({n_layers}, {n_heads}, L); "
                             f"got {describe(self.received)}")
        length = self.received.shape[2]
        for name in ("entropy", "sink", "distance", *(("max_logit",) if self.max_logit is not None else ())):
            value = getattr(self, name)
            if tuple(value.shape) != (n_layers, n_heads):
                raise ValueError(f"{name} must be (layers, heads) = ({n_layers}, {n_heads}); got {describe(value)}")
        if self.top_keys.dim() != 4 or tuple(self.top_keys.shape[:3]) != (n_layers, n_heads, length) \
                or self.top_weights.shape != self.top_keys.shape:
            raise ValueError(f"top_keys and top_weights must both be (layers, heads, L, k) with L = {length}; got "
                             f"{describe(self.top_keys)} and {describe(self.top_weights)}")
        if (self.distance_share is None) != (self.distance_edges is None) or (
                self.distance_share is not None and self.distance_edges is not None
                and tuple(self.distance_share.shape) != (n_layers, n_heads, len(self.distance_edges) - 1)):
            raise ValueError("distance_share must be (layers, heads, bins) with distance_edges of bins + 1 edges, "
                             "or both None")

    @classmethod
    def from_stats(cls, st: AttentionStats) -> Overview:
        """The overview of one input's :func:`attnkit.inspect.stats` (an :class:`~attnkit.inspect.AttentionStats`)."""
        if not isinstance(st, AttentionStats):
            raise TypeError(f"st must be an AttentionStats (attnkit.inspect.stats(...)[0]); got {describe(st)}")
        return cls(layers=list(st.layers), heads=list(range(st.received.shape[1])), received=st.received,
                   entropy=st.mean_entropy, sink=st.sink_share, distance=st.mean_distance, max_logit=st.max_logit,
                   top_keys=st.top_index, top_weights=st.top_weight, sink_tokens=st.sinks,
                   distance_share=st.distance_share(), distance_edges=st.distance_edges.tolist())


def _float32_blob(t: Tensor) -> str:
    return base64.b64encode(t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()).decode()


def _grid(t: Tensor | None) -> list[list[float | None]] | None:
    if t is None:
        return None
    return [[float(v) if math.isfinite(float(v)) else None for v in row] for row in t.double().tolist()]


def long_data(overview: Overview, tokens: list[str], *, model: str, context_window: int | None,
              title: str | None = None, zoom: bool = False) -> dict[str, Any]:
    """The JSON the long page reads.

    Args:
        overview: the statistics (:class:`Overview`).
        tokens: the L tokens' texts.
        model: the model's name, as the page shows it.
        context_window: the most positions the model reads (``attnkit._model_facts.max_positions``),
            or None where it states none.
        title: shown at the top (default: "a document of L tokens").
        zoom: whether the page may ask ``POST /api/long/zoom`` for exact weights (``attnkit serve``);
            else it zooms on the stored top-k.

    Returns:
        ``{"format": 1, "kind": "long", "title", "model", "context_window", "tokens", "layers", "heads",
        "sink_tokens", "grid": {"sink", "entropy", "distance", "max_logit"} (layers x heads lists),
        "distance_edges", "distance_share" (layers x heads x bins, or None),
        "received": {"dtype": "float32", "shape": [layers * heads, L], "blob"}, "top" (the encoded top-k,
        :func:`attnkit.viz.encode.encode_peaks`), "zoom": None | {"url", "max_rows", "max_columns"}}``.

    >>> import torch
    >>> ov = Overview(layers=[0], heads=[0], received=torch.tensor([[[1.5, 0.5]]]), entropy=torch.zeros(1, 1),
    ...               sink=torch.ones(1, 1), distance=torch.full((1, 1), 0.25), max_logit=None,
    ...               top_keys=torch.tensor([[[[0, 1], [0, 1]]]]),
    ...               top_weights=torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]]), sink_tokens=1)
    >>> data = long_data(ov, ["a", "b"], model="m", context_window=None)
    >>> data["grid"]["distance"], data["top"]["kept"], data["received"]["shape"]
    ([[0.25]], 3, [1, 2])
    """
    if not isinstance(overview, Overview):
        raise TypeError(f"overview must be an Overview (Overview.from_stats(attnkit.inspect.stats(...)[0])); "
                        f"got {describe(overview)}")
    length = overview.received.shape[2]
    if not isinstance(tokens, list) or len(tokens) != length:
        raise ValueError(f"tokens must be a list of the {length} tokens the statistics cover; got {describe(tokens)}")
    if length > MAX_LENGTH:
        raise ValueError(f"the long page shows at most {MAX_LENGTH:,} tokens; got {length:,}")
    n_layers, n_heads = len(overview.layers), len(overview.heads)
    top = encode_peaks(overview.top_keys.reshape(n_layers * n_heads, length, -1),
                       overview.top_weights.reshape(n_layers * n_heads, length, -1), length)
    if title is None:
        title = f"a document of {length:,} tokens"
    return {
        "format": 1, "kind": "long", "title": title, "model": model, "context_window": context_window,
        "tokens": [str(t) for t in tokens], "layers": list(overview.layers), "heads": list(overview.heads),
        "sink_tokens": overview.sink_tokens, "distance_edges": overview.distance_edges,
        "distance_share": None if overview.distance_share is None else overview.distance_share.double().tolist(),
        "grid": {"sink": _grid(overview.sink), "entropy": _grid(overview.entropy),
                 "distance": _grid(overview.distance), "max_logit": _grid(overview.max_logit)},
        "received": {"dtype": "float32", "shape": [n_layers * n_heads, length],
                     "blob": _float32_blob(overview.received.reshape(n_layers * n_heads, length))},
        "top": top.to_json(),
        "zoom": {"url": "/api/long/zoom", "max_rows": MAX_ZOOM_ROWS, "max_columns": MAX_ZOOM_COLUMNS} if zoom else None,
    }


def long_html(data: dict[str, Any], *, connect: bool = False) -> str:
    """The self-contained page of :func:`long_data`'s payload (``connect``: it may call its own server)."""
    return page(f"attnkit · {data['title']}", css=["explorer.css", "long.css"], js=["explorer.js", "long.js"],
                body=_BODY, data=data, connect=connect)


def write_long_report(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write :func:`long_html` of ``data`` to ``path``; return the path."""
    out = Path(path)
    out.write_text(long_html(data), encoding="utf-8")
    return out


def read_text(path: str | os.PathLike) -> str:
    """The text of the UTF-8 file at ``path``, with errors that say what is wrong with it."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or a path to a text file; got {describe(path)}")
    file = Path(path).expanduser()
    if not file.exists():
        raise ValueError(f"{str(path)!r} does not exist; pass the path of a UTF-8 text file to explain")
    if not file.is_file():
        raise ValueError(f"{str(path)!r} is not a file; pass the path of a UTF-8 text file to explain")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason}); save it as "
                         "UTF-8") from None
    if not text.strip():
        raise ValueError(f"{str(path)!r} holds no text; the long explorer needs a document")
    return text


# -- one document, cached, and its zoom ----------------------------------------------------------


class _Enough(Exception):
    """Raised by the zoom's observer once the wanted layer is read: the rest of the forward pass is not needed."""


class LongDocument:
    """A model and one document it read: the statistics for the page, and the exact weights of a few queries.

    Args:
        model: a self-attention model (encoder or decoder) that :func:`attnkit.inspect.stats` reads: a
            Hugging Face model or an attnkit module such as :class:`~attnkit.nn.TransformerLM`.
        tokenizer: turns the text into ids (a Hugging Face tokenizer); None when ``text`` is token ids.
        text: the document (a string), or its token ids (a list of ints or a (L,) integer tensor).
        top_k: top keys per query the page stores (default 5).
        sink_tokens: first tokens the sink mass counts (default 4, StreamingLLM's).
        progress: ``progress(description, done, total)`` while the statistics are computed, or None.

    Attributes:
        stats: the document's :class:`~attnkit.inspect.AttentionStats`; ``overview``: what the page draws.
        ids: (1, L) the token ids; ``length``: L.

    Raises:
        ValueError: an empty document, an encoder-decoder model, or more tokens than the model's context
            window (``max_positions``, refused by :func:`~attnkit.inspect.stats` before it runs) or than the
            page shows (65,535).

    >>> import torch, attnkit
    >>> lm = attnkit.nn.TransformerLM(attnkit.nn.TransformerConfig(vocab_size=50, dim=32, depth=2, num_heads=4))
    >>> doc = LongDocument(lm, None, list(range(1, 41)))
    >>> doc.length, doc.data()["grid"]["sink"][0][0] > 0
    (40, True)
    >>> rows = doc.zoom(layer=1, head=2, q0=30, q1=32)  # two queries' exact weights over all 40 keys
    >>> rows["per"], len(rows["top"]), len(rows["top"][0])
    (1, 2, 8)
    """

    def __init__(self, model: nn.Module, tokenizer: Any, text: str | list[int] | Tensor, *, top_k: int = 5,
                 sink_tokens: int = 4, progress: Callable[[str, int, int], None] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {describe(model)}")
        if facts.kind(model) == "encoder-decoder":
            raise ValueError(f"the long explorer reads one self-attention stack; {facts.name(model)!r} is an "
                             "encoder-decoder model: use explain --target for its cross-attention")
        self.model, self.tokenizer = model, tokenizer
        self.top_k = require_int("top_k", top_k, minimum=1)
        self.sink_tokens = require_int("sink_tokens", sink_tokens, minimum=1)
        self.ids = self._ids(text)  # (1, L)
        flat = " ".join(text.split()) if isinstance(text, str) else ""
        self.title = flat if len(flat) <= _TITLE else flat[:_TITLE - 1] + "…"  # the text's beginning, or none
        self.length = int(self.ids.shape[1])
        if self.length > MAX_LENGTH:
            raise ValueError(f"the document has {self.length:,} tokens; the long explorer shows at most "
                             f"{MAX_LENGTH:,}. Shorten it")
        self.overview = self._statistics(progress)  # sets self.stats
        self._lock = threading.Lock()
        self._held: tuple[int, tuple] | None = None  # the last layer's (q, k, mask, bias, scale, softcap)

    def _ids(self, text: str | list[int] | Tensor) -> Tensor:
        if isinstance(text, str):
            if not text.strip():
                raise ValueError("text is empty; the long explorer needs a document")
            if self.tokenizer is None:
                raise ValueError(f"text is a string, so a tokenizer is needed, and none was given for "
                                 f"{facts.name(self.model)!r}; pass tokenizer=, or token ids as text")
            ids = torch.tensor([self.tokenizer(text, verbose=False)["input_ids"]])
        elif isinstance(text, Tensor) and not text.dtype.is_floating_point and text.dim() == 1:
            ids = text[None].long()
        elif isinstance(text, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in text):
            ids = torch.tensor([text], dtype=torch.long)
        else:
            raise TypeError(f"text must be a string or token ids (a list of ints or a (L,) integer tensor); "
                            f"got {describe(text)}")
        if ids.shape[1] == 0:
            raise ValueError("text has no tokens; the long explorer needs a document")
        return ids

    def _inputs(self) -> tuple[tuple, dict]:
        return ((), {"input_ids": self.ids}) if facts.is_hf(self.model) else ((self.ids,), {})

    def _statistics(self, progress: Callable[[str, int, int], None] | None) -> Overview:
        """:func:`attnkit.inspect.stats` of the document (which skips a language model's head)."""
        step = None if progress is None else (lambda done, total: progress("attention statistics", done, total))
        self.stats = stats(self.model, self.ids, top_k=self.top_k, sinks=self.sink_tokens,
                           tokenizer=self.tokenizer, progress=step or False)[0]
        return Overview.from_stats(self.stats)

    def data(self, *, title: str | None = None, zoom: bool = False) -> dict[str, Any]:
        """:func:`long_data` of this document (``zoom``: for a page served with :meth:`zoom` behind it); the
        title defaults to the text's beginning."""
        return long_data(self.overview, self.stats.tokens, model=self.stats.model_name,
                         context_window=self.stats.context_window, title=title or self.title or None, zoom=zoom)

    # -- zoom ----------------------------------------------------------------------------------

    def parse_zoom(self, body: bytes, content_type: str) -> dict[str, int]:
        """The checked fields of a ``POST /api/long/zoom`` body: a JSON object with ``layer``, ``head``
        (the model's numbers), ``q0``, ``q1`` (the queries ``[q0, q1)``, at most 64), and optionally ``k0``,
        ``k1`` (the keys, default the whole document) and ``columns`` (the most columns per row, default
        and at most 4096; wider windows are summed over adjacent keys).

        Raises:
            RequestError: 415 not JSON; 400 anything else wrong, naming the field.
        """
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise RequestError(415, f"the body must be JSON sent as Content-Type: application/json; got "
                                    f"{content_type or 'no Content-Type'!r}")
        try:
            request = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise RequestError(400, 'the body must be a JSON object such as {"layer": 0, "head": 0, "q0": 10, '
                                    '"q1": 20}') from None
        if not isinstance(request, dict):
            raise RequestError(400, 'the body must be a JSON object such as {"layer": 0, "head": 0, "q0": 10, '
                                    '"q1": 20}')
        unknown = sorted(set(request) - set(_ZOOM_FIELDS))
        if unknown:
            raise RequestError(400, f"unknown field(s) {', '.join(map(repr, unknown))}; expected "
                                    f"{', '.join(map(repr, _ZOOM_FIELDS))}")
        missing = [f for f in ("layer", "head", "q0", "q1") if f not in request]
        if missing:
            raise RequestError(400, f"the body has no {', '.join(map(repr, missing))}")
        bad = [f for f, v in request.items() if isinstance(v, bool) or not isinstance(v, int)]
        if bad:
            raise RequestError(400, f"{bad[0]!r} must be a whole number; got {request[bad[0]]!r}")
        fields = {"k0": 0, "k1": self.length, "columns": MAX_ZOOM_COLUMNS, **request}
        try:
            self._check_zoom(**fields)
        except ValueError as err:
            raise RequestError(400, str(err)) from None
        return fields

    def _check_zoom(self, layer: int, head: int, q0: int, q1: int, k0: int, k1: int, columns: int) -> None:
        ov = self.overview
        if layer not in ov.layers:
            raise ValueError(f"layer must be one of the model's layers {ov.layers[0]}..{ov.layers[-1]}; got {layer}")
        if head not in ov.heads:
            raise ValueError(f"head must be one of the model's heads {ov.heads[0]}..{ov.heads[-1]}; got {head}")
        if not 0 <= q0 < q1 <= self.length or q1 - q0 > MAX_ZOOM_ROWS:
            raise ValueError(f"q0, q1 must pick 1 to {MAX_ZOOM_ROWS} queries of [0, {self.length}) as q0 < q1; got "
                             f"q0={q0}, q1={q1}")
        if not 0 <= k0 < k1 <= self.length:
            raise ValueError(f"k0, k1 must pick keys of [0, {self.length}) as k0 < k1; got k0={k0}, k1={k1}")
        if not 1 <= columns <= MAX_ZOOM_COLUMNS:
            raise ValueError(f"columns must be in [1, {MAX_ZOOM_COLUMNS}]; got {columns}")

    def zoom(self, layer: int, head: int, q0: int, q1: int, k0: int = 0, k1: int | None = None,
             columns: int = MAX_ZOOM_COLUMNS) -> dict[str, Any]:
        """The exact attention weights of queries ``[q0, q1)`` in one head, over keys ``[k0, k1)``.

        Computed now, densely over only these rows (at most 64 x L scores per head), from the query and
        key vectors the model hands attention in ``layer`` when it reads the document again (the pass
        stops after that layer; the last layer read is kept, so zooms within one layer run no model).

        Returns:
            ``{"layer", "head", "q0", "q1", "k0", "k1", "per", "weights", "outside", "top"}``: ``weights``
            base64 little-endian float32, (q1 - q0) rows of ``ceil((k1 - k0) / per)`` columns, column c
            the sum over keys ``[k0 + c * per, k0 + (c + 1) * per)`` (``per`` = 1 when the window fits
            ``columns``: each key's own weight); ``outside``: per row, the mass on keys outside the window;
            ``top``: per row, its 8 heaviest keys over the whole document as ``[key, weight]``.
        """
        k1 = self.length if k1 is None else k1
        self._check_zoom(layer, head, q0, q1, k0, k1, columns)
        probs = self._rows(self.overview.layers.index(layer), self.overview.heads.index(head), q0, q1)  # (R, L)
        per = math.ceil((k1 - k0) / columns)
        window = probs[:, k0:k1].double()
        width = math.ceil((k1 - k0) / per)
        sums = torch.nn.functional.pad(window, (0, width * per - (k1 - k0))).view(len(probs), width, per).sum(-1)
        weights, keys = probs.topk(min(ZOOM_TOP, self.length), dim=-1)
        return {"layer": layer, "head": head, "q0": q0, "q1": q1, "k0": k0, "k1": k1, "per": per,
                "weights": _float32_blob(sums),
                "outside": (probs.double().sum(-1) - window.sum(-1)).clamp(min=0).tolist(),
                "top": [[[int(j), float(w)] for j, w in zip(kr.tolist(), wr.tolist()) if w > 0]
                        for kr, wr in zip(keys, weights)]}

    def _rows(self, layer_index: int, head_index: int, q0: int, q1: int) -> Tensor:
        """(q1 - q0, L) probabilities (float32; float64 for a float64 model) of one head's rows, from q and k."""
        from attnkit import masks
        from attnkit.inspect.recording import probabilities

        with self._lock:
            if self._held is None or self._held[0] != layer_index:
                self._held = (layer_index, self._read_layer(layer_index))
            q, k, mask, bias, scale, softcap = self._held[1]
        q_len, k_len = q.shape[2], k.shape[2]

        def rows(t: Any) -> Any:  # a tensor mask or bias, (.., Lq or 1, Lk), cut to the rows
            return t[..., q0:q1, :] if t.dim() >= 2 and t.shape[-2] == q_len else t

        if isinstance(mask, masks.Mask):
            mask = mask.shifted(q0, 0, q_total=q_len, k_total=k_len)
        elif isinstance(mask, Tensor):
            mask = rows(mask)
        parts = bias if isinstance(bias, list) else [] if bias is None else [bias]
        shifted = [b.shifted(q0, 0, q_total=q_len, k_total=k_len) if not isinstance(b, Tensor) else rows(b)
                   for b in parts]
        (_, p), = probabilities(q[:, :, q0:q1], k, mask, shifted or None, scale, softcap, [head_index])
        return p[0, 0]

    def _read_layer(self, layer_index: int) -> tuple:
        """The (q, k, mask, bias, scale, softcap) that attention call ``layer_index`` of a forward pass gets."""
        calls: list[tuple] = []

        def observe(*call: Any) -> None:
            calls.append(call)
            if len(calls) > layer_index:
                raise _Enough

        args, kwargs = self._inputs()
        with contextlib.suppress(_Enough):
            run_eval(self.model, tap(self.model, lambda module: observe, reader="the zoom"), args, kwargs,
                     forward=facts.headless(self.model, kwargs))
        if len(calls) <= layer_index:
            raise ValueError(f"the model made {len(calls)} attention calls reading the document; layer index "
                             f"{layer_index} was asked for")
        return calls[layer_index]

