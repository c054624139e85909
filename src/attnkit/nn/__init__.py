"""Building blocks for models: attention modules, KV caches, a small transformer.

They are thin: they project, apply positions, update the cache and call
:func:`attnkit.attention`.
"""

from attnkit.nn.attention import AttentionConfig, MultiHeadAttention
from attnkit.nn.cache import (
    KV_PRESETS,
    DynamicKVCache,
    KVCache,
    KVShape,
    SlidingWindowKVCache,
    StaticKVCache,
    kv_cache_bytes,
)
from attnkit.nn.transformer import TransformerBlock, TransformerConfig, TransformerLM

__all__ = [
    "KV_PRESETS",
    "AttentionConfig",
    "DynamicKVCache",
    "KVCache",
    "KVShape",
    "MultiHeadAttention",
    "SlidingWindowKVCache",
    "StaticKVCache",
    "TransformerBlock",
    "TransformerConfig",
    "TransformerLM",
    "kv_cache_bytes",
]
