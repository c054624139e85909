"""Comparing two models' attention (attnkit.inspect.compare): Jensen–Shannon per head, key-set mass shift."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnkit.inspect.compare import Comparison, compare, jensen_shannon
from attnkit.inspect.maps import AttentionMaps
from attnkit.inspect.roles import token_set_mass

from conftest import MapsStandIn

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])




def random_attn(*lead, length=6, seed=0, causal=True, sharpness=2.0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(*lead, length, length, generator=g, dtype=torch.float64) * sharpness
    if causal:
        scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), -math.inf)
    return scores.softmax(-1)


def ref_js(p, q):
    """JS divergence of two rows in bits, from the definition, with plain floats."""
    sp, sq = sum(p), sum(q)
    p, q = [x / sp for x in p], [x / sq for x in q]
    m = [(x + y) / 2 for x, y in zip(p, q)]
    kl_pm = sum(x * math.log2(x / z) for x, z in zip(p, m) if x > 0)
    kl_qm = sum(y * math.log2(y / z) for y, z in zip(q, m) if y > 0)
    return (kl_pm + kl_qm) / 2


def ref_head_js(a, b):
    """(layers, heads): mean over query rows of ref_js, rows with no mass in either left out."""
    out = torch.empty(a.shape[:2], dtype=torch.float64)
    for layer in range(a.shape[0]):
        for head in range(a.shape[1]):
            rows = [ref_js(p, q) for p, q in zip(a[layer, head].tolist(), b[layer, head].tolist())
                    if sum(p) > 0 and sum(q) > 0]
            out[layer, head] = sum(rows) / len(rows) if rows else math.nan
    return out


def test_js_identical_is_zero_and_disjoint_is_one():
    p = random_attn(2, 3, seed=1)
    assert (jensen_shannon(p, p) == 0).all()
    one_hot = torch.eye(5)
    assert torch.equal(jensen_shannon(one_hot, one_hot.roll(1, dims=0)), torch.ones(5, dtype=torch.float64))
    assert torch.equal(jensen_shannon(torch.tensor([0.5, 0.5, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.3, 0.7])),
                       torch.tensor(1.0, dtype=torch.float64))


def test_js_matches_the_definition():
    a, b = random_attn(2, 3, seed=2), random_attn(2, 3, seed=3)
    expected = torch.tensor([[[ref_js(p, q) for p, q in zip(a[i, j].tolist(), b[i, j].tolist())]
                              for j in range(3)] for i in range(2)], dtype=torch.float64)
    assert torch.allclose(jensen_shannon(a, b), expected, rtol=1e-12, atol=1e-15)


def test_js_closed_form_uniform_against_one_hot():
    # m = (2/3, 1/6, 1/6): KL(e0 || m) = log2(3/2), KL(u || m) = 1/3, JS = (log2(3/2) + 1/3) / 2.
    js = jensen_shannon(torch.tensor([1.0, 0.0, 0.0]), torch.full((3,), 1 / 3))
    assert js.item() == pytest.approx((math.log2(1.5) + 1 / 3) / 2, rel=1e-12)


def test_js_zeros_in_one_row_only_give_no_nan():
    p = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.8, 0.0]])
    q = torch.tensor([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    js = jensen_shannon(p, q)
    assert torch.isfinite(js).all()
    assert torch.allclose(js, torch.tensor([ref_js(*rows) for rows in zip(p.tolist(), q.tolist())],
                                           dtype=torch.float64), rtol=1e-12)


def test_js_of_a_row_without_mass_is_nan():
    p = torch.tensor([[0.0, 0.0], [0.5, 0.5]])
    q = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    js = jensen_shannon(p, q)
    assert js[0].isnan() and js[1] == 0


@SETTINGS
@given(length=st.integers(1, 10), seed=st.integers(0, 2**16), sharpness=st.floats(0.1, 30.0),
       causal=st.booleans(), dtype=st.sampled_from([torch.float64, torch.float32, torch.float16]))
def test_js_symmetric_and_within_unit_interval(length, seed, sharpness, causal, dtype):
    a = random_attn(3, length=length, seed=seed, sharpness=sharpness, causal=causal).to(dtype)
    b = random_attn(3, length=length, seed=seed + 1, sharpness=sharpness, causal=causal).to(dtype)
    ab, ba = jensen_shannon(a, b), jensen_shannon(b, a)
    assert torch.equal(ab, ba)
    assert ((ab >= 0) & (ab <= 1)).all()
    assert (jensen_shannon(a, a) == 0).all()


def test_compare_matches_reference():
    a, b = random_attn(3, 2, seed=4), random_attn(3, 2, seed=5)
    result = compare(a, b)
    assert isinstance(result, Comparison)
    assert torch.allclose(result.js, ref_head_js(a, b), rtol=1e-12, atol=1e-15)
    assert result.layers == (0, 1, 2) and result.heads == (0, 1) and result.n_rows == 6
    assert result.mass_a is None and result.mass_b is None and result.mass_shift is None


def test_compare_leaves_out_rows_without_mass():
    a, b = random_attn(1, 2, seed=6), random_attn(1, 2, seed=7)
    b[0, 1, 2] = 0.0  # row 2 of head 1 fully masked in b only
    result = compare(a, b)
    assert torch.isfinite(result.js).all()
    assert torch.allclose(result.js, ref_head_js(a, b), rtol=1e-12)


def test_most_changed_orders_heads_with_model_indices():
    a = random_attn(2, 3, seed=8)
    b = a.clone()
    b[1, 0] = random_attn(length=6, seed=9)  # changed a little
    b[0, 2] = torch.eye(6).roll(1, dims=1)  # changed completely where a's row is not all on that key
    ids = [[1, 2, 3, 4, 5, 6]]
    maps_a = MapsStandIn([a], [list("abcdef")], ids, layers=(3, 8), heads=(0, 2, 5), model_name="base")
    maps_b = MapsStandIn([b], [list("abcdef")], ids, layers=(3, 8), heads=(0, 2, 5), model_name="tuned")
    result = compare(maps_a, maps_b)
    ranked = result.most_changed(n=6)
    assert [(layer, head) for layer, head, _ in ranked[:2]] == [(3, 5), (8, 0)]
    assert [js for _, _, js in ranked] == sorted(result.js.flatten().tolist(), reverse=True)
    assert ranked[-1][2] == 0.0
    assert result.names == ("base", "tuned")
    assert str(result).startswith("Comparison(base vs tuned: 2 layers x 3 heads, 6 query rows)")


def test_key_set_mass_shift():
    a, b = random_attn(2, 2, seed=10), random_attn(2, 2, seed=11)
    keys = [0, 2]
    result = compare(a, b, key_set=keys)
    assert torch.equal(result.mass_a, token_set_mass(a, keys))
    assert torch.equal(result.mass_b, token_set_mass(b, keys))
    expected_shift = torch.empty(2, 2, dtype=torch.float64)
    for i in range(2):
        for j in range(2):
            on_keys_a = sum(row[k] for row in a[i, j].tolist() for k in keys)
            on_keys_b = sum(row[k] for row in b[i, j].tolist() for k in keys)
            expected_shift[i, j] = (on_keys_b - on_keys_a) / 6  # 6 rows, each summing to 1
    assert torch.allclose(result.mass_shift, expected_shift, rtol=1e-12, atol=1e-15)
    mask = torch.tensor([True, False, True, False, False, False])
    assert torch.equal(compare(a, b, key_set=mask).mass_shift, result.mass_shift)


def test_str_is_a_per_layer_table():
    a = random_attn(2, 2, seed=12)
    b = a.clone()
    b[1, 1] = torch.eye(6)
    lines = str(compare(a, b, key_set=[0])).splitlines()
    assert lines[0] == "Comparison(a vs b: 2 layers x 2 heads, 6 query rows)"
    assert lines[2].split() == ["layer", "mean", "js", "max", "js", "(head)", "mass", "a", "mass", "b", "shift"]
    assert lines[3].split()[:4] == ["0", "0.000", "0.000", "(0)"]
    assert lines[4].split()[3] == "(1)"
    assert lines[5].startswith("most changed: L1.H1")
    assert "mass a" not in str(compare(a, b))


def test_compare_errors():
    a = random_attn(2, 2, seed=13)
    with pytest.raises(ValueError, match="must have the same shape"):
        compare(a, random_attn(2, 3, seed=13))
    with pytest.raises(ValueError, match="must be 4-D"):
        compare(a[0], a[0])
    with pytest.raises(TypeError, match=r"maps_b must be a torch\.Tensor"):
        compare(a, a.numpy())

    def maps(tokens, ids=None, layers=(0, 1), heads=(0, 1)):
        return MapsStandIn([a], [tokens], None if ids is None else [ids], layers, heads)

    tokens = ["the", "cat", "sat", "on", "the", "mat"]
    with pytest.raises(ValueError, match=r"same tokens for input 0; they first differ at position 1: 'cat' vs 'dog'"):
        compare(maps(tokens), maps(["the", "dog", "sat", "on", "the", "mat"]))
    with pytest.raises(ValueError, match=r"same token ids.*position 5: 6 vs 7"):
        compare(maps(tokens, [1, 2, 3, 4, 5, 6]), maps(tokens, torch.tensor([1, 2, 3, 4, 5, 7])))
    with pytest.raises(ValueError, match=r"same layers; got \(0, 1\) and \(0, 2\)"):
        compare(maps(tokens), maps(tokens, layers=(0, 2)))
    with pytest.raises(ValueError, match=r"same heads"):
        compare(maps(tokens), maps(tokens, heads=(1, 2)))
    with pytest.raises(ValueError, match=r"key_set indices must be in \[0, 6\)"):
        compare(a, a, key_set=[6])
    with pytest.raises(ValueError, match="n must be >= 1"):
        compare(a, a).most_changed(0)
    with pytest.raises(ValueError, match="p and q must have the same shape"):
        jensen_shannon(torch.ones(3), torch.ones(4))
    with pytest.raises(TypeError, match=r"q must be a torch\.Tensor"):
        jensen_shannon(torch.ones(3), [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="at least 1-D"):
        jensen_shannon(torch.tensor(1.0), torch.tensor(1.0))
    # a tensor against maps: only the shape can be checked, and it is enough
    assert torch.equal(compare(a, maps(tokens)).js, torch.zeros(2, 2, dtype=torch.float64))


def test_with_real_attention_maps():
    a, b = random_attn(2, 2, seed=14).float(), random_attn(2, 2, seed=15).float()

    def maps(attn, tokens, name):
        return AttentionMaps(attentions=[attn], tokens=[tokens], token_ids=None, model_name=name,
                             layers=(0, 1), heads=(0, 1))

    tokens = ["the", "cat", "sat", "on", "the", "mat"]
    result = compare(maps(a, tokens, "base"), maps(b, tokens, "tuned"))
    assert torch.allclose(result.js, ref_head_js(a.double(), b.double()), rtol=1e-12, atol=1e-15)
    assert result.names == ("base", "tuned")
    with pytest.raises(ValueError, match="same tokens"):
        compare(maps(a, tokens, "base"), maps(b, [*tokens[:-1], "rug"], "tuned"))
    with pytest.raises(ValueError, match=r"same heads; got \(0, 1\) and \(1,\)"):
        compare(maps(a, tokens, "base"), maps(b, tokens, "tuned").select(heads=[1]))


def test_real_maps_with_model_indices_and_a_key_set():
    a = random_attn(2, 3, seed=31).float()
    b = a.clone()
    b[1, 2] = torch.eye(6).roll(1, dims=1)  # model layer 8, head 5: all on the previous key
    tokens = ["the", "cat", "sat", "on", "the", "mat"]
    maps_a = AttentionMaps([a], [tokens], [[1, 2, 3, 4, 1, 5]], "base", layers=(3, 8), heads=(0, 2, 5))
    maps_b = AttentionMaps([b], [tokens], [[1, 2, 3, 4, 1, 5]], "tuned", layers=(3, 8), heads=(0, 2, 5))
    result = compare(maps_a, maps_b, key_set=[0, 4])
    assert torch.allclose(result.js, ref_head_js(a.double(), b.double()), rtol=1e-6, atol=1e-7)
    assert (result.layers, result.heads) == ((3, 8), (0, 2, 5))
    assert result.most_changed(n=1)[0][:2] == (8, 5)
    # mass on keys 0 and 4, from a loop: rows sum to 1, so the share is the mean over the 6 rows
    for maps, attn in ((result.mass_a, a), (result.mass_b, b)):
        want = [[sum(attn[la, h, i, j].item() for i in range(6) for j in (0, 4)) / 6 for h in range(3)]
                for la in range(2)]
        assert torch.allclose(maps.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(result.mass_shift, result.mass_b - result.mass_a)
    # selected by model index on both sides, the comparison is that part of the whole
    part = compare(maps_a.select(layers=8, heads=[5, 0]), maps_b.select(layers=8, heads=[5, 0]))
    assert torch.allclose(part.js, result.js[[1]][:, [2, 0]])
    assert (part.layers, part.heads) == ((8,), (5, 0))
