"""``capture()``: record the attention probabilities of one forward pass.

How it records, without changing what the model computes:

- attnkit modules: a hook on every :class:`~attnkit.nn.MultiHeadAttention`
  (:meth:`~attnkit.nn.MultiHeadAttention.register_attention_hook`) sees q, k, the mask and
  the bias of each call.
- Hugging Face models, whatever attention implementation they were loaded with (eager,
  sdpa, attnkit, ...): for the duration of the call, transformers' attention-function lookup
  returns a recording wrapper around the model's own function. The wrapper calls that
  function unchanged, and its result is what the model gets; then it computes the
  probabilities with :func:`attnkit.attention_probs` from the same q, k, mask, scaling,
  softcap, sliding window and position bias. With sdpa (where ``output_attentions`` gives
  nothing) this is the only way to see them. The lookup is restored afterwards, also on
  error; the model itself (its config, its attention implementation) is never modified.
  A model whose attention bypasses that lookup (BERT before transformers 5, Falcon before 5.25, Bloom,
  MPT) is run a second time with its own ``output_attentions=True``, which holds all layers
  at once; only when it was loaded with ``attn_implementation="eager"``, since other paths
  of such models may compute their maps apart from what they use (Falcon 5.24 under sdpa gave
  non-causal ones).

Layers are numbered in the order the model calls attention in one forward pass, which for
encoders and decoders is the model's layer index. An encoder-decoder model's calls are told
apart by module (:func:`encoder_decoder_parts`) and numbered per part, giving
:class:`~attnkit.inspect.Seq2SeqMaps`. Calls with a KV cache are refused here; see
:func:`attnkit.inspect.capture_generation`.

Memory: only the requested layers and heads are computed and kept. Probabilities are
computed for a few heads at a time (at most about 64 MiB of float32 scores; all heads of a
layer at once when the mask or bias varies by head, as with attnkit's ALiBi), cut to each
input's real tokens and converted to the storage ``dtype`` at once, into one preallocated
(layers, heads, L, L) tensor per input. A 2,000-token capture of all 6 x 12 heads of a
BERT-sized model stores 6 * 12 * 2000**2 * 2 bytes = 576 MB in float16.

Some rows only (``queries=``): the selected query rows are computed in pieces of the query
range (runs of nearby selected rows, at most about 64 MiB of float32 scores per head), with
the mask and position bias shifted to each piece (:meth:`attnkit.masks.Mask.shifted`), and
stored as (layers, heads, kept rows, L). ``max_bytes=`` is checked from the layer, head and
token counts before the model runs.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from attnkit import _model_facts as facts
from attnkit import biases, masks
from attnkit._checks import describe, require_int
from attnkit._format import size
from attnkit.functional import attention_probs
from attnkit.inspect import encoding as enc
from attnkit.inspect._common import index_list, layer_progress
from attnkit.inspect.maps import AttentionMaps, Seq2SeqMaps
from attnkit.integrations.tap import Observer, attnkit_tap, run_eval, tap, transformers_tap
from attnkit.nn.attention import MultiHeadAttention
from attnkit.nn.encoder_decoder import EncoderDecoder

__all__ = ["capture", "probabilities"]

_STORAGE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CHUNK_BYTES = 1 << 26  # float32 scores computed at once, at most (when heads can be split)


def _heads_slice(t: Tensor, heads: list[int]) -> Tensor:
    """A (.., H, Lq, Lk)-broadcastable tensor restricted to some heads (unchanged if it has no head dim)."""
    t4 = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    return t4 if t4.shape[1] == 1 else t4[:, heads]


Queries = int | slice | Sequence[int] | None
_GAP = 64  # selected rows further apart than this are computed in separate blocks


def _check_queries(queries: object) -> None:
    if queries is None or isinstance(queries, slice) or (isinstance(queries, int) and not isinstance(queries, bool)):
        return
    if isinstance(queries, (str, bytes)) or not isinstance(queries, Sequence) or not queries or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in queries):
        raise TypeError(f"queries must be None (every row), an int, a slice or a non-empty sequence of ints, indexing "
                        f"each input's real tokens as a Python list (negative counts from the end; the last n: "
                        f"queries=slice(-n, None)); got {describe(queries)}")


def query_rows(queries: Queries, length: int, where: str = "the input") -> list[int]:
    """The token indices ``queries`` selects among ``length`` real tokens, increasing and each once.

    ``queries`` indexes the tokens as a Python list would: an int (``-1``: the last token), a
    slice (``slice(-n, None)``: the last n; a slice may select none), or a sequence of ints;
    None selects all.

    >>> query_rows(slice(-3, None), 10), query_rows([4, -1, 4], 10), query_rows(-1, 10)
    ([7, 8, 9], [4, 9], [9])
    """
    _check_queries(queries)
    if queries is None:
        return list(range(length))
    if isinstance(queries, slice):
        return sorted(set(range(length)[queries]))
    wanted = [queries] if isinstance(queries, int) else list(queries)
    bad = [i for i in wanted if not -length <= i < length]
    if bad:
        raise ValueError(f"queries {bad} are out of range for {where}, which has {length} real tokens; give indices "
                         f"in [-{length}, {length}), or a slice, which clips")
    return sorted({i % length for i in wanted})


def _row_piece(x: Any, start: int, stop: int, q_len: int, k_len: int) -> Any:
    """A mask or bias (Mask, Bias, tensor broadcastable to (B, H, Lq, Lk), a list of them, or None) as seen
    by queries ``start:stop`` of the call."""
    if x is None:
        return None
    if isinstance(x, list):
        return [_row_piece(b, start, stop, q_len, k_len) for b in x]
    if isinstance(x, Tensor):
        return x[..., start:stop, :] if x.dim() >= 2 and x.shape[-2] == q_len and q_len > 1 else x
    return x.shifted(start, 0, q_total=q_len, k_total=k_len)  # masks.Mask and biases.Bias


def probabilities(q: Tensor, k: Tensor, mask: masks.Mask | Tensor | None, bias: Any, scale: float | None,
                  softcap: float | None, heads: Sequence[int]) -> Iterator[tuple[int, Tensor]]:
    """The attention probabilities of one call, a few heads at a time.

    q (B, H, Lq, D), k (B, Hkv, Lk, D), ``mask``/``bias`` as :func:`attnkit.attention_probs`
    takes them. Yields ``(start, probs)``: probs (B, c, Lq, Lk) float of ``heads[start:start + c]``,
    at most about 64 MiB of float32 scores at once (all heads at once when the mask or bias
    varies by head in a way that cannot be sliced). Drop each before taking the next.
    """
    batch, num_heads, q_len, _ = q.shape
    groups = num_heads // k.shape[1]
    bias_parts = bias if isinstance(bias, list) else [] if bias is None else [bias]
    splittable = (all(isinstance(b, Tensor) for b in bias_parts)
                  and (not isinstance(mask, masks.Mask) or mask.extent()[1] == 1))
    per_head = batch * q_len * k.shape[2] * 4
    step = max(1, _CHUNK_BYTES // max(1, per_head)) if splittable else len(heads)
    for start in range(0, len(heads), step):
        chosen = list(heads[start:start + step])
        if splittable:
            kv = k[:, [h // groups for h in chosen]]  # (B, c, Lk, D): each chosen head with its K head
            yield start, attention_probs(
                q[:, chosen], kv, kv, scale=scale, softcap=softcap,
                mask=_heads_slice(mask, chosen) if isinstance(mask, Tensor) else mask,
                bias=[biases.from_tensor(_heads_slice(b, chosen)) for b in bias_parts] or None,
            )  # (B, c, Lq, Lk)
        else:
            yield start, attention_probs(q, k, k, mask=mask, bias=bias, scale=scale, softcap=softcap)[:, chosen]


class _Recorder:
    """Receives the attention calls of one kind (all of them, or an encoder-decoder's encoder,
    decoder or cross calls) in one forward pass and keeps the selected probabilities.

    ``real_q``/``real_k``: per input, its real query and key positions (a slice or indices;
    ``slice(0, None)`` = all, whatever the length). ``lengths``: the (Lq, Lk) every call must
    have, None where any length goes.
    """

    def __init__(self, layers: tuple[int, ...] | None, heads: tuple[int, ...] | None, dtype: torch.dtype,
                 real_q: Sequence[slice | Tensor], real_k: Sequence[slice | Tensor],
                 lengths: tuple[int | None, int | None], progress: Callable[[int, int], None] | None,
                 queries: Queries = None):
        self.layers, self.heads, self.dtype, self.progress = layers, heads, dtype, progress
        self.real_q, self.real_k, self.lengths, self.queries = real_q, real_k, lengths, queries
        self.rows: list[list[int]] | None = None  # per input, the kept real-token rows (queries given)
        self._where: list[Tensor] = []  # per input, those rows' positions in the current call
        self.calls = 0
        self.recorded = 0
        self.num_heads: int | None = None
        self.store: list[Tensor] = []

    def _begin(self, batch: int, num_heads: int, q_len: int, k_len: int) -> int | None:
        """The slot of the next attention call's layer (None if not selected), checked; storage on first use."""
        layer, self.calls = self.calls, self.calls + 1
        self.num_heads = num_heads
        if self.layers is not None and layer not in self.layers:
            return None
        want_q, want_k = self.lengths
        if (want_q not in (None, q_len)) or (want_k not in (None, k_len)) or batch != len(self.real_q):
            raise ValueError(f"capture records attention over the whole input in one pass; attention call {layer} "
                             f"has {q_len} queries and {k_len} keys for a batch of {batch}, where {want_q} queries "
                             f"and {want_k} keys for a batch of {len(self.real_q)} were expected (a cache?)")
        if self.heads is None:
            self.heads = tuple(range(num_heads))
        elif self.heads[-1] >= num_heads:
            raise ValueError(f"heads must be < {num_heads}, the model's heads per layer; got {list(self.heads)}")
        if not self.store:
            count = len(self.layers) if self.layers is not None else None
            if self.queries is not None:
                self.rows = [query_rows(self.queries, enc.real_length(rq, q_len), f"input {b}")
                             for b, rq in enumerate(self.real_q)]
            self.store = [torch.empty(count or 0, len(self.heads),
                                      enc.real_length(rq, q_len) if self.rows is None else len(self.rows[b]),
                                      enc.real_length(rk, k_len), dtype=self.dtype)
                          for b, (rq, rk) in enumerate(zip(self.real_q, self.real_k))]
        if self.layers is None:  # all layers, however many: grow by one
            self.store = [torch.cat([s, s.new_empty(1, *s.shape[1:])]) for s in self.store]
            return layer
        return self.layers.index(layer)

    def _keep(self, slot: int, start: int, probs: Tensor, first: int = 0) -> None:
        """Store (B, c, n, Lk) probabilities of the selected heads ``start:start + c`` for queries
        ``first:first + n`` of the call, cut to the real tokens (and to the selected rows)."""
        heads = slice(start, start + probs.shape[1])
        for b, (rq, rk) in enumerate(zip(self.real_q, self.real_k)):
            if self.rows is None:
                self.store[b][slot, heads] = probs[b][:, rq][:, :, rk]
                continue
            where = self._where[b] - first  # the kept rows, numbered within this piece
            inside = (where >= 0) & (where < probs.shape[2])
            if bool(inside.any()):
                rows = probs[b][:, where[inside]][:, :, rk]  # (c, kept here, Lk real)
                self.store[b][slot, heads, inside.nonzero().flatten()] = rows.to(self.dtype)

    def _locate(self, q_len: int) -> None:
        """Each input's kept rows as query positions of a call with ``q_len`` (padded) queries."""
        if self.rows is None:
            return
        self._where = []
        for rq, kept in zip(self.real_q, self.rows):
            real = torch.arange(q_len)[rq] if isinstance(rq, slice) else rq.cpu()
            self._where.append(real[torch.tensor(kept, dtype=torch.long)])

    def _pieces(self, batch: int, q_len: int, k_len: int) -> list[tuple[int, int]]:
        """The query ranges to compute: everything at once without ``queries``; else runs of the selected rows
        (of any input), split where rows are far apart or a piece's scores would pass about 64 MiB per head."""
        if self.rows is None:
            return [(0, q_len)]
        wanted = sorted({int(p) for where in self._where for p in where})
        most = max(1, _CHUNK_BYTES // max(1, batch * k_len * 4))
        pieces: list[list[int]] = []
        for p in wanted:
            if pieces and p - pieces[-1][1] <= _GAP and p + 1 - pieces[-1][0] <= most:
                pieces[-1][1] = p + 1
            else:
                pieces.append([p, p + 1])
        return [(a, b) for a, b in pieces]

    def _done(self) -> None:
        self.recorded += 1
        if self.progress is not None and self.layers is not None:
            self.progress(self.recorded, len(self.layers))

    def __call__(self, q: Tensor, k: Tensor, mask: masks.Mask | Tensor | None, bias: Any,
                 scale: float | None, softcap: float | None) -> None:
        """Compute and keep the probabilities of one attention call: q (B, H, Lq, D), k (B, Hkv, Lk, D)."""
        q_len, k_len = q.shape[2], k.shape[2]
        slot = self._begin(q.shape[0], q.shape[1], q_len, k_len)
        if slot is None:
            return
        self._locate(q_len)
        for first, last in self._pieces(q.shape[0], q_len, k_len):
            piece = (q, mask, bias) if (first, last) == (0, q_len) else (
                q[:, :, first:last], _row_piece(mask, first, last, q_len, k_len),
                _row_piece(bias, first, last, q_len, k_len))
            for start, probs in probabilities(piece[0], k, piece[1], piece[2], scale, softcap, self.heads or ()):
                self._keep(slot, start, probs, first)
                del probs
        self._done()

    def given(self, probs: Tensor) -> None:
        """Keep one layer's probabilities (B, H, L, L) that the model computed itself."""
        slot = self._begin(probs.shape[0], probs.shape[1], probs.shape[2], probs.shape[3])
        if slot is not None:
            self._locate(probs.shape[2])
            self._keep(slot, 0, probs[:, list(self.heads or ())])
            self._done()


# -- which attention module is which ------------------------------------------------------------


def attnkit_parts(model: EncoderDecoder) -> dict[int, str]:
    """For an attnkit :class:`~attnkit.nn.EncoderDecoder`: ``id(module) -> "encoder" | "decoder" | "cross"``
    for its attention modules ``encoder[i].attn``, ``decoder[i].self_attn`` and ``decoder[i].cross_attn``."""
    parts = {id(block.attn): "encoder" for block in model.encoder}
    for block in model.decoder:
        parts[id(block.self_attn)], parts[id(block.cross_attn)] = "decoder", "cross"
    return parts


# -- what a capture will store ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    """One kind of attention call a capture records: how many layers and heads it keeps, and per input its
    real query and key counts."""

    name: str
    layers: int
    heads: int | None  # None: the model does not say (a max_bytes check then needs heads=)
    queries: list[int]
    keys: list[int | None]  # None: only known once the model runs (Whisper's encoder frames)


def _stored_bytes(parts: Sequence[_Part], queries: Queries, itemsize: int) -> int:
    """Bytes the maps of ``parts`` take with ``queries``."""
    total = 0
    for p in parts:
        rows = [len(query_rows(queries, n, f"input {b}")) for b, n in enumerate(p.queries)]
        total += p.layers * (p.heads or 0) * sum(r * (k or 0) for r, k in zip(rows, p.keys)) * itemsize
    return total


def _most_last_rows(parts: Sequence[_Part], itemsize: int, budget: int) -> int:
    """The largest n for which ``queries=slice(-n, None)`` fits ``budget`` (0 if not even one row does);
    the size grows with n, so a bisection finds it."""
    low, high = 0, max(n for p in parts for n in p.queries)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if _stored_bytes(parts, slice(-mid, None), itemsize) <= budget else (low, mid - 1)
    return low


def _most(count: int, keep: Callable[[int], list[_Part]], queries: Queries, itemsize: int,
          budget: int) -> tuple[int, int]:
    """The largest n <= ``count`` whose parts ``keep(n)`` fit ``budget``, and their size; (0, 0) if none."""
    sizes = ((n, _stored_bytes(keep(n), queries, itemsize)) for n in range(count, 0, -1))
    return next(((n, b) for n, b in sizes if b <= budget), (0, 0))


def _check_budget(max_bytes: int | None, parts: Sequence[_Part], queries: Queries, dtype: torch.dtype,
                  layers: Sequence[int], heads: Sequence[int] | None) -> None:
    """Refuse, before anything runs or is allocated, a capture whose maps would pass ``max_bytes``,
    naming the size and the selections (queries=, heads=, layers=, dtype=) that would fit."""
    kept = [len(query_rows(queries, n, f"input {b}"))  # bad queries are refused even without a budget
            for p in parts for b, n in enumerate(p.queries if None not in p.keys else ())]
    if queries is not None and kept and not any(kept):
        lengths = sorted({n for p in parts for n in p.queries})
        raise ValueError(f"queries={queries!r} selects no row of any input (real lengths {lengths}); a slice clips "
                         "to each input's length, so give one that reaches into the inputs, e.g. slice(-n, None)")
    if max_bytes is None:
        return
    unknown = [p.name for p in parts if p.heads is None or None in p.keys]
    if unknown:
        raise ValueError(f"max_bytes needs the size of the maps before the model runs, and the {', '.join(unknown)} "
                         "maps' head count or key count is not known until then; pass heads= explicitly, or leave "
                         "max_bytes out")
    itemsize = dtype.itemsize
    stored = _stored_bytes(parts, queries, itemsize)
    if stored <= max_bytes:
        return
    fits = []
    last = _most_last_rows(parts, itemsize, max_bytes)
    if last:
        fits.append(f"queries=slice(-{last}, None) (the last {last} rows: "
                    f"{size(_stored_bytes(parts, slice(-last, None), itemsize))})")
    # the first h heads (or n layers) of each part: parts may differ in depth, so each size is counted
    kept_heads = list(heads or ())
    h, with_heads = _most(len(kept_heads), lambda n: [replace(p, heads=min(n, p.heads or 0)) for p in parts],
                          queries, itemsize, max_bytes)
    if h:
        fits.append(f"heads={kept_heads[:h]} ({h} of the {len(kept_heads)} heads: {size(with_heads)})")
    n_layers, with_layers = _most(len(layers), lambda n: [replace(p, layers=min(n, p.layers)) for p in parts],
                                  queries, itemsize, max_bytes)
    if n_layers:
        fits.append(f"layers={list(layers[:n_layers])} ({n_layers} of {len(layers)} layers: {size(with_layers)})")
    for smaller in (torch.float16,):
        if itemsize > 2 and stored * 2 // itemsize <= max_bytes:
            fits.append(f"dtype={smaller} ({size(stored * 2 // itemsize)})")
    shape = "; ".join(f"{p.name}: {p.layers} layers x {p.heads} heads x (rows x keys) of {len(p.queries)} input"
                      f"{'s' if len(p.queries) > 1 else ''}" for p in parts)
    advice = ("Selections that fit: " + "; ".join(fits)) if fits else \
        "No single change of queries=, heads=, layers= or dtype= fits; combine them, or raise max_bytes"
    raise ValueError(f"capture would store {size(stored)} ({stored:,} bytes of {str(dtype).replace('torch.', '')}; "
                     f"{shape}), more than max_bytes={max_bytes:,}; nothing was run or allocated. {advice}")


def _model_heads(model: nn.Module, hf: bool, *names: str) -> int | None:
    """Query heads per layer: the first of the config fields ``names`` (transformers), or attnkit's modules'."""
    if not hf:
        return next((m.config.num_heads for m in model.modules() if isinstance(m, MultiHeadAttention)), None)
    config = facts.text_config(model)
    return next((getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)), None)


@dataclass(frozen=True)
class _Keep:
    """A capture's row selection and storage budget."""

    queries: Queries
    max_bytes: int | None

    def check(self, parts: Sequence[_Part], dtype: torch.dtype, layers: Sequence[int],
              heads: Sequence[int] | None) -> None:
        _check_budget(self.max_bytes, parts, self.queries, dtype, layers, heads)


# -- capture -------------------------------------------------------------------------------------

_CROSS_NAME = re.compile(r"cross|encoder|encdec", re.IGNORECASE)


def encoder_decoder_parts(model: nn.Module) -> dict[int, str]:
    """For an encoder-decoder transformers model: ``id(module) -> "encoder" | "decoder" | "cross"``
    for every module of its encoder and decoder.

    A module belongs to the part whose stack (``get_encoder()``, ``get_decoder()``) holds it;
    in the decoder, an attention module named like cross-attention (``encoder_attn`` in BART,
    Marian and Whisper, ``EncDecAttention`` in T5, ``crossattention``) is ``"cross"``.
    """
    lm = facts.pretrained(model)
    encoder, decoder = lm.get_encoder(), lm.get_decoder()
    parts = {id(m): "encoder" for m in encoder.modules()}
    for name, m in decoder.named_modules():
        parts[id(m)] = "cross" if _CROSS_NAME.search(name.rsplit(".", 1)[-1]) else "decoder"
    return parts


def capture(model: nn.Module, inputs: object, layers: Iterable[int] | int | None = None,
            heads: Iterable[int] | int | None = None, *, queries: Queries = None, max_bytes: int | None = None,
            target: object = None, dtype: torch.dtype = torch.float32, tokenizer: Any = None,
            progress: bool | Callable[[int, int], None] = False) -> AttentionMaps | Seq2SeqMaps:
    """Run ``model`` once on ``inputs`` and return the attention probabilities it computed.

    Args:
        model: a Hugging Face transformers model loaded with any attention implementation
            (eager, sdpa, attnkit; flex_attention masks cannot be read back), or an attnkit
            module holding :class:`~attnkit.nn.MultiHeadAttention` layers (e.g.
            :class:`~attnkit.nn.TransformerLM`), or attnkit's
            :class:`~attnkit.nn.EncoderDecoder` (with ``target``; gives Seq2SeqMaps).
        inputs: a string or a list of strings (tokenized with ``tokenizer`` into a padded
            batch), token ids ((L,) or (B, L) integer tensor, or a list of ints), or a dict
            of tensors passed to the model (``input_ids``, ``attention_mask``, ...; for
            attnkit models ``tokens``/``padding_mask``, or ``x`` for embeddings). Whisper-like
            models: a float ``input_features`` tensor or a dict holding it.
        target: for an encoder-decoder model, what its decoder produces, teacher-forced:
            text (tokenized with ``tokenizer(text_target=...)``), or token ids. The decoder
            reads ``config.decoder_start_token_id`` followed by the target (the start token
            is not added if every target begins with it), so row i+1 is the step that
            produces target token i. Or pass ``decoder_input_ids`` (and
            ``decoder_attention_mask``) in ``inputs``; then these are read as given.
            For attnkit's EncoderDecoder, the decoder's input ids as its ``forward``
            takes them (BOS first), read as given; or ``tgt_ids`` (and
            ``tgt_padding_mask``) in an inputs dict beside ``src_ids``.
        layers, heads: model indices to keep (an int or a sequence); None = all. Layers
            are counted in the order the model calls attention (for an encoder-decoder,
            separately in its encoder, decoder and cross-attention; the selection applies
            to each).
        queries: which query rows to keep, indexing each input's real (non-padding) tokens
            as a Python list: an int (``-1``: the last token, what a generation step
            reads), a slice (``slice(-n, None)``: the last n; ``slice(0, 64)``; a slice
            clips to each input's length), or a sequence of ints (``[0, 5, -1]``). None
            (default) keeps every row. Only the kept rows are computed and stored, each equal
            to that row of a full capture up to float rounding (a matrix product over fewer
            rows may differ in the last bit or two); rows come in token order, each once, and
            the maps say which tokens they are (``query_positions``, :meth:`AttentionMaps.rows`).
            Keys are always every real token. For an encoder-decoder the selection applies
            to each part's own queries (encoder: source tokens; decoder and cross: target
            tokens). Views that draw or score whole maps (the explorer, head roles,
            rollout, comparisons) refuse partial maps.
        max_bytes: refuse, before the model runs and before anything is allocated, a
            capture whose maps would take more than this many bytes; the error gives the
            size and the ``queries=``, ``heads=``, ``layers=`` and ``dtype=`` choices that
            would fit. None (default): no limit.
        dtype: storage dtype of the maps: float32 (default), float16, bfloat16 or float64.
            Probabilities are computed in float32 (float64 for a float64 model) and
            converted as soon as each head is done.
        tokenizer: turns text into ids and ids into token strings. Default for a
            transformers model: the tokenizer in its local folder (``model.name_or_path``);
            without one, tokens are ``str(id)``.
        progress: True prints ``layer i/n`` to stderr; a callable gets ``(done, total)``.

    Returns:
        :class:`AttentionMaps` with one (layers, heads, L, L) tensor per input, cut to its
        real tokens (padding is removed, for left or right padding alike), and the model's
        layer and head counts, special-token flags and word ids where known.
        For an encoder-decoder model (``config.is_encoder_decoder``):
        :class:`~attnkit.inspect.Seq2SeqMaps`, whose ``encoder`` (S x S), ``decoder``
        (T x T) and ``cross`` (T x S: queries are target tokens, keys source tokens) maps
        are each cut to the real tokens on both sides. Whisper's encoder side has no
        tokens: its keys are named ``"frame i"`` (one per encoder position).

    The model runs in eval mode and without gradients, and gets back its mode after. Its
    outputs are exactly those of a normal call: recording only reads q and k.

    Raises:
        ValueError: an input longer than the model's ``max_position_embeddings`` (or a
            learned-position TransformerLM's ``max_length``); a layer or head the model
            does not have; a query index out of range for an input, or ``queries`` that keep
            no row of any input (an input of the batch may keep none); maps larger than
            ``max_bytes``; a model that calls attention a number of times other than its
            layer count, or with a cache; an encoder-decoder model without a target, or
            a target for one that is not.
        TypeError: inputs or model of a kind capture does not take.

    >>> import torch
    >>> from attnkit.nn import TransformerConfig, TransformerLM
    >>> lm = TransformerLM(TransformerConfig(vocab_size=50, dim=32, depth=3, num_heads=4))
    >>> maps = capture(lm, torch.tensor([[5, 6, 7, 8]]), layers=[0, 2], heads=[1, 3])
    >>> maps
    AttentionMaps(model='TransformerLM', 1 input of 4 tokens, layers [0, 2], heads [1, 3], float32, 256 B)
    >>> maps[0].shape, maps.tokens[0]
    (torch.Size([2, 2, 4, 4]), ['5', '6', '7', '8'])
    >>> bool(maps[0][..., 0, 1:].eq(0).all())  # causal: the first token sees only itself
    True
    >>> last = capture(lm, torch.tensor([[5, 6, 7, 8]]), queries=slice(-2, None))  # the last 2 rows
    >>> last[0].shape, last.rows(0), torch.equal(last[0], capture(lm, torch.tensor([[5, 6, 7, 8]]))[0][:, :, 2:])
    (torch.Size([3, 4, 2, 4]), [2, 3], True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {describe(model)}")
    if dtype not in _STORAGE:
        raise TypeError(f"dtype must be one of {', '.join(str(d) for d in _STORAGE)}; got {dtype!r}")
    wanted_layers, wanted_heads = index_list("layers", layers), index_list("heads", heads)
    _check_queries(queries)
    keep = _Keep(queries, None if max_bytes is None else require_int("max_bytes", max_bytes, minimum=1))
    report = layer_progress("capture", progress)
    if isinstance(model, EncoderDecoder):
        return _capture_attnkit_seq2seq(model, inputs, target, wanted_layers, wanted_heads, dtype, tokenizer, keep)
    hf = facts.is_hf(model)
    if tokenizer is None and (enc.is_text(inputs) or enc.is_text(target) or hf):
        tokenizer = enc.find_tokenizer(model)
        if tokenizer is None and enc.is_text(inputs):
            raise ValueError(f"inputs are text, so capture needs a tokenizer, and none was found for "
                             f"{facts.name(model)!r}; pass tokenizer= (e.g. the one attnkit.models.load returns)")
    if hf and getattr(facts.pretrained(model).config, "is_encoder_decoder", False):
        return _capture_seq2seq(model, inputs, target, wanted_layers, wanted_heads, dtype, tokenizer, report, keep)
    if target is not None:
        raise ValueError(f"target is for encoder-decoder models; {facts.name(model)!r} is not one (its decoder reads "
                         f"inputs alone); got target {enc.summary(target)}")
    count, selected = _layers(model, hf, wanted_layers)
    # encode
    args, kwargs, ids, valid, word_ids = enc.encode(model, inputs, tokenizer)
    first = args[0] if args else ids
    if not isinstance(first, Tensor):
        raise TypeError(f"inputs must include token ids ('input_ids') or embeddings; got {enc.summary(inputs)}")
    batch, length = first.shape[:2]
    _check_length(model, length)
    real = enc.real_positions(valid, batch, length)
    counts = [enc.real_length(r, length) for r in real]
    num_heads = len(wanted_heads) if wanted_heads is not None else _model_heads(model, hf, "num_attention_heads")
    keep.check([_Part("attention", len(selected), num_heads, counts, list(counts))], dtype, selected,
               wanted_heads or (tuple(range(num_heads)) if num_heads else None))
    # tap
    recorder = _Recorder(selected, wanted_heads, dtype, real, real, (length, length), report, keep.queries)
    _record_self_attention(model, recorder, args, kwargs)
    if count is not None and recorder.calls != count:
        raise ValueError(f"{facts.name(model)!r} called attention {recorder.calls} times in one forward pass but has "
                         f"{count} layers; capture supports models that attend once per layer (encoders, decoders) "
                         "and encoder-decoder models")
    if recorder.recorded != len(selected):
        raise ValueError(f"{facts.name(model)!r} called attention only {recorder.calls} times (0 through the attention "
                         f"interface means its attention cannot be recorded); layers {list(selected)} were requested")
    # assemble
    side = enc.sides(ids, real, length, tokenizer, word_ids)
    return AttentionMaps(attentions=recorder.store, model_name=facts.name(model), layers=selected,
                         heads=recorder.heads or (), model_layers=count, model_heads=recorder.num_heads,
                         query_positions=recorder.rows, **side)


def _layers(model: nn.Module, hf: bool, wanted: tuple[int, ...] | None) -> tuple[int | None, tuple[int, ...]]:
    """The model's attention layer count (None where a transformers config does not say) and the layers to keep."""
    if hf:
        count = getattr(facts.text_config(model), "num_hidden_layers", None)
    else:
        count = sum(isinstance(m, MultiHeadAttention) for m in model.modules())
        if not count:
            raise TypeError(f"model must be a transformers model or hold attnkit MultiHeadAttention modules; "
                            f"got {type(model).__name__}, which holds none")
    if count is not None and wanted is not None and wanted[-1] >= count:
        raise ValueError(f"layers must be < {count}, the model's layer count; got {list(wanted)}")
    if wanted is not None:
        return count, wanted
    if count is None:
        raise ValueError(f"cannot tell how many attention layers {facts.name(model)!r} has; pass layers= explicitly")
    return count, tuple(range(count))


def _record_self_attention(model: nn.Module, recorder: _Recorder, args: tuple, kwargs: dict) -> None:
    """One forward of ``model`` with ``recorder`` on the tap of its own attention calls; for a transformers model
    whose attention bypasses the tap, its eager path's ``output_attentions`` instead."""
    ours = {id(m) for m in model.modules()}  # calls of other models meanwhile are not this capture's
    run_eval(model, tap(model, lambda module: recorder if id(module) in ours else None), args, kwargs)
    if not facts.is_hf(model) or recorder.calls:
        return
    # Its attention bypasses transformers' AttentionInterface (BERT before transformers 5): use the
    # model's own output_attentions, which holds every layer's (B, H, L, L) float maps at once. Only
    # the eager path's maps are the ones the model used: other paths of such models compute them
    # separately, and some leave the mask out (Falcon under sdpa gave non-causal maps).
    implementation = getattr(facts.pretrained(model).config, "_attn_implementation", None)
    if implementation != "eager":
        raise ValueError(
            f"{facts.name(model)!r} computes attention in its own code, not through transformers' "
            f"attention interface, so capture can only read its eager path's output_attentions; it "
            f"was loaded with attn_implementation={implementation!r}. Load it with "
            f"attn_implementation='eager' to capture its maps")
    out = run_eval(model, contextlib.nullcontext(), args, {**kwargs, "output_attentions": True})
    for probs in getattr(out, "attentions", None) or ():
        recorder.given(probs)


def _check_length(model: nn.Module, length: int) -> None:
    limit = facts.max_positions(model, unstated=None)
    if limit is not None and length > limit:
        raise ValueError(f"the input has {length} tokens, but {facts.name(model)!r} accepts at most {limit} positions "
                         "(max_position_embeddings); shorten the input")


def _part_recorders(layers: tuple[int, ...] | None, heads: tuple[int, ...] | None, dtype: torch.dtype,
                    src: tuple[Sequence[slice | Tensor], int | None], tgt: tuple[Sequence[slice | Tensor], int],
                    queries: Queries) -> dict[str, _Recorder]:
    """The encoder's, decoder's and cross-attention's recorders; ``src``, ``tgt``: (real positions, length)."""
    (real_src, src_len), (real_tgt, tgt_len) = src, tgt
    return {
        "encoder": _Recorder(layers, heads, dtype, real_src, real_src, (src_len, src_len), None, queries),
        "decoder": _Recorder(layers, heads, dtype, real_tgt, real_tgt, (tgt_len, tgt_len), None, queries),
        "cross": _Recorder(layers, heads, dtype, real_tgt, real_src, (tgt_len, src_len), None, queries),
    }


def _seq2seq_parts(model: nn.Module, layers: tuple[int, ...] | None, heads: tuple[int, ...] | None,
                   depth: tuple[int | None, int | None], src: list[int | None], tgt: list[int]) -> list[_Part]:
    """The encoder, decoder and cross parts a transformers encoder-decoder capture stores."""
    def count(n: int | None) -> int:
        return len(layers) if layers is not None else n or 0

    enc_heads = len(heads) if heads else _model_heads(model, True, "encoder_attention_heads", "num_heads",
                                                      "num_attention_heads")
    dec_heads = len(heads) if heads else _model_heads(model, True, "decoder_attention_heads", "num_heads",
                                                      "num_attention_heads")
    return [_Part("encoder", count(depth[0]), enc_heads, [n or 0 for n in src], src),
            _Part("decoder", count(depth[1]), dec_heads, tgt, list(tgt)),
            _Part("cross", count(depth[1]), dec_heads, tgt, src)]


def _capture_seq2seq(model: nn.Module, inputs: object, target: object, wanted_layers: tuple[int, ...] | None,
                     wanted_heads: tuple[int, ...] | None, dtype: torch.dtype, tokenizer: Any,
                     report: Callable[[int, int], None] | None, keep: _Keep) -> Seq2SeqMaps:
    """:func:`capture` of an encoder-decoder transformers model: its encoder, decoder and cross calls apart."""
    args, kwargs, src_ids, src_valid, src_words = enc.encode(model, inputs, tokenizer)
    if "decoder_input_ids" in kwargs and target is not None:
        raise ValueError("pass the decoder's tokens once: inputs hold decoder_input_ids and target is given too")
    if "decoder_input_ids" in kwargs:
        tgt_ids, tgt_valid, tgt_words = kwargs["decoder_input_ids"], kwargs.get("decoder_attention_mask"), None
    elif target is None:
        raise ValueError(f"{facts.name(model)!r} is an encoder-decoder model: capture needs the decoder's side too; "
                         f"pass target= (text or ids, teacher-forced) or decoder_input_ids in inputs; got inputs "
                         f"{enc.summary(inputs)}")
    else:
        decoded = enc.target_inputs(model, target, tokenizer)
        tgt_ids, tgt_valid, tgt_words = decoded["decoder_input_ids"], decoded["decoder_attention_mask"], \
            decoded["word_ids"]
        kwargs["decoder_input_ids"] = tgt_ids
        if tgt_valid is not None:
            kwargs["decoder_attention_mask"] = tgt_valid
    if not isinstance(tgt_ids, Tensor) or tgt_ids.dim() != 2 or tgt_ids.dtype.is_floating_point:
        raise TypeError(f"decoder_input_ids must be a (B, T) integer tensor; got {enc.summary(tgt_ids)}")
    source = src_ids if src_ids is not None else kwargs.get(getattr(model, "main_input_name", "input_ids"))
    if not isinstance(source, Tensor):
        raise TypeError(f"inputs must include the encoder's input ('input_ids', or "
                        f"{getattr(model, 'main_input_name', 'input_ids')!r}); got {enc.summary(inputs)}")
    batch, tgt_len = tgt_ids.shape
    if source.shape[0] != batch:
        raise ValueError(f"inputs hold {source.shape[0]} sequences but the target {batch}; expected one target each")
    src_len = source.shape[1] if src_ids is not None else None  # Whisper: encoder positions come from its features
    if src_len is not None:
        _check_length(model, src_len)
    real_src = enc.real_positions(src_valid, batch, src_len) if src_len is not None else [slice(0, None)] * batch
    real_tgt = enc.real_positions(tgt_valid, batch, tgt_len)
    config = facts.pretrained(model).config
    encoder_layers = getattr(config, "encoder_layers", None) or getattr(config, "num_layers", None)
    decoder_layers = getattr(config, "decoder_layers", None) or getattr(config, "num_decoder_layers", None) \
        or encoder_layers
    if keep.max_bytes is not None or keep.queries is not None:
        src_n = [enc.real_length(r, src_len) if src_len is not None else None for r in real_src]
        tgt_n = [enc.real_length(r, tgt_len) for r in real_tgt]
        stored = _seq2seq_parts(model, wanted_layers, wanted_heads, (encoder_layers, decoder_layers), src_n, tgt_n)
        keep.check(stored, dtype, wanted_layers or tuple(range(max(encoder_layers or 1, decoder_layers or 1))),
                   wanted_heads or tuple(range(max(p.heads or 0 for p in stored))))
    recorders = _part_recorders(wanted_layers, wanted_heads, dtype, (real_src, src_len), (real_tgt, tgt_len),
                                keep.queries)
    parts = encoder_decoder_parts(model)
    total = encoder_layers + 2 * decoder_layers if encoder_layers and decoder_layers else None
    done = [0]

    def route(module: nn.Module) -> Observer | None:
        part = parts.get(id(module))
        if part is None:
            return None
        done[0] += 1
        if report is not None and total is not None:
            report(min(done[0], total), total)  # called before this call's maps are computed
        return recorders[part]

    run_eval(model, transformers_tap(model, route), args, kwargs)
    counts = {part: r.calls for part, r in recorders.items()}
    if counts["encoder"] == 0 or counts["decoder"] == 0 or counts["cross"] != counts["decoder"]:
        raise ValueError(f"{facts.name(model)!r} made {counts['encoder']} encoder, {counts['decoder']} decoder and "
                         f"{counts['cross']} cross-attention calls through transformers' attention interface; "
                         "capture needs each layer's calls there, one cross call per decoder layer")
    for part, r in recorders.items():
        if wanted_layers is not None and wanted_layers[-1] >= r.calls:
            raise ValueError(f"layers must be < {r.calls}, the {part}'s layer count; got {list(wanted_layers)}")
    src_real_len = source.shape[1] if src_len is not None else recorders["encoder"].store[0].shape[-1]
    src = enc.sides(src_ids, real_src, src_real_len, tokenizer, src_words, label="frame ")
    tgt = enc.sides(tgt_ids, real_tgt, tgt_len, tokenizer, tgt_words)
    keyed = {"key_tokens": src["tokens"], "key_token_ids": src["token_ids"], "key_special": src["special"],
             "key_word_ids": src["word_ids"]}

    def maps(part: str, side: dict, **keys: Any) -> AttentionMaps:
        r = recorders[part]
        return AttentionMaps(attentions=r.store, model_name=facts.name(model), layers=r.layers or tuple(range(r.calls)),
                             heads=r.heads or (), model_layers=r.calls, model_heads=r.num_heads,
                             query_positions=r.rows, **side, **keys)

    return Seq2SeqMaps(encoder=maps("encoder", src), decoder=maps("decoder", tgt), cross=maps("cross", tgt, **keyed),
                       sequences={"source": src["token_ids"], "target": tgt["token_ids"]})


# -- attnkit's EncoderDecoder ---------------------------------------------------------------------


def _capture_attnkit_seq2seq(model: EncoderDecoder, inputs: object, target: object,
                             wanted_layers: tuple[int, ...] | None, wanted_heads: tuple[int, ...] | None,
                             dtype: torch.dtype, tokenizer: Any, keep: _Keep) -> Seq2SeqMaps:
    """:func:`capture` of attnkit's :class:`~attnkit.nn.EncoderDecoder`, teacher-forced on ``target``:
    the decoder's input ids (B, T) as ``forward`` takes them (BOS, then the target shifted right)."""
    src, src_valid, rest = enc.source_inputs(inputs)
    if "tgt_ids" in rest and target is not None:
        raise ValueError("pass the decoder's tokens once: inputs hold tgt_ids and target is given too")
    if "tgt_ids" not in rest and target is None:
        raise ValueError(f"attnkit's EncoderDecoder needs the decoder's side too: pass target= (the decoder's input "
                         "ids (B, T), BOS first, teacher-forced) or tgt_ids in inputs; got inputs "
                         f"{enc.summary(inputs)}")
    tgt = enc.int_ids("target", rest["tgt_ids"] if target is None else target)
    tgt_valid = rest.get("tgt_padding_mask")
    if tgt.shape[0] != src.shape[0]:
        raise ValueError(f"inputs hold {src.shape[0]} sequences but the target {tgt.shape[0]}; expected one target "
                         "each")
    c = model.config
    for part, depth in (("encoder", c.encoder_depth), ("decoder", c.decoder_depth)):
        if wanted_layers is not None and wanted_layers[-1] >= depth:
            raise ValueError(f"layers must be < {depth}, the {part}'s layer count; got {list(wanted_layers)}")
    if wanted_heads is not None and wanted_heads[-1] >= c.num_heads:
        raise ValueError(f"heads must be < {c.num_heads}, the model's heads per layer; got {list(wanted_heads)}")
    batch, (src_len, tgt_len) = src.shape[0], (src.shape[1], tgt.shape[1])
    real_src = enc.real_positions(src_valid, batch, src_len)
    real_tgt = enc.real_positions(tgt_valid, batch, tgt_len)
    src_n = [enc.real_length(r, src_len) for r in real_src]
    tgt_n = [enc.real_length(r, tgt_len) for r in real_tgt]
    heads = len(wanted_heads) if wanted_heads is not None else c.num_heads
    enc_layers, dec_layers = (len(wanted_layers),) * 2 if wanted_layers is not None else (c.encoder_depth,
                                                                                         c.decoder_depth)
    keep.check([_Part("encoder", enc_layers, heads, src_n, list(src_n)), _Part("decoder", dec_layers, heads, tgt_n,
                list(tgt_n)), _Part("cross", dec_layers, heads, tgt_n, list(src_n))], dtype,
               wanted_layers or tuple(range(max(c.encoder_depth, c.decoder_depth))),
               wanted_heads or tuple(range(c.num_heads)))
    recorders = _part_recorders(wanted_layers, wanted_heads, dtype, (real_src, src_len), (real_tgt, tgt_len),
                                keep.queries)
    parts = attnkit_parts(model)
    modules = [m for m in model.modules() if isinstance(m, MultiHeadAttention) and id(m) in parts]
    recording = attnkit_tap(modules, lambda module: recorders[parts[id(module)]])
    run_eval(model, recording, (src, tgt), {"src_padding_mask": src_valid, "tgt_padding_mask": tgt_valid})
    src_side = enc.sides(src, real_src, src_len, tokenizer, None)
    tgt_side = enc.sides(tgt, real_tgt, tgt_len, tokenizer, None)
    keyed = {"key_tokens": src_side["tokens"], "key_token_ids": src_side["token_ids"],
             "key_special": src_side["special"]}

    def maps(part: str, side: dict, **keys: Any) -> AttentionMaps:
        r = recorders[part]
        return AttentionMaps(attentions=r.store, model_name=facts.name(model), layers=r.layers or tuple(range(r.calls)),
                             heads=r.heads or (), model_layers=r.calls, model_heads=c.num_heads,
                             query_positions=r.rows, **side, **keys)

    return Seq2SeqMaps(encoder=maps("encoder", src_side), decoder=maps("decoder", tgt_side),
                       cross=maps("cross", tgt_side, **keyed),
                       sequences={"source": src_side["token_ids"], "target": tgt_side["token_ids"]})


_MOVED = {"hf_recording": "transformers_tap", "wrapped_attention_functions": "wrap_attention_functions"}


def __getattr__(name: str) -> object:
    """The hooks moved to :mod:`attnkit.integrations.tap` (their old names here are deprecated)."""
    if name in _MOVED:
        import warnings

        from attnkit.integrations import tap

        warnings.warn(f"attnkit.inspect.recording.{name} is deprecated and will be removed in the next release; use "
                      f"attnkit.integrations.tap.{_MOVED[name]}", DeprecationWarning, stacklevel=2)
        return getattr(tap, _MOVED[name])
    raise AttributeError(f"module 'attnkit.inspect.recording' has no attribute {name!r}")
