"""attnkit.nn: MultiHeadAttention against torch.nn.MultiheadAttention, KV-cache decoding
against the full forward, and the caches' memory against kv_cache_bytes."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import masks
from attnkit.nn import (
    KV_PRESETS,
    AttentionConfig,
    DynamicKVCache,
    MultiHeadAttention,
    SlidingWindowKVCache,
    StaticKVCache,
    kv_cache_bytes,
)


def _torch_mha_copy(mha: MultiHeadAttention) -> torch.nn.MultiheadAttention:
    c = mha.config
    ref = torch.nn.MultiheadAttention(c.embed_dim, c.num_heads, bias=c.bias, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([mha.q_proj.weight, mha.k_proj.weight, mha.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([mha.q_proj.bias, mha.k_proj.bias, mha.v_proj.bias]))
        ref.out_proj.weight.copy_(mha.o_proj.weight)
        ref.out_proj.bias.copy_(mha.o_proj.bias)
    return ref.double()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_mha_equals_torch_multihead_attention(causal, padded):
    torch.manual_seed(0)
    mha = MultiHeadAttention(AttentionConfig(48, 6, causal=causal)).double()
    ref = _torch_mha_copy(mha)
    x = torch.randn(3, 13, 48, dtype=torch.float64)
    valid = torch.ones(3, 13, dtype=torch.bool)
    if padded:
        valid[1, 9:] = False  # right padding
        valid[2, 4:] = False
    ours = mha(x, padding_mask=valid if padded else None)
    attn_mask = torch.ones(13, 13, dtype=torch.bool).triu(1) if causal else None  # True = blocked
    theirs, _ = ref(x, x, x, key_padding_mask=~valid if padded else None, attn_mask=attn_mask, need_weights=False)
    assert torch.allclose(ours, theirs, atol=1e-10)


def test_mha_cross_attention_equals_torch():
    torch.manual_seed(1)
    mha = MultiHeadAttention(AttentionConfig(32, 4)).double()
    ref = _torch_mha_copy(mha)
    x, ctx = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 17, 32, dtype=torch.float64)
    valid = torch.ones(2, 17, dtype=torch.bool)
    valid[0, 11:] = False
    theirs, _ = ref(x, ctx, ctx, key_padding_mask=~valid, need_weights=False)
    assert torch.allclose(mha(x, ctx, padding_mask=valid), theirs, atol=1e-10)


def _decode(mha, x, cache, *, valid=None, chunks=None):
    """Run ``x`` through ``mha`` in pieces (a prompt, then token by token) with ``cache``."""
    length = x.shape[1]
    sizes = chunks or [1] * length
    outs, start = [], 0
    for n in sizes:
        piece = slice(start, start + n)
        outs.append(mha(x[:, piece], padding_mask=None if valid is None else valid[:, piece], cache=cache))
        start += n
    assert start == length
    return torch.cat(outs, dim=1)


_DECODE_CASES = {
    "mha-rope": dict(num_kv_heads=None, positions="rope"),
    "gqa-rope-interleaved": dict(num_kv_heads=2, positions="rope", rope_layout="interleaved"),
    "mqa-alibi": dict(num_kv_heads=1, positions="alibi"),
    "gqa-alibi-qknorm": dict(num_kv_heads=2, positions="alibi", qk_norm=True),
    "gqa-none": dict(num_kv_heads=4, positions="none"),
}


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("case", list(_DECODE_CASES))
def test_token_by_token_decoding_equals_full_forward(case, cache_kind):
    torch.manual_seed(2)
    mha = MultiHeadAttention(AttentionConfig(64, 8, causal=True, **_DECODE_CASES[case]))
    x = torch.randn(2, 23, 64)
    full = mha(x)
    cache = DynamicKVCache() if cache_kind == "dynamic" else StaticKVCache(23)
    stepped = _decode(mha, x, cache, chunks=[7] + [1] * 16)
    assert len(cache) == 23 and cache.position == 23
    assert (stepped - full).abs().max() <= 1e-5


@pytest.mark.parametrize("positions", ["rope", "alibi"])
def test_sliding_window_decoding_equals_full_forward(positions):
    torch.manual_seed(3)
    window = 5
    mha = MultiHeadAttention(AttentionConfig(32, 4, num_kv_heads=2, causal=True, window=window, positions=positions))
    x = torch.randn(2, 40, 32)
    full = mha(x)
    cache = SlidingWindowKVCache(window)
    # a prompt longer than the window, then single tokens, then a chunk of 3
    stepped = _decode(mha, x, cache, chunks=[9] + [1] * 28 + [3])
    assert (stepped - full).abs().max() <= 1e-5
    assert len(cache) == window and cache.position == 40


def test_sliding_window_cache_memory_stays_flat():
    cache = SlidingWindowKVCache(16)
    sizes = []
    for _ in range(100):
        cache.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
        sizes.append(cache.nbytes)
    assert set(sizes) == {kv_cache_bytes(1, 2, 8, 16, torch.float32)}


@pytest.mark.parametrize("cache_kind", ["dynamic", "static", "sliding"])
def test_padded_batch_decoding_equals_each_prompt_alone(cache_kind):
    torch.manual_seed(4)
    window = 4 if cache_kind == "sliding" else None
    mha = MultiHeadAttention(AttentionConfig(32, 4, num_kv_heads=2, causal=True, positions="rope", window=window))
    lengths = [6, 3, 9]
    prompts = [torch.randn(1, n, 32) for n in lengths]
    new = torch.randn(3, 5, 32)  # 5 further tokens per row
    longest = max(lengths)
    x = torch.zeros(3, longest, 32)
    valid = torch.zeros(3, longest, dtype=torch.bool)
    for b, p in enumerate(prompts):
        x[b, longest - p.shape[1]:] = p[0]  # left padding
        valid[b, longest - p.shape[1]:] = True
    cache = {"dynamic": DynamicKVCache(), "static": StaticKVCache(longest + 5),
             "sliding": SlidingWindowKVCache(4)}[cache_kind]
    batched = [mha(x, padding_mask=valid, cache=cache)]
    batched += [mha(new[:, t:t + 1], cache=cache) for t in range(5)]
    batched = torch.cat(batched, dim=1)
    assert cache.real.tolist() == [n + 5 for n in lengths]
    for b, p in enumerate(prompts):
        alone = mha(torch.cat([p, new[b:b + 1]], dim=1))[0]
        got = torch.cat([batched[b, longest - p.shape[1]:longest], batched[b, longest:]])
        assert (got - alone).abs().max() <= 1e-5


def test_cross_attention_with_cached_context():
    torch.manual_seed(5)
    mha = MultiHeadAttention(AttentionConfig(32, 4, num_kv_heads=2, context_dim=24, qk_norm=True))
    ctx = torch.randn(2, 11, 24)
    ctx_valid = torch.ones(2, 11, dtype=torch.bool)
    ctx_valid[1, 7:] = False
    x = torch.randn(2, 6, 32)
    full = mha(x, ctx, padding_mask=ctx_valid)
    unpadded = mha(x[1:], ctx[1:, :7])
    assert (full[1:] - unpadded).abs().max() <= 1e-5
    cache = DynamicKVCache()
    calls = []
    handle = mha.k_proj.register_forward_hook(lambda *a: calls.append(1))
    stepped = torch.cat([mha(x[:, t:t + 1], ctx, padding_mask=ctx_valid, cache=cache) for t in range(6)], dim=1)
    handle.remove()
    assert len(calls) == 1  # context keys computed once, then read from the cache
    assert (stepped - full).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="holds 11 context tokens"):
        mha(x[:, :1], ctx[:, :5], cache=cache)
    with pytest.raises(ValueError, match="padding_mask differs"):
        mha(x[:, :1], ctx, cache=cache)
    with pytest.raises(ValueError, match="this cache holds cross-attention keys"):
        MultiHeadAttention(AttentionConfig(32, 4, num_kv_heads=2))(x[:, :1], cache=cache)
    with pytest.raises(ValueError, match="too few tokens for a cross-attention context"):
        mha(x[:, :1], ctx, cache=SlidingWindowKVCache(16))


def test_decoding_step_uses_sdpa_and_static_cache_writes_in_place():
    mha = MultiHeadAttention(AttentionConfig(32, 4, causal=True, positions="rope"))
    cache = StaticKVCache(10)
    mha(torch.randn(1, 4, 32), cache=cache)
    buffer = cache._k.data_ptr()
    q = torch.randn(1, 4, 1, 8)
    k, v = cache.keys_values()
    # one new token under a bottom-right causal mask sees every key: the mask is dropped
    assert mha._mask(None, None, False, 1, 5) is None
    assert attnkit.functional.core.select_backend(
        attnkit.functional._call.make_call(q, k, v, mask=None, bias=None, scale=None, softcap=None,
                                           dropout_p=0.0, return_lse=False), "auto").name == "sdpa"
    mha(torch.randn(1, 1, 32), cache=cache)
    assert cache._k.data_ptr() == buffer
    with pytest.raises(ValueError, match=r"StaticKVCache\(max_length=10\) holds 5 tokens"):
        mha(torch.randn(1, 6, 32), cache=cache)


def test_cache_memory_equals_kv_cache_bytes():
    layers, heads, dim, tokens = 3, 2, 16, 37
    for cache in (StaticKVCache(tokens), DynamicKVCache()):
        caches = [type(cache)(tokens) if isinstance(cache, StaticKVCache) else DynamicKVCache() for _ in range(layers)]
        for c in caches:
            c.update(torch.randn(1, heads, tokens, dim, dtype=torch.float16),
                     torch.randn(1, heads, tokens, dim, dtype=torch.float16))
        assert sum(c.nbytes for c in caches) == kv_cache_bytes(layers, heads, dim, tokens, torch.float16)


def test_kv_cache_bytes_published_figures():
    gib = 2**30
    assert kv_cache_bytes(32, 32, 128, 4096, torch.float16) == 2 * gib  # Llama-2-7B
    assert KV_PRESETS["llama-2-7b"].bytes(4096) == 2 * gib
    assert KV_PRESETS["llama-2-70b"].bytes(4096) == 1.25 * gib  # 8 KV heads (GQA)
    assert KV_PRESETS["mistral-7b"].bytes(4096) == 0.5 * gib
    assert KV_PRESETS["mistral-7b"].bytes(100_000) == 0.5 * gib  # capped by its 4096 window
    assert kv_cache_bytes(32, 32, 128, 4096, torch.float32, batch=2) == 8 * gib
    with pytest.raises(TypeError, match=r"dtype must be a torch\.dtype"):
        kv_cache_bytes(1, 1, 1, 1, "fp16")
    with pytest.raises(ValueError, match="tokens must be >= 0"):
        kv_cache_bytes(1, 1, 1, -1)


def test_dynamic_cache_returns_views_and_grows_geometrically():
    cache = DynamicKVCache()
    capacities = set()
    for _ in range(100):
        k_all, _ = cache.update(torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4))
        capacities.add(cache._k.shape[2])
        assert k_all.data_ptr() == cache._k.data_ptr()
    assert len(capacities) <= 4  # 16, 32, 64, 128: appends are amortised O(1)


def test_config_and_forward_errors():
    with pytest.raises(ValueError, match=r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)"):
        AttentionConfig(48, 6, num_kv_heads=4)
    with pytest.raises(ValueError, match=r"embed_dim \(50\) must be divisible by num_heads"):
        AttentionConfig(50, 4)
    with pytest.raises(ValueError, match="positions must be one of"):
        AttentionConfig(32, 4, positions="sinusoid")
    with pytest.raises(ValueError, match="backend must be one of"):
        AttentionConfig(32, 4, backend="fast")
    with pytest.raises(TypeError, match="causal must be a bool"):
        AttentionConfig(32, 4, causal="no")
    with pytest.raises(ValueError, match="rope_scaling needs positions='rope'"):
        AttentionConfig(32, 4, positions="alibi", rope_scaling=attnkit.positions.RopeScaling("linear", 2.0))
    with pytest.raises(ValueError, match="needs an even head_dim"):
        AttentionConfig(32, 4, head_dim=7, positions="rope")
    mha = MultiHeadAttention(AttentionConfig(32, 4))
    with pytest.raises(ValueError, match=r"x must be \(B, L, embed_dim=32\)"):
        mha(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"padding_mask must be \(B, L\) = \(2, 5\)"):
        mha(torch.randn(2, 5, 32), padding_mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="cache must be an attnkit KV cache"):
        mha(torch.randn(2, 5, 32), cache={})
    with pytest.raises(ValueError, match=r"SlidingWindowKVCache\(4\) keeps too few tokens for this layer's window="):
        mha(torch.randn(2, 5, 32), cache=SlidingWindowKVCache(4))
    with pytest.raises(ValueError, match="does not match the cache"):
        cache = DynamicKVCache()
        cache.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
        cache.update(torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4))


def test_dropout_only_in_training():
    torch.manual_seed(7)
    mha = MultiHeadAttention(AttentionConfig(32, 4, dropout=0.5))
    x = torch.randn(2, 9, 32)
    mha.eval()
    plain = mha(x)
    assert torch.equal(plain, mha(x))
    mha.train()
    a, b = mha(x), mha(x)
    assert not torch.allclose(a, plain, atol=1e-3) and not torch.allclose(a, b, atol=1e-3)


def test_extra_mask_and_gradients_flow():
    torch.manual_seed(6)
    mha = MultiHeadAttention(AttentionConfig(32, 4, num_kv_heads=1, causal=True))
    x = torch.randn(1, 9, 32, requires_grad=True)
    out = mha(x, mask=masks.sliding_window(left=2))
    ref = MultiHeadAttention(AttentionConfig(32, 4, num_kv_heads=1, causal=True, window=3))
    ref.load_state_dict(mha.state_dict())
    assert torch.allclose(out, ref(x), atol=1e-6)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in mha.parameters())
