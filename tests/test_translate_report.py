"""translate-demo's HTML report: the Seq2SeqMaps it builds from EncoderDecoder's return_attention."""

from __future__ import annotations

import copy

import pytest
import torch

from attnkit.demos.translate import TranslateConfig, TranslateResult, example_maps, train_translation
from attnkit.viz import report_html
from test_encoder_decoder import _by_hand


@pytest.fixture(scope="module")
def brief():
    return train_translation(TranslateConfig(steps=2, dim=16, heads=2, encoder_depth=1, decoder_depth=1,
                                             eval_every=2, probes=2))


@pytest.mark.slow  # training, even 2 steps, evaluates every held-out sentence (about 10 s)
def test_example_maps_are_the_models_attention(brief):
    maps = example_maps(brief)
    assert maps.encoder.tokens == [["the", "bank", "of", "the", "river"]]
    assert maps.cross.key_tokens == maps.encoder.tokens and maps.cross.tokens[0][0] == "<s>"
    src = torch.tensor([maps.sequences["source"][0]])
    tgt = torch.tensor([maps.sequences["target"][0]])
    # against softmax(q k^T / sqrt(d)) computed from each cross-attention's weights and the inputs it received
    seen = {}

    def keep(layer):
        def hook(module, args, kwargs):
            seen[layer] = (args[0], args[1], kwargs.get("padding_mask"))
        return hook

    decoder = brief.model.decoder
    handles = [block.cross_attn.register_forward_pre_hook(keep(n), with_kwargs=True) for n, block in enumerate(decoder)]
    try:
        with torch.no_grad():
            brief.model(src, tgt)
    finally:
        for h in handles:
            h.remove()
    for n, layer in enumerate(maps.cross.layers):
        xq, memory, valid = seen[layer]
        valid = torch.ones(memory.shape[:2], dtype=torch.bool) if valid is None else valid
        attn = copy.deepcopy(decoder[layer].cross_attn).double()
        want, _ = _by_hand(attn, xq.double(), memory.double(), valid, causal=False)
        torch.testing.assert_close(maps.cross.attentions[0][n].double(), want[0], atol=1e-5, rtol=0)
    assert torch.allclose(maps.cross.attentions[0].sum(-1), torch.ones(1, 2, tgt.shape[1]), atol=1e-5)
    assert "attnkit-seq2seq" in report_html(maps)
    with pytest.raises(ValueError, match="outside the corpus vocabulary: \\['zebra'\\]"):
        example_maps(brief, "the zebra")
    with pytest.raises(ValueError, match="result must come from train_translation"):
        example_maps(TranslateResult(TranslateConfig()))
