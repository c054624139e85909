"""Multi-head attention as a module: project, apply positions, update the cache, attend.

Legend for the shape comments: B batch, L new tokens, S keys (cache + new, or context),
H query heads, G = H / Hkv query heads per key/value head, D head dim, E embed dim.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from attnkit import biases, masks
from attnkit._checks import describe, require_choice, require_int, require_real, require_tensor
from attnkit.functional import attention, backends
from attnkit.nn.cache import KVCache, SinkKVCache, SlidingWindowKVCache
from attnkit.positions import RopeScaling, RotaryEmbedding

__all__ = ["AttentionConfig", "MultiHeadAttention"]

_POSITIONS = ("none", "rope", "alibi")


@dataclass(frozen=True)
class AttentionConfig:
    """What a :class:`MultiHeadAttention` computes.

    Args:
        embed_dim: width of the input and output (E).
        num_heads: query heads (H).
        num_kv_heads: key/value heads: H for MHA (default), fewer for GQA, 1 for MQA.
        head_dim: features per head; default ``embed_dim // num_heads``.
        bias: whether the projections have a bias.
        dropout: dropout on the attention probabilities while training.
        causal: each token sees only itself and earlier tokens (self-attention only).
        window: each query sees the ``window`` most recent keys, itself included
            (Mistral's ``sliding_window``); without ``causal``, also ``window - 1``
            keys ahead. None = unlimited.
        positions: ``"none"``, ``"rope"`` or ``"alibi"``, for self-attention. Absolute
            embeddings are added to the tokens by the model, not here.
        rope_base, rope_layout, rope_scaling: the :class:`~attnkit.positions.RotaryEmbedding`.
        qk_norm: RMS-normalise each head's q and k before positions (OLMo 2, Qwen 3).
        context_dim: width of the context for cross-attention; default ``embed_dim``.
        backend: the :func:`attnkit.attention` backend.
    """

    embed_dim: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    bias: bool = True
    dropout: float = 0.0
    causal: bool = False
    window: int | None = None
    positions: str = "none"
    rope_base: float = 10000.0
    rope_layout: str = "half"
    rope_scaling: RopeScaling | None = field(default=None)
    qk_norm: bool = False
    context_dim: int | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        require_int("embed_dim", self.embed_dim, minimum=1)
        require_int("num_heads", self.num_heads, minimum=1)
        kv = self.kv_heads
        require_int("num_kv_heads", kv, minimum=1)
        if self.num_heads % kv:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({kv})")
        if self.head_dim is None and self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads}), "
                             "or give head_dim")
        require_int("head_dim", self.dim_per_head, minimum=1)
        if not 0.0 <= require_real("dropout", self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}")
        if self.window is not None:
            require_int("window", self.window, minimum=1)
        require_choice("positions", self.positions, _POSITIONS)
        for name in ("bias", "causal", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool; got {describe(getattr(self, name))}")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, RopeScaling):
                raise TypeError(f"rope_scaling must be a RopeScaling or None; got {describe(self.rope_scaling)}")
            if self.positions != "rope":
                raise ValueError(f"rope_scaling needs positions='rope'; got positions={self.positions!r}")
        require_choice("backend", self.backend, ("auto", *backends()))
        if self.positions == "rope" and self.dim_per_head % 2:
            raise ValueError(f"positions='rope' needs an even head_dim; got {self.dim_per_head}")
        if self.context_dim is not None:
            require_int("context_dim", self.context_dim, minimum=1)

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def dim_per_head(self) -> int:
        return self.embed_dim // self.num_heads if self.head_dim is None else self.head_dim


class MultiHeadAttention(nn.Module):
    """Multi-head attention (MHA, GQA, MQA; self or cross) on :func:`attnkit.attention`.

    ``forward(x, context=None, *, mask=None, padding_mask=None, positions=None, cache=None)``

    Args:
        x: (B, L, E) the tokens that ask (queries).
        context: (B, S, context_dim) for cross-attention: keys and values come from it,
            with no causal mask and no positions. With a ``cache``, they are computed
            on the first call and read back from the cache after.
        mask: an extra :mod:`attnkit.masks` mask or bool tensor broadcastable to
            (B, H, L, S), True = may attend; combined with the configured ones.
        padding_mask: (B, L) bool (or (B, S) for cross-attention), True for real tokens,
            False for padding (transformers' ``attention_mask``). With a cache, the flags
            are kept, so later steps still ignore padded keys.
        positions: (L,) or (B, L) absolute positions for RoPE; default continues from the
            cache (``cache.position + arange(L)``).
        cache: a :mod:`attnkit.nn.cache` KV cache, updated in place.

    Returns:
        (B, L, E). Query rows that see no key (e.g. padding under a causal mask) are 0
        before the output projection.

    >>> import torch
    >>> from attnkit.nn import AttentionConfig, MultiHeadAttention
    >>> mha = MultiHeadAttention(AttentionConfig(64, 8, num_kv_heads=2, causal=True, positions="rope"))
    >>> mha(torch.randn(2, 10, 64)).shape
    torch.Size([2, 10, 64])
    """

    def __init__(self, config: AttentionConfig):
        super().__init__()
        if not isinstance(config, AttentionConfig):
            raise TypeError(f"config must be an AttentionConfig; got {describe(config)}")
        self.config = c = config
        d, ctx = c.dim_per_head, c.context_dim or c.embed_dim
        self.q_proj = nn.Linear(c.embed_dim, c.num_heads * d, bias=c.bias)
        self.k_proj = nn.Linear(ctx, c.kv_heads * d, bias=c.bias)
        self.v_proj = nn.Linear(ctx, c.kv_heads * d, bias=c.bias)
        self.o_proj = nn.Linear(c.num_heads * d, c.embed_dim, bias=c.bias)
        self.q_norm = nn.RMSNorm(d, eps=1e-6) if c.qk_norm else None
        self.k_norm = nn.RMSNorm(d, eps=1e-6) if c.qk_norm else None
        self.rotary = (RotaryEmbedding(d, c.rope_base, c.rope_layout, c.rope_scaling)
                       if c.positions == "rope" else None)
        self._attention_hooks: OrderedDict[int, Callable[..., None]] = OrderedDict()  # weakref-able, for the handle

    def register_attention_hook(self, hook: Callable[..., None]) -> RemovableHandle:
        """Call ``hook(module, q, k, v, mask, bias)`` in every forward, just before attention runs.

        ``q`` is (B, H, L, D) and ``k``, ``v`` (B, Hkv, S, D), after positions and the cache;
        ``mask`` and ``bias`` are what :func:`attnkit.attention` receives (None, an attnkit
        mask or bias). The scale is the default, 1/sqrt(D). :func:`attnkit.inspect.capture`
        records attention maps this way. Returns a handle whose ``remove()`` unregisters it.
        """
        handle = RemovableHandle(self._attention_hooks)
        self._attention_hooks[handle.id] = hook
        return handle

    def _heads(self, t: Tensor, heads: int) -> Tensor:
        batch, length, _ = t.shape
        return t.view(batch, length, heads, self.config.dim_per_head).transpose(1, 2)  # (B, heads, L, D)

    def forward(self, x: Tensor, context: Tensor | None = None, *, mask: masks.Mask | Tensor | None = None,
                padding_mask: Tensor | None = None, positions: Tensor | None = None,
                cache: KVCache | None = None) -> Tensor:
        c = self.config
        require_tensor("x", x)
        if x.dim() != 3 or x.shape[-1] != c.embed_dim:
            raise ValueError(f"x must be (B, L, embed_dim={c.embed_dim}); got {describe(x)}")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be an attnkit KV cache (DynamicKVCache, ...); got {describe(cache)}")
        batch, length, _ = x.shape
        cross = context is not None
        if cache is not None:
            role = "cross" if cross else "self"
            if cache.role not in (None, role):
                raise ValueError(f"this cache holds {cache.role}-attention keys; a {role}-attention call needs its "
                                 "own cache" + (" (pass context on every cross-attention step)" if not cross else ""))
            if isinstance(cache, SlidingWindowKVCache) and (cross or c.window is None or c.window > cache.window):
                raise ValueError(f"a SlidingWindowKVCache({cache.window}) keeps too few tokens for "
                                 + ("a cross-attention context; use DynamicKVCache" if cross else
                                    f"this layer's window={c.window}; use a cache window >= the attention window, "
                                    "or DynamicKVCache"))
            if isinstance(cache, SinkKVCache) and (cross or c.window is not None):
                raise ValueError("a SinkKVCache is for causal self-attention without a sliding window (this layer has "
                                 + ("cross-attention; use DynamicKVCache" if cross else
                                    f"window={c.window}, whose mask would hide the sinks; build the model with "
                                    "window=None, or use SlidingWindowKVCache") + ")")
            cache.role = role
        valid = self._padding("padding_mask", padding_mask, batch,
                              context.shape[1] if context is not None and context.dim() == 3 else length)

        q = self._heads(self.q_proj(x), c.num_heads)  # (B, H, L, D)
        if context is not None:
            k, v, key_valid = self._cross_kv(context, valid, cache)
        else:
            k = self._heads(self.k_proj(x), c.kv_heads)  # (B, Hkv, L, D)
            v = self._heads(self.v_proj(x), c.kv_heads)
        if self.q_norm is not None:
            q = self.q_norm(q)
            if not cross:
                k = self.k_norm(k)  # type: ignore[misc]
        if not cross:
            start = 0 if cache is None else cache.position
            if self.rotary is not None:
                if positions is None:
                    positions = torch.arange(start, start + length, device=x.device)
                q, k = self.rotary(q, positions), self.rotary(k, positions)
            if cache is not None:
                k, v = cache.update(k, v, valid)  # (B, Hkv, S, D), S = cached + L
                key_valid = cache.valid
            else:
                key_valid = valid

        attn_mask, bias = self._mask(mask, key_valid, cross, length, k.shape[2]), self._bias(cross)
        for hook in self._attention_hooks.values():
            hook(self, q, k, v, attn_mask, bias)
        out = attention(q, k, v, mask=attn_mask, bias=bias, dropout_p=c.dropout if self.training else 0.0,
                        backend=c.backend)  # (B, H, L, D)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, c.num_heads * c.dim_per_head))

    def _padding(self, name: str, padding_mask: Tensor | None, batch: int, length: int) -> Tensor | None:
        if padding_mask is None:
            return None
        require_tensor(name, padding_mask)
        if padding_mask.shape != (batch, length):
            raise ValueError(f"{name} must be (B, L) = {(batch, length)} (the tokens, or the context for "
                             f"cross-attention); got {describe(padding_mask)}")
        if padding_mask.dtype != torch.bool:
            if padding_mask.dtype.is_floating_point:
                raise TypeError(f"{name} must be bool or 0/1 integers, True = real token; got {describe(padding_mask)}")
            padding_mask = padding_mask != 0
        return None if bool(padding_mask.all()) else padding_mask

    def _cross_kv(self, context: Tensor, valid: Tensor | None,
                  cache: KVCache | None) -> tuple[Tensor, Tensor, Tensor | None]:
        c = self.config
        require_tensor("context", context)
        width = c.context_dim or c.embed_dim
        if context.dim() != 3 or context.shape[-1] != width:
            raise ValueError(f"context must be (B, S, context_dim={width}); got {describe(context)}")
        if cache is not None and cache.length > 0:
            if cache.length != context.shape[1]:
                raise ValueError(f"the cache holds {cache.length} context tokens but context has "
                                 f"{context.shape[1]}; reset the cache for a new context")
            held = cache.valid
            if (valid is None) != (held is None) or (valid is not None and held is not None
                                                      and not torch.equal(valid, held)):
                raise ValueError("padding_mask differs from the one the cached context was computed with; "
                                 "pass the same padding_mask on every step, or reset the cache")
            k, v = cache.keys_values()
            return k, v, held
        k = self._heads(self.k_proj(context), c.kv_heads)  # (B, Hkv, S, D)
        v = self._heads(self.v_proj(context), c.kv_heads)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if cache is not None:
            k, v = cache.update(k, v, valid)
        return k, v, valid

    def _mask(self, extra: masks.Mask | Tensor | None, key_valid: Tensor | None, cross: bool,
              q_len: int, k_len: int) -> masks.Mask | None:
        c = self.config
        parts: list[masks.Mask] = []
        if not cross:
            if c.causal:
                parts.append(masks.causal(align="bottom_right"))
            if c.window is not None:
                parts.append(masks.sliding_window(left=c.window - 1, right=0 if c.causal else c.window - 1,
                                                  align="bottom_right"))
        # a part that allows everything at these lengths (e.g. causal for one new token) is
        # dropped, so the call can go to the fastest backend
        parts = [m for m in parts if not m.is_full(q_len, k_len)]
        if key_valid is not None:
            parts.append(masks.key_padding(valid=key_valid))
        if extra is not None:
            parts.append(extra if isinstance(extra, masks.Mask) else masks.from_tensor(extra))
        if not parts:
            return None
        out = parts[0]
        for m in parts[1:]:
            out = out & m
        return out

    def _bias(self, cross: bool) -> biases.Bias | None:
        if cross or self.config.positions != "alibi":
            return None
        return biases.alibi(self.config.num_heads, align="bottom_right")

    def extra_repr(self) -> str:
        c = self.config
        kind = "MHA" if c.kv_heads == c.num_heads else ("MQA" if c.kv_heads == 1 else "GQA")
        return (f"{kind}, heads={c.num_heads}, kv_heads={c.kv_heads}, head_dim={c.dim_per_head}, "
                f"causal={c.causal}, window={c.window}, positions={c.positions!r}")
