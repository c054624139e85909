"""capture and capture_generation on attnkit's own nn.EncoderDecoder.

Cross maps are checked against softmax(q k^T / sqrt(d)) computed here in float64 from the
cross-attention module's weights and its inputs (read with a forward pre-hook), and against
the model's own ``return_attention=True``; generation against ``model.generate`` and a
teacher-forced forward over the generated sequence.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from attnkit.inspect import GenerationMaps, Seq2SeqMaps, capture, capture_generation
from attnkit.nn import EncoderDecoder, EncoderDecoderConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
BOS, EOS = 1, 2


def _model(seed: int = 0) -> EncoderDecoder:
    torch.manual_seed(seed)
    model = EncoderDecoder(EncoderDecoderConfig(src_vocab_size=23, tgt_vocab_size=19, dim=24, num_heads=3,
                                                encoder_depth=2, decoder_depth=2, max_length=16))
    for p in model.parameters():  # larger weights than the init: peaked, distinct rows
        p.data.normal_(0, 0.5)
    return model.eval()


def _batch():
    src = torch.tensor([[4, 5, 6, 7, 8], [9, 10, 11, 0, 0]])
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    tgt = torch.tensor([[BOS, 3, 4, 5], [BOS, 6, 7, 8]])
    return src, valid, tgt


def _cross_by_hand(model: EncoderDecoder, src, valid, tgt) -> list[torch.Tensor]:
    """Per decoder layer, (B, H, T, S) float64: softmax(q k^T / sqrt(d)) over the real source keys,
    q and k projected here from the float64 weights and the module's inputs."""
    m64 = copy.deepcopy(model).double()
    inputs = []
    hooks = [b.cross_attn.register_forward_pre_hook(lambda mod, args, kw: inputs.append((args[0], args[1])),
                                                    with_kwargs=True) for b in m64.decoder]
    with torch.no_grad():
        m64(src, tgt, src_padding_mask=valid)
    for h in hooks:
        h.remove()
    out = []
    heads, d = model.config.num_heads, model.config.dim // model.config.num_heads
    for block, (x, memory) in zip(m64.decoder, inputs):
        attn = block.cross_attn
        q = (x @ attn.q_proj.weight.T + attn.q_proj.bias).unflatten(-1, (heads, d)).transpose(1, 2)  # (B, H, T, d)
        k = (memory @ attn.k_proj.weight.T + attn.k_proj.bias).unflatten(-1, (heads, d)).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)  # (B, H, T, S)
        scores = scores.masked_fill(~valid[:, None, None, :], -math.inf)
        out.append(scores.softmax(-1))
    return out


def test_capture_gives_seq2seq_maps_whose_cross_rows_equal_a_float64_hand_computation():
    model = _model()
    src, valid, tgt = _batch()
    maps = capture(model, {"src_ids": src, "src_padding_mask": valid}, target=tgt)
    assert isinstance(maps, Seq2SeqMaps)
    want = torch.stack(_cross_by_hand(model, src, valid, tgt), 1)  # (B, layers, H, T, S)
    for b, length in enumerate((5, 3)):
        assert maps.cross[b].shape == (2, 3, 4, length)
        torch.testing.assert_close(maps.cross[b].double(), want[b][..., :length], atol=TOL, rtol=0)
    assert maps.cross.key_token_ids == [[4, 5, 6, 7, 8], [9, 10, 11]] and maps.cross.tokens[0] == ["1", "3", "4", "5"]
    assert (maps.cross.model_layers, maps.cross.model_heads, maps.encoder.model_layers) == (2, 3, 2)
    assert maps.sequences == {"source": [[4, 5, 6, 7, 8], [9, 10, 11]], "target": tgt.tolist()}


def test_capture_equals_return_attention_for_every_part_and_selects_layers_and_heads():
    model = _model(1)
    src, valid, tgt = _batch()
    tgt_valid = torch.tensor([[True] * 4, [True, True, True, False]])
    with torch.no_grad():
        out = model(src, tgt, src_padding_mask=valid, tgt_padding_mask=tgt_valid, return_attention=True)
    maps = capture(model, {"input_ids": src, "attention_mask": valid, "tgt_ids": tgt, "tgt_padding_mask": tgt_valid})
    enc, dec, cross = (torch.stack(x, 1) for x in (out.encoder_attentions, out.decoder_attentions,
                                                    out.cross_attentions))
    for b, (s, t) in enumerate(((5, 4), (3, 3))):
        torch.testing.assert_close(maps.encoder[b], enc[b][..., :s, :s], atol=TOL, rtol=0)
        torch.testing.assert_close(maps.decoder[b], dec[b][..., :t, :t], atol=TOL, rtol=0)
        torch.testing.assert_close(maps.cross[b], cross[b][..., :t, :s], atol=TOL, rtol=0)
    part = capture(model, src[:1], target=tgt[:1], layers=[1], heads=[0, 2])
    assert part.cross.layers == (1,) and part.cross.heads == (0, 2)
    torch.testing.assert_close(part.cross[0], cross[0][[1]][:, [0, 2]], atol=TOL, rtol=0)


def test_capture_argument_errors_for_the_encoder_decoder():
    model = _model()
    src, _, tgt = _batch()
    with pytest.raises(ValueError, match="pass target="):
        capture(model, src)
    with pytest.raises(ValueError, match="once"):
        capture(model, {"src_ids": src, "tgt_ids": tgt}, target=tgt)
    with pytest.raises(TypeError, match="not text"):
        capture(model, "the bank", target=tgt[:1])
    with pytest.raises(ValueError, match="layers must be < 2"):
        capture(model, src, target=tgt, layers=[2])
    with pytest.raises(ValueError, match="heads must be < 3"):
        capture(model, src, target=tgt, heads=[3])
    with pytest.raises(ValueError, match="one target each"):
        capture(model, src, target=tgt[:1])


@pytest.mark.parametrize("cache", ["dynamic", "static", "none"])
def test_capture_generation_tokens_equal_generate_and_maps_a_teacher_forced_forward(cache):
    model = _model(2)
    src, valid, _ = _batch()
    settings = dict(max_new_tokens=6, bos=BOS, eos=None, cache=cache)
    plain = model.generate(src, src_padding_mask=valid, **settings)
    got = capture_generation(model, {"src_ids": src, "src_padding_mask": valid}, **settings)
    assert isinstance(got, GenerationMaps) and torch.equal(got.sequences, plain)
    with torch.no_grad():
        out = model(src, plain, src_padding_mask=valid, return_attention=True)
    enc, dec, cross = (torch.stack(x, 1) for x in (out.encoder_attentions, out.decoder_attentions,
                                                    out.cross_attentions))
    for b, s in enumerate((5, 3)):
        assert got.decoder[b].shape == (2, 3, 7, 7)  # every token of sequences has its row, the last one too
        torch.testing.assert_close(got.decoder[b], dec[b], atol=TOL, rtol=0)
        torch.testing.assert_close(got.cross[b], cross[b][..., :s], atol=TOL, rtol=0)
        torch.testing.assert_close(got.encoder[b], enc[b][..., :s, :s], atol=TOL, rtol=0)
    assert got.decoder.token_ids == plain.tolist() and got.cross.key_token_ids[1] == [9, 10, 11]
    assert bool((got.decoder[0].triu(1) == 0).all())


def test_capture_generation_stops_at_eos_and_refuses_target_ids():
    model = _model(3)
    src, _, tgt = _batch()
    first = model.generate(src[:1], 3, bos=BOS)[0, 1].item()  # make the first generated token the EOS
    got = capture_generation(model, src[:1], max_new_tokens=6, bos=BOS, eos=first)
    assert got.sequences.tolist() == [[BOS, first]] and got.decoder[0].shape == (2, 3, 2, 2)
    with pytest.raises(ValueError, match="source only"):
        capture_generation(model, {"src_ids": src, "tgt_ids": tgt}, max_new_tokens=2, bos=BOS)
