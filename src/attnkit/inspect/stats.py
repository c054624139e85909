"""``stats()``: exact attention statistics of a whole model at long context, without the maps.

:func:`capture` stores (layers, heads, L, L) maps; at 32K tokens that is 32 GiB per layer
in float16. :func:`stats` keeps what people ask of those maps instead, per layer and head,
exactly (see :class:`AttentionStats`): received mass per key (H2O, sinks), entropy per
query, sink mass (StreamingLLM), attention distance (mean and histogram), the top-k keys
of every query, and the largest logit (QK-clip).

How: it rides the same tap as :func:`capture` (:mod:`attnkit.integrations.tap`). Inside
each attention call, after the model's own attention function ran (its output is what the
model gets, unchanged), it computes the rows' log-sum-exp with attnkit's tiled backend and
then the statistics block by block from q, k, the mask and that log-sum-exp
(:func:`attnkit.functional.stats.call_stats`), never holding an (L x L) tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnkit import _model_facts as facts
from attnkit import masks
from attnkit._checks import describe
from attnkit.functional._call import make_call
from attnkit.functional.core import select_backend
from attnkit.functional.stats import CallStats, StatsOptions, call_stats
from attnkit.inspect import encoding as enc
from attnkit.inspect._common import index_list, layer_progress
from attnkit.integrations.tap import run_eval, tap
from attnkit.nn.attention import MultiHeadAttention

__all__ = ["AttentionStats", "CallStats", "StatsOptions", "stats"]

_PER_QUERY = ("entropy", "sink_mass", "distance", "row_max", "lse")


@dataclass(frozen=True)
class AttentionStats:
    """One input's attention statistics, per layer and head, over its real tokens only.

    ``n`` below is the number of recorded layers (``layers``), ``H`` the heads per layer,
    ``L`` the input's real tokens (padding removed, left or right), ``k`` the top-k.
    Positions (``top_index``, the columns of ``received``) index the real tokens ``0..L-1``.
    Distances are measured in the padded input's positions: the real tokens' own distances when
    the padding is on the sides, as tokenizers pad.

    Fields:
        received: (n, H, L) attention each key receives, summed over the queries (column sums).
        entropy: (n, H, L) each query's entropy in nats.
        sink_mass: (n, H, L) each query's mass on the first ``sinks`` real tokens.
        distance: (n, H, L) each query's mean ``|i - j|``.
        distance_hist: (n, H, nbins) mass at distances ``distance_edges[t] <= |i - j| <
            distance_edges[t + 1]``, summed over the queries (rows sum to the number of
            queries with a key; see :meth:`distance_share`).
        distance_edges: (nbins + 1,) int64: 0, 1, 2, 4, 8, ...
        top_index: (n, H, L, k) int64 each query's keys of largest weight, descending;
            -1 where fewer keys carry weight; keys of equal weight in no set order.
        top_weight: (n, H, L, k) their probabilities (0 where the index is -1).
        row_max: (n, H, L) each query's largest logit (the score entering the softmax).
        max_logit: (n, H) the largest logit of each head (QK-clip).
        lse: (n, H, L) each query's log-sum-exp; the exact weights of query ``i`` over keys
            ``j`` are ``exp(score(i, j) - lse[., ., i])``.
        layers: the model's layer indices recorded, in order.
        tokens, token_ids: the real tokens (strings, ids; ids None without them).
        special: one bool per token, True for special tokens; None = unknown.
        model_name, model_layers, model_heads: the model's name, layer and head counts.
        context_window: the most positions the model takes (None: it states none).
        sinks: the number of sink tokens (``sink_mass``).
    """

    received: Tensor
    entropy: Tensor
    sink_mass: Tensor
    distance: Tensor
    distance_hist: Tensor
    distance_edges: Tensor
    top_index: Tensor
    top_weight: Tensor
    row_max: Tensor
    max_logit: Tensor
    lse: Tensor
    layers: tuple[int, ...]
    tokens: list[str]
    token_ids: list[int] | None
    special: list[bool] | None
    model_name: str
    model_layers: int
    model_heads: int
    context_window: int | None
    sinks: int

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def sink_share(self) -> Tensor:
        """(n, H) the mean mass on the sink tokens, over the queries."""
        return self.sink_mass.mean(-1)

    @property
    def mean_entropy(self) -> Tensor:
        """(n, H) the mean entropy of the queries, in nats."""
        return self.entropy.mean(-1)

    @property
    def mean_distance(self) -> Tensor:
        """(n, H) the mean attention distance of the queries."""
        return self.distance.mean(-1)

    def distance_share(self) -> Tensor:
        """(n, H, nbins) ``distance_hist`` as a distribution per head (each row sums to 1)."""
        total = self.distance_hist.sum(-1, keepdim=True)
        return self.distance_hist / torch.where(total > 0, total, 1.0)

    def __repr__(self) -> str:
        return (f"AttentionStats(model={self.model_name!r}, {len(self)} tokens, layers {list(self.layers)}, "
                f"{self.model_heads} heads, top_k={self.top_index.shape[-1]}, sinks={self.sinks})")


class _StatsRecorder:
    """The tap's observer: statistics of each selected attention call, in the padded batch's positions."""

    def __init__(self, layers: tuple[int, ...] | None, options: StatsOptions, valid: Tensor | None, length: int,
                 progress: Callable[[int, int], None] | None, total: int | None):
        self.layers, self.options, self.valid, self.length = layers, options, valid, length
        self.progress, self.total = progress, total
        self.calls = 0
        self.kept: list[tuple[int, CallStats]] = []

    def __call__(self, q: Tensor, k: Tensor, mask: masks.Mask | Tensor | None, bias: Any,
                 scale: float | None, softcap: float | None) -> None:
        layer, self.calls = self.calls, self.calls + 1
        if self.layers is not None and layer not in self.layers:
            return
        if q.shape[2] != self.length or k.shape[2] != self.length:
            raise ValueError(f"stats reads attention over the whole input in one pass; attention call {layer} has "
                             f"{q.shape[2]} queries and {k.shape[2]} keys, where {self.length} of each were expected "
                             "(a cache, or cross-attention?)")
        call = make_call(q, k, k, mask=mask, bias=bias, scale=scale, softcap=softcap, dropout_p=0.0, return_lse=True)
        _, lse = select_backend(call, "tiled").run(call)
        valid = self.valid
        sink_start = None if valid is None else valid.int().argmax(-1)
        self.kept.append((layer, call_stats(call, lse, self.options, query_valid=valid, sink_start=sink_start)))
        if self.progress is not None:
            self.progress(len(self.kept), len(self.layers) if self.layers is not None else self.total or len(self.kept))


def _layer_count(model: nn.Module) -> int | None:
    if facts.is_hf(model):
        count = getattr(facts.text_config(model), "num_hidden_layers", None)
        return count if isinstance(count, int) else None
    count = sum(isinstance(m, MultiHeadAttention) for m in model.modules())
    if not count:
        raise TypeError(f"model must be a transformers model or hold attnkit MultiHeadAttention modules; got "
                        f"{type(model).__name__}, which holds none")
    return count


def stats(model: nn.Module, inputs: object, layers: Iterable[int] | int | None = None, *, top_k: int = 8,
          sinks: int = 4, tokenizer: Any = None, progress: bool | Callable[[int, int], None] = False,
          ) -> list[AttentionStats]:
    """Run ``model`` once on ``inputs``; return each input's exact attention statistics (no maps).

    Args:
        model: a Hugging Face transformers model whose attention goes through transformers'
            attention interface (eager, sdpa, attnkit; BERT, GPT-2, Llama, Mistral, ... in
            transformers 5), or an attnkit module holding
            :class:`~attnkit.nn.MultiHeadAttention` layers (e.g. :class:`~attnkit.nn.TransformerLM`).
        inputs: as :func:`attnkit.inspect.capture` takes them: text or a list of texts (with
            ``tokenizer``), token ids ((L,) or (B, L), or a list of ints), or a dict of
            tensors (``input_ids`` and ``attention_mask``; ``tokens``/``padding_mask`` for
            attnkit models). Padding (left or right) is left out of every statistic.
        layers: the model's layers to keep (an int or a sequence); None = all.
        top_k: keys kept per query (0 = none). sinks: leading real tokens counted as the sink.
        tokenizer: as :func:`capture` (default: the model's own, if found).
        progress: True prints ``stats: layer i/n`` to stderr after each layer; a callable
            gets ``(done, total)``.

    Returns:
        One :class:`AttentionStats` per input, cut to its real tokens.

    Every mask the model uses is honoured (causal, sliding window, padding, documents), as
    the tap translates it. The model's attention calls are exactly those of a normal call.
    A transformers model with a task head (``...ForCausalLM``, ``...ForMaskedLM``) runs as
    its ``base_model`` where that takes the inputs' keywords: the head's (L x vocab) logits,
    4 GB at 32K tokens and a 30K vocabulary, are never computed. Memory: the statistics,
    O(layers * heads * L * top_k), plus one block of scores at a time.

    Raises:
        ValueError: a layer the model does not have; an input longer than the model's
            context window; a call with a cache or cross-attention; bad ``top_k``/``sinks``.
        TypeError: a model or inputs of a kind stats does not take.

    >>> import torch
    >>> from attnkit.nn import TransformerConfig, TransformerLM
    >>> lm = TransformerLM(TransformerConfig(vocab_size=50, dim=32, depth=2, num_heads=4))
    >>> st = stats(lm, torch.tensor([[5, 6, 7, 8, 9]]), top_k=2, sinks=1)[0]
    >>> st
    AttentionStats(model='TransformerLM', 5 tokens, layers [0, 1], 4 heads, top_k=2, sinks=1)
    >>> st.received.shape, st.top_index.shape, st.max_logit.shape
    (torch.Size([2, 4, 5]), torch.Size([2, 4, 5, 2]), torch.Size([2, 4]))
    >>> round(float(st.received[0, 0].sum()), 4)  # every query's weights sum to 1
    5.0
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {describe(model)}")
    options = StatsOptions(top_k=top_k, sinks=sinks)
    wanted = index_list("layers", layers)
    count = _layer_count(model)
    if count is not None and wanted is not None and wanted[-1] >= count:
        raise ValueError(f"layers must be < {count}, the model's layer count; got {list(wanted)}")
    report = layer_progress("stats", progress)
    hf = facts.is_hf(model)
    if hf and getattr(facts.pretrained(model).config, "is_encoder_decoder", False):
        raise ValueError(f"stats reads self-attention over one input; {facts.name(model)!r} is an encoder-decoder "
                         "model: use attnkit.inspect.capture for its cross-attention")
    if tokenizer is None and (enc.is_text(inputs) or hf):
        tokenizer = enc.find_tokenizer(model)
        if tokenizer is None and enc.is_text(inputs):
            raise ValueError(f"inputs are text, so stats needs a tokenizer, and none was found for "
                             f"{facts.name(model)!r}; pass tokenizer=")
    args, kwargs, ids, valid, word_ids = enc.encode(model, inputs, tokenizer)
    first = args[0] if args else ids
    if not isinstance(first, Tensor):
        raise TypeError(f"inputs must include token ids ('input_ids') or embeddings; got {enc.summary(inputs)}")
    batch, length = first.shape[:2]
    window = facts.max_positions(model, unstated=None)
    if window is not None and length > window:
        raise ValueError(f"the input has {length} tokens, but {facts.name(model)!r} accepts at most {window} "
                         "positions; shorten the input")
    valid_bool = None if valid is None else valid.bool().to(first.device)
    recorder = _StatsRecorder(wanted, options, valid_bool, length, report, count)
    ours = {id(m) for m in model.modules()}
    recording = tap(model, lambda module: recorder if id(module) in ours else None, reader="stats")
    run_eval(model, recording, args, kwargs, forward=facts.headless(model, kwargs))
    expected = wanted if wanted is not None else tuple(range(count if count is not None else recorder.calls))
    if [layer for layer, _ in recorder.kept] != list(expected):
        raise ValueError(f"{facts.name(model)!r} called attention {recorder.calls} times through the attention tap; "
                         f"layers {list(expected)} were requested (a model whose attention bypasses transformers' "
                         "attention interface cannot be read; capture reads its eager maps)")
    real = enc.real_positions(valid, batch, length)
    side = enc.sides(ids, real, length, tokenizer, word_ids)
    heads = recorder.kept[0][1].entropy.shape[1] if recorder.kept else 0
    return [_one_input(recorder.kept, b, r, side, b_facts=(facts.name(model), count or recorder.calls, heads, window),
                       sinks=sinks) for b, r in enumerate(real)]


def _one_input(kept: list[tuple[int, CallStats]], b: int, real: slice | Tensor, side: dict[str, Any],
               b_facts: tuple[str, int, int, int | None], sinks: int) -> AttentionStats:
    """Input ``b``'s statistics over its real positions ``real``, stacked over the recorded layers."""
    name, model_layers, model_heads, window = b_facts
    length = kept[0][1].received.shape[-1]
    rank = torch.full((length,), -1, dtype=torch.int64)
    rank[real] = torch.arange(enc.real_length(real, length))

    def stack(field: str, cut: bool) -> Tensor:
        parts = [getattr(s, field)[b] for _, s in kept]  # (H, ...)
        return torch.stack([p[:, real] if cut else p for p in parts])

    top = stack("top_index", True)
    mapped = torch.where(top >= 0, rank.to(top.device)[top.clamp(min=0)], -1)
    per_query = {f: stack(f, True) for f in _PER_QUERY}
    return AttentionStats(
        received=stack("received", True), distance_hist=stack("distance_hist", False),
        distance_edges=kept[0][1].distance_edges, top_index=mapped, top_weight=stack("top_weight", True),
        max_logit=stack("max_logit", False), layers=tuple(layer for layer, _ in kept),
        tokens=side["tokens"][b], token_ids=None if side["token_ids"] is None else side["token_ids"][b],
        special=None if side["special"] is None else side["special"][b], model_name=name, model_layers=model_layers,
        model_heads=model_heads, context_window=window, sinks=sinks, **per_query)
