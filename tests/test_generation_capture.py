"""attnkit.inspect.capture_generation: maps recorded during ``generate`` with a KV cache.

The tokens are compared with a plain ``generate`` (same arguments); the maps with transformers'
eager ``output_attentions`` of one full forward pass over the whole generated sequence (every
row, the last generated token's included), cut to the real tokens.
"""

from __future__ import annotations

import copy

import pytest
import torch

from attnkit.inspect import GenerationMaps, capture_generation

TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def _transformers():
    return pytest.importorskip("transformers")


def _decoder(name: str, impl: str):
    t = _transformers()
    small = dict(vocab_size=53, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                 num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    if name == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(**small))
    elif name == "mistral":  # a window of 4 binds on a 6-token prompt and 5 new tokens
        model = t.MistralForCausalLM(t.MistralConfig(sliding_window=4, **small))
    else:
        model = t.GPT2LMHeadModel(t.GPT2Config(vocab_size=53, n_embd=48, n_layer=2, n_head=6, n_positions=64,
                                               pad_token_id=0, eos_token_id=None, bos_token_id=None))
    model.eval().set_attn_implementation(impl)
    return model


def _eager_maps(model, ids, mask):
    """(B, layers, H, L, L) from one full eager forward pass with output_attentions, at the
    positions generate gives a left-padded prompt (counted from its first real token)."""
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = reference(ids, attention_mask=mask, position_ids=positions, output_attentions=True)
    return torch.stack(out.attentions, 1)


def _prompt():
    ids = torch.randint(3, 53, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 6, dtype=torch.long)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("name, impl, cache", [
    ("llama", "sdpa", None),
    ("mistral", "eager", None),
    ("mistral", "sdpa", "static"),
    ("llama", "eager", "static"),
    ("gpt2", "sdpa", None),
    ("gpt2", "eager", "static"),
])
def test_generation_maps_equal_one_full_eager_forward(name, impl, cache):
    model = _decoder(name, impl)
    prompt = _prompt()
    settings = dict(max_new_tokens=5, do_sample=False, cache_implementation=cache)
    with torch.no_grad():
        plain = model.generate(**prompt, **settings)
    got = capture_generation(model, prompt, **settings)
    assert isinstance(got, GenerationMaps) and torch.equal(got.sequences, plain)
    read = plain.shape[1]  # every token has its row, the last generated one included
    mask = torch.cat([prompt["attention_mask"], torch.ones(2, read - 6, dtype=torch.long)], 1)
    want = _eager_maps(model, plain[:, :read], mask)
    for b, start in enumerate((2, 0)):
        torch.testing.assert_close(got.decoder[b], want[b][:, :, start:, start:], atol=TOL, rtol=0)
        assert got.decoder.token_ids[b] == plain[b, start:read].tolist()
    assert got.decoder[0].shape == (2, 6, read - 2, read - 2) and got.decoder.model_heads == 6
    assert bool((got.decoder[1].triu(1) == 0).all())  # lower-triangular
    if name == "mistral":  # the window: no weight four or more tokens back
        assert read > 4 and bool((got.decoder[1].tril(-4) == 0).all())


def test_sampling_with_a_seed_generates_the_same_tokens_in_float16_storage():
    model = _decoder("llama", "sdpa")
    prompt = _prompt()
    settings = dict(max_new_tokens=4, do_sample=True, top_k=5)
    torch.manual_seed(7)
    with torch.no_grad():
        plain = model.generate(**prompt, **settings)
    torch.manual_seed(7)
    got = capture_generation(model, prompt, dtype=torch.float16, **settings)
    assert torch.equal(got.sequences, plain) and got.decoder[0].dtype == torch.float16
    sums = got.decoder[1].float().sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=2e-3, rtol=0)


@pytest.mark.parametrize("cache", [None, "static"])
def test_encoder_decoder_generation_equals_a_teacher_forced_eager_forward(cache):
    t = _transformers()
    torch.manual_seed(0)
    model = t.BartForConditionalGeneration(t.BartConfig(
        vocab_size=40, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None,
        forced_eos_token_id=None)).eval()
    model.set_attn_implementation("sdpa")
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    mask = (ids != 0).long()
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, num_beams=1, cache_implementation=cache)
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=mask, **settings)
    got = capture_generation(model, {"input_ids": ids, "attention_mask": mask}, **settings)
    assert torch.equal(got.sequences, plain)
    read = plain  # all of it: the last token's row too
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(input_ids=ids, attention_mask=mask, decoder_input_ids=read, output_attentions=True)
    dec, cross, enc = (torch.stack(x, 1) for x in (out.decoder_attentions, out.cross_attentions,
                                                    out.encoder_attentions))
    for b in range(2):
        s = mask[b].bool()
        torch.testing.assert_close(got.decoder[b], dec[b], atol=TOL, rtol=0)
        torch.testing.assert_close(got.cross[b], cross[b][..., s], atol=TOL, rtol=0)
        torch.testing.assert_close(got.encoder[b], enc[b][:, :, s][..., s], atol=TOL, rtol=0)
    assert got.cross.key_token_ids[1] == [10, 11, 12] and got.cross.tokens[0][0] == "2"


def test_whisper_generation_from_features_equals_a_teacher_forced_eager_forward():
    # Features in, no prompt ids: the encoder's keys are frames, and the maps still match eager's.
    t = _transformers()
    torch.manual_seed(0)
    model = t.WhisperForConditionalGeneration(t.WhisperConfig(
        vocab_size=60, num_mel_bins=8, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=8,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=[], begin_suppress_tokens=[])).eval()
    model.set_attn_implementation("sdpa")
    features = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))  # (B, mel bins, 2 x positions)
    settings = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, num_beams=1)
    with torch.no_grad():
        plain = model.generate(features, **settings)
    got = capture_generation(model, features, **settings)
    assert torch.equal(got.sequences[:, 1:], plain)  # a plain Whisper generate leaves out the start token
    assert int(got.sequences[0, 0]) == 1
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(input_features=features, decoder_input_ids=got.sequences, output_attentions=True)
    for part, reference in (("decoder", out.decoder_attentions), ("cross", out.cross_attentions),
                            ("encoder", out.encoder_attentions)):
        torch.testing.assert_close(getattr(got, part)[0], torch.stack(reference, 1)[0], atol=TOL, rtol=0)
    assert got.cross.keys[0] == [f"frame {i}" for i in range(8)]


def test_capture_generation_argument_errors():
    with pytest.raises(TypeError, match="must be a transformers model"):
        capture_generation(torch.nn.Linear(2, 2), [1, 2])
    with pytest.raises(TypeError, match="dtype must be one of"):
        capture_generation(torch.nn.Linear(2, 2), [1, 2], dtype=torch.int8)
    model = _decoder("llama", "sdpa")
    with pytest.raises(TypeError, match="dtype must be one of"):
        capture_generation(model, [1, 2], dtype=torch.int8)
    with pytest.raises(ValueError, match="needs the prompt's token ids"):  # which rows are real is unknown
        capture_generation(model, {"inputs_embeds": torch.randn(1, 3, 48)}, max_new_tokens=1)
