"""Reports of encoder-decoder maps (cross-attention, alignment heatmap) and of generation:
the page's numbers against the maps (float64 means of the chosen heads), in a real browser."""

from __future__ import annotations

import math
import re

import pytest
import torch

from attnkit.inspect import AttentionMaps, GenerationMaps, Seq2SeqMaps
from attnkit.viz import report_data, report_html, write_report
from attnkit.viz.encode import QUANTUM, decode
from attnkit.viz.seq2seq import generation_data, seq2seq_data

XSS_IMG = "<img src=x onerror=window.__pwned=1>"
XSS_SCRIPT = "</script><script>window.__pwned=2</script>"
SOURCE = ["the", XSS_IMG, "of", "the", "river", "</s>"]
TARGET = ["<s>", "la", XSS_SCRIPT, "du", "fleuve"]


def probs(*shape, seed=0, causal=False):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    if causal:
        scores = scores.masked_fill(~torch.ones(shape[-2:], dtype=torch.bool).tril(), -math.inf)
    return torch.softmax(scores, -1)


def toy_seq2seq(layers=2, heads=3) -> Seq2SeqMaps:
    s, t = len(SOURCE), len(TARGET)
    part = dict(model_name="toy", layers=tuple(range(layers)), heads=tuple(range(heads)), token_ids=None)
    return Seq2SeqMaps(
        encoder=AttentionMaps([probs(layers, heads, s, s, seed=1).float()], [SOURCE], **part),
        decoder=AttentionMaps([probs(layers, heads, t, t, seed=2, causal=True).float()], [TARGET], **part),
        cross=AttentionMaps([probs(layers, heads, t, s, seed=3).float()], [TARGET], key_tokens=[SOURCE], **part),
        sequences={"source": [list(range(s))], "target": [list(range(t))]})


def toy_generation(cross=True, layers=2, heads=2) -> GenerationMaps:
    """A decoder that read 6 tokens (the 7th, id 9, was generated last and never read)."""
    tokens = ["<s>", "la", XSS_IMG, "du", "fleuve", "rouge"]
    part = dict(model_name="toy", layers=tuple(range(layers)), heads=tuple(range(heads)), token_ids=None)
    decoder = AttentionMaps([probs(layers, heads, 6, 6, seed=4, causal=True).float()], [tokens], **part)
    crossed = None if not cross else AttentionMaps([probs(layers, heads, 6, 4, seed=5).float()], [tokens],
                                                   key_tokens=[["the", "bank", XSS_SCRIPT, "</s>"]], **part)
    encoder = None if not cross else AttentionMaps([probs(layers, heads, 4, 4, seed=6).float()],
                                                   [["the", "bank", XSS_SCRIPT, "</s>"]], **part)
    return GenerationMaps(sequences=torch.tensor([[1, 8, 5, 10, 11, 17, 9]]), decoder=decoder, cross=crossed,
                          encoder=encoder)


# --- the data, against the maps ---

def test_cross_maps_report_with_target_rows_and_source_columns():
    maps = toy_seq2seq()
    data = report_data(maps.cross, tolerance=0.0)
    assert data["tokens"] == TARGET and data["key_tokens"] == SOURCE
    assert data["rollout"] is False and "cross-attention" in data["rollout_missing"]
    # A decoder's self-attention whose rows are named by the token each step produces (keys: the tokens read)
    # has key tokens too: the reason must not call it cross-attention outright.
    produced = AttentionMaps([maps.decoder.attentions[0]], [[*TARGET[1:], "</s>"]], None, "toy",
                             maps.decoder.layers, maps.decoder.heads, key_tokens=[TARGET])
    assert "whose rows are named by the token each step produces" in report_data(produced)["rollout_missing"]
    assert "these maps are cross-attention" not in report_data(produced)["rollout_missing"]
    got = decode(data["encoding"]).double()  # (layers * heads, T, S), layer-major
    want = maps.cross.attentions[0].double().reshape(6, len(TARGET), len(SOURCE))
    assert got.shape == want.shape and (got - want).abs().max() <= QUANTUM
    assert report_data(maps.encoder)["key_tokens"] is None  # self-attention: the keys are the tokens


def test_old_rectangular_maps_without_key_tokens_name_their_queries_by_position():
    p = probs(1, 1, 8, 4).float()
    data = report_data(AttentionMaps([p], [list("abcd")], None, "toy", (0,), (0,)))
    assert data["tokens"] == [f"#{i}" for i in range(8)] and data["key_tokens"] == list("abcd")


def test_seq2seq_data_has_the_three_parts_and_checks_its_arguments():
    maps = toy_seq2seq()
    data = seq2seq_data(maps, title="t")
    assert data["kind"] == "seq2seq" and data["source"] == SOURCE and data["target"] == TARGET
    assert {k: (v["tokens"], v["key_tokens"]) for k, v in data["parts"].items()} == {
        "cross": (TARGET, SOURCE), "encoder": (SOURCE, None), "decoder": (TARGET, None)}
    with pytest.raises(ValueError, match=r"input_index must be in \[0, 1\)"):
        seq2seq_data(maps, 1)
    with pytest.raises(TypeError, match="maps must be a Seq2SeqMaps"):
        seq2seq_data(maps.cross)
    with pytest.raises(TypeError, match="title must be a str"):
        report_html(maps, title=3)
    assert data["figures"] == [] and seq2seq_data(maps, figures=(f for f in "ab"))["figures"] == ["a", "b"]
    for bad in ("one line", ["a", 3]):
        with pytest.raises(TypeError, match="figures must be a sequence of str lines"):
            seq2seq_data(maps, figures=bad)


def test_generation_data_adds_the_last_token_and_needs_new_tokens_for_a_decoder():
    data = generation_data(toy_generation())
    assert data["tokens"][-1] == "9" and len(data["tokens"]) == 7 and data["prompt"] == 1
    assert data["source"] == ["the", "bank", XSS_SCRIPT, "</s>"]
    plain = toy_generation(cross=False)
    with pytest.raises(ValueError, match="new_tokens must be given"):
        generation_data(plain)
    with pytest.raises(ValueError, match="new_tokens must leave at least one token of prompt"):
        generation_data(plain, new_tokens=7)
    assert generation_data(plain, new_tokens=3)["prompt"] == 4 and generation_data(plain, new_tokens=3)["cross"] is None


# --- in a real browser ---

@pytest.fixture
def open_page(watched_page, tmp_path):
    def make(maps, ready, name="page", **kwargs):
        path = write_report(maps, tmp_path / f"{name}.html", **kwargs)
        watch = watched_page(allowed=(path.as_uri(),))
        watch.page.goto(path.as_uri())
        watch.page.evaluate(f"{ready}.ready")
        return watch

    return make


def test_seq2seq_page_draws_cross_attention_whose_values_are_the_maps(open_page):
    maps = toy_seq2seq()
    figures = [f"the head reads {XSS_IMG}", XSS_SCRIPT]
    watch = open_page(maps, "window.attnkitSeq2Seq", tolerance=0.0, figures=figures)
    page = watch.page
    cross = "attnkitSeq2Seq.parts.cross"
    # the findings above the picture are text, never markup
    assert page.eval_on_selector_all(".akx-figures li", "items => items.map((li) => li.textContent)") == figures
    page.evaluate(f"{cross}.set({{layer: 1, heads: [0, 2], tab: 'matrix'}})")
    want = maps.cross.attentions[0].double()[1, [0, 2]].mean(0)  # (T, S)
    for i in range(len(TARGET)):
        got = torch.tensor(page.evaluate(f"{cross}.aggregate({i})"), dtype=torch.float64)
        assert (got - want[i]).abs().max() <= QUANTUM
    # The alignment heatmap's cell (target 3, source 4) says its value on hover.
    box = page.locator('[data-part-pane="cross"] [data-view="matrix"]').bounding_box()
    origin = float(page.eval_on_selector('[data-part-pane="cross"] [data-view="matrix"]', "c => c.dataset.origin"))
    cell = (box["width"] - origin - 4) / len(SOURCE)
    page.mouse.move(box["x"] + origin + 4.5 * cell, box["y"] + origin + 3.5 * cell)
    tip = page.text_content('[data-part-pane="cross"] .akx-tip')
    assert tip.startswith("#3 du → #4 river")
    # the pixels say the same: in each target row, a clearly heavier cell is drawn darker
    from conftest import canvas_rgb

    rgb = canvas_rgb(page, '[data-part-pane="cross"] [data-view="matrix"]')
    ratio = rgb.shape[1] / box["width"]  # backing-store pixels per CSS pixel

    def ink(i, j):  # 255 - the mean of the cell's centre pixels: 0 for white
        y, x = int((origin + (i + 0.5) * cell) * ratio), int((origin + 4 + (j + 0.5) * cell) * ratio)
        return 255 - float(rgb[y - 1:y + 2, x - 1:x + 2].mean())

    pairs = [(i, j, k) for i in range(len(TARGET)) for j in range(len(SOURCE)) for k in range(len(SOURCE))
             if want[i, j] > want[i, k] + 0.05]
    assert len(pairs) > 20 and all(ink(i, j) > ink(i, k) + 5 for i, j, k in pairs)
    assert float(re.search(r"\n(\S+)", tip).group(1)) == pytest.approx(float(want[3, 4]), abs=6e-4)
    assert page.locator('[data-part-pane="cross"] [data-tab="matrix"]').text_content() == "Alignment"
    # The head view: target tokens on the left, source on the right.
    page.evaluate(f"{cross}.set({{tab: 'head', focus: 2}})")
    info = page.text_content('[data-part-pane="cross"] .akx-info')
    assert XSS_SCRIPT in info and XSS_IMG in info  # the query (a target token) and its keys, as text
    watch.shot("report-seq2seq-cross")
    # The encoder and decoder parts are explorers of their own maps.
    assert "reading the source tokens" in page.text_content('[data-role="part-shows"]')
    page.click('[data-part="decoder"]')
    assert page.is_visible('[data-part-pane="decoder"]') and not page.is_visible('[data-part-pane="cross"]')
    shows = page.text_content('[data-role="part-shows"]')  # the tab says what it shows: not cross-attention
    assert shows.startswith("The decoder's causal self-attention") and "not the source" in shows
    got = torch.tensor(page.evaluate("attnkitSeq2Seq.parts.decoder.row(0, 4)"), dtype=torch.float64)
    assert (got - maps.decoder.attentions[0].double()[0, 0, 4]).abs().max() <= QUANTUM
    got = torch.tensor(page.evaluate("attnkitSeq2Seq.parts.encoder.row(5, 1)"), dtype=torch.float64)
    assert (got - maps.encoder.attentions[0].double()[1, 2, 1]).abs().max() <= QUANTUM
    assert page.evaluate("window.__pwned") is None and page.locator("img").count() == 0
    watch.assert_clean()


def weights(page, selector):
    return {int(n.get_attribute("data-index")): float(n.get_attribute("data-weight"))
            for n in page.query_selector_all(f"{selector} [data-weight]")}


def test_generation_page_grows_and_shows_where_each_token_looked(open_page):
    gen = toy_generation()
    watch = open_page(gen, "window.attnkitGeneration", tolerance=0.0)
    page = watch.page
    assert page.locator('[data-view="text"] .akx-gtok').count() == 7
    page.click('[data-control="prev"]')
    page.click('[data-control="prev"]')
    assert page.locator('[data-view="text"] .akx-gtok').count() == 5
    page.click('[data-view="text"] [data-index="3"]')  # generated token 3 was produced reading token 2
    assert page.evaluate("attnkitGeneration.state()") == {"shown": 5, "token": 3, "layer": 1, "head": None}
    self_row = gen.decoder.attentions[0].double()[1].mean(0)[2]
    got = weights(page, '[data-view="text"]')
    assert sorted(got) == [0, 1, 2]  # every earlier token, nothing later
    assert max(abs(got[j] - float(self_row[j])) for j in got) <= QUANTUM
    cross_row = gen.cross.attentions[0].double()[1].mean(0)[2]
    got = weights(page, '[data-view="source"]')
    assert max(abs(got[j] - float(cross_row[j])) for j in range(4)) <= QUANTUM
    page.select_option('[data-control="head"]', "0")
    page.select_option('[data-control="layer"]', "0")
    got = weights(page, '[data-view="text"]')
    assert max(abs(got[j] - float(gen.decoder.attentions[0].double()[0, 0, 2, j])) for j in got) <= QUANTUM
    page.fill('[data-control="step"]', "7")
    assert page.locator('[data-view="text"] .akx-gtok').count() == 7
    assert page.evaluate("window.__pwned") is None and page.locator("img").count() == 0
    assert XSS_IMG in page.text_content('[data-view="text"]')
    watch.shot("report-generation")
    watch.assert_clean()


def test_generation_page_of_a_decoder_only_model(open_page):
    gen = toy_generation(cross=False)
    watch = open_page(gen, "window.attnkitGeneration", new_tokens=2)
    page = watch.page
    assert page.locator('[data-view="text"] .akx-prompt').count() == 5
    assert page.locator('[data-view="source"]').count() == 0
    page.evaluate("attnkitGeneration.set({token: 5})")
    got = weights(page, '[data-view="text"]')
    assert sorted(got) == [0, 1, 2, 3, 4]
    with pytest.raises(Exception, match="token must be null or a generated token index"):
        page.evaluate("attnkitGeneration.set({token: 2})")
    watch.assert_clean()


def test_alignment_png_draws_the_cross_maps_mean(tmp_path):
    pytest.importorskip("matplotlib")
    from attnkit.viz.png import save_alignment_png

    from conftest import assert_drawn, png_rgb

    maps = toy_seq2seq()
    path = save_alignment_png(maps, tmp_path / "align.png", layer=1, heads=[0, 2])
    assert_drawn(path)
    # One-hot maps: each target row is dark in exactly its own column, so the picture changes with them.
    hot = torch.zeros(2, 3, len(TARGET), len(SOURCE))
    hot[..., torch.arange(len(TARGET)), torch.arange(len(TARGET))] = 1.0
    one = AttentionMaps([hot], [TARGET], None, "toy", (0, 1), (0, 1, 2), key_tokens=[SOURCE])
    other = AttentionMaps([hot.flip(-1)], [TARGET], None, "toy", (0, 1), (0, 1, 2), key_tokens=[SOURCE])
    a, b = png_rgb(save_alignment_png(one, tmp_path / "a.png")), png_rgb(save_alignment_png(other, tmp_path / "b.png"))
    assert a.shape == b.shape and (a != b).any()
    with pytest.raises(ValueError, match="layers \\[7\\] were not captured"):
        save_alignment_png(maps, tmp_path / "c.png", layer=7)
