"""A small pre-norm encoder-decoder (Vaswani et al. 2017) on attnkit's attention modules.

The encoder reads the source with bidirectional self-attention (padding keys masked); the
decoder reads the target with causal self-attention, then the encoder's output with
cross-attention, in every layer. Decoding keeps two caches per decoder layer: the growing
self-attention keys and values, and the cross-attention keys and values, which are
projected from the encoder output once, on the first step, and read back afterwards.

Shapes: B batch, S source tokens, T target tokens, H heads, E = ``dim``.

Module names, for hooks and inspection: ``encoder[i].attn`` (encoder self-attention),
``decoder[i].self_attn`` (causal) and ``decoder[i].cross_attn`` (queries from the target,
keys from the source), each a :class:`~attnkit.nn.MultiHeadAttention`.

>>> import torch
>>> from attnkit.nn import EncoderDecoder, EncoderDecoderConfig
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = EncoderDecoder(EncoderDecoderConfig(src_vocab_size=20, tgt_vocab_size=30, dim=32, num_heads=4))
>>> src = torch.tensor([[4, 5, 6, 7]])
>>> model(src, torch.tensor([[1, 8, 9]])).shape  # logits for each target position
torch.Size([1, 3, 30])
>>> out = model(src, torch.tensor([[1, 8, 9]]), return_attention=True)
>>> [tuple(p.shape) for p in (out.encoder_attentions[0], out.decoder_attentions[0], out.cross_attentions[0])]
[(1, 4, 4, 4), (1, 4, 3, 3), (1, 4, 3, 4)]
>>> model.generate(src, max_new_tokens=5, bos=1, eos=2).shape[1] <= 6
True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from attnkit._checks import describe, require_choice, require_int, require_real, require_tensor
from attnkit.biases import Bias
from attnkit.functional import attention_probs
from attnkit.masks import Mask
from attnkit.nn.attention import AttentionConfig, MultiHeadAttention
from attnkit.nn.cache import DynamicKVCache, KVCache, StaticKVCache
from attnkit.nn.transformer import TransformerBlock
from attnkit.positions import LearnedPositionalEmbedding

__all__ = ["DecoderBlock", "EncoderDecoder", "EncoderDecoderConfig", "Seq2SeqOutput"]

_CACHES = ("dynamic", "static", "none")


@dataclass(frozen=True)
class EncoderDecoderConfig:
    """The shape of an :class:`EncoderDecoder`.

    Args:
        src_vocab_size, tgt_vocab_size: token ids of the source and of the target.
        dim: model width (E).
        encoder_depth, decoder_depth: layers on each side.
        num_heads: heads of every attention (self and cross).
        max_length: positions of the learned position tables (one per side); longer
            sources or targets raise ValueError.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        dropout: dropout on attention probabilities and sublayer outputs while training.
        bias: biases in the projections and MLPs.
        tie_embeddings: the output head shares the target embedding's weight.
        encoder_window: None (default) lets every source token attend to every other in
            the encoder; ``w`` limits each to the ``w - 1`` tokens either side of it (the
            :class:`~attnkit.nn.AttentionConfig` ``window`` without ``causal``). 1 keeps each
            source position to its own token and position: no mixing before cross-attention.
    """

    src_vocab_size: int
    tgt_vocab_size: int
    dim: int = 64
    encoder_depth: int = 2
    decoder_depth: int = 2
    num_heads: int = 4
    max_length: int = 64
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    encoder_window: int | None = None

    def __post_init__(self) -> None:
        for name in ("src_vocab_size", "tgt_vocab_size", "encoder_depth", "decoder_depth", "max_length"):
            require_int(name, getattr(self, name), minimum=1)
        if self.encoder_window is not None:
            require_int("encoder_window", self.encoder_window, minimum=1)
        if require_real("mlp_ratio", self.mlp_ratio) <= 0:
            raise ValueError(f"mlp_ratio must be > 0; got {self.mlp_ratio}")
        for name in ("bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool; got {describe(getattr(self, name))}")
        self.attention(causal=False, window=self.encoder_window)  # validates dim, num_heads, dropout, window

    def attention(self, causal: bool, window: int | None = None) -> AttentionConfig:
        return AttentionConfig(embed_dim=self.dim, num_heads=self.num_heads, bias=self.bias, dropout=self.dropout,
                               causal=causal, window=window)


@dataclass
class Seq2SeqOutput:
    """What :meth:`EncoderDecoder.forward` returns with ``return_attention=True``.

    ``logits`` is (B, T, tgt_vocab). Each attention tuple has one (B, H, queries, keys)
    float32 tensor of probabilities per layer (float64 for a float64 model):
    ``encoder_attentions`` (B, H, S, S), ``decoder_attentions`` (B, H, T, keys), where keys
    counts the cached target tokens too, and ``cross_attentions`` (B, H, T, S). Padded keys
    get probability 0; rows of padded queries are kept (cut them away with the masks).
    """

    logits: Tensor
    encoder_attentions: tuple[Tensor, ...]
    decoder_attentions: tuple[Tensor, ...]
    cross_attentions: tuple[Tensor, ...]


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: ``x + self_attn(norm(x))``, ``x + cross_attn(norm(x), memory)``,
    then ``x + mlp(norm(x))``.

    ``forward(x, memory, *, memory_mask=None, padding_mask=None, caches=None, cross_mask=None)``:
    x (B, T, E), memory (B, S, E) the encoder output, memory_mask (B, S) True for real source
    tokens, padding_mask (B, T) True for real target tokens, caches a (self, cross) pair of
    KV caches, cross_mask an extra :mod:`attnkit.masks` mask (or bool tensor) on the
    cross-attention only, broadcastable to (B, H, T, S).
    """

    def __init__(self, config: EncoderDecoderConfig):
        super().__init__()
        dim = config.dim
        self.self_norm, self.cross_norm, self.mlp_norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = MultiHeadAttention(config.attention(causal=True))
        self.cross_attn = MultiHeadAttention(config.attention(causal=False))
        hidden = max(1, round(dim * config.mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=config.bias), nn.GELU(),
                                 nn.Linear(hidden, dim, bias=config.bias))
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, memory: Tensor, *, memory_mask: Tensor | None = None,
                padding_mask: Tensor | None = None, caches: tuple[KVCache, KVCache] | None = None,
                cross_mask: Mask | Tensor | None = None) -> Tensor:
        self_cache, cross_cache = (None, None) if caches is None else caches
        x = x + self.drop(self.self_attn(self.self_norm(x), padding_mask=padding_mask, cache=self_cache))
        x = x + self.drop(self.cross_attn(self.cross_norm(x), memory, mask=cross_mask, padding_mask=memory_mask,
                                          cache=cross_cache))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class EncoderDecoder(nn.Module):
    """An encoder-decoder transformer for sequence-to-sequence tasks (translation).

    ``forward(src_ids, tgt_ids, *, src_padding_mask=None, tgt_padding_mask=None,
    return_attention=False)`` runs teacher-forced: ``tgt_ids`` (B, T) is the decoder's
    input (BOS, then the target shifted right); the logits at position t predict target
    token t + 1. ``src_ids`` is (B, S). Padding goes on the right of either side, flagged
    False in the (B, S) / (B, T) padding masks; a real token's outputs do not depend on
    how much padding follows it. Returns logits (B, T, tgt_vocab), or a
    :class:`Seq2SeqOutput` with every layer's attention probabilities when
    ``return_attention`` is True.

    :meth:`encode` and :meth:`decode` are the two halves, for step-by-step decoding with
    :meth:`new_caches`; :meth:`generate` decodes greedily.
    """

    def __init__(self, config: EncoderDecoderConfig):
        super().__init__()
        if not isinstance(config, EncoderDecoderConfig):
            raise TypeError(f"config must be an EncoderDecoderConfig; got {describe(config)}")
        self.config = c = config
        self.src_embed = nn.Embedding(c.src_vocab_size, c.dim)
        self.tgt_embed = nn.Embedding(c.tgt_vocab_size, c.dim)
        for emb in (self.src_embed, self.tgt_embed):
            nn.init.normal_(emb.weight, std=0.02)
        self.src_positions = LearnedPositionalEmbedding(c.max_length, c.dim)
        self.tgt_positions = LearnedPositionalEmbedding(c.max_length, c.dim)
        self.encoder = nn.ModuleList(TransformerBlock(c.attention(causal=False, window=c.encoder_window),
                                                      mlp_ratio=c.mlp_ratio,
                                                      dropout=c.dropout) for _ in range(c.encoder_depth))
        self.decoder = nn.ModuleList(DecoderBlock(c) for _ in range(c.decoder_depth))
        self.encoder_norm, self.decoder_norm = nn.LayerNorm(c.dim), nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.tgt_vocab_size, bias=False)
        if c.tie_embeddings:
            self.head.weight = self.tgt_embed.weight

    # -- checks ---------------------------------------------------------------------------

    def _ids(self, name: str, given: object, vocab: int) -> Tensor:
        ids = require_tensor(name, given)
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.shape[1] == 0:
            raise ValueError(f"{name} must be (B, L) integer token ids with L >= 1; got {describe(ids)}")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"{name} must lie in [0, {vocab}); got {int(ids.min())}..{int(ids.max())}")
        return ids

    def _padding(self, name: str, given: object, ids: Tensor) -> Tensor | None:
        if given is None:
            return None
        mask = require_tensor(name, given)
        if mask.shape != ids.shape:
            raise ValueError(f"{name} must be (B, L) = {tuple(ids.shape)} like the ids; got {describe(mask)}")
        if mask.dtype.is_floating_point:
            raise TypeError(f"{name} must be bool or 0/1 integers, True = real token; got {describe(mask)}")
        mask = mask.to(device=ids.device, dtype=torch.bool)
        if not bool(mask[:, 0].all()):
            raise ValueError(f"{name} leaves a row with no real token first; pad on the right, each row needs "
                             "at least one token")
        return mask

    def _positions(self, name: str, start: int, length: int, device: torch.device) -> Tensor:
        if start + length > self.config.max_length:
            raise ValueError(f"{name} reach position {start + length - 1}, past max_length={self.config.max_length}; "
                             "make max_length larger or the sequences shorter")
        return torch.arange(start, start + length, device=device)

    # -- the two halves ---------------------------------------------------------------------

    def encode(self, src_ids: Tensor, src_padding_mask: Tensor | None = None) -> Tensor:
        """The encoder output (B, S, E) for ``src_ids`` (B, S); ``src_padding_mask`` (B, S)
        True for real tokens, padding on the right."""
        src_ids = self._ids("src_ids", src_ids, self.config.src_vocab_size)
        valid = self._padding("src_padding_mask", src_padding_mask, src_ids)
        x = self.src_embed(src_ids) + self.src_positions(
            self._positions("src_ids", 0, src_ids.shape[1], src_ids.device))  # (B, S, E)
        for block in self.encoder:
            x = block(x, padding_mask=valid)
        return self.encoder_norm(x)

    def decode(self, tgt_ids: Tensor, memory: Tensor, *, src_padding_mask: Tensor | None = None,
               tgt_padding_mask: Tensor | None = None,
               caches: list[tuple[KVCache, KVCache]] | None = None,
               cross_mask: Mask | Tensor | None = None) -> Tensor:
        """Logits (B, T, tgt_vocab) for ``tgt_ids`` (B, T) reading ``memory`` (B, S, E) from
        :meth:`encode`.

        ``cross_mask``, an :mod:`attnkit.masks` mask or bool tensor broadcastable to (B, H,
        T, S), True = may attend, limits every layer's cross-attention further and leaves
        ``memory`` as it is: ``masks.key_padding(valid=keep)`` hides the source tokens where
        ``keep`` (B, S) is False from the decoder only (an intervention; the encoder still
        read them).

        With ``caches`` (from :meth:`new_caches`), ``tgt_ids`` continues the tokens already
        decoded: positions and causal masking count them, and the cross-attention keys
        and values come from the cache after the first call. Pass the same ``memory`` and
        ``src_padding_mask`` on every step.
        """
        c = self.config
        tgt_ids = self._ids("tgt_ids", tgt_ids, c.tgt_vocab_size)
        require_tensor("memory", memory)
        if memory.dim() != 3 or memory.shape[0] != tgt_ids.shape[0] or memory.shape[2] != c.dim:
            raise ValueError(f"memory must be (B={tgt_ids.shape[0]}, S, dim={c.dim}), the encoder output; "
                             f"got {describe(memory)}")
        src_valid = None
        if src_padding_mask is not None:  # checked against the source's (B, S), which memory has
            src_valid = self._padding("src_padding_mask", src_padding_mask, memory[..., 0])
        tgt_valid = self._padding("tgt_padding_mask", tgt_padding_mask, tgt_ids)
        if caches is not None and (not isinstance(caches, (list, tuple)) or len(caches) != len(self.decoder)):
            raise ValueError(f"caches must be a list of {len(self.decoder)} (self, cross) cache pairs from "
                             f"new_caches(); got {describe(caches)}")
        start = 0 if caches is None else caches[0][0].position
        x = self.tgt_embed(tgt_ids) + self.tgt_positions(
            self._positions("tgt_ids", start, tgt_ids.shape[1], tgt_ids.device))  # (B, T, E)
        for i, block in enumerate(self.decoder):
            x = block(x, memory, memory_mask=src_valid, padding_mask=tgt_valid,
                      caches=None if caches is None else caches[i], cross_mask=cross_mask)
        return self.head(self.decoder_norm(x))

    def new_caches(self, kind: str = "dynamic", max_length: int | None = None) -> list[tuple[KVCache, KVCache]]:
        """One (self-attention, cross-attention) pair of empty caches per decoder layer.

        ``kind`` is ``"dynamic"`` or ``"static"`` (needs ``max_length``, the most target
        tokens) for self-attention; the cross-attention cache is always a
        :class:`~attnkit.nn.DynamicKVCache`, filled once from the encoder output.
        """
        require_choice("kind", kind, _CACHES[:2])
        if kind == "static":
            if max_length is None:
                raise ValueError("kind='static' needs max_length, the most target tokens the cache will hold")
            max_length = require_int("max_length", max_length, minimum=1)
        return [(StaticKVCache(max_length) if max_length is not None and kind == "static" else DynamicKVCache(),
                 DynamicKVCache()) for _ in self.decoder]

    # -- forward, with attention on request ---------------------------------------------------

    @contextlib.contextmanager
    def _recording(self) -> Iterator[dict[str, list[Tensor]]]:
        """Collect the probabilities of every attention call, by kind, for the duration."""
        record: dict[str, list[Tensor]] = {"encoder": [], "decoder": [], "cross": []}
        modules: list[tuple[MultiHeadAttention, str]] = (
            [(cast(TransformerBlock, b).attn, "encoder") for b in self.encoder]
            + [(cast(DecoderBlock, b).self_attn, "decoder") for b in self.decoder]
            + [(cast(DecoderBlock, b).cross_attn, "cross") for b in self.decoder])
        handles = []
        for module, kind in modules:
            def hook(mod: MultiHeadAttention, q: Tensor, k: Tensor, v: Tensor, mask: Mask | None,
                     bias: Bias | None, kind: str = kind) -> None:
                record[kind].append(attention_probs(q, k, v, mask=mask, bias=bias).detach())
            handles.append(module.register_attention_hook(hook))
        try:
            yield record
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, src_ids: Tensor, tgt_ids: Tensor, *, src_padding_mask: Tensor | None = None,
                tgt_padding_mask: Tensor | None = None, return_attention: bool = False) -> Tensor | Seq2SeqOutput:
        if not isinstance(return_attention, bool):
            raise TypeError(f"return_attention must be a bool; got {describe(return_attention)}")
        if isinstance(src_ids, Tensor) and isinstance(tgt_ids, Tensor) and src_ids.dim() == tgt_ids.dim() == 2 \
                and src_ids.shape[0] != tgt_ids.shape[0]:
            raise ValueError(f"src_ids and tgt_ids must have the same batch size; got {describe(src_ids)} and "
                             f"{describe(tgt_ids)}")
        if not return_attention:
            memory = self.encode(src_ids, src_padding_mask)
            return self.decode(tgt_ids, memory, src_padding_mask=src_padding_mask, tgt_padding_mask=tgt_padding_mask)
        with self._recording() as record:
            memory = self.encode(src_ids, src_padding_mask)
            logits = self.decode(tgt_ids, memory, src_padding_mask=src_padding_mask,
                                 tgt_padding_mask=tgt_padding_mask)
        return Seq2SeqOutput(logits, tuple(record["encoder"]), tuple(record["decoder"]), tuple(record["cross"]))

    # -- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, src_ids: Tensor, max_new_tokens: int, *, bos: int, eos: int | None = None,
                 src_padding_mask: Tensor | None = None, cache: str = "dynamic") -> Tensor:
        """Greedy decoding: the target (B, 1 + n) int64, ``bos`` first, then n <= max_new_tokens tokens.

        The source is encoded once. Each step feeds the newest token through the decoder:
        with ``cache="dynamic"`` or ``"static"`` only that token is projected (the cross
        keys and values come from the cache after the first step); ``cache="none"``
        recomputes the whole target at each step (slow, for checking: same tokens). A row
        that emits ``eos`` is finished and repeats ``eos``; generation stops when every row
        has. Runs in eval mode (no dropout) and restores the mode after.
        """
        c = self.config
        src_ids = self._ids("src_ids", src_ids, c.src_vocab_size)
        max_new_tokens = require_int("max_new_tokens", max_new_tokens, minimum=0)
        for name, value in (("bos", bos), ("eos", eos)):
            if value is not None and not 0 <= require_int(name, value) < c.tgt_vocab_size:
                raise ValueError(f"{name} must be a target token id in [0, {c.tgt_vocab_size}); got {value}")
        require_choice("cache", cache, _CACHES)
        if 1 + max_new_tokens > c.max_length:
            raise ValueError(f"max_new_tokens={max_new_tokens} needs {1 + max_new_tokens} target positions, "
                             f"more than max_length={c.max_length}")
        was_training = self.training
        self.eval()
        try:
            memory = self.encode(src_ids, src_padding_mask)
            return self._greedy(memory, src_padding_mask, max_new_tokens, bos, eos, cache)
        finally:
            self.train(was_training)

    def _greedy(self, memory: Tensor, src_padding_mask: Tensor | None, max_new_tokens: int, bos: int,
                eos: int | None, cache: str) -> Tensor:
        batch = memory.shape[0]
        out = torch.full((batch, 1), bos, dtype=torch.long, device=memory.device)
        caches = None if cache == "none" else self.new_caches(cache, 1 + max_new_tokens)
        done = torch.zeros(batch, dtype=torch.bool, device=memory.device)
        for _ in range(max_new_tokens):
            step_input = out if caches is None else out[:, -1:]
            logits = self.decode(step_input, memory, src_padding_mask=src_padding_mask, caches=caches)[:, -1]
            nxt = logits.argmax(-1)  # (B,)
            if eos is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                done |= nxt == eos
            out = torch.cat((out, nxt[:, None]), dim=1)
            if bool(done.all()):
                break
        return out
