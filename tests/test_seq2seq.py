"""attnkit.inspect.capture on encoder-decoder models: encoder, decoder and cross maps.

Each part is compared with transformers' own eager weights (``output_attentions=True``:
``encoder_attentions``, ``decoder_attentions``, ``cross_attentions``) on the same padded
batch, cut to the real tokens the same way, for models loaded with eager and with sdpa.
"""

from __future__ import annotations

import pytest
import torch

from attnkit.inspect import AttentionMaps, Seq2SeqMaps, capture
from tiny_seq_models import WORDS, word_tokenizer

TOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")


def _transformers():
    transformers = pytest.importorskip("transformers")
    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (4, 57):
        pytest.skip("capture from transformers models needs transformers >= 4.57")
    return transformers


@pytest.fixture(scope="module")
def tokenizer():
    _transformers()
    return word_tokenizer()


def _small(name: str):
    """A tiny random model of family ``name`` (2 encoder and 2 decoder layers, 4 heads), in eval mode."""
    return _build(name).eval()


def _build(name: str):
    t = _transformers()
    vocab = len(WORDS)
    common = dict(vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    torch.manual_seed(0)
    if name == "t5":
        return t.T5ForConditionalGeneration(t.T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                       num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                                       eos_token_id=2))
    if name == "bart":
        return t.BartForConditionalGeneration(t.BartConfig(max_position_embeddings=64, **common))
    if name == "marian":
        return t.MarianMTModel(t.MarianConfig(max_position_embeddings=64, **common))
    return t.WhisperForConditionalGeneration(t.WhisperConfig(num_mel_bins=8, max_source_positions=16,
                                                             max_target_positions=16, **common))


def _eager(model, impl):
    model.eval().set_attn_implementation(impl)
    return model


def _cut(t: torch.Tensor, rows, cols) -> torch.Tensor:
    """(layers, H, Lq, Lk) restricted to the real query rows and key columns (bool flags)."""
    return t[:, :, rows][:, :, :, cols]


def _want(model, inputs):
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    return (torch.stack(out.encoder_attentions, 1), torch.stack(out.decoder_attentions, 1),
            torch.stack(out.cross_attentions, 1))


def _padded_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, len(WORDS), (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0  # right padding on the source
    ids[1, 4:] = 0
    dec = torch.randint(4, len(WORDS), (2, 5), generator=g)
    dec_mask = torch.ones(2, 5, dtype=torch.long)
    dec_mask[0, 3:] = 0  # and on the target
    dec[0, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "decoder_attention_mask": dec_mask}


def _check(maps: Seq2SeqMaps, want, src_mask, tgt_mask):
    enc, dec, cross = want
    for b in range(len(maps)):
        s, t = src_mask[b].bool(), tgt_mask[b].bool()
        torch.testing.assert_close(maps.encoder[b], _cut(enc[b], s, s), atol=TOL, rtol=0)
        torch.testing.assert_close(maps.decoder[b], _cut(dec[b], t, t), atol=TOL, rtol=0)
        torch.testing.assert_close(maps.cross[b], _cut(cross[b], t, s), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["bart", "t5",
                                  "marian"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_encoder_decoder_and_cross_maps_equal_eager_output_attentions(name, impl):
    model = _small(name)
    inputs = _padded_batch()
    want = _want(model, inputs)
    from attnkit.integrations.transformers import supports

    if not supports(model):  # T5 in transformers 4.57 computes attention in its own code
        with pytest.raises(ValueError, match="made 0 encoder, 0 decoder and 0 cross-attention calls through"):
            capture(_eager(model, impl), inputs)
        return
    maps = capture(_eager(model, impl), inputs)
    assert isinstance(maps, Seq2SeqMaps) and len(maps) == 2
    _check(maps, want, inputs["attention_mask"], inputs["decoder_attention_mask"])
    assert maps.cross[0].shape == (2, 4, 3, 7) and maps.cross[1].shape == (2, 4, 5, 4)
    assert maps.cross.key_tokens[1] == [str(int(i)) for i in inputs["input_ids"][1, :4]]  # no tokenizer: str(id)
    assert maps.cross.tokens[0] == [str(int(i)) for i in inputs["decoder_input_ids"][0, :3]]
    assert maps.sequences["source"][1] == inputs["input_ids"][1, :4].tolist()
    assert maps.sequences["target"][0] == inputs["decoder_input_ids"][0, :3].tolist()
    for part in (maps.encoder, maps.decoder, maps.cross):
        assert (part.model_layers, part.model_heads, part.layers, part.heads) == (2, 4, (0, 1), (0, 1, 2, 3))
    assert maps.decoder[0][..., 0, 1:].eq(0).all()  # causal: the first target token sees only itself


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_whisper_maps_equal_eager_and_name_encoder_frames(impl):
    model = _small("whisper")
    features = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(2))
    dec = torch.tensor([[1, 5, 6, 0], [1, 7, 8, 9]])
    dec_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    inputs = {"input_features": features, "decoder_input_ids": dec, "decoder_attention_mask": dec_mask}
    want = _want(model, inputs)
    maps = capture(_eager(model, impl), inputs)
    _check(maps, want, torch.ones(2, 16), dec_mask)  # the conv halves 32 feature frames into 16 positions
    assert maps.cross.key_tokens[0] == [f"frame {i}" for i in range(16)]
    assert maps.sequences["source"] is None and maps.cross.key_token_ids is None


def test_text_target_is_teacher_forced_behind_the_start_token(tokenizer):
    """The decoder reads decoder_start + the tokenized target; padding cut, special tokens flagged."""
    model = _eager(_small("bart"), "eager")
    texts, targets = ["the bank of the river", "red car"], ["la rive du fleuve", "la voiture rouge"]
    maps = capture(model, texts, target=targets, tokenizer=tokenizer, layers=[1], heads=[0, 3])
    src = tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False)  # BART takes none
    labels = tokenizer(text_target=targets, padding=True, return_tensors="pt")
    start = torch.full((2, 1), model.config.decoder_start_token_id)
    inputs = {**src, "decoder_input_ids": torch.cat([start, labels.input_ids], 1),
              "decoder_attention_mask": torch.cat([torch.ones(2, 1, dtype=torch.long), labels.attention_mask], 1)}
    enc, dec, cross = _want(model, inputs)
    sel = (slice(1, 2), [0, 3])
    _check(maps, (enc[:, sel[0]][:, :, sel[1]], dec[:, sel[0]][:, :, sel[1]], cross[:, sel[0]][:, :, sel[1]]),
           inputs["attention_mask"], inputs["decoder_attention_mask"])
    assert maps.cross.tokens[1] == ["<s>", "la", "voiture", "rouge", "</s>"]
    assert maps.cross.key_tokens[1] == ["red", "car", "</s>"]
    assert maps.cross.special[1] == [True, False, False, False, True]
    assert maps.cross.key_special[1] == [False, False, True]
    assert maps.encoder.word_ids[0] == [0, 1, 2, 3, 4, None]
    assert maps.cross.word_ids[1] == [None, 0, 1, 2, None] and maps.cross.key_word_ids[1] == [0, 1, None]
    assert (maps.cross.layers, maps.cross.heads, maps.cross.model_layers) == ((1,), (0, 3), 2)


def test_cross_maps_round_trip_through_a_file(tmp_path, tokenizer):
    model = _eager(_small("bart"), "sdpa")
    maps = capture(model, ["the bank of the river", "red car"], target=["la rive", "la voiture rouge"],
                   tokenizer=tokenizer)
    maps.cross.save(tmp_path / "cross.safetensors")
    back = AttentionMaps.load(tmp_path / "cross.safetensors")
    for name in ("tokens", "key_tokens", "token_ids", "key_token_ids", "special", "key_special", "word_ids",
                 "key_word_ids", "model_layers", "model_heads", "layers", "heads"):
        assert getattr(back, name) == getattr(maps.cross, name), name
    assert all(torch.equal(a, b) for a, b in zip(back.attentions, maps.cross.attentions))
    assert back.select(layers=1).key_tokens == maps.cross.key_tokens


def test_seq2seq_argument_errors(tokenizer):
    model = _eager(_small("bart"), "eager")
    with pytest.raises(ValueError, match="encoder-decoder model: capture needs the decoder's side"):
        capture(model, "the bank", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="pass the decoder's tokens once"):
        capture(model, {"input_ids": torch.tensor([[4, 5]]), "decoder_input_ids": torch.tensor([[1]])}, target=[4])
    with pytest.raises(TypeError, match=r"target must be text .* got a float"):
        capture(model, [4, 5], target=1.5)
    with pytest.raises(ValueError, match="inputs hold 1 sequences but the target 2"):
        capture(model, [4, 5], target=torch.tensor([[4], [5]]))
    with pytest.raises(ValueError, match=r"layers must be < 2, the encoder's layer count"):
        capture(model, [4, 5], target=[6], layers=[2])
