"""``capture_generation()``: the attention of every token a model reads while it generates.

The model's own ``generate`` runs unchanged, with its KV cache (dynamic, sliding-window or
static): the attention functions transformers hands its modules are wrapped for the call
(:func:`~attnkit.integrations.tap.transformers_tap`), so the tokens are those of a plain
``generate``. Each call's probabilities are computed from the same q, k and mask
(:func:`~attnkit.inspect.recording.probabilities`) and its rows are placed by absolute
position: a cache hands the keys in position order, either starting at position 0 (a static
cache that is not full; its empty slots are masked) or ending at the newest token (a dynamic
cache, a full sliding window), so key j of a call is position ``max(0, N - Lk) + j`` when N
tokens have been read.

The last generated token is never read by the model (generation stops after producing it).
To give it its row, one more forward pass reads the final sequence without a cache (the
encoder's output is recomputed, not recorded) and only the rows of tokens not read before are
kept: the last token's. So the maps cover all T tokens of ``sequences``, and row i equals row i
of one full forward pass over the sequence. Cost: that pass is a full forward over T tokens,
and each layer's (B, H, T, T) probabilities are computed and all but the last row dropped,
about what :func:`~attnkit.inspect.capture` of the final sequence costs on top of ``generate``.
Storage: the rows of each step (lower-triangular: T**2 / 2 values per layer and head in all)
in the storage dtype, assembled into square maps at the end.

attnkit's own :class:`~attnkit.nn.EncoderDecoder` is recorded through its attention hooks,
with its own greedy ``generate`` (``cache="dynamic"``, ``"static"``, or ``"none"``, which
re-reads the whole target at every step; each token's rows are kept from the step that first
read it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnkit import _model_facts as facts
from attnkit._checks import describe
from attnkit.inspect import encoding as enc
from attnkit.inspect import recording as rec
from attnkit.inspect.maps import AttentionMaps
from attnkit.integrations.tap import Observer, attnkit_tap, transformers_tap
from attnkit.nn.attention import MultiHeadAttention
from attnkit.nn.encoder_decoder import EncoderDecoder

__all__ = ["GenerationMaps", "capture_generation"]


@dataclass
class GenerationMaps:
    """What a model attended to while it generated (:func:`capture_generation`).

    Attributes:
        sequences: (B, T) the ids ``generate`` returned: the prompt and the generated tokens
            (for an encoder-decoder model, the decoder's tokens from its start token on).
        decoder: the decoder's self-attention over all T tokens of ``sequences``, per input
            (layers, heads, T', T'), lower-triangular, cut to the real tokens (a left-padded
            prompt's padding is removed, so T' = T - padding).
        cross: for an encoder-decoder model, (layers, heads, T', S) per input: the rows of
            the decoder's tokens over the source tokens; None for a decoder-only model.
        encoder: for an encoder-decoder model, the encoder's (layers, heads, S, S) maps; else None.
    """

    sequences: Tensor
    decoder: AttentionMaps
    cross: AttentionMaps | None = None
    encoder: AttentionMaps | None = None

    def __len__(self) -> int:
        return len(self.decoder)


class _Steps:
    """The rows of one kind of attention call (decoder self, cross or encoder), step by step."""

    def __init__(self, kind: str, dtype: torch.dtype):
        self.kind, self.dtype = kind, dtype
        self.layer_of: dict[int, int] = {}  # id(module) -> layer, in the order of the first forward's calls
        self.read: list[int] = []  # per layer: query rows kept so far
        self.rows: list[list[Tensor]] = []  # per layer: (B, H, q, N) row blocks
        self.num_heads = 0

    def recorder(self, module: nn.Module, *, refeed: bool = False) -> Observer:
        """Who records ``module``'s call. ``refeed``: the call reads the whole sequence again from
        position 0 without a cache (queries are positions 0..Lq-1, keys 0..Lk-1), and only the rows
        of tokens not read before are kept."""
        layer = self.layer_of.setdefault(id(module), len(self.layer_of))
        if layer == len(self.rows):
            self.rows.append([])
            self.read.append(0)

        def record(q: Tensor, k: Tensor, mask: Any, bias: Any, scale: float | None, softcap: float | None) -> None:
            self.num_heads = q.shape[1]
            blocks = [p.to(self.dtype) for _, p in rec.probabilities(q, k, mask, bias, scale, softcap,
                                                                   range(q.shape[1]))]
            probs = torch.cat(blocks, 1) if len(blocks) > 1 else blocks[0]  # (B, H, q, Lk)
            if refeed:
                probs, n = probs[:, :, self.read[layer]:], q.shape[2]  # the rows of the tokens not read before
            else:
                n = self.read[layer] + q.shape[2]
            if self.kind == "decoder" and not refeed:
                offset = max(0, n - k.shape[2])
                row = probs.new_zeros(*probs.shape[:3], n)
                row[..., offset:] = probs[..., : n - offset]  # key j is position offset + j; later slots are empty
                probs = row
            self.read[layer] = n
            self.rows[layer].append(probs)

        return record

    def assemble(self, real_q: Sequence[slice | Tensor], real_k: Sequence[slice | Tensor] | None) -> list[Tensor]:
        """Per input, (layers, heads, Lq, Lk) cut to the real tokens; decoder rows padded to a square."""
        layers = []
        for blocks in self.rows:
            width = blocks[-1].shape[-1]
            layers.append(torch.cat([nn.functional.pad(b, (0, width - b.shape[-1])) for b in blocks], 2))
        stacked = torch.stack(layers, 1)  # (B, layers, H, Lq, Lk)
        real_k = real_q if real_k is None else real_k
        return [stacked[b][:, :, rq][:, :, :, rk].contiguous() for b, (rq, rk) in enumerate(zip(real_q, real_k))]


def capture_generation(model: nn.Module, inputs: object, tokenizer: Any = None, *, dtype: torch.dtype = torch.float32,
                       **generate_kwargs: Any) -> GenerationMaps:
    """Run ``model.generate`` on ``inputs`` and record the attention of every token in what it returns.

    Args:
        model: a transformers model that generates (decoder-only, or encoder-decoder such
            as BART or T5) and routes attention through transformers' attention interface,
            loaded with any implementation (eager, sdpa, attnkit); or attnkit's
            :class:`~attnkit.nn.EncoderDecoder`.
        inputs: a string or list of strings (tokenized with ``tokenizer``; decoder-only
            batches want ``tokenizer.padding_side = "left"``), token ids ((L,) or (B, L)), or
            a dict of tensors for ``generate`` (``input_ids``, ``attention_mask``, ...). For
            attnkit's EncoderDecoder: source ids, or a dict with ``src_ids`` and
            ``src_padding_mask``.
        tokenizer: turns text into ids and ids into tokens; default: the model folder's.
        dtype: storage dtype: float32 (default), float16, bfloat16 or float64.
        generate_kwargs: passed to ``generate`` unchanged (``max_new_tokens``, ``do_sample``,
            ``cache_implementation="static"``, ...; ``return_dict_in_generate`` is set), or
            to :meth:`attnkit.nn.EncoderDecoder.generate` (``max_new_tokens``, ``bos``,
            ``eos``, ``cache``).

    Returns:
        :class:`GenerationMaps`; its ``sequences`` equal what a plain ``generate`` call with
        the same arguments (and seed) returns, and its maps have one row per token of
        ``sequences`` (the last token's row from one extra forward pass, see the module).

    Raises:
        TypeError: a model that is not a transformers model or an attnkit EncoderDecoder,
            or inputs of another kind.
        ValueError: a model whose attention bypasses transformers' attention interface
            (no call was seen), or one ``capture`` refuses for the same reasons.
    """
    if dtype not in rec._STORAGE:
        raise TypeError(f"dtype must be one of {', '.join(str(d) for d in rec._STORAGE)}; got {dtype!r}")
    if isinstance(model, EncoderDecoder):
        return _attnkit_generation(model, inputs, tokenizer, dtype, generate_kwargs)
    if not facts.is_hf(model):
        raise TypeError(f"model must be a transformers model with generate() or an attnkit EncoderDecoder; got "
                        f"{describe(model)}")
    if tokenizer is None:
        tokenizer = enc.find_tokenizer(model)
    if enc.is_text(inputs) and tokenizer is None:
        raise ValueError(f"inputs are text, so capture_generation needs a tokenizer; none was found for "
                         f"{facts.name(model)!r}; pass tokenizer=")
    _, kwargs, ids, valid, _ = enc.encode(model, inputs, tokenizer)
    lm = facts.pretrained(model)
    seq2seq = bool(getattr(lm.config, "is_encoder_decoder", False))
    prompt = None if seq2seq else _prompt_flags(ids, valid)
    parts = rec.encoder_decoder_parts(model) if seq2seq else {id(m): "decoder" for m in model.modules()}
    steps = {kind: _Steps(kind, dtype) for kind in ("encoder", "decoder", "cross")}
    final = [False]  # True for the forward pass that adds the last token's rows

    def route(module: nn.Module) -> Observer | None:
        part = parts.get(id(module))
        if part is None or (final[0] and part == "encoder"):
            return None
        return steps[part].recorder(module, refeed=final[0])

    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), transformers_tap(model, route):
            out = lm.generate(**kwargs, **generate_kwargs, return_dict_in_generate=True)
            if not steps["decoder"].rows:
                raise ValueError(f"{facts.name(model)!r} made no attention call through transformers' attention "
                                 "interface while generating, so its attention cannot be recorded")
            sequences = out.sequences
            batch = sequences.shape[0]
            final[0] = True
            if prompt is None:
                model(**kwargs, decoder_input_ids=sequences, use_cache=False)
            else:
                flags = torch.cat([prompt, prompt.new_ones(batch, sequences.shape[1] - prompt.shape[1])], 1)
                extra = {} if valid is None else {"attention_mask": flags,
                                                  "position_ids": (flags.long().cumsum(-1) - 1).clamp(min=0)}
                model(**{**_extended(kwargs, prompt.shape, sequences.shape[1]), "input_ids": sequences, **extra},
                      use_cache=False)
    finally:
        for m, mode in modes:
            m.training = mode
    decoder = steps["decoder"]
    length = sequences.shape[1]
    real_t = [slice(0, length)] * batch if seq2seq else enc.real_positions(flags, batch, length)
    tgt = enc.sides(sequences, real_t, length, tokenizer, None)
    result = GenerationMaps(sequences=sequences,
                            decoder=_maps(facts.name(model), decoder, decoder.assemble(real_t, None), tgt))
    if seq2seq:
        length = ids.shape[1] if ids is not None else steps["encoder"].rows[0][0].shape[-1]
        real_s = enc.real_positions(valid, batch, length) if ids is not None else [slice(0, length)] * batch
        src = enc.sides(ids, real_s, length, tokenizer, None, label="frame ")
        _add_source(result, facts.name(model), steps, real_t, real_s, tgt, src)
    return result


def _extended(kwargs: dict[str, Any], prompt: torch.Size, length: int) -> dict[str, Any]:
    """The prompt's other per-token inputs (``token_type_ids``) grown to ``length`` tokens by repeating their
    last column, as decoders extend them while generating."""
    return {name: torch.cat([v, v[:, -1:].expand(-1, length - v.shape[1])], 1)
            if isinstance(v, Tensor) and v.shape == prompt and name != "input_ids" else v
            for name, v in kwargs.items()}


def _prompt_flags(ids: Tensor | None, valid: Tensor | None) -> Tensor:
    """A decoder-only model's prompt flags (B, P), 1 for real tokens: its attention mask, else all ones."""
    if valid is not None:
        return valid
    if ids is not None:
        return torch.ones_like(ids)
    raise ValueError("capture_generation of a decoder-only model needs the prompt's token ids (input_ids) or its "
                     "attention_mask; the inputs held neither")


def _maps(name: str, part: _Steps, stored: list[Tensor], side: dict, **keys: Any) -> AttentionMaps:
    count = len(part.rows)
    return AttentionMaps(attentions=stored, model_name=name, layers=tuple(range(count)),
                         heads=tuple(range(part.num_heads)), model_layers=count, model_heads=part.num_heads,
                         **side, **keys)


def _add_source(result: GenerationMaps, name: str, steps: dict[str, _Steps], real_t: Sequence[slice | Tensor],
                real_s: Sequence[slice | Tensor],
                tgt: dict, src: dict) -> None:
    """Fill ``result.encoder`` and ``result.cross`` of an encoder-decoder model from the two sides' facts."""
    keyed = {"key_tokens": src["tokens"], "key_token_ids": src["token_ids"], "key_special": src["special"]}
    result.encoder = _maps(name, steps["encoder"], steps["encoder"].assemble(real_s, None), src)
    result.cross = _maps(name, steps["cross"], steps["cross"].assemble(real_t, real_s), tgt, **keyed)


def _attnkit_generation(model: EncoderDecoder, inputs: object, tokenizer: Any, dtype: torch.dtype,
                        generate_kwargs: dict[str, Any]) -> GenerationMaps:
    """:func:`capture_generation` of attnkit's :class:`~attnkit.nn.EncoderDecoder`: its own greedy
    ``generate`` with any ``cache`` (``"none"`` re-reads the whole target at each step: its
    rows are kept once, from the step that first read each token)."""
    src, valid, rest = enc.source_inputs(inputs)
    if rest:
        raise ValueError(f"capture_generation reads the source only (the decoder's tokens are generated); inputs "
                         f"hold {sorted(rest)}")
    refeed = generate_kwargs.get("cache", "dynamic") == "none"
    parts = rec.attnkit_parts(model)
    modules = [m for m in model.modules() if isinstance(m, MultiHeadAttention) and id(m) in parts]
    steps = {kind: _Steps(kind, dtype) for kind in ("encoder", "decoder", "cross")}
    final = [False]

    def route(module: nn.Module) -> Observer | None:
        part = parts[id(module)]
        if part == "encoder":
            return None if final[0] else steps[part].recorder(module)
        return steps[part].recorder(module, refeed=refeed or final[0])

    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.no_grad(), attnkit_tap(modules, route):
            sequences = model.generate(src, src_padding_mask=valid, **generate_kwargs)
            final[0] = True
            model.eval()
            model(src, sequences, src_padding_mask=valid)
    finally:
        for m, mode in modes:
            m.training = mode
    batch, length = sequences.shape
    real_t = [slice(0, length)] * batch
    name = facts.name(model)
    tgt = enc.sides(sequences, real_t, length, tokenizer, None)
    result = GenerationMaps(sequences=sequences,
                            decoder=_maps(name, steps["decoder"], steps["decoder"].assemble(real_t, None), tgt))
    real_s = enc.real_positions(valid, batch, src.shape[1])
    _add_source(result, name, steps, real_t, real_s, tgt, enc.sides(src, real_s, src.shape[1], tokenizer, None))
    return result
