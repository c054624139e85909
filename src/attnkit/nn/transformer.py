"""A small pre-norm transformer: blocks, a causal language model, and generation with a KV cache.

Small enough to read top to bottom, and complete enough to study: it has configurable
positions, KV heads, sliding windows and depth, and an ``attention_only`` switch (no MLP)
for the induction-head experiments of Olsson et al. 2022.

>>> import torch
>>> from attnkit.nn import TransformerConfig, TransformerLM
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> lm = TransformerLM(TransformerConfig(vocab_size=50, dim=32, depth=2, num_heads=4))
>>> out = lm.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, temperature=0)
>>> out.shape
torch.Size([1, 8])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from attnkit._checks import describe, require_choice, require_int, require_real, require_tensor
from attnkit.nn.attention import AttentionConfig, MultiHeadAttention
from attnkit.nn.cache import DynamicKVCache, KVCache, SlidingWindowKVCache, StaticKVCache
from attnkit.positions import LearnedPositionalEmbedding, RopeScaling, SinusoidalPositionalEmbedding

__all__ = ["TransformerBlock", "TransformerConfig", "TransformerLM"]

_POSITIONS = ("rope", "alibi", "sinusoidal", "learned", "none")
_NORMS = ("layer", "rms")
_CACHES = ("auto", "dynamic", "static", "none")


@dataclass(frozen=True)
class TransformerConfig:
    """The shape of a :class:`TransformerLM`.

    Args:
        vocab_size: number of token ids.
        dim: model width.
        depth: number of blocks.
        num_heads, num_kv_heads: query heads and key/value heads (GQA/MQA when fewer).
        positions: ``"rope"``, ``"alibi"`` (in attention), ``"sinusoidal"``, ``"learned"``
            (added to the embeddings) or ``"none"``.
        max_length: size of the learned position table (``positions="learned"`` only).
        window: sliding attention window in tokens (generation then uses a
            :class:`~attnkit.nn.SlidingWindowKVCache` of that size), or None.
        attention_only: no MLP sublayers (the residual stream is only attention).
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        norm: ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm), applied before each sublayer.
        bias: biases in the projections and MLP.
        dropout: dropout on attention probabilities and sublayer outputs while training.
        qk_norm, rope_base, rope_scaling: passed to :class:`~attnkit.nn.AttentionConfig`.
        tie_embeddings: the output head shares the token embedding's weight.
    """

    vocab_size: int
    dim: int = 128
    depth: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    positions: str = "rope"
    max_length: int = 2048
    window: int | None = None
    attention_only: bool = False
    mlp_ratio: float = 4.0
    norm: str = "layer"
    bias: bool = False
    dropout: float = 0.0
    qk_norm: bool = False
    rope_base: float = 10000.0
    rope_scaling: RopeScaling | None = field(default=None)
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        require_int("vocab_size", self.vocab_size, minimum=1)
        require_int("depth", self.depth, minimum=1)
        require_int("max_length", self.max_length, minimum=1)
        require_choice("positions", self.positions, _POSITIONS)
        require_choice("norm", self.norm, _NORMS)
        if require_real("mlp_ratio", self.mlp_ratio) <= 0:
            raise ValueError(f"mlp_ratio must be > 0; got {self.mlp_ratio}")
        if self.positions == "sinusoidal" and self.dim % 2:
            raise ValueError(f"positions='sinusoidal' needs an even dim; got {self.dim}")
        for name in ("attention_only", "bias", "tie_embeddings", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool; got {describe(getattr(self, name))}")
        if self.rope_scaling is not None and self.positions != "rope":
            raise ValueError(f"rope_scaling needs positions='rope'; got positions={self.positions!r}")
        self.attention()  # validates the attention fields

    def attention(self, causal: bool = True) -> AttentionConfig:
        return AttentionConfig(
            embed_dim=self.dim, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, bias=self.bias,
            dropout=self.dropout, causal=causal, window=self.window,
            positions=self.positions if self.positions in ("rope", "alibi") else "none",
            rope_base=self.rope_base, rope_scaling=self.rope_scaling, qk_norm=self.qk_norm,
        )


def _norm(kind: str, dim: int) -> nn.Module:
    return nn.LayerNorm(dim) if kind == "layer" else nn.RMSNorm(dim, eps=1e-6)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))`` unless attention-only.

    With ``attention.causal=False`` it is an encoder block.

    >>> import torch
    >>> from attnkit.nn import AttentionConfig
    >>> block = TransformerBlock(AttentionConfig(32, 4))  # an encoder block
    >>> block(torch.randn(2, 7, 32)).shape
    torch.Size([2, 7, 32])
    """

    def __init__(self, attention: AttentionConfig, *, mlp_ratio: float = 4.0, norm: str = "layer",
                 dropout: float = 0.0, attention_only: bool = False):
        super().__init__()
        require_choice("norm", norm, _NORMS)
        dim = attention.embed_dim
        self.attn_norm = _norm(norm, dim)
        self.attn = MultiHeadAttention(attention)
        self.drop = nn.Dropout(dropout)
        self.mlp_norm: nn.Module | None = None
        self.mlp: nn.Sequential | None = None
        if not attention_only:
            hidden = max(1, round(dim * mlp_ratio))
            self.mlp_norm = _norm(norm, dim)
            self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=attention.bias), nn.GELU(),
                                     nn.Linear(hidden, dim, bias=attention.bias))

    def forward(self, x: Tensor, *, padding_mask: Tensor | None = None, positions: Tensor | None = None,
                cache: KVCache | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), padding_mask=padding_mask, positions=positions, cache=cache))
        if self.mlp is not None and self.mlp_norm is not None:
            x = x + self.drop(self.mlp(self.mlp_norm(x)))
        return x


class TransformerLM(nn.Module):
    """A causal language model of :class:`TransformerBlock` s.

    ``forward(tokens, *, padding_mask=None, positions=None, caches=None)`` returns logits
    (B, L, vocab). ``tokens`` is (B, L) int64. ``padding_mask`` (B, L) bool is True for real
    tokens; padding goes on the left for generation. ``positions`` (B, L) default: counted
    over each row's real tokens, continuing from the real tokens ``caches`` have seen. ``caches`` is
    one KV cache per block (see :meth:`new_caches`).
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig; got {describe(config)}")
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.position_embed: nn.Module | None = None
        if c.positions == "learned":
            self.position_embed = LearnedPositionalEmbedding(c.max_length, c.dim)
        elif c.positions == "sinusoidal":
            self.position_embed = SinusoidalPositionalEmbedding(c.dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(c.attention(causal=True), mlp_ratio=c.mlp_ratio, norm=c.norm, dropout=c.dropout,
                             attention_only=c.attention_only)
            for _ in range(c.depth)
        )
        self.final_norm = _norm(c.norm, c.dim)
        self.head = nn.Linear(c.dim, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.head.weight = self.embed.weight

    def new_caches(self, kind: str = "auto", max_length: int | None = None) -> list[KVCache]:
        """One empty cache per block: ``"dynamic"``, ``"static"`` (needs ``max_length``), or
        ``"auto"`` (sliding-window when the config has a window, else dynamic)."""
        require_choice("kind", kind, _CACHES[:3])
        if kind == "static":
            if max_length is None:
                raise ValueError("kind='static' needs max_length, the most tokens the cache will hold")
            return [StaticKVCache(max_length) for _ in self.blocks]
        if kind == "auto" and self.config.window is not None:
            return [SlidingWindowKVCache(self.config.window) for _ in self.blocks]
        return [DynamicKVCache() for _ in self.blocks]

    def forward(self, tokens: Tensor, *, padding_mask: Tensor | None = None, positions: Tensor | None = None,
                caches: list[KVCache] | None = None) -> Tensor:
        require_tensor("tokens", tokens)
        if tokens.dim() != 2 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be (B, L) integer ids; got {describe(tokens)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(f"tokens must lie in [0, vocab_size={self.config.vocab_size}); "
                             f"got {int(tokens.min())}..{int(tokens.max())}")
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"caches must hold one cache per block ({len(self.blocks)}); got {len(caches)}")
        batch, length = tokens.shape
        if positions is None:  # count real tokens only, continuing from the cache
            seen = caches[0].real if caches is not None and caches[0].real is not None else None
            base = torch.zeros(batch, 1, dtype=torch.long, device=tokens.device) if seen is None else seen[:, None]
            if padding_mask is not None:
                positions = base + (padding_mask.long().cumsum(1) - 1).clamp(min=0)
            else:
                positions = base + torch.arange(length, device=tokens.device)
        x = self.embed(tokens)  # (B, L, dim)
        if self.position_embed is not None:
            x = x + self.position_embed(positions).to(x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, padding_mask=padding_mask, positions=positions,
                      cache=None if caches is None else caches[i])
        return self.head(self.final_norm(x))

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                 padding_mask: Tensor | None = None, cache: str = "auto", stop_token: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Continue ``prompt`` (B, L) or (L,) by up to ``max_new_tokens`` tokens.

        Args:
            temperature: 0 for greedy decoding, else logits are divided by it and sampled.
            top_k: sample only among the ``top_k`` most likely tokens.
            padding_mask: (B, L) bool, True for real tokens; padding must be on the left.
            cache: ``"auto"``, ``"dynamic"``, ``"static"`` or ``"none"`` (recompute the whole
                sequence at each step; slow, for checking).
            stop_token: a row that emits it is finished; later positions repeat it. Stops
                early when every row has finished.
            generator: the random generator for sampling.

        The model runs in eval mode (no dropout) during generation and goes back to its mode
        after. Generation runs under ``torch.no_grad``: caches are not differentiable.

        Returns:
            (B, L + n) int64, the prompt and n <= max_new_tokens new tokens ((L + n,) for a 1-D prompt).
        """
        require_tensor("prompt", prompt)
        squeeze = prompt.dim() == 1
        tokens = prompt[None] if squeeze else prompt
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"prompt must be (L,) or (B, L) token ids with L >= 1; got {describe(prompt)}")
        max_new_tokens = require_int("max_new_tokens", max_new_tokens, minimum=0)
        if require_real("temperature", temperature) < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
        if top_k is not None:
            require_int("top_k", top_k, minimum=1)
        require_choice("cache", cache, _CACHES)
        if stop_token is not None and not 0 <= require_int("stop_token", stop_token) < self.config.vocab_size:
            raise ValueError(f"stop_token must be a token id in [0, {self.config.vocab_size}); got {stop_token}")
        if max_new_tokens == 0:
            return prompt.clone()
        was_training = self.training
        self.eval()  # dropout off: the cache and the full forward must see the same network
        try:
            result = self._generate(tokens, max_new_tokens, temperature, top_k, padding_mask, cache, stop_token,
                                    generator)
        finally:
            self.train(was_training)
        return result[0] if squeeze else result

    def _generate(self, tokens: Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
                  padding_mask: Tensor | None, cache: str, stop_token: int | None,
                  generator: torch.Generator | None) -> Tensor:
        batch, length = tokens.shape
        valid = self._left_padding(padding_mask, batch, length, tokens.device)
        pads = (~valid).sum(1, keepdim=True)  # (B, 1): a token's position is its index minus the row's padding

        def positions(start: int, stop: int) -> Tensor:
            return (torch.arange(start, stop, device=tokens.device) - pads).clamp(min=0)

        mask_arg = None if bool(valid.all()) else valid
        caches = None if cache == "none" else self.new_caches(cache, length + max_new_tokens)
        logits = self(tokens, padding_mask=mask_arg, positions=positions(0, length), caches=caches)[:, -1]
        done = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
        out = [tokens]
        for step in range(max_new_tokens):
            nxt = self._sample(logits, temperature, top_k, generator)
            if stop_token is not None:
                nxt = torch.where(done, torch.full_like(nxt, stop_token), nxt)
                done |= nxt == stop_token
            out.append(nxt[:, None])
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            now = length + step + 1
            if caches is None:
                seq = torch.cat(out, dim=1)
                full_mask = None if mask_arg is None else torch.cat((valid, valid.new_ones(batch, now - length)), 1)
                logits = self(seq, padding_mask=full_mask, positions=positions(0, now))[:, -1]
            else:
                logits = self(nxt[:, None], positions=positions(now - 1, now), caches=caches)[:, -1]
        return torch.cat(out, dim=1)

    def _left_padding(self, padding_mask: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
        if padding_mask is None:
            return torch.ones(batch, length, dtype=torch.bool, device=device)
        require_tensor("padding_mask", padding_mask)
        if padding_mask.shape != (batch, length):
            raise ValueError(f"padding_mask must be (B, L) = {(batch, length)}; got {describe(padding_mask)}")
        if padding_mask.dtype.is_floating_point:
            raise TypeError("padding_mask must be bool or 0/1 integers, True = real token; "
                            f"got {describe(padding_mask)}")
        valid = padding_mask.to(device=device, dtype=torch.bool)
        if bool((valid[:, :-1] & ~valid[:, 1:]).any()):
            raise ValueError("padding_mask must pad on the left for generation (each row: False... then True...); "
                             "a real token is followed by padding")
        if not bool(valid[:, -1].all()):
            raise ValueError("padding_mask leaves a row with no real token; every prompt needs at least one")
        return valid

    @staticmethod
    def _sample(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
        logits = logits.float()
        scaled = logits / temperature if temperature > 0 else logits
        if temperature == 0 or not bool(torch.isfinite(scaled).all()):  # greedy, or a temperature too small
            return logits.argmax(-1)
        if top_k is not None and top_k < scaled.shape[-1]:
            top = scaled.topk(top_k, dim=-1)  # exactly top_k candidates, ties broken by topk
            scaled = torch.full_like(scaled, float("-inf")).scatter(-1, top.indices, top.values)
        return torch.multinomial(scaled.softmax(-1), 1, generator=generator)[:, 0]
