"""The explorer page's layout and labels in a real browser (issue 26, section 6): the model view fits
1280 px with its rollout column, the matrix names its axes and thins its column labels, the head view
has a legend for its colours, and the page says why it opened on a head."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from attnkit.inspect import AttentionMaps
from attnkit.viz import write_report


def maps_of(n, layers=6, heads=12, seed=0):
    """Random (layers, heads, n, n) softmax maps with MiniLM's shape and tokens w0..w{n-1}."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(layers, heads, n, n, generator=g) * 3, -1)
    return AttentionMaps([p], [[f"w{i}" for i in range(n)]], None, "toy", tuple(range(layers)), tuple(range(heads)))


@pytest.fixture
def open_at(watched_page, tmp_path):
    def make(maps, width=1280, height=800, **kwargs):
        path = write_report(maps, tmp_path / "r.html", **kwargs)
        watch = watched_page(allowed=(path.as_uri(),), width=width, height=height)
        watch.page.goto(path.as_uri())
        watch.page.evaluate("window.attnkitExplorer.ready")
        return watch

    return make


def test_model_view_shows_the_rollout_column_at_1280_without_scrolling(open_at):
    watch = open_at(maps_of(12))
    page = watch.page
    page.evaluate("attnkitExplorer.set({tab: 'model'})")
    page.wait_for_selector('.akx-grid[data-done="1"]')
    main = page.locator(".akx-main").bounding_box()
    thumbs = page.locator("canvas.akx-thumb")
    assert thumbs.count() == 6 * 13
    for layer in range(6):
        box = page.locator(f'canvas.akx-thumb[data-layer="{layer}"][data-head="rollout"]').bounding_box()
        assert box["x"] >= main["x"] and box["x"] + box["width"] <= main["x"] + main["width"] + 0.5, (box, main)
    assert page.evaluate("(() => { const m = document.querySelector('.akx-main'); "
                         "return m.scrollWidth <= m.clientWidth; })()")
    # Nothing on the page sticks out past the viewport's right edge.
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    watch.assert_clean()


def test_matrix_names_its_axes(open_at):
    watch = open_at(maps_of(12, layers=1, heads=2))
    page = watch.page
    page.evaluate("attnkitExplorer.set({tab: 'matrix'})")
    assert page.text_content('[data-role="axes"]') == "rows: queries ↓ · columns: keys →"
    # The titles are drawn on the canvas too: its top-left corner, empty without them, holds ink.
    from conftest import canvas_rgb

    rgb = canvas_rgb(page, '[data-view="matrix"]')
    ratio = rgb.shape[1] / page.eval_on_selector('[data-view="matrix"]', "c => c.getBoundingClientRect().width")
    corner = rgb[: int(16 * ratio), : int(120 * ratio)]  # where "key →" begins, above the column labels
    assert (corner.min(-1) < 128).any()
    watch.assert_clean()


@pytest.mark.parametrize("n", [12, 421])
def test_matrix_column_labels_never_overlap(open_at, n):
    watch = open_at(maps_of(n, layers=1, heads=1))
    page = watch.page
    page.evaluate("attnkitExplorer.set({tab: 'matrix'})")
    mx = '[data-view="matrix"]'
    shown = page.eval_on_selector(mx, "c => JSON.parse(c.dataset.columnLabels)")
    cell = page.eval_on_selector(mx, "c => +c.dataset.cell")
    assert shown, "labels drawn"
    # Rotated 60 degrees, a label of font f needs f / sin(60) of width: the spacing between drawn labels.
    font = min(12, cell)
    gaps = {b - a for a, b in itertools.pairwise(shown)}
    assert len(gaps) <= 1 and min(gaps | {math.inf}) * cell >= font / math.sin(math.pi / 3)
    if n == 12:
        assert shown == list(range(12))  # room for every label: none left out
    else:
        assert len(shown) < 64  # the 64-key detail window, thinned
    watch.assert_clean()


def test_head_view_legend_names_each_colour(open_at):
    watch = open_at(maps_of(12, layers=2, heads=4))
    page = watch.page
    page.evaluate("attnkitExplorer.set({tab: 'head', layer: 1, heads: [0, 3]})")
    keys = page.locator('[data-role="head-legend"] .akx-hkey')
    assert keys.count() == 2 and keys.all_text_contents() == ["head 0", "head 3"]
    for n, head in enumerate((0, 3)):  # each swatch has its chip's colour
        chip = page.eval_on_selector(f'.akx-chip[data-head="{head}"]', "c => getComputedStyle(c).borderTopColor")
        swatch = keys.nth(n).locator(".akx-swatch").evaluate("s => getComputedStyle(s).backgroundColor")
        assert swatch == chip
    assert "opacity is its weight" in page.text_content('[data-role="head-legend"]')
    page.evaluate("attnkitExplorer.set({heads: [2]})")
    assert keys.all_text_contents() == ["head 2"]
    page.evaluate("attnkitExplorer.set({mode: 'rollout'})")
    assert keys.all_text_contents() == ["rollout up to layer 1"]
    watch.assert_clean()


def test_the_page_opens_on_the_given_head_and_says_why(open_at):
    why = "Opened on layer 1 head 2, query 'w4': <b>not markup</b>"
    watch = open_at(maps_of(12, layers=2, heads=4), focus=4, view=(1, [2]), view_reason=why)
    page = watch.page
    assert page.evaluate("attnkitExplorer.state()")["layer"] == 1
    assert page.evaluate("attnkitExplorer.state()")["heads"] == [2]
    assert page.evaluate("attnkitExplorer.state()")["focus"] == 4
    assert page.text_content('[data-role="why"]') == why and page.locator('[data-role="why"] b').count() == 0
    watch.assert_clean()
    with pytest.raises(TypeError, match="view_reason must be a str"):
        write_report(maps_of(4, 1, 1), "unused.html", view_reason=3)


def test_role_cards_say_what_they_rest_on_and_thin_evidence_shows_no_number(open_at):
    maps = maps_of(8, layers=1, heads=2)
    maps = AttentionMaps(maps.attentions, maps.tokens, [[5, 6, 7, 5, 8, 9, 10, 11]], "toy", (0,), (0, 1))
    watch = open_at(maps)
    page = watch.page
    page.evaluate("attnkitExplorer.set({tab: 'roles'})")
    assert page.text_content('[data-role-card="first_token"] [data-role="evidence"]') == "scored on 8 query rows"
    # One repeated token: induction's card, among the others at the top, gives the reason and no number.
    card = page.locator('[data-role-card="induction"]')
    assert card.get_attribute("data-skipped") == "1" and card.locator("button").count() == 0
    assert card.locator('[data-role="not-scored"]').text_content().startswith(
        "not scored: not enough evidence: 1 repeated token")
    assert card.bounding_box()["y"] < page.locator('[data-pane="roles"] table').bounding_box()["y"]
    watch.assert_clean()
