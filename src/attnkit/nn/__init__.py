"""Building blocks for models: attention modules, KV caches, a small transformer, an encoder-decoder.

They are thin: they project, apply positions, update the cache and call
:func:`attnkit.attention`.
"""

from attnkit.nn.attention import AttentionConfig, MultiHeadAttention
from attnkit.nn.cache import (
    KV_PRESETS,
    DynamicKVCache,
    KVCache,
    KVShape,
    SinkKVCache,
    SlidingWindowKVCache,
    StaticKVCache,
    kv_cache_bytes,
)
from attnkit.nn.encoder_decoder import DecoderBlock, EncoderDecoder, EncoderDecoderConfig, Seq2SeqOutput
from attnkit.nn.transformer import TransformerBlock, TransformerConfig, TransformerLM

__all__ = [
    "KV_PRESETS",
    "AttentionConfig",
    "DecoderBlock",
    "DynamicKVCache",
    "EncoderDecoder",
    "EncoderDecoderConfig",
    "KVCache",
    "KVShape",
    "MultiHeadAttention",
    "Seq2SeqOutput",
    "SinkKVCache",
    "SlidingWindowKVCache",
    "StaticKVCache",
    "TransformerBlock",
    "TransformerConfig",
    "TransformerLM",
    "kv_cache_bytes",
]
