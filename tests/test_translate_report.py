"""translate-demo's HTML report: the Seq2SeqMaps it builds from EncoderDecoder's return_attention,
and the page in a real browser: rows labelled as in the PNG, opened on the reported head at
the step that writes the sense."""

from __future__ import annotations

import copy

import pytest
import torch

from attnkit.demos.translate import (
    SENSES,
    TranslateConfig,
    TranslateResult,
    example_maps,
    shown_example,
    train_translation,
    write_example_report,
)
from attnkit.viz import report_html
from test_encoder_decoder import _by_hand

from conftest import png_rgb


@pytest.fixture(scope="module")
def brief():
    return train_translation(TranslateConfig(steps=2, dim=16, heads=2, encoder_depth=1, decoder_depth=1,
                                             eval_every=2, probes=2))


@pytest.mark.slow  # training, even 2 steps, evaluates every held-out sentence (about 10 s)
def test_example_maps_are_the_models_attention(brief):
    maps = example_maps(brief, "the bank of the river")
    assert maps.encoder.tokens == [["the", "bank", "of", "the", "river"]]
    assert maps.cross.key_tokens == maps.encoder.tokens and maps.decoder.key_tokens[0][0] == "<s>"
    # rows are labelled by the token each step produces: the decoder's next input
    assert maps.cross.tokens[0][:-1] == maps.decoder.key_tokens[0][1:] == maps.decoder.tokens[0][:-1]
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


@pytest.fixture(scope="module")
def trained(one_thread):
    """A small model trained long enough to write "rive" (about 10 s)."""
    return train_translation(TranslateConfig(steps=100, dim=32, heads=2, encoder_depth=1, decoder_depth=1,
                                             eval_every=100, probes=2, lr=5e-3))


@pytest.mark.slow  # the training (about 10 s)
def test_page_opens_on_the_reported_head_at_the_sense_step_with_the_pngs_row_labels(trained, tmp_path,
                                                                                     watched_page):
    pytest.importorskip("matplotlib")
    shown = shown_example(trained)
    assert "rive" in shown["produced"], "the run must write 'rive' for this test; train longer"
    path = write_example_report(trained, tmp_path / "translate.html")
    url = path.resolve().as_uri()
    watch = watched_page(allowed=(url,), width=1280, height=800)
    watch.page.goto(url)
    watch.page.wait_for_function("window.attnkitSeq2Seq")
    watch.page.evaluate("window.attnkitSeq2Seq.ready")
    cross = watch.page.evaluate("JSON.parse(document.getElementById('attnkit-data').textContent).parts.cross")
    # the PNG's rows are shown["produced"] (TranslateResult.plot): the page's rows are the same tokens
    assert cross["tokens"] == shown["produced"] and cross["key_tokens"] == shown["source"]
    state = watch.page.evaluate("window.attnkitSeq2Seq.parts.cross.state()")
    layer, head, _ = trained.rive_head()
    assert (state["layer"], state["heads"], state["tab"]) == (layer, [head], "head")
    assert cross["tokens"][state["focus"]] in SENSES
    assert cross["tokens"][state["focus"]] == shown["produced"][state["focus"]] == "rive"
    # the info panel names the produced token, and the findings are on the page
    assert watch.page.inner_text("[data-part-pane=cross] .akx-focus b") == "rive"
    figures = watch.page.eval_on_selector_all(".akx-figures li", "items => items.map((li) => li.textContent)")
    assert figures == trained.findings()
    watch.assert_clean()
    assert _has_gray_colour_bar(png_rgb(trained.plot(tmp_path / "translate.png")))


def _has_gray_colour_bar(rgb) -> bool:
    """A colour bar of the gray map: some pixel column holds a vertical run of 100 px or more
    of neutral gray that darkens step by step from white (>= 250) to black (<= 5) through 50
    or more levels. Heatmap cells cannot: each is one flat gray, a dozen to a panel."""
    import numpy as np

    gray, neutral = rgb[..., 0], rgb.max(-1) - rgb.min(-1) <= 2
    for x in range(gray.shape[1]):
        # breaks: where the run cannot continue from the pixel above (brighter, or not gray)
        steps = (gray[1:, x] <= gray[:-1, x]) & neutral[1:, x] & neutral[:-1, x]
        starts = np.flatnonzero(np.concatenate(([True], ~steps)))
        for start, stop in zip(starts, [*starts[1:], len(steps) + 1]):
            run = gray[start:stop, x]
            if len(run) >= 100 and run[0] >= 250 and run[-1] <= 5 and len(np.unique(run)) >= 50:
                return True
    return False
