"""Head-role scores, token sets, top keys, rollout and head_roles (attnkit.inspect.roles).

Every score is checked against a plain-Python loop over the definition, in float64, and
against closed forms on uniform causal attention and perfect patterns.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnkit.inspect.maps import AttentionMaps
from attnkit.inspect.roles import (
    ROLES,
    STOP_WORDS,
    attention_entropy,
    column_heads,
    column_mean,
    duplicate_token_score,
    first_token_score,
    head_roles,
    induction_score,
    mean_attention_distance,
    pattern_score,
    previous_token_score,
    rollout,
    specificity,
    token_set,
    token_set_mass,
    top_attended,
)

from conftest import MapsStandIn

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])




def random_attn(*lead, length=7, k_len=None, causal=True, seed=0, dtype=torch.float64):
    """Softmax of random scores, (*lead, length, k_len), optionally causal."""
    g = torch.Generator().manual_seed(seed)
    k_len = length if k_len is None else k_len
    scores = torch.randn(*lead, length, k_len, generator=g, dtype=torch.float64) * 2
    if causal:
        scores = scores.masked_fill(~torch.ones(length, k_len, dtype=torch.bool).tril(), -math.inf)
    return scores.softmax(-1).to(dtype)


def uniform_causal(length, *lead):
    a = torch.ones(*lead, length, length, dtype=torch.float64).tril()
    return a / a.sum(-1, keepdim=True)


# Reference implementations: loops over one (Lq, Lk) map, straight from the definitions.


def ref_share(a, eligible):
    """sum of A over eligible keys / sum of A, over rows that have an eligible key."""
    a = np.asarray(a, dtype=np.float64)
    num = den = 0.0
    for i in range(a.shape[0]):
        keys = [j for j in range(a.shape[1]) if eligible(i, j)]
        if keys:
            num += sum(a[i, j] for j in keys)
            den += sum(a[i, j] for j in range(a.shape[1]))
    return num / den if den else math.nan


def ref_distance(a):
    a = np.asarray(a, dtype=np.float64)
    num = sum(a[i, j] * abs(i - j) for i in range(a.shape[0]) for j in range(a.shape[1]))
    return num / a.sum()


def ref_entropy(a, normalized=False, allowed=None):
    a = np.asarray(a, dtype=np.float64)
    values = []
    for i in range(a.shape[0]):
        total = a[i].sum()
        if total == 0:
            continue
        h = -sum((w / total) * math.log(w / total) for w in a[i] if w > 0)
        if normalized:
            n = int(np.asarray(allowed[i]).sum())
            if n < 2:
                continue
            h /= math.log(n)
        values.append(h)
    return sum(values) / len(values) if values else math.nan


def per_head(fn, attn, *args):
    """Apply a reference to every (layer, head) map of a (layers, heads, Lq, Lk) tensor."""
    return torch.tensor([[fn(attn[layer, head].numpy(), *args) for head in range(attn.shape[1])]
                         for layer in range(attn.shape[0])], dtype=torch.float64)


def close(a, b):
    return torch.allclose(a, b, rtol=1e-12, atol=1e-12, equal_nan=True)


# Analytic cases


def test_perfect_previous_token_head_scores_one():
    a = torch.zeros(6, 6)
    a[0, 0] = 1.0
    a[torch.arange(1, 6), torch.arange(0, 5)] = 1.0
    assert previous_token_score(a).item() == 1.0
    assert mean_attention_distance(a).item() == pytest.approx(5 / 6)


@pytest.mark.parametrize("length", [2, 5, 13])
def test_uniform_causal_closed_forms(length):
    a = uniform_causal(length)
    harmonic = sum(1 / n for n in range(1, length + 1))
    assert previous_token_score(a).item() == pytest.approx((harmonic - 1) / (length - 1), rel=1e-12)
    assert first_token_score(a).item() == pytest.approx(harmonic / length, rel=1e-12)
    assert mean_attention_distance(a).item() == pytest.approx((length - 1) / 4, rel=1e-12)
    assert attention_entropy(a).item() == pytest.approx(math.lgamma(length + 1) / length, rel=1e-12)
    assert attention_entropy(a, normalized=True).item() == pytest.approx(1.0, rel=1e-12)


def test_one_hot_rows_have_zero_normalized_entropy_under_the_heads_shared_mask():
    attn = uniform_causal(5, 1, 2).clone()
    attn[0, 1] = torch.eye(5)
    entropy = attention_entropy(attn, normalized=True)
    assert entropy[0, 0].item() == pytest.approx(1.0, rel=1e-12)
    assert entropy[0, 1].item() == 0.0


def test_single_token_and_no_repeats_give_nan():
    one = torch.ones(1, 1)
    assert previous_token_score(one).isnan()
    assert attention_entropy(one, normalized=True).isnan()
    a = uniform_causal(4)
    assert duplicate_token_score(a, [1, 2, 3, 4]).isnan()
    assert induction_score(a, [1, 2, 3, 4]).isnan()


def test_uniform_bidirectional_first_token_and_entropy():
    a = torch.full((2, 3, 6, 6), 1 / 6)
    assert torch.allclose(first_token_score(a), torch.full((2, 3), 1 / 6, dtype=torch.float64))
    assert torch.allclose(attention_entropy(a), torch.full((2, 3), math.log(6), dtype=torch.float64))


# Against the loops, on random maps


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_scores_match_loops_on_random_maps(dtype):
    attn = random_attn(2, 3, length=9, seed=1, dtype=dtype)
    ids = [5, 1, 2, 1, 2, 5, 3, 2, 1]
    a64 = attn.double()
    assert close(previous_token_score(attn), per_head(lambda a: ref_share(a, lambda i, j: j == i - 1), a64))
    assert close(first_token_score(attn), per_head(lambda a: ref_share(a, lambda i, j: j == 0), a64))
    assert close(duplicate_token_score(attn, ids),
                 per_head(lambda a: ref_share(a, lambda i, j: j < i and ids[j] == ids[i]), a64))
    assert close(induction_score(attn, ids),
                 per_head(lambda a: ref_share(a, lambda i, j: j >= 1 and j - 1 < i and ids[j - 1] == ids[i]), a64))
    assert close(mean_attention_distance(attn), per_head(ref_distance, a64))
    assert close(attention_entropy(attn), per_head(ref_entropy, a64))
    visible = torch.ones(9, 9, dtype=torch.bool).tril()
    assert close(attention_entropy(attn, normalized=True), per_head(ref_entropy, a64, True, visible))


def test_fully_masked_rows_drop_out():
    attn = random_attn(1, 2, length=6, seed=2)
    attn[..., 3, :] = 0.0  # a row with no allowed key
    kept = [0, 1, 2, 4, 5]
    expected = per_head(lambda a: ref_share(a, lambda i, j: j == i - 1), attn)
    assert close(previous_token_score(attn), expected)
    assert close(attention_entropy(attn), per_head(ref_entropy, attn[..., kept, :]))
    assert not previous_token_score(attn).isnan().any()


def test_leading_dims_are_kept():
    attn = random_attn(2, 3, 4, length=5, seed=3)
    assert previous_token_score(attn).shape == (2, 3, 4)
    assert previous_token_score(attn[0, 0, 0]).shape == ()
    assert close(previous_token_score(attn)[1, 2], previous_token_score(attn[1, 2]))


# Induction, duplicate tokens


def repeated_sequence(n, seed=0):
    """[BOS, r1..rN, r1..rN] with distinct random r's, as ids."""
    g = torch.Generator().manual_seed(seed)
    r = (torch.randperm(500, generator=g)[:n] + 1).tolist()
    return [0, *r, *r]


@pytest.mark.parametrize("n", [1, 4, 9])
def test_induction_on_a_repeated_sequence_is_the_stripe(n):
    ids = repeated_sequence(n, seed=n)
    attn = random_attn(2, 2, length=2 * n + 1, seed=n)
    stripe = torch.stack([attn[..., i, i - n + 1] for i in range(n + 1, 2 * n + 1)], -1)  # (layers, heads, N)
    assert close(induction_score(attn, ids), stripe.mean(-1))
    dup = torch.stack([attn[..., i, i - n] for i in range(n + 1, 2 * n + 1)], -1)
    assert close(duplicate_token_score(attn, ids), dup.mean(-1))


def test_induction_ignores_the_query_before_the_repeat():
    # a tutorial's diagonal stripe also credits query N (key 1); it has no earlier copy, so it must not count.
    n = 5
    ids = repeated_sequence(n, seed=3)
    attn = random_attn(length=2 * n + 1, seed=4)
    moved = attn.clone()
    moved[n] = 0.0
    moved[n, 1] = 1.0
    assert induction_score(moved, ids).item() == pytest.approx(induction_score(attn, ids).item(), rel=1e-15)


def test_perfect_induction_head_scores_one():
    n = 6
    ids = repeated_sequence(n)
    attn = torch.eye(2 * n + 1, dtype=torch.float64)
    for i in range(n + 1, 2 * n + 1):
        attn[i] = 0.0
        attn[i, i - n + 1] = 1.0
    assert induction_score(attn, ids).item() == 1.0
    assert duplicate_token_score(attn, ids).item() == 0.0


def test_induction_with_a_repeated_token_in_a_row_credits_the_current_key():
    # ids [7, 7]: query 1's token occurred at 0, the key after it is 1 itself (j <= i).
    attn = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    assert induction_score(attn, [7, 7]).item() == 0.75
    assert duplicate_token_score(attn, [7, 7]).item() == 0.25


def test_pattern_score_is_the_general_form():
    attn = random_attn(3, length=6, seed=5)
    pattern = torch.rand(6, 6, generator=torch.Generator().manual_seed(0)) > 0.6
    expected = torch.stack([torch.tensor(ref_share(a.numpy(), lambda i, j: bool(pattern[i, j]))) for a in attn])
    assert close(pattern_score(attn, pattern), expected)
    assert close(pattern_score(attn, torch.ones(6, 6, dtype=torch.bool).tril(-1).triu(-1)),
                 previous_token_score(attn))


# Token sets


def test_token_set_wordpiece_and_specials():
    tokens = ["[CLS]", "The", "play", "##ing", "cat", "sat", "on", "##ly", ",", "[SEP]", "[PAD]"]
    mask = token_set(tokens, {"the", "playing", "only", "cls", "sep"})
    assert mask.tolist() == [False, True, True, True, False, False, True, True, False, False, False]
    assert mask.dtype == torch.bool


def test_token_set_gpt2_bpe():
    tokens = ["<|endoftext|>", "The", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat", ".", "Ċ", "It", "Ġwas", "Ġun",
              "believ", "able", "'s"]
    assert token_set(tokens, STOP_WORDS).tolist() == [
        False, True, False, False, True, True, False, False, False, True, True, False, False, False, False]
    assert token_set(tokens, {"unbelievable"}).tolist()[11:14] == [True, True, True]
    assert token_set(tokens, {"believ"}).any().item() is False


def test_token_set_sentencepiece_and_plain_tokens():
    assert token_set(["<s>", "▁The", "▁bank", "s", "▁of", "</s>"], {"banks", "the"}).tolist() == [
        False, True, True, True, False, False]
    assert token_set(["the", "cat", "12", "of"], STOP_WORDS).tolist() == [True, False, False, True]
    assert token_set([], STOP_WORDS).shape == (0,)


def test_token_set_case():
    assert token_set(["The", "the"], {"the"}, case_sensitive=True).tolist() == [False, True]
    assert token_set(["The", "the"], {"THE"}).tolist() == [True, True]


def test_stop_words():
    assert 100 <= len(STOP_WORDS) <= 150
    assert {"the", "a", "of", "and", "it"} <= STOP_WORDS
    assert not {"cat", "bank", "river"} & STOP_WORDS
    assert all(w == w.lower() and w.isalpha() for w in STOP_WORDS)


def test_token_set_mass_matches_loop():
    attn = random_attn(2, 2, length=6, k_len=6, seed=6)
    keys = [0, 3, 4]
    mask = torch.zeros(6, dtype=torch.bool)
    mask[keys] = True
    expected = per_head(lambda a: ref_share(a, lambda i, j: j in keys), attn)
    assert close(token_set_mass(attn, keys), expected)
    assert close(token_set_mass(attn, mask), expected)
    assert (token_set_mass(attn, []) == 0).all()
    assert close(token_set_mass(attn, list(range(6))), torch.ones(2, 2, dtype=torch.float64))


def test_token_set_mass_cross_attention():
    attn = random_attn(3, length=4, k_len=9, causal=False, seed=7)
    expected = torch.tensor([ref_share(a.numpy(), lambda i, j: j in (2, 8)) for a in attn])
    assert close(token_set_mass(attn, [2, 8]), expected)


# Top attended keys


def ref_top(grid, tokens, k):
    rows = []
    for row in grid.tolist():
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        rows.append([(j, tokens[j], row[j]) for j in order[:k] if row[j] > 0])
    return rows


def test_top_attended_matches_sorting():
    attn = random_attn(2, 3, length=6, seed=8)
    tokens = ["the", "cat", "sat", "on", "the", "mat"]
    assert top_attended(attn, tokens, layer=1, head=2, k=3) == ref_top(attn[1, 2], tokens, 3)
    assert top_attended(attn, tokens, layer=0, k=2) == ref_top(attn[0].mean(0), tokens, 2)
    assert top_attended(attn[0, 1], k=4) == ref_top(attn[0, 1], [str(j) for j in range(6)], 4)


def test_top_attended_leaves_out_masked_keys_and_breaks_ties_by_index():
    attn = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.25, 0.5, 0.25]], dtype=torch.float64)
    assert top_attended(attn, k=3) == [[(0, "0", 1.0)], [(0, "0", 0.5), (1, "1", 0.5)],
                                       [(1, "1", 0.5), (0, "0", 0.25), (2, "2", 0.25)]]


def test_top_attended_uses_the_models_indices_on_maps():
    attn = random_attn(2, 3, length=5, seed=9)
    maps = MapsStandIn([attn], [list("abcde")], None, layers=(4, 7), heads=(1, 5, 6))
    assert top_attended(maps, layer=7, head=5) == ref_top(attn[1, 1], list("abcde"), 3)
    with pytest.raises(ValueError, match=r"layer must be one of the layers held, \(4, 7\); got 0"):
        top_attended(maps, layer=0)


def test_top_attended_errors():
    attn = random_attn(2, 3, length=5, seed=9)
    with pytest.raises(ValueError, match="layer is required"):
        top_attended(attn)
    with pytest.raises(ValueError, match="layer and head apply to"):
        top_attended(attn[0, 0], layer=0)
    with pytest.raises(ValueError, match='head must be a head index or "mean"'):
        top_attended(attn, layer=0, head="max")
    with pytest.raises(ValueError, match="head must be one of the heads held"):
        top_attended(attn, layer=0, head=3)
    with pytest.raises(ValueError, match="one entry per key, Lk = 5; got 2"):
        top_attended(attn, ["a", "b"], layer=0)
    with pytest.raises(ValueError, match="k must be >= 1"):
        top_attended(attn, layer=0, k=0)
    with pytest.raises(ValueError, match=r"\(Lq, Lk\) or \(layers, heads, Lq, Lk\)"):
        top_attended(attn[0], layer=0)


# Rollout


def ref_rollout(attn):
    attn = attn.numpy()
    length = attn.shape[-1]
    result = np.eye(length)
    for layer in attn:
        mixed = 0.5 * layer.mean(0) + 0.5 * np.eye(length)
        mixed = mixed / mixed.sum(1, keepdims=True)
        result = mixed @ result
    return torch.from_numpy(result)


def test_rollout_matches_matrix_loop():
    attn = random_attn(4, 3, length=7, seed=10)
    assert torch.allclose(rollout(attn), ref_rollout(attn), rtol=1e-12, atol=1e-14)


def test_rollout_of_identity_attention_is_identity():
    attn = torch.eye(5).expand(3, 2, 5, 5)
    assert torch.equal(rollout(attn), torch.eye(5, dtype=torch.float64))


def test_rollout_order_is_last_layer_times_first():
    first = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # all on token 0
    second = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # all on token 1
    attn = torch.stack([first, second])[:, None]  # (2 layers, 1 head, 2, 2)
    a1 = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    a2 = torch.tensor([[0.5, 0.5], [0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(rollout(attn), a2 @ a1)
    assert not torch.allclose(a2 @ a1, a1 @ a2)


@SETTINGS
@given(layers=st.integers(1, 4), heads=st.integers(1, 3), length=st.integers(1, 12), seed=st.integers(0, 2**16),
       causal=st.booleans())
def test_rollout_rows_sum_to_one(layers, heads, length, seed, causal):
    attn = random_attn(layers, heads, length=length, seed=seed, causal=causal, dtype=torch.float32)
    result = rollout(attn)
    assert result.shape == (length, length)
    assert torch.allclose(result.sum(-1), torch.ones(length, dtype=torch.float64), atol=1e-12)
    assert (result >= 0).all()
    if causal:
        assert (result.triu(1) == 0).all()


def test_rollout_fully_masked_row_becomes_identity_row():
    attn = random_attn(2, 2, length=4, seed=11)
    attn[..., 2, :] = 0.0
    result = rollout(attn)
    assert torch.allclose(result[2], torch.eye(4, dtype=torch.float64)[2])


def test_rollout_needs_all_layers_and_heads():
    attn = random_attn(2, 2, length=4, seed=12)
    assert torch.allclose(rollout(MapsStandIn([attn], [list("abcd")], None, (0, 1), (0, 1))), rollout(attn))
    with pytest.raises(ValueError, match=r"every layer of the model.*holds layers \(1, 2\)"):
        rollout(MapsStandIn([attn], [list("abcd")], None, (1, 2), (0, 1)))
    with pytest.raises(ValueError, match=r"every head of the model.*holds heads \(0, 3\)"):
        rollout(MapsStandIn([attn], [list("abcd")], None, (0, 1), (0, 3)))
    with pytest.raises(ValueError, match=r"must be 4-D"):
        rollout(attn[0])
    with pytest.raises(ValueError, match=r"Lq == Lk"):
        rollout(random_attn(2, 2, length=3, k_len=4, causal=False))
    with pytest.raises(ValueError, match="at least one layer"):
        rollout(torch.ones(0, 2, 3, 3))


# head_roles


def test_head_roles_equals_the_individual_scores():
    attn = random_attn(3, 4, length=9, seed=13)
    ids = repeated_sequence(4)
    roles = head_roles(attn, ids, min_evidence=1)
    assert tuple(roles.scores) == ROLES and not roles.skipped
    assert close(roles["previous_token"], previous_token_score(attn))
    assert close(roles["duplicate_token"], duplicate_token_score(attn, ids))
    assert close(roles["induction"], induction_score(attn, ids))
    assert close(roles["first_token"], first_token_score(attn))
    assert close(roles["mean_distance"], mean_attention_distance(attn))
    assert close(roles["normalized_entropy"], attention_entropy(attn, normalized=True))
    assert roles.layers == (0, 1, 2) and roles.heads == (0, 1, 2, 3) and roles.n_tokens == 9


def test_head_roles_top_uses_model_indices_and_orders_scores():
    attn = random_attn(2, 3, length=6, seed=14)
    attn[1, 2] = 0.0
    attn[1, 2, 0, 0] = 1.0
    attn[1, 2, torch.arange(1, 6), torch.arange(0, 5)] = 1.0  # a perfect previous-token head
    maps = MapsStandIn([attn], [list("abcdef")], [[1, 2, 3, 1, 2, 3]], layers=(2, 9), heads=(0, 4, 8))
    roles = head_roles(maps, min_evidence=1)
    scores = roles["previous_token"]
    top = roles.top("previous_token", n=6)
    assert top[0] == (9, 8, 1.0)
    assert [s for _, _, s in top] == sorted(scores.flatten().tolist(), reverse=True)
    expected = {(lay, hd): scores[i, j].item() for i, lay in enumerate((2, 9)) for j, hd in enumerate((0, 4, 8))}
    assert all(expected[(lay, hd)] == s for lay, hd, s in top)
    assert roles.top("mean_distance", n=1, largest=False)[0][2] == roles["mean_distance"].min().item()
    assert len(roles.top("induction", n=2)) == 2
    assert roles.model_name == "stand-in"


def test_head_roles_skips_what_does_not_apply():
    attn = random_attn(1, 2, length=5, seed=15)
    roles = head_roles(attn)
    assert set(roles.skipped) == {"duplicate_token", "induction"}
    text = str(roles)
    assert "skipped duplicate_token: no token ids" in text and "skipped induction: no token ids" in text
    with pytest.raises(KeyError, match="skipped: no token ids"):
        roles.top("induction")
    with pytest.raises(KeyError, match="role must be one of"):
        roles["syntax"]

    no_repeats = head_roles(attn, [1, 2, 3, 4, 5])
    assert set(no_repeats.skipped) == {"duplicate_token", "induction"}
    assert "no token repeats" in str(no_repeats)

    cross = head_roles(random_attn(1, 2, length=3, k_len=5, causal=False), [1, 2, 1, 2, 1])
    assert set(cross.scores) == {"first_token", "normalized_entropy", "top_key", "monotonicity", "diagonal"}
    assert set(cross.skipped) == {"previous_token", "duplicate_token", "induction", "mean_distance"}
    assert str(cross).count("Lq != Lk (3 vs 5)") == 4


def test_head_roles_str_is_a_table():
    attn = uniform_causal(4, 2, 2).clone()
    attn[0, 1] = torch.eye(4).roll(-1, dims=1).tril()
    attn[0, 1, 0, 0] = 1.0
    lines = str(head_roles(attn, [3, 1, 3, 1])).splitlines()
    assert lines[0] == "HeadRoles(2 layers x 2 heads, 4 tokens)"
    assert lines[2].startswith("previous_token") and "L0.H1 1.000" in lines[2]
    assert len(lines) == 2 + len(ROLES)


def test_head_roles_reads_the_chosen_input():
    first, second = random_attn(1, 2, length=4, seed=16), random_attn(1, 2, length=6, seed=17)
    ids = [[1, 2, 1, 2], [1, 2, 3, 1, 2, 3]]
    maps = MapsStandIn([first, second], [list("abcd"), list("abcdef")], ids, (0,), (0, 1))
    roles = head_roles(maps, input_index=1, min_evidence=1)
    assert roles.n_tokens == 6
    assert close(roles["induction"], induction_score(second, [1, 2, 3, 1, 2, 3]))
    assert close(induction_score(maps, input_index=1), roles["induction"])
    assert close(induction_score(maps, [1, 1, 1, 1, 1, 1], input_index=1),
                 induction_score(second, [1, 1, 1, 1, 1, 1]))


def test_with_real_attention_maps():
    attn = random_attn(3, 2, length=7, seed=19, dtype=torch.float32)
    ids = [1, 2, 3, 1, 2, 3, 1]
    maps = AttentionMaps(attentions=[attn], tokens=[list("abcabca")], token_ids=[ids],
                         model_name="toy", layers=(0, 1, 2), heads=(0, 1))
    roles = head_roles(maps, min_evidence=1)
    assert close(roles["induction"], induction_score(attn, ids)) and roles.model_name == "toy"
    assert torch.equal(rollout(maps), rollout(attn))
    sub = maps.select(layers=[2, 0], heads=1)
    assert close(previous_token_score(sub), previous_token_score(attn[[2, 0]][:, [1]]))
    # the best first-token head of the selection, found here from the two scores themselves
    scores = {(2, 1): first_token_score(attn[2, 1]).item(), (0, 1): first_token_score(attn[0, 1]).item()}
    assert scores[(2, 1)] != scores[(0, 1)]
    layer, head = max(scores, key=scores.get)
    assert head_roles(sub).top("first_token", n=1) == [(layer, head, pytest.approx(scores[(layer, head)]))]
    assert top_attended(sub, layer=0, head=1) == top_attended(attn, list("abcabca"), layer=0, head=1)
    with pytest.raises(ValueError, match="every layer of the model"):
        rollout(sub)


def test_real_maps_report_the_models_layer_and_head_indices():
    attn = random_attn(2, 3, length=8, seed=23, dtype=torch.float32)
    tokens = ["[CLS]", "the", "cat", "sat", "the", "cat", "sat", "[SEP]"]
    ids = [101, 5, 6, 7, 5, 6, 7, 102]
    maps = AttentionMaps([attn], [tokens], [ids], "toy", layers=(4, 9), heads=(1, 3, 7))
    roles = head_roles(maps)
    assert (roles.layers, roles.heads, roles.n_tokens) == ((4, 9), (1, 3, 7), 8)
    ref = torch.tensor([[ref_share(attn[la, h].double(), lambda i, j: j == i - 1) for h in range(3)]
                        for la in range(2)], dtype=torch.float64)
    assert close(roles["previous_token"], ref)
    flat = sorted(((ref[la, h].item(), (4, 9)[la], (1, 3, 7)[h]) for la in range(2) for h in range(3)), reverse=True)
    assert [(la, h) for la, h, _ in roles.top("previous_token", n=3)] == [(la, h) for _, la, h in flat[:3]]
    # the same scores through select, by model index
    sub = maps.select(layers=9, heads=[7, 1])
    assert close(head_roles(sub)["previous_token"], ref[[1]][:, [2, 0]])
    with pytest.raises(ValueError, match=r"layers \[5\] were not captured"):
        maps.select(layers=5)


def test_real_maps_token_set_mass_matches_a_loop():
    attn = random_attn(1, 2, length=6, seed=29, dtype=torch.float32)
    tokens = ["[CLS]", "the", "cat", "is", "the", "[SEP]"]
    maps = AttentionMaps([attn], [tokens], [[101, 5, 6, 8, 5, 102]], "toy", layers=(0,), heads=(0, 1))
    keys = token_set(maps.tokens[0], ["the"])
    assert keys.tolist() == [t == "the" for t in tokens]
    got = token_set_mass(maps, keys)
    want = torch.tensor([[sum(attn[0, h, i, j].item() for i in range(6) for j in (1, 4)) / 6 for h in range(2)]],
                        dtype=torch.float64)
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-7)


# Properties


@SETTINGS
@given(length=st.integers(1, 12), seed=st.integers(0, 2**16), causal=st.booleans(),
       ids=st.lists(st.integers(0, 3), min_size=12, max_size=12))
def test_share_scores_lie_in_unit_interval(length, seed, causal, ids):
    attn = random_attn(2, 2, length=length, seed=seed, causal=causal)
    ids = ids[:length]
    for score in (previous_token_score(attn), first_token_score(attn), duplicate_token_score(attn, ids),
                  induction_score(attn, ids), attention_entropy(attn, normalized=True)):
        finite = score[~score.isnan()]
        assert ((finite >= 0) & (finite <= 1 + 1e-12)).all()
    assert (mean_attention_distance(attn) <= length - 1).all()


# Bad input


def test_bad_input_errors():
    attn = random_attn(2, 2, length=4, seed=18)
    with pytest.raises(TypeError, match=r"attn must be a torch.Tensor of attention probabilities.*got list"):
        previous_token_score([[1.0]])
    with pytest.raises(TypeError, match="floating-point"):
        previous_token_score(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least 2-D"):
        first_token_score(torch.ones(3))
    with pytest.raises(ValueError, match="not the scores"):
        previous_token_score(torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="not the scores"):
        previous_token_score(torch.full((4, 4), math.nan))
    with pytest.raises(ValueError, match=r"previous_token_score needs self-attention.*\(Lq == Lk\)"):
        previous_token_score(torch.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="token_ids is required for induction_score"):
        induction_score(attn)
    with pytest.raises(ValueError, match="one id per token, 4; got 3"):
        duplicate_token_score(attn, [1, 2, 3])
    with pytest.raises(TypeError, match="token_ids must hold integers"):
        induction_score(attn, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match="input_index applies to AttentionMaps"):
        first_token_score(attn, input_index=1)
    with pytest.raises(ValueError, match=r"input_index must be in \[0, 1\)"):
        first_token_score(MapsStandIn([attn], [list("abcd")], None, (0, 1), (0, 1)), input_index=1)
    with pytest.raises(ValueError, match=r"must be \(layers, heads, Lq, Lk\) with 3 layers"):
        first_token_score(MapsStandIn([attn], [list("abcd")], None, (0, 1, 2), (0, 1)))
    with pytest.raises(ValueError, match=r"allowed is only used with normalized=True"):
        attention_entropy(attn, allowed=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"allowed must be a bool \(Lq, Lk\) = \(4, 4\)"):
        attention_entropy(attn, normalized=True, allowed=torch.ones(4, 4))
    with pytest.raises(TypeError, match="pattern must be a bool tensor"):
        pattern_score(attn, torch.ones(4, 4))
    with pytest.raises(ValueError, match=r"pattern must be \(Lq, Lk\) = \(4, 4\)"):
        pattern_score(attn, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_set indices must be in \[0, 4\)"):
        token_set_mass(attn, [0, 4])
    with pytest.raises(ValueError, match=r"key_set as a bool mask must be \(Lk,\) = \(4,\)"):
        token_set_mass(attn, torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="got a list of bools"):
        token_set_mass(attn, [True, False, True, False])
    with pytest.raises(TypeError, match="words must be a collection of words"):
        token_set(["the"], "the")
    with pytest.raises(TypeError, match="words must hold strings"):
        token_set(["the"], {1})
    with pytest.raises(TypeError, match=r"tokens\[1\] is int"):
        token_set(["the", 3], STOP_WORDS)
    with pytest.raises(TypeError, match="tokens must be a list of token strings"):
        token_set("the cat", STOP_WORDS)
    with pytest.raises(ValueError, match="n must be >= 1"):
        head_roles(attn).top("first_token", n=0)
    with pytest.raises(ValueError, match="must be 4-D"):
        head_roles(attn[0])


# evidence, specificity, column heads


def test_head_roles_counts_evidence_and_refuses_a_score_on_too_little():
    attn = random_attn(1, 2, length=8, seed=31)
    one_repeat = head_roles(attn, [1, 2, 3, 1, 4, 5, 6, 7])  # one token repeats: one row to score induction on
    assert "induction" not in one_repeat.scores and "duplicate_token" not in one_repeat.scores
    assert one_repeat.skipped["induction"].startswith("not enough evidence: 1 repeated token, at least 5")
    assert "--probe induction" in one_repeat.skipped["induction"]
    assert one_repeat.evidence["induction"] == 1 and one_repeat.evidence_text("induction") == "1 repeated token"
    # Counted by hand: 8 rows see a key; 7 have a previous token; the causal first row has one key only.
    assert (one_repeat.evidence["first_token"], one_repeat.evidence["previous_token"],
            one_repeat.evidence["normalized_entropy"]) == (8, 7, 7)
    five = head_roles(attn, [1, 2, 3, 1, 2, 3, 1, 2])  # positions 3..7 repeat earlier tokens
    assert five.evidence["induction"] == 5 and close(five["induction"], induction_score(attn, [1, 2, 3, 1, 2, 3, 1, 2]))
    assert "induction" in head_roles(attn, [1, 2, 3, 1, 4, 5, 6, 7], min_evidence=1).scores
    with pytest.raises(ValueError, match="min_evidence"):
        head_roles(attn, min_evidence=0)


def _column_means(a):
    """Column means by a loop over the rows with any mass, in float64."""
    rows = [r for r in a.double() if float(r.sum()) > 0]
    return [sum(float(r[j]) for r in rows) / len(rows) for j in range(a.shape[-1])]


def test_specificity_against_a_loop_on_a_hand_made_map():
    # A column head on key 1 (every row sends it most weight) and row 3, which alone looks at key 0.
    a = torch.tensor([[0.1, 0.8, 0.1, 0.0], [0.1, 0.7, 0.1, 0.1], [0.0, 0.9, 0.1, 0.0], [0.6, 0.3, 0.0, 0.1]])
    s = specificity(a, 3)
    means = _column_means(a)
    assert s.column_mean.tolist() == pytest.approx(means)
    assert s.difference.tolist() == pytest.approx([float(a[3, j]) - means[j] for j in range(4)])
    assert s.ratio.tolist() == pytest.approx([float(a[3, j]) / means[j] for j in range(4)])
    assert s.ratio[0] > 2 and s.ratio[1] < 1  # key 0 is specific to row 3; key 1 is everyone's
    # A fully masked row drops out of the column mean; a column nobody looks at has no ratio.
    masked = torch.cat([a, torch.zeros(1, 4)])
    assert specificity(masked, 3).column_mean.tolist() == pytest.approx(means)
    assert column_mean(masked).tolist() == pytest.approx(means)
    assert column_mean(torch.zeros(2, 3)).tolist() == [0.0, 0.0, 0.0]  # every row masked: 0, not NaN
    assert specificity(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), 0).ratio[1].isnan()
    stacked = torch.stack([a, a.flip(-1)])[None]  # (1 layer, 2 heads, 4, 4)
    assert specificity(stacked, 3).weight.shape == (1, 2, 4)
    with pytest.raises(ValueError, match=r"query must be a query row in \[0, 4\); got 4"):
        specificity(a, 4)


def test_column_heads_against_a_count_on_hand_made_maps():
    column = torch.tensor([[0.1, 0.8, 0.1], [0.2, 0.6, 0.2], [0.1, 0.55, 0.35], [0.7, 0.3, 0.0]])
    diagonal = torch.eye(3, 4) * 0.9 + 0.025
    spread = torch.full((4, 3), 1 / 3)
    for a, key, fraction in ((column, 1, 3 / 4), (diagonal, 0, 1 / 3), (spread, 0, 0.0)):
        found = column_heads(a)
        # Counted here: rows whose top key holds at least half the row, grouped by key.
        counts = {}
        for row in a:
            j = int(row.argmax())
            if float(row[j]) >= 0.5 * float(row.sum()):
                counts[j] = counts.get(j, 0) + 1
        best = max(counts.values(), default=0)
        assert float(found.fraction) == pytest.approx(best / a.shape[0]) == pytest.approx(fraction)
        assert bool(found.flagged) == (best / a.shape[0] > 0.5)
        if best:
            assert int(found.key) == key
    both = column_heads(torch.stack([column, column.roll(1, -1)])[None])
    assert both.key.tolist() == [[1, 2]] and both.flagged.tolist() == [[True, True]]
    assert not bool(column_heads(column, share=0.9).flagged)
    with pytest.raises(ValueError, match=r"share must be in \(0, 1\]"):
        column_heads(column, share=0)
