"""The explorer report (attnkit.viz.report, attnkit.viz.encode): the encoding against the
float64 truth, the report's numbers against attnkit.inspect, and the page in a real browser."""

from __future__ import annotations

import html
import json
import math

import pytest
import torch

from attnkit.inspect import AttentionMaps, head_roles, rollout
from attnkit.viz import report_data, report_html, write_report
from attnkit.viz.encode import QUANTUM, decode, encode
from attnkit.viz.report import iframe

XSS_IMG = "<img src=x onerror=window.__pwned=1>"
XSS_SCRIPT = "</script><script>window.__pwned=2</script>"


def probs(*shape, sharp=3.0, seed=0, causal=False):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(*shape, generator=g, dtype=torch.float64) * sharp
    if causal:
        scores = scores.masked_fill(~torch.ones(shape[-2:], dtype=torch.bool).tril(), -math.inf)
    return torch.softmax(scores, -1)


def toy_maps(n=9, layers=2, heads=3, tokens=None, seed=0):
    p = probs(layers, heads, n, n, seed=seed).float()
    tokens = tokens or [f"t{i}" for i in range(n)]
    ids = [hash(t) % 1000 for t in tokens]
    return AttentionMaps([p], [tokens], [ids], "toy", tuple(range(layers)), tuple(range(heads)))


# --- the encoding, against the float64 probabilities ---

@pytest.mark.parametrize("tol", [0.0, 0.001, 0.05])
def test_peaks_only_keep_all_but_tolerance_and_round_to_a_quantum(tol):
    p = probs(4, 37, 53, causal=True)
    enc = encode(p, tolerance=tol, plan=(None, 0))
    d = decode(enc.to_json()).double()
    kept = d > 0
    assert (d[kept] - p[kept]).abs().max() <= QUANTUM + 1e-9
    lost = (p * ~kept).sum(-1)  # mass of the left-out entries, per row
    assert lost.max() <= tol + 1e-9
    assert enc.dropped_max == pytest.approx(lost.amax(-1).tolist(), abs=1e-6)
    assert not kept[:, ~torch.ones(37, 53, dtype=torch.bool).tril()].any()  # masked stays 0
    # Every left-out entry is no larger than every kept one of its row.
    smallest_kept = p.masked_fill(~kept, math.inf).amin(-1)
    largest_out = p.masked_fill(kept, -math.inf).amax(-1)
    assert (largest_out <= smallest_kept).all()


@pytest.mark.parametrize("n", [5, 97, 300])
def test_exact_zeros_are_never_stored_even_with_zero_tolerance(n):
    p = probs(2, n, n, causal=True).float()  # float32 sums: the tail of a zero rounds to ~1e-17
    for plan in ((None, 0), (8, 4)):
        d = decode(encode(p, tolerance=0.0, plan=plan).to_json())
        if plan[1] == 0:
            assert not ((p == 0) & (d > 0)).any()
        else:  # zeros only get background, and only inside a block that holds nonzero keys
            assert (d[p == 0] <= encode(p, tolerance=0.0, plan=plan).blurred_max[0] + QUANTUM).all()


def test_auto_takes_the_exact_plan_whenever_it_fits():
    p = probs(6, 64, 64, sharp=1.0)
    exact = encode(p, plan=(None, 0))
    chosen = encode(p, max_bytes=len(exact.blob))
    assert (chosen.peaks, chosen.blocks) == (None, 0) and chosen.blob == exact.blob
    assert encode(p, max_bytes=len(exact.blob) - 1).blocks > 0


def test_auto_with_sampled_prediction_takes_the_exact_plan_when_it_fits():
    p = probs(4, 300, 300, sharp=3.0)  # long enough that plans are predicted from a sample
    exact = encode(p, plan=(None, 0))
    assert (encode(p, max_bytes=len(exact.blob)).peaks, encode(p, max_bytes=len(exact.blob)).blocks) == (None, 0)


def test_regular_maps_compress_past_any_fixed_ratio():
    sink = torch.zeros(40, 500, 500)
    sink[:, :, 0] = 1.0  # every query on the first token: deflate shrinks this hundreds of times
    enc = encode(sink, max_bytes=20_000)
    assert (enc.peaks, enc.blocks) == (None, 0) and len(enc.blob) <= 20_000
    assert torch.equal(decode(enc.to_json()), sink)


def test_bfloat16_rows_are_probabilities_too():
    p = probs(2, 200, 200, sharp=3.0).to(torch.bfloat16).float()  # rows round to 1 +- 0.004
    mass = p.sum(-1, dtype=torch.float64)
    assert mass.max() > 1.001
    enc = encode(p)
    assert (enc.peaks, enc.blocks) == (None, 0)  # small enough for the exact plan
    d = decode(enc.to_json()).double()
    assert d.shape == p.shape
    kept = d > 0
    assert (d[kept] - p.double()[kept]).abs().max() <= QUANTUM + 1e-9  # each kept value within a quantum
    lost = (p.double() * ~kept).sum(-1)  # what each row left out: at most the tolerance (0.001)
    assert lost.max() <= 0.001 + 1e-6  # float32 sums inside the encoder
    assert (d.sum(-1) - mass).abs().max() <= 0.001 + 200 * QUANTUM  # so each row keeps its own mass
    assert enc.dropped_max == pytest.approx(lost.amax(-1).tolist(), abs=1e-6)


@pytest.mark.parametrize("plan", [(1, 1), (4, 7), (16, 64), (3, 200)])
def test_background_keeps_every_rows_mass_and_bounds_each_value(plan):
    p = probs(3, 41, 97, sharp=1.5, seed=1)
    enc = encode(p, plan=plan)
    d = decode(enc.to_json()).double()
    assert enc.dropped_max == [0.0] * 3
    blocks = min(plan[1], 97)
    # Row sums: each stored value is rounded to half a quantum.
    slack = (plan[0] + blocks) * QUANTUM / 2 + 1e-9
    assert (d.sum(-1) - 1).abs().max() <= slack
    bound = torch.tensor(enc.blurred_max, dtype=torch.float64)[:, None, None]
    assert ((d - p).abs() <= bound + QUANTUM).all()
    # The bound is the largest value not among the peaks: check it from the truth.
    top = p.topk(plan[0] + 1, dim=-1).values
    assert enc.blurred_max == pytest.approx(top[..., plan[0]].amax(-1).tolist(), abs=1e-6)
    assert (top[..., : plan[0]] >= top[..., plan[0] :]).all()


def test_auto_plan_fits_the_budget_and_prefers_exact():
    p = probs(6, 64, 64, sharp=1.0)
    small = encode(p, max_bytes=10**7)
    assert (small.peaks, small.blocks) == (None, 0)
    tight = encode(p, max_bytes=15_000)
    assert len(tight.blob) <= 15_000 and tight.blocks > 0
    assert (decode(tight.to_json()).double().sum(-1) - 1).abs().max() < 0.01
    with pytest.raises(ValueError, match="max_bytes=100 is too small"):
        encode(p, max_bytes=100)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"matrices": torch.ones(2, 2)}, ValueError, r"matrices must be \(M, Lq, Lk\)"),
        ({"matrices": [torch.ones(2, 2), torch.ones(3, 3)]}, ValueError, "one shape"),
        ({"matrices": torch.full((1, 2, 2), -1.0)}, ValueError, "probabilities"),
        ({"matrices": torch.ones(1, 2, 2, dtype=torch.int64)}, TypeError, "floating-point"),
        ({"matrices": torch.full((1, 2, 2), 3.0)}, ValueError, "rows summing to at most 1; a row sums to 6"),
        ({"matrices": torch.full((1, 2, 2), 0.5), "progress": 3}, TypeError, "progress must be a callable"),
        ({"matrices": "abc"}, TypeError, "matrices must be"),
        ({"matrices": torch.zeros(1, 0, 2)}, ValueError, "at least one query"),
        ({"matrices": torch.full((1, 2, 2), 0.5), "tolerance": 1.0}, ValueError, r"tolerance must be in \[0, 1\)"),
        ({"matrices": torch.full((1, 2, 2), 0.5), "plan": "best"}, ValueError, "plan must be"),
        ({"matrices": torch.full((1, 2, 2), 0.5), "plan": (0, 1)}, ValueError, "peaks"),
        ({"matrices": torch.full((1, 2, 2), 0.5), "plan": [1, 1]}, TypeError, "plan must be"),
    ],
)
def test_encode_argument_errors(kwargs, error, match):
    matrices = kwargs.pop("matrices")
    with pytest.raises(error, match=match):
        encode(matrices, **kwargs)


# --- the report's data, against attnkit.inspect ---

def test_report_data_holds_the_maps_rollout_and_roles():
    maps = toy_maps(n=11)
    data = report_data(maps, focus=4)
    assert data["tokens"] == maps.tokens[0] and data["focus"] == 4 and data["rollout"] is True
    mats = decode(data["encoding"]).double()
    heads = maps.attentions[0].double().flatten(0, 1)
    kept = mats[:6] > 0
    assert (mats[:6][kept] - heads[kept]).abs().max() <= QUANTUM + 1e-7
    assert ((heads * ~kept).sum(-1) <= data["encoding"]["tolerance"] + 1e-7).all()
    every = torch.stack([rollout(AttentionMaps([maps.attentions[0][: n + 1]], maps.tokens, maps.token_ids, "toy",
                                               tuple(range(n + 1)), (0, 1, 2))) for n in range(2)])
    assert (mats[6:] - every).abs().max() <= data["encoding"]["tolerance"] + 1e-4
    roles = head_roles(maps)
    assert data["roles"]["names"] == list(roles.scores)
    for name, scores in roles.scores.items():
        got = torch.tensor([[math.nan if v is None else v for v in row] for row in data["roles"]["scores"][name]],
                           dtype=torch.float64)
        assert torch.allclose(got, scores, atol=1e-5, equal_nan=True)


def test_report_without_the_whole_model_has_no_rollout_and_says_why():
    maps = toy_maps().select(heads=[0, 2])
    data = report_data(maps)
    assert data["rollout"] is False and "every layer and head" in data["rollout_missing"]
    assert data["encoding"]["matrices"] == 4


def test_report_refuses_what_it_cannot_draw():
    lone = toy_maps(n=3, tokens=["a", "\ud800", "c"])
    with pytest.raises(ValueError, match=r"tokens\[0\]\[1\] is not valid text"):
        report_html(lone)
    with pytest.raises(TypeError, match="progress must be a callable"):
        report_html(toy_maps(), progress=1)
    with pytest.raises(TypeError, match="rollout must be a bool"):
        report_html(toy_maps(), rollout="no")
    with pytest.raises(TypeError, match="height must be an int"):
        iframe(toy_maps(), height="abc")


def test_precomputed_roles_are_used_and_checked():
    maps = toy_maps()
    assert report_data(maps, roles=head_roles(maps))["roles"] == report_data(maps)["roles"]
    with pytest.raises(ValueError, match="roles must be head_roles of these maps"):
        report_data(maps, roles=head_roles(maps.select(heads=[0, 1])))


def test_rollout_can_be_left_out_for_a_leading_subset_of_heads():
    data = report_data(toy_maps().select(heads=[0, 1]), rollout=False)
    assert data["rollout"] is False and "turned off" in data["rollout_missing"]
    assert data["encoding"]["matrices"] == 4


def test_report_argument_errors(tmp_path):
    maps = toy_maps()
    with pytest.raises(TypeError, match="maps must be an AttentionMaps"):
        report_html(torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match=r"input_index must be in \[0, 1\)"):
        report_html(maps, 1)
    with pytest.raises(ValueError, match=r"focus must be a query token index in \[0, 9\); got 9"):
        report_html(maps, focus=9)
    with pytest.raises(ValueError, match="must be a file"):
        write_report(maps, tmp_path)
    with pytest.raises(TypeError, match="path must be"):
        write_report(maps, 3)


def test_page_is_self_contained_and_tokens_are_never_markup():
    maps = toy_maps(n=4, tokens=[XSS_IMG, XSS_SCRIPT, "&amp;", "ok"])
    text = report_html(maps)
    assert "://" not in text  # no URL of any kind: nothing to fetch
    assert "<img" not in text and "<script>window" not in text
    assert text.count("</script>") == text.count("<script")
    csp = html.unescape(text.split('http-equiv="Content-Security-Policy" content="', 1)[1].split('"', 1)[0])
    assert "default-src 'none'" in csp and "connect-src 'none'" in csp
    data = json.loads(text.split('id="attnkit-data">', 1)[1].split("</script>", 1)[0])
    assert data["tokens"] == [XSS_IMG, XSS_SCRIPT, "&amp;", "ok"]


# --- in a real browser ---

@pytest.fixture
def open_report(watched_page, tmp_path):
    def make(maps, name="report", **kwargs):
        path = write_report(maps, tmp_path / f"{name}.html", **kwargs)
        watch = watched_page(allowed=(path.as_uri(),))
        watch.page.goto(path.as_uri())
        watch.page.evaluate("window.attnkitExplorer.ready")
        return watch

    return make


def pixels(page, selector):
    return page.eval_on_selector(selector, "c => c.toDataURL()")


def test_report_loads_clean_and_its_numbers_are_the_encodings(open_report):
    maps = toy_maps(n=23, heads=4)
    watch = open_report(maps)
    page = watch.page
    data = report_data(maps)
    expected = decode(data["encoding"])
    for m in (0, 5, 7, 9):
        for i in (0, 11, 22):
            got = torch.tensor(page.evaluate(f"attnkitExplorer.row({m}, {i})"))
            assert torch.allclose(got, expected[m, i], atol=1e-6)
    # The aggregate of the selected heads is their mean.
    page.evaluate("attnkitExplorer.set({layer: 1, heads: [0, 3]})")
    got = torch.tensor(page.evaluate("attnkitExplorer.aggregate(5)"))
    assert torch.allclose(got, (expected[4, 5] + expected[7, 5]) / 2, atol=1e-6)
    page.evaluate("attnkitExplorer.set({mode: 'rollout'})")
    got = torch.tensor(page.evaluate("attnkitExplorer.aggregate(5)"))
    assert torch.allclose(got, expected[2 * 4 + 1, 5], atol=1e-6)
    note = page.text_content('[data-role="encoding"]')
    assert "left out" in note and "1/65535" in note
    watch.shot("report-head-view")
    watch.assert_clean()


def test_background_rows_decode_the_same_in_the_page(open_report):
    maps = toy_maps(n=150, layers=1, heads=2)
    watch = open_report(maps, plan=(4, 16))
    data = report_data(maps, plan=(4, 16))
    expected = decode(data["encoding"])
    for m, i in ((0, 0), (1, 77), (2, 149)):
        got = torch.tensor(watch.page.evaluate(f"attnkitExplorer.row({m}, {i})"))
        assert torch.allclose(got, expected[m, i], atol=1e-6)
    assert "blocks of 10 keys" in watch.page.text_content('[data-role="encoding"]')
    watch.assert_clean()


def test_controls_change_what_is_drawn(open_report):
    maps = toy_maps(n=12, heads=3)
    watch = open_report(maps)
    page = watch.page
    before = pixels(page, '[data-view="head"]')
    page.select_option('[data-control="layer"]', "0")
    after_layer = pixels(page, '[data-view="head"]')
    assert after_layer != before
    page.click('.akx-chip[data-head="1"]')  # toggle a head off
    assert page.evaluate("attnkitExplorer.state().heads") == [0, 2]
    assert pixels(page, '[data-view="head"]') != after_layer
    hovered = pixels(page, '[data-view="head"]')
    box = page.locator('[data-view="head"]').bounding_box()
    page.mouse.move(box["x"] + 150, box["y"] + 10 + 20 * 3.5)  # over query token 3
    assert pixels(page, '[data-view="head"]') != hovered
    assert "t3" in page.text_content(".akx-info")
    page.mouse.click(box["x"] + 150, box["y"] + 10 + 20 * 3.5)
    assert page.evaluate("attnkitExplorer.state().focus") == 3
    thr = pixels(page, '[data-view="head"]')
    page.eval_on_selector('[data-control="threshold"]',
                          "el => { el.value = '0.4'; el.dispatchEvent(new Event('input', {bubbles: true})); }")
    assert page.evaluate("attnkitExplorer.state().threshold") == 0.4
    assert pixels(page, '[data-view="head"]') != thr
    # Model view: a thumbnail per head plus rollout; a click opens that head in the matrix.
    page.click('[data-tab="model"]')
    page.wait_for_selector('.akx-grid[data-done="1"]')
    assert page.locator(".akx-thumb").count() == 2 * 3 + 2
    page.click('.akx-thumb[data-layer="1"][data-head="2"]')
    state = page.evaluate("attnkitExplorer.state()")
    assert (state["tab"], state["layer"], state["heads"], state["mode"]) == ("matrix", 1, [2], "heads")
    watch.shot("report-model-view")
    # Matrix: hover shows the value of that cell.
    page.eval_on_selector('[data-control="threshold"]',
                          "el => { el.value = '0'; el.dispatchEvent(new Event('input', {bubbles: true})); }")
    origin = float(page.eval_on_selector('[data-view="matrix"]', "c => c.dataset.origin"))
    box = page.locator('[data-view="matrix"]').bounding_box()
    cell = (box["width"] - origin - 4) / 12
    page.mouse.move(box["x"] + origin + cell * 5.5, box["y"] + origin + cell * 2.5)
    tip = page.text_content(".akx-tip")
    value = float(maps.attentions[0][1, 2, 2, 5])
    assert tip.startswith("#2 t2 → #5 t5") and abs(float(tip.split("\n")[1].split()[0]) - value) < 1e-3
    watch.shot("report-matrix")
    page.click('[data-tab="roles"]')
    rows = page.locator(".akx-table tbody tr")
    assert rows.count() == 6
    page.click('.akx-table tbody tr[data-layer="0"][data-head="1"]')
    assert page.evaluate("attnkitExplorer.state().heads") == [1]
    watch.assert_clean()


def test_tokens_show_as_text_and_nothing_executes(open_report):
    tokens = [XSS_IMG, XSS_SCRIPT, "plain", "<b>bold</b>"]
    watch = open_report(toy_maps(n=4, tokens=tokens), focus=0)
    page = watch.page
    assert page.evaluate("window.__pwned") is None
    assert page.locator("img").count() == 0 and page.locator("b:text('bold')").count() == 0
    info = page.text_content(".akx-info")
    assert XSS_IMG in info  # the focused query, as text
    page.evaluate("attnkitExplorer.set({focus: 1})")
    assert XSS_SCRIPT in page.text_content(".akx-info")
    page.fill('[data-control="find"]', "<b>bold</b>")
    page.press('[data-control="find"]', "Enter")
    assert page.evaluate("attnkitExplorer.state().focus") == 3
    assert page.evaluate("window.__pwned") is None
    watch.assert_clean()


def test_a_subset_of_heads_is_drawn_and_named_by_the_models_indices(open_report):
    maps = toy_maps(n=7, layers=3, heads=4).select(layers=[1, 2], heads=[1, 3])
    watch = open_report(maps, name="subset")
    page = watch.page
    assert page.locator(".akx-chip").count() == 2
    assert page.evaluate("attnkitExplorer.state()")["heads"] == [1, 3]
    page.evaluate("attnkitExplorer.set({layer: 2, heads: [3]})")
    expected = maps.attentions[0][1, 1, 4]  # layer 2 is the second held, head 3 the second held
    got = torch.tensor(page.evaluate("attnkitExplorer.aggregate(4)"))
    assert torch.allclose(got, expected, atol=1e-3 + 2e-5)  # left out: at most 0.1% of the row
    assert "layer 2, head 3" in page.text_content(".akx-info")
    with pytest.raises(Exception, match="head must be one of 1, 3; got 0"):
        page.evaluate("attnkitExplorer.set({heads: [0]})")
    with pytest.raises(Exception, match="no rollout"):
        page.evaluate("attnkitExplorer.set({mode: 'rollout'})")
    with pytest.raises(Exception, match="focus must be null or a token index"):
        page.evaluate("attnkitExplorer.set({layer: 1, focus: 99})")
    assert page.evaluate("attnkitExplorer.state().layer") == 2  # a refused set changes nothing
    page.evaluate("attnkitExplorer.set({heads: [1, 3]})")
    assert "mean of heads 1, 3" in page.text_content(".akx-info")
    assert not page.locator('option[value="rollout"]').is_enabled()
    watch.assert_clean()


def test_long_input_is_windowed(open_report):
    n = 1200
    g = torch.Generator().manual_seed(0)
    # Local attention plus a few long-range peaks, as real heads have.
    scores = -((torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs().float() / 8) + torch.randn(
        2, 2, n, n, generator=g)
    maps = AttentionMaps([torch.softmax(scores, -1)], [[f"w{i}" for i in range(n)]], None, "toy", (0, 1), (0, 1))
    watch = open_report(maps, name="long", focus=700)
    page = watch.page
    opened = page.evaluate("attnkitExplorer.state()")  # the page opens with the windows on the focus
    assert opened["focus"] == 700 and opened["window"] <= 700 < opened["window"] + 48
    assert opened["detail"][0] <= 700 < opened["detail"][0] + 64
    assert page.locator('[data-control="window"]').count() == 1
    before = pixels(page, '[data-view="head"]')
    page.evaluate("attnkitExplorer.set({focus: 900})")
    state = page.evaluate("attnkitExplorer.state()")
    assert state["window"] <= 900 < state["window"] + 48
    assert pixels(page, '[data-view="head"]') != before
    page.click('[data-tab="matrix"]')
    assert page.locator('[data-view="overview"]').count() == 1
    assert state["detail"][0] <= 900 < state["detail"][0] + 64
    watch.shot("report-long-matrix")
    watch.assert_clean()


def test_notebook_output_explains_what_it_cannot_show():
    lone = toy_maps(n=3, tokens=["a", "\ud800", "c"])
    assert "Cannot show these maps" in lone._repr_html_() and "not valid text" in lone._repr_html_()


def test_notebook_iframe_runs_the_same_explorer(watched_page):
    maps = toy_maps(n=5, tokens=["a", XSS_IMG, "c", "d", "e"])
    assert maps._repr_html_().startswith("<iframe srcdoc=")
    watch = watched_page()
    watch.page.set_content(iframe(maps, height=700))
    frame = watch.page.frames[1]
    frame.wait_for_function("window.attnkitExplorer && document.querySelector('[data-view=head]')")
    assert frame.evaluate("attnkitExplorer.state().layer") == 1
    assert watch.page.evaluate("window.__pwned") is None and frame.evaluate("window.__pwned") is None
    watch.assert_clean()


def test_report_opens_on_the_chosen_view_with_distinct_head_colours(open_report):
    maps = AttentionMaps([probs(3, 12, 6, 6, seed=1).float()], [[f"t{i}" for i in range(6)]], None, "toy",
                         (4, 5, 6), tuple(range(12)))
    watch = open_report(maps, view=(5, [11]), title="A title as typed")
    page = watch.page
    state = page.evaluate("attnkitExplorer.state()")
    assert state["layer"] == 5 and state["heads"] == [11]
    assert page.text_content(".akx-title") == "A title as typed"
    colours = page.eval_on_selector_all(".akx-chip", "cs => cs.map(c => getComputedStyle(c).borderColor)")
    rgb = [tuple(int(x) for x in c[c.index("(") + 1 : c.index(")")].split(",")[:3]) for c in colours]
    gaps = [sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5 for n, a in enumerate(rgb) for b in rgb[n + 1 :]]
    assert len(rgb) == 12 and min(gaps) >= 60, f"two head colours are only {min(gaps):.0f} apart in RGB"
    watch.assert_clean()
    with pytest.raises(ValueError, match="view's layer must be one of"):
        report_html(maps, view=(0, [1]))
    with pytest.raises(ValueError, match="view's heads must be"):
        report_html(maps, view=(5, [12]))
    with pytest.raises(TypeError, match="view must be a"):
        report_html(maps, view=[5, 11])
