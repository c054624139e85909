"""Generation cost of a decoder with its KV cache: time to first token (the prefill forward
of the prompt), per-token latency as the context grows, tokens per second, and the cache's
bytes measured against :func:`attnkit.kv_cache_bytes`.

Greedy decoding by hand, so that every step is timed alone: an attnkit
:class:`~attnkit.nn.TransformerLM` with one :class:`~attnkit.nn.StaticKVCache` per block, sized
to the prompt plus the new tokens (so its bytes are the cache's, not a growth reserve); a
Hugging Face decoder with its own default cache (``past_key_values``).
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from attnkit._checks import require_int
from attnkit._model_facts import is_hf, text_config
from attnkit.nn.cache import kv_cache_bytes
from attnkit.nn.transformer import TransformerLM
from attnkit.profile._hooks import synchronizer
from attnkit.profile.core import check_lengths, inputs, max_length


def is_decoder(model: nn.Module) -> bool:
    """A model that generates: an attnkit TransformerLM, or a transformers model with ``generate``
    whose config is a decoder (``is_decoder`` or a causal-LM architecture)."""
    if isinstance(model, TransformerLM):
        return True
    if not is_hf(model):
        return False
    config = model.config
    return bool(getattr(config, "is_decoder", False)) or type(model).__name__.endswith("ForCausalLM")


def cache_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the model's KV cache."""
    if isinstance(model, TransformerLM):
        c = model.config.attention()
        return model.config.depth, c.kv_heads, c.dim_per_head
    config = text_config(model)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def measured_cache_bytes(cache: Any) -> int:
    """Bytes of the keys and values a cache holds: attnkit caches (a list, one per block) or a
    transformers ``Cache`` (its layers' ``keys``/``values``)."""
    if isinstance(cache, list):
        return sum(c.nbytes for c in cache)
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def generation(model: nn.Module, prompt_lengths: Sequence[int], new_tokens: int = 16, *, batch: int = 1,
               repeats: int = 3) -> dict[str, Any]:
    """Time greedy generation of ``new_tokens`` after prompts of each length (medians of ``repeats``).

    Returns ``{"new_tokens", "rows": [{prompt_length, ttft_s, per_token_s, tokens_per_s,
    step_s: [seconds of each new token], cache_bytes, cache_bytes_formula}]}``, where
    ``cache_bytes_formula`` is :func:`attnkit.kv_cache_bytes` for the final context.

    Raises ValueError for a model that does not generate, or a prompt plus ``new_tokens``
    longer than the model's maximum.
    """
    if not is_decoder(model):
        raise ValueError(f"generation needs a decoder (a TransformerLM or a transformers *ForCausalLM); "
                         f"got {type(model).__name__}")
    new_tokens = require_int("new_tokens", new_tokens, minimum=1)
    repeats = require_int("repeats", repeats, minimum=1)
    lengths = check_lengths(prompt_lengths, max_length(model) - new_tokens)
    layers, kv_heads, head_dim = cache_shape(model)
    dtype = next(model.parameters()).dtype
    sync = synchronizer(model)
    rows = []
    with torch.inference_mode():
        for length in lengths:
            prompt = inputs(model, batch, length)
            runs = [_generate(model, prompt, new_tokens, sync) for _ in range(repeats + 1)][1:]  # first: warm-up
            steps = [statistics.median(r[1][i] for r in runs) for i in range(new_tokens - 1)]
            per_token = statistics.median(steps) if steps else None
            rows.append({"prompt_length": length, "ttft_s": statistics.median(r[0] for r in runs),
                         "per_token_s": per_token, "tokens_per_s": batch / per_token if per_token else None,
                         "step_s": steps, "cache_bytes": runs[-1][2],
                         "cache_bytes_formula": kv_cache_bytes(layers, kv_heads, head_dim, length + new_tokens - 1,
                                                               dtype, batch)})
    return {"new_tokens": new_tokens, "rows": rows}


def _generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int,
              sync: Callable[[], None]) -> tuple[float, list[float], int]:
    """(seconds to the first token, seconds of each later token, cache bytes at the end). The
    cache ends holding the prompt and every new token but the last (never fed back)."""
    hf = is_hf(model)
    cache_name = "cache" if hf and "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    lm: Any = model  # a Hugging Face model or a TransformerLM: attributes nn.Module does not declare
    cache: Any = None if hf else lm.new_caches("static", prompt.shape[1] + new_tokens - 1)
    steps: list[float] = []
    ids = prompt
    for i in range(new_tokens):
        sync()
        start = time.perf_counter()
        if hf:
            out = model(input_ids=ids, use_cache=True, **{cache_name: cache})
            logits, cache = out.logits, getattr(out, "cache", None) or out.past_key_values
        else:
            logits = model(ids, caches=cache)
        ids = logits[:, -1:].argmax(-1)
        sync()
        elapsed = time.perf_counter() - start
        if i == 0:
            first = elapsed
        else:
            steps.append(elapsed)
    return first, steps, measured_cache_bytes(cache)
