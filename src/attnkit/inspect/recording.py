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
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from attnkit import _model_facts as facts
from attnkit import biases, masks
from attnkit._checks import describe
from attnkit.functional import attention_probs
from attnkit.inspect import encoding as enc
from attnkit.inspect.maps import AttentionMaps, Seq2SeqMaps
from attnkit.integrations.tap import Observer, attnkit_tap, tap, transformers_tap
from attnkit.nn.attention import MultiHeadAttention
from attnkit.nn.encoder_decoder import EncoderDecoder

__all__ = ["capture", "probabilities"]

_STORAGE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CHUNK_BYTES = 1 << 26  # float32 scores computed at once, at most (when heads can be split)


def _index_list(name: str, given: Iterable[int] | int | None) -> tuple[int, ...] | None:
    if given is None:
        return None
    values = [given] if isinstance(given, int) else list(given)
    if not values or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in values):
        raise ValueError(f"{name} must be None, an int >= 0 or a non-empty sequence of them; got {given!r}")
    return tuple(sorted(set(values)))


def _heads_slice(t: Tensor, heads: list[int]) -> Tensor:
    """A (.., H, Lq, Lk)-broadcastable tensor restricted to some heads (unchanged if it has no head dim)."""
    t4 = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    return t4 if t4.shape[1] == 1 else t4[:, heads]


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
                 lengths: tuple[int | None, int | None], progress: Callable[[int, int], None] | None):
        self.layers, self.heads, self.dtype, self.progress = layers, heads, dtype, progress
        self.real_q, self.real_k, self.lengths = real_q, real_k, lengths
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
            self.store = [torch.empty(count or 0, len(self.heads), enc.real_length(rq, q_len),
                                      enc.real_length(rk, k_len), dtype=self.dtype)
                          for rq, rk in zip(self.real_q, self.real_k)]
        if self.layers is None:  # all layers, however many: grow by one
            self.store = [torch.cat([s, s.new_empty(1, *s.shape[1:])]) for s in self.store]
            return layer
        return self.layers.index(layer)

    def _keep(self, slot: int, start: int, probs: Tensor) -> None:
        """Store (B, c, Lq, Lk) probabilities of the selected heads ``start:start + c``, cut to the real tokens."""
        for b, (rq, rk) in enumerate(zip(self.real_q, self.real_k)):
            self.store[b][slot, start:start + probs.shape[1]] = probs[b][:, rq][:, :, rk]

    def _done(self) -> None:
        self.recorded += 1
        if self.progress is not None and self.layers is not None:
            self.progress(self.recorded, len(self.layers))

    def __call__(self, q: Tensor, k: Tensor, mask: masks.Mask | Tensor | None, bias: Any,
                 scale: float | None, softcap: float | None) -> None:
        """Compute and keep the probabilities of one attention call: q (B, H, Lq, D), k (B, Hkv, Lk, D)."""
        slot = self._begin(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if slot is None:
            return
        for start, probs in probabilities(q, k, mask, bias, scale, softcap, self.heads or ()):
            self._keep(slot, start, probs)
            del probs
        self._done()

    def given(self, probs: Tensor) -> None:
        """Keep one layer's probabilities (B, H, L, L) that the model computed itself."""
        slot = self._begin(probs.shape[0], probs.shape[1], probs.shape[2], probs.shape[3])
        if slot is not None:
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


def _progress(progress: bool | Callable[[int, int], None]) -> Callable[[int, int], None] | None:
    if callable(progress):
        return progress
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool or a callable (done, total); got {describe(progress)}")
    if not progress:
        return None

    def show(done: int, total: int) -> None:
        print(f"\rcapture: layer {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    return show


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


def _run(model: nn.Module, recording: contextlib.AbstractContextManager, args: tuple, kwargs: dict) -> Any:
    """One forward pass of ``model`` in eval mode without gradients, recorded; its modes restored after.
    Returns the model's output."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), recording:
            return model(*args, **kwargs)
    finally:
        for m, mode in modes:
            m.training = mode


def capture(model: nn.Module, inputs: object, layers: Iterable[int] | int | None = None,
            heads: Iterable[int] | int | None = None, *, target: object = None, dtype: torch.dtype = torch.float32,
            tokenizer: Any = None, progress: bool | Callable[[int, int], None] = False) -> AttentionMaps | Seq2SeqMaps:
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
            does not have; a model that calls attention a number of times other than its
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
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {describe(model)}")
    if dtype not in _STORAGE:
        raise TypeError(f"dtype must be one of {', '.join(str(d) for d in _STORAGE)}; got {dtype!r}")
    wanted_layers, wanted_heads = _index_list("layers", layers), _index_list("heads", heads)
    report = _progress(progress)
    if isinstance(model, EncoderDecoder):
        return _capture_attnkit_seq2seq(model, inputs, target, wanted_layers, wanted_heads, dtype, tokenizer)
    hf = facts.is_hf(model)
    if tokenizer is None and (enc.is_text(inputs) or enc.is_text(target) or hf):
        tokenizer = enc.find_tokenizer(model)
        if tokenizer is None and enc.is_text(inputs):
            raise ValueError(f"inputs are text, so capture needs a tokenizer, and none was found for "
                             f"{facts.name(model)!r}; pass tokenizer= (e.g. the one attnkit.models.load returns)")
    if hf and getattr(facts.pretrained(model).config, "is_encoder_decoder", False):
        return _capture_seq2seq(model, inputs, target, wanted_layers, wanted_heads, dtype, tokenizer, report)
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
    # tap
    recorder = _Recorder(selected, wanted_heads, dtype, real, real, (length, length), report)
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
                         heads=recorder.heads or (), model_layers=count, model_heads=recorder.num_heads, **side)


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
    _run(model, tap(model, lambda module: recorder if id(module) in ours else None), args, kwargs)
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
    out = _run(model, contextlib.nullcontext(), args, {**kwargs, "output_attentions": True})
    for probs in getattr(out, "attentions", None) or ():
        recorder.given(probs)


def _check_length(model: nn.Module, length: int) -> None:
    limit = facts.max_positions(model, unstated=None)
    if limit is not None and length > limit:
        raise ValueError(f"the input has {length} tokens, but {facts.name(model)!r} accepts at most {limit} positions "
                         "(max_position_embeddings); shorten the input")


def _capture_seq2seq(model: nn.Module, inputs: object, target: object, wanted_layers: tuple[int, ...] | None,
                     wanted_heads: tuple[int, ...] | None, dtype: torch.dtype, tokenizer: Any,
                     report: Callable[[int, int], None] | None) -> Seq2SeqMaps:
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
    recorders = {
        "encoder": _Recorder(wanted_layers, wanted_heads, dtype, real_src, real_src, (src_len, src_len), None),
        "decoder": _Recorder(wanted_layers, wanted_heads, dtype, real_tgt, real_tgt, (tgt_len, tgt_len), None),
        "cross": _Recorder(wanted_layers, wanted_heads, dtype, real_tgt, real_src, (tgt_len, src_len), None),
    }
    parts = encoder_decoder_parts(model)
    config = facts.pretrained(model).config
    encoder_layers = getattr(config, "encoder_layers", None) or getattr(config, "num_layers", None)
    decoder_layers = getattr(config, "decoder_layers", None) or getattr(config, "num_decoder_layers", None) \
        or encoder_layers
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

    _run(model, transformers_tap(model, route), args, kwargs)
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
                             heads=r.heads or (), model_layers=r.calls, model_heads=r.num_heads, **side, **keys)

    return Seq2SeqMaps(encoder=maps("encoder", src), decoder=maps("decoder", tgt), cross=maps("cross", tgt, **keyed),
                       sequences={"source": src["token_ids"], "target": tgt["token_ids"]})


# -- attnkit's EncoderDecoder ---------------------------------------------------------------------


def _capture_attnkit_seq2seq(model: EncoderDecoder, inputs: object, target: object,
                             wanted_layers: tuple[int, ...] | None, wanted_heads: tuple[int, ...] | None,
                             dtype: torch.dtype, tokenizer: Any) -> Seq2SeqMaps:
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
    recorders = {
        "encoder": _Recorder(wanted_layers, wanted_heads, dtype, real_src, real_src, (src_len, src_len), None),
        "decoder": _Recorder(wanted_layers, wanted_heads, dtype, real_tgt, real_tgt, (tgt_len, tgt_len), None),
        "cross": _Recorder(wanted_layers, wanted_heads, dtype, real_tgt, real_src, (tgt_len, src_len), None),
    }
    parts = attnkit_parts(model)
    modules = [m for m in model.modules() if isinstance(m, MultiHeadAttention) and id(m) in parts]
    recording = attnkit_tap(modules, lambda module: recorders[parts[id(module)]])
    _run(model, recording, (src, tgt), {"src_padding_mask": src_valid, "tgt_padding_mask": tgt_valid})
    src_side = enc.sides(src, real_src, src_len, tokenizer, None)
    tgt_side = enc.sides(tgt, real_tgt, tgt_len, tokenizer, None)
    keyed = {"key_tokens": src_side["tokens"], "key_token_ids": src_side["token_ids"],
             "key_special": src_side["special"]}

    def maps(part: str, side: dict, **keys: Any) -> AttentionMaps:
        r = recorders[part]
        return AttentionMaps(attentions=r.store, model_name=facts.name(model), layers=r.layers or tuple(range(r.calls)),
                             heads=r.heads or (), model_layers=r.calls, model_heads=c.num_heads, **side, **keys)

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
