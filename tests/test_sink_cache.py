"""SinkKVCache, StreamingLLM's cache: which keys it keeps, against a list kept by hand, and the
decoding it gives against the caches it generalises."""

from __future__ import annotations

import pytest
import torch

from attnkit.nn import (
    AttentionConfig,
    DynamicKVCache,
    MultiHeadAttention,
    SinkKVCache,
    SlidingWindowKVCache,
    TransformerConfig,
    TransformerLM,
)


def _feed(cache, chunks: list[int]) -> list[list[float]]:
    """Feed tokens 0, 1, 2, ... (each key is its own index) in chunks; per update, the keys returned."""
    seen, out = 0, []
    for n in chunks:
        k = torch.arange(seen, seen + n, dtype=torch.float32).view(1, 1, n, 1)
        k_all, v_all = cache.update(k, k.clone())
        assert torch.equal(k_all, v_all)
        out.append(k_all.flatten().tolist())
        seen += n
    return out


@pytest.mark.parametrize("window, sinks, chunks", [(3, 2, [1] * 9), (4, 4, [3, 1, 5, 2, 1]), (2, 0, [1] * 6),
                                                   (5, 1, [7, 1, 1])])
def test_keeps_the_first_tokens_and_the_last_window(window, sinks, chunks):
    cache = SinkKVCache(window, sinks=sinks)
    held: list[float] = []  # what the cache should hold, kept by hand
    seen = 0
    for n in chunks:
        k = torch.arange(seen, seen + n, dtype=torch.float32).view(1, 1, n, 1)
        got = cache.update(k, k.clone())[0].flatten().tolist()
        new = [float(t) for t in range(seen, seen + n)]
        assert got == held + new  # the held tokens, then every new one
        everything = [float(t) for t in range(seen + n)]
        held = everything[:sinks] + everything[sinks:][-window:]
        seen += n
        assert len(cache) == len(held) and cache.position == seen
        assert cache.keys_values()[0].flatten().tolist() == held


def test_without_sinks_it_returns_what_a_sliding_window_cache_returns():
    assert _feed(SinkKVCache(4, sinks=0), [1] * 10) == _feed(SlidingWindowKVCache(4), [1] * 10)


def test_decoding_equals_a_dynamic_cache_until_it_evicts():
    torch.manual_seed(0)
    lm = TransformerLM(TransformerConfig(vocab_size=50, dim=32, depth=2, num_heads=4)).eval()
    tokens = torch.randint(0, 50, (2, 12))
    caches = {"sink": [SinkKVCache(8, sinks=4) for _ in lm.blocks], "dynamic": [DynamicKVCache() for _ in lm.blocks]}
    with torch.no_grad():
        logits = {k: torch.cat([lm(tokens[:, t:t + 1], caches=c) for t in range(12)], 1) for k, c in caches.items()}
        full = lm(tokens)
    torch.testing.assert_close(logits["sink"], full, atol=1e-5, rtol=0)  # 12 = 4 sinks + 8: nothing evicted
    torch.testing.assert_close(logits["dynamic"], full, atol=1e-5, rtol=0)


def test_misuse_is_refused():
    with pytest.raises(ValueError, match="window"):
        SinkKVCache(0)
    with pytest.raises(ValueError, match="does not track padding"):
        SinkKVCache(4).update(torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 2, 3), torch.ones(1, 2, dtype=torch.bool))
    windowed = MultiHeadAttention(AttentionConfig(embed_dim=16, num_heads=2, causal=True, window=4))
    with pytest.raises(ValueError, match="whose mask would hide the sinks"):
        windowed(torch.randn(1, 1, 16), cache=SinkKVCache(4))
    cross = MultiHeadAttention(AttentionConfig(embed_dim=16, num_heads=2))
    with pytest.raises(ValueError, match="cross-attention; use DynamicKVCache"):
        cross(torch.randn(1, 1, 16), torch.randn(1, 3, 16), cache=SinkKVCache(4))


@pytest.mark.parametrize("positions", ["rope", "alibi"])
def test_positions_after_eviction(positions):
    """After eviction, RoPE keys keep their original positions (unlike StreamingLLM, which re-indexes
    them within the cache): the newest query equals a full forward whose mask keeps only the sinks and
    the window. ALiBi counts distance within the kept keys, as the paper does: the newest query equals a
    fresh forward over the kept tokens alone."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(AttentionConfig(embed_dim=16, num_heads=2, causal=True, positions=positions)).eval()
    x, window, sinks = torch.randn(1, 15, 16), 5, 3
    cache = SinkKVCache(window, sinks=sinks)
    with torch.no_grad():
        for t in range(15):
            got = mha(x[:, t:t + 1], cache=cache)[:, -1]
            kept = sorted(set(range(min(sinks, t + 1))) | set(range(max(0, t - window), t + 1)))
            if positions == "rope":
                allowed = torch.zeros(t + 1, t + 1, dtype=torch.bool)
                allowed[-1, kept] = True
                allowed[:-1] = True  # rows other than the newest are not compared
                want = mha(x[:, :t + 1], mask=allowed)[:, -1]
            else:
                want = mha(x[:, kept])[:, -1]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=f"step {t}, keys {kept}")
