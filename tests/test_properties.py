"""Property-based tests of attention's invariants (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnkit
from attnkit import masks

from conftest import max_err, qkv

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

lengths = st.integers(1, 40)
mask_kinds = st.sampled_from(["none", "causal", "causal_br", "window", "document", "padding"])


def build_mask(kind, q_len, k_len, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "causal":
        return masks.causal()
    if kind == "causal_br":
        return masks.causal("bottom_right")
    if kind == "window":
        return masks.sliding_window(int(torch.randint(0, 6, (1,), generator=g)),
                                    int(torch.randint(0, 3, (1,), generator=g)))
    if kind == "document":
        return masks.document(torch.randint(0, 3, (q_len,), generator=g).sort().values,
                              torch.randint(0, 3, (k_len,), generator=g).sort().values)
    if kind == "padding":
        return masks.key_padding(torch.randint(0, k_len + 1, (2,), generator=g))
    return None


@SETTINGS
@given(lq=lengths, lk=lengths, kind=mask_kinds, seed=st.integers(0, 2**16))
def test_probabilities_sum_to_one_or_zero(lq, lk, kind, seed):
    q, k, v = qkv(2, 2, 1, lq, lk, 8, seed=seed)
    mask = build_mask(kind, lq, lk, seed)
    p = attnkit.attention_probs(q, k, v, mask=mask)
    rows = p.sum(-1)
    allowed = torch.ones(2, 2, lq, lk, dtype=torch.bool) if mask is None else \
        mask.to_dense(lq, lk, batch=2).expand(2, 2, lq, lk)
    has_key = allowed.any(-1)
    assert torch.allclose(rows[has_key], torch.ones_like(rows[has_key]))
    assert torch.equal(rows[~has_key], torch.zeros_like(rows[~has_key]))
    assert (p[~allowed] == 0).all()


@SETTINGS
@given(length=st.integers(2, 300), cut=st.integers(1, 299), seed=st.integers(0, 2**16),
       backend=st.sampled_from(["tiled", "reference", "sdpa"]))
def test_causal_output_ignores_future_tokens(length, cut, seed, backend):
    cut = min(cut, length - 1)
    q, k, v = qkv(1, 2, 2, length, length, 8, seed=seed)
    out = attnkit.attention(q, k, v, mask=masks.causal(), backend=backend)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, cut:] += 5.0
    v2[:, :, cut:] -= 3.0
    out2 = attnkit.attention(q, k2, v2, mask=masks.causal(), backend=backend)
    assert max_err(out[:, :, :cut], out2[:, :, :cut]) < 1e-12


@SETTINGS
@given(lq=st.integers(1, 200), lk=st.integers(1, 200), seed=st.integers(0, 2**16),
       backend=st.sampled_from(["tiled", "reference", "sdpa"]))
def test_permutation_equivariance_without_mask(lq, lk, seed, backend):
    q, k, v = qkv(1, 4, 2, lq, lk, 8, seed=seed)
    g = torch.Generator().manual_seed(seed)
    pq, pk = torch.randperm(lq, generator=g), torch.randperm(lk, generator=g)
    out = attnkit.attention(q, k, v, backend=backend)
    permuted = attnkit.attention(q[:, :, pq], k[:, :, pk], v[:, :, pk], backend=backend)
    assert max_err(permuted, out[:, :, pq]) < 1e-12


@SETTINGS
@given(lq=lengths, lk=st.integers(2, 300), split=st.floats(0.05, 0.95), kind=mask_kinds,
       seed=st.integers(0, 2**16))
def test_merging_two_key_halves_by_lse_equals_the_whole(lq, lk, split, kind, seed):
    q, k, v = qkv(2, 2, 1, lq, lk, 8, seed=seed)
    cut = max(1, min(lk - 1, int(split * lk)))
    mask = build_mask(kind, lq, lk, seed)
    whole, lse = attnkit.attention(q, k, v, mask=mask, backend="tiled", return_lse=True)
    dense = None if mask is None else mask.to_dense(lq, lk, batch=2)
    parts = []
    for sl in (slice(0, cut), slice(cut, lk)):
        m = None if dense is None else dense[..., sl]
        parts.append(attnkit.attention(q, k[:, :, sl], v[:, :, sl], mask=m, backend="tiled", return_lse=True))
    (o1, l1), (o2, l2) = parts
    merged_lse = torch.logaddexp(l1, l2)
    safe = torch.where(torch.isinf(merged_lse), 0.0, merged_lse)
    merged = o1 * torch.exp(l1 - safe)[..., None] + o2 * torch.exp(l2 - safe)[..., None]
    assert max_err(merged, whole) < 1e-12
    assert max_err(merged_lse, lse) < 1e-12


@SETTINGS
@given(kv_heads=st.sampled_from([1, 2, 4]), positions=st.sampled_from(["none", "rope", "alibi"]),
       window=st.sampled_from([None, 1, 3, 8]), length=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_kv_cache_decoding_equals_full_forward(kv_heads, positions, window, length, seed):
    from attnkit.nn import AttentionConfig, DynamicKVCache, MultiHeadAttention, SlidingWindowKVCache

    torch.manual_seed(seed)
    mha = MultiHeadAttention(AttentionConfig(32, 4, num_kv_heads=kv_heads, causal=True, window=window,
                                             positions=positions))
    x = torch.randn(1, length, 32)
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(set(torch.randint(1, length + 1, (3,), generator=g).tolist()) | {length})
    cache = DynamicKVCache() if window is None else SlidingWindowKVCache(window)
    pieces, start = [], 0
    for cut in cuts:  # random chunks: a prompt, then pieces of any size
        pieces.append(mha(x[:, start:cut], cache=cache))
        start = cut
    assert (torch.cat(pieces, dim=1) - mha(x)).abs().max() <= 1e-5
