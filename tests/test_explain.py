"""`attnkit explain` on the bundled MiniLM, its pieces, and the PNG heatmaps."""

from __future__ import annotations

import json

import pytest
import torch

from attnkit import cli, models
from attnkit.inspect import AttentionMaps, capture, rollout
from attnkit.viz import explain, find_tokens, save_pngs, summarize
from attnkit.viz.encode import decode
from attnkit.viz.explainer import SpecificHead, special_positions, specific_heads, uniform_score

from conftest import assert_drawn, png_rgb

SEED = "The cat sat on the mat because it was tired."


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    return models.load("minilm")


def test_explain_captures_what_capture_does(minilm):
    maps = explain(SEED, minilm)
    direct = capture(minilm[0], SEED, tokenizer=minilm[1])
    assert maps.tokens == direct.tokens
    assert torch.equal(maps.attentions[0], direct.attentions[0])
    with pytest.raises(ValueError, match="text must hold"):
        explain("   ", minilm)
    with pytest.raises(TypeError, match="text must be a str"):
        explain(b"bytes", minilm)


def test_summary_lists_the_heaviest_keys_without_special_tokens(minilm):
    maps = explain(SEED, minilm)
    tokens = maps.tokens[0]
    it = find_tokens(tokens, "it")
    assert it == [tokens.index("it")]
    summary = summarize(maps, tokens=it, k=3)
    assert summary.skipped_keys == [0, len(tokens) - 1]
    # Independent: layer 5's mean over heads, row "it", specials removed, three largest.
    row = maps.attentions[0][5, :, it[0]].double().mean(0)
    row[[0, len(tokens) - 1]] = -1
    expected = [tokens[j] for j in row.topk(3).indices.tolist()]
    assert [key for _, key, _ in summary.rows[0][2][5]] == expected
    # The heads are ranked by specificity: weight from "it" minus the key's column mean, over keys more than
    # 2 tokens away and not special; computed here by loops over every head, key and query row.
    attn, i = maps.attentions[0].double(), it[0]
    n = len(tokens)
    best = []
    for layer in range(6):
        for head in range(12):
            a = attn[layer, head]
            diffs = [(float(a[i, j]) - sum(float(a[q, j]) for q in range(n)) / n, j)
                     for j in range(n) if abs(i - j) > 2 and j not in (0, n - 1)]
            best.append((*max(diffs), layer, head))
    best.sort(reverse=True)
    assert [(h.layer, h.head, h.key) for h in summary.heads] == [(lay, hd, j) for _, j, lay, hd in best[:5]]
    for h, (diff, *_) in zip(summary.heads, best):
        assert h.difference == pytest.approx(diff, abs=1e-5) and h.query == i
    assert (summary.heads[0].layer, summary.heads[0].head, tokens[summary.heads[0].key]) == (3, 1, "cat")


def test_find_tokens_and_specials():
    assert find_tokens(["[CLS]", "the", "Ġcat", "▁sat", "##s"], "CAT") == [2]
    assert find_tokens(["a", "b"], "#1") == [1]
    with pytest.raises(ValueError, match="out of range"):
        find_tokens(["a"], "#3")
    with pytest.raises(TypeError, match="query must be a str"):
        find_tokens(["a"], 3)
    # attnkit.inspect.tokens' documented rule: ``[NAME]`` or ``<name>`` with no space inside.
    tokens = ["<s>", "hi", "</s>", "<|endoftext|>", "[PAD]", "[x]", "< b >", "[two words]", "a<b"]
    assert special_positions(tokens) == [0, 2, 3, 4, 5]
    # The tokenizer's flags, when given, decide alone: "</s>" spelled special but flagged not.
    assert special_positions(["<s>", "hi", "</s>"], [True, False, False]) == [0]
    with pytest.raises(ValueError, match="one flag per token"):
        special_positions(["<s>", "hi"], [True])


def test_summary_skips_the_keys_the_maps_flag_special_over_their_spelling():
    # 4 tokens, uniform causal rows: every visible key gets weight, so only skipping removes one from the lists.
    p = torch.ones(4, 4).tril()
    p = (p / p.sum(-1, keepdim=True))[None, None]  # (1 layer, 1 head, 4, 4)
    tokens = [["<s>", "cat", "[MASK]", "</s>"]]
    by_spelling = AttentionMaps([p], tokens, None, "toy", (0,), (0,))
    assert summarize(by_spelling, k=4).skipped_keys == [0, 2, 3]
    flagged = AttentionMaps([p], tokens, None, "toy", (0,), (0,), special=[[True, False, False, False]])
    summary = summarize(flagged, tokens=[3], k=4)
    assert summary.skipped_keys == [0]
    # Row "</s>" lists every key but <s>, weights 1/4 each, in key order (ties kept stable).
    assert summary.rows[0][2][0] == [(1, "cat", 0.25), (2, "[MASK]", 0.25), (3, "</s>", 0.25)]


@pytest.mark.slow  # eight MiniLM figures take 20-60 s on 2 cores; test_save_pngs_files_and_errors stays by default
def test_cli_explain_png_writes_every_layer_mean_and_rollout(minilm, tmp_path):
    pngs = tmp_path / "png"
    assert cli.main(["explain", SEED, "--out", "", "--png", str(pngs), "--no-cost"]) == 0
    names = sorted(p.name for p in pngs.iterdir())
    assert names == sorted([f"layer{i}.png" for i in range(6)] + ["mean.png", "rollout.png"])
    for n in names:
        assert_drawn(pngs / n)


def test_cli_explain_writes_the_report(minilm, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert cli.main(["explain", SEED, "--out", str(out), "--token", "it", "--top", "2", "--no-cost"]) == 0
    printed = capsys.readouterr().out
    assert "8:it" in printed and "2:cat" in printed
    assert "layer 5" in printed and "previous_token" in printed and "induction" in printed
    assert "L3.H1" in printed  # the most specific head from "it" (it -> cat, 0.49 against a column mean of 0.16)
    text = out.read_text(encoding="utf-8")
    data = json.loads(text.split('id="attnkit-data">', 1)[1].split("</script>", 1)[0])
    assert data["focus"] == data["tokens"].index("it")
    assert data["title"] == SEED  # as typed, not rebuilt from lowercased wordpieces
    # It opens on the most specific head (test_summary_lists_the_heaviest_keys_without_special_tokens checks the
    # ranking by loops), and says why, on the page and in the terminal.
    assert data["view"] == {"layer": 3, "heads": [1]}
    assert data["view_reason"].startswith("Opened on layer 3 head 1, query 'it'")
    assert "column mean of 0.16" in data["view_reason"]
    assert " ".join(data["view_reason"].split()) in " ".join(printed.split())
    # Layer 5 head 11, the heaviest, is a column head: most of its queries put half their weight or more on "cat".
    a = capture(minilm[0], SEED, tokenizer=minilm[1]).attentions[0][5, 11]
    assert sum(float(row.max()) >= 0.5 and data["tokens"][int(row.argmax())] == "cat" for row in a) > len(a) / 2
    assert decode(data["encoding"]).shape == (6 * 12 + 6, 13, 13)


def test_cli_explain_heads_subset_has_no_rollout(minilm, tmp_path):
    out, pngs = tmp_path / "r.html", tmp_path / "png"
    assert cli.main(["explain", SEED, "--out", str(out), "--png", str(pngs), "--heads", "0,1", "--layers", "4,5",
                     "--top", "1", "--no-cost"]) == 0
    data = json.loads(out.read_text(encoding="utf-8").split('id="attnkit-data">', 1)[1].split("</script>", 1)[0])
    assert data["rollout"] is False and data["heads"] == [0, 1] and data["layers"] == [4, 5]
    assert sorted(p.name for p in pngs.iterdir()) == ["layer4.png", "layer5.png", "mean.png"]
    # Every head named explicitly is the whole model again: rollout comes back.
    every = ",".join(map(str, range(12)))
    assert cli.main(["explain", SEED, "--out", str(out), "--heads", every, "--top", "1", "--no-cost"]) == 0
    data = json.loads(out.read_text(encoding="utf-8").split('id="attnkit-data">', 1)[1].split("</script>", 1)[0])
    assert data["rollout"] is True


def test_cli_prints_bracketed_tokens_as_text():
    from rich.console import Console

    from attnkit.cli._common import Console as CliConsole

    con = CliConsole()
    con._rich = Console(record=True, width=100)
    con.rule("[/ model [red]x")
    con.print("[bold]y")
    con.table("title [/", ("token", "layer 0"), [("1 [/", "[red]x .50\n] .20")])
    text = con._rich.export_text()
    assert "[/ model [red]x" in text and "[bold]y" in text and "[red]x .50" in text and "1 [/" in text


def test_cli_explain_fits_80_columns_and_prints_entries_whole(minilm, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    assert cli.main(["explain", SEED, "--out", "", "--token", "it", "--token", "#2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 80, [line for line in lines if len(line) > 80]
    summary = summarize(explain(SEED, minilm), tokens=[8, 2])
    cells = [cell for line in lines for cell in line.split("  ") if cell.strip()]
    for _, _, per_layer in summary.rows:  # every "key weight" entry on one line, its number whole
        for tops in per_layer:
            for _, key, w in tops:
                assert f"{key} {w:.2f}".replace(" 0.", " .") in [c.strip() for c in cells], (key, w)
    assert [line.split(" (")[0] for line in lines if line.startswith("[")][-1] == "[6/6] capturing attention"


def test_summarize_argument_errors(minilm):
    maps = explain(SEED, minilm)
    with pytest.raises(ValueError, match=r"input_index must be in \[0, 1\)"):
        summarize(maps, 5)
    with pytest.raises(TypeError, match=r"tokens\[0\] must be an int"):
        summarize(maps, tokens=[1.5])
    with pytest.raises(TypeError, match="tokens must be a sequence"):
        summarize(maps, tokens=3)
    with pytest.raises(ValueError, match=r"positions in \[0, 13\)"):
        summarize(maps, tokens=[20])
    assert summarize(maps, tokens=torch.tensor([8])).rows == summarize(maps, tokens=[8]).rows


def test_cli_errors_before_any_work(tmp_path, capsys):
    assert cli.main(["explain", SEED, "--out", str(tmp_path / "missing" / "r.html")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["lab", "--out", str(tmp_path)]) == 1
    assert "attnkit lab: error: path must be a file to write, not a folder" in capsys.readouterr().err
    assert cli.main(["serve", "--port", "70000"]) == 1
    assert "attnkit serve: error: port" in capsys.readouterr().err
    assert cli.main(["serve", "--host", "", "--port", "0"]) == 1
    assert "host" in capsys.readouterr().err


def test_cli_explain_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["explain", SEED, "--top", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: attnkit explain ") and "--top: invalid int value: 'x'" in err
    with pytest.raises(SystemExit) as exc:
        cli.main(["explain"])
    assert exc.value.code == 2 and "the following arguments are required: text" in capsys.readouterr().err


def test_cli_explain_failures_exit_1(minilm, capsys):
    assert cli.main(["explain", "  ", "--out", ""]) == 1
    assert "attnkit explain: error: text must hold at least one non-blank character" in capsys.readouterr().err
    assert cli.main(["explain", SEED, "--out", "", "--top", "0"]) == 1
    assert "attnkit explain: error: k must be >= 1; got 0" in capsys.readouterr().err


def test_cli_explain_unknown_token(minilm, capsys):
    assert cli.main(["explain", SEED, "--out", "", "--token", "dog"]) == 1
    err = capsys.readouterr().err
    assert "attnkit explain: error: --token 'dog' matches no token" in err and "Traceback" not in err


def test_cli_lab_writes_the_page(tmp_path, capsys):
    path = tmp_path / "lab.html"
    assert cli.main(["lab", "--out", str(path)]) == 0
    assert "AttnkitLab" in path.read_text(encoding="utf-8") and "wrote" in capsys.readouterr().out
    assert cli.main(["lab", "--out", str(path), "--tokens", "the bank of the river", "--head-dim", "3"]) == 0
    assert '"tokens": ["the", "bank", "of", "the", "river"], "head_dim": 3' in path.read_text(encoding="utf-8")
    assert cli.main(["lab", "--out", str(path), "--head-dim", "9"]) == 1
    assert "head_dim must be between 2 and 8; got 9" in capsys.readouterr().err


def test_save_pngs_files_and_errors(tmp_path):
    pytest.importorskip("matplotlib")
    p = torch.softmax(torch.randn(2, 3, 5, 5), -1)
    maps = AttentionMaps([p], [list("abcde")], None, "toy", (0, 1), (0, 1, 2))
    paths = save_pngs(maps, tmp_path / "figs")
    assert [x.name for x in paths] == ["layer0.png", "layer1.png", "mean.png", "rollout.png"]
    for x in paths:
        assert_drawn(x)
    assert [x.name for x in save_pngs(maps.select(heads=[1, 2]), tmp_path / "sub")] == ["layer0.png", "layer1.png",
                                                                                     "mean.png"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="must be a folder"):
        save_pngs(maps, tmp_path / "file")


def test_rollout_every_layer_and_float32():
    p = torch.softmax(torch.randn(3, 2, 6, 6, dtype=torch.float64), -1)
    steps = rollout(p, every_layer=True)
    assert steps.shape == (3, 6, 6)
    assert torch.allclose(steps[-1], rollout(p))
    assert torch.allclose(steps[0], rollout(p[:1]))
    assert torch.allclose(rollout(p, dtype=torch.float32).double(), rollout(p), atol=1e-6)
    with pytest.raises(TypeError, match="dtype must be"):
        rollout(p, dtype=torch.float16)


def test_png_cell_colour_follows_its_value(tmp_path):
    """Two maps that differ only in cells (2, 0) and (2, 2), where they swap 0.2 and 0.5:
    the pixels that differ are those two cells, and each shows the colour of its value on
    the 0..1 colour scale."""
    import numpy as np
    from matplotlib import colormaps

    a = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    b = a.clone()
    b[2] = torch.tensor([0.5, 0.3, 0.2])
    images = []
    for name, p in (("a", a), ("b", b)):
        maps = AttentionMaps([p[None, None]], [["x", "y", "z"]], None, "toy", (0,), (0,))
        images.append(png_rgb(save_pngs(maps, tmp_path / name, rollout=False)[0]))
    assert images[0].shape == images[1].shape
    changed = (images[0] != images[1]).any(-1)
    xs = np.nonzero(changed)[1]
    assert len(xs) > 100  # two cells' worth of pixels, not an edge
    mid = (xs.min() + xs.max()) / 2
    left, right = changed & (np.arange(changed.shape[1]) < mid), changed & (np.arange(changed.shape[1]) > mid)
    colour = {v: np.array(colormaps["magma_r"](v)[:3]) * 255 for v in (0.2, 0.5)}
    for image, (lv, rv) in zip(images, ((0.2, 0.5), (0.5, 0.2))):
        assert np.abs(np.median(image[left], 0) - colour[lv]).max() <= 3
        assert np.abs(np.median(image[right], 0) - colour[rv]).max() <= 3


def test_cli_explain_help_reads_right(capsys):
    with pytest.raises(SystemExit):
        cli.main(["explain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: True)" not in text and "(default: False)" not in text
    assert "--no-cost leave out the report's cost section (by default the report has one" in text


def test_cli_explain_induction_without_evidence_and_its_probe(minilm, capsys):
    assert cli.main(["explain", SEED, "--out", "", "--probe", "induction", "--no-cost"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    # The seed's one repeated token ("the") is too little to score induction on; the probe has 40.
    assert "skipped induction: not enough evidence: 1 repeated token, at least 5 needed" in printed
    assert "induction on its standard probe: repeated random tokens, 82 tokens, scored on 40 repeated tokens" in printed
    # MiniLM sees every key: even weight puts 1/82 on each query's one induction target.
    assert (f"(x even: the score against {1 / 82:.3f}, what a head that spread each query's weight evenly over the "
            "keys it sees would score on the same tokens)") in printed


def test_probe_is_the_repeated_random_sequence(minilm):
    from attnkit.viz.explainer import probe

    maps, roles = probe("induction", minilm, length=12, seed=3)
    ids = list(maps.token_ids[0])
    body = ids[1:-1]
    assert len(body) == 24 and body[:12] == body[12:] and len(set(body[:12])) == 12
    assert maps.tokens[0][0] == "[CLS]" and maps.tokens[0][-1] == "[SEP]"
    assert all(t.isalpha() for t in maps.tokens[0][1:-1])
    assert roles.evidence["induction"] == 12 and "induction" in roles.scores
    plain, _ = probe("previous_token", minilm, length=12, seed=3)
    assert len(set(list(plain.token_ids[0])[1:-1])) == 12 == len(plain.tokens[0]) - 2  # never repeated
    with pytest.raises(ValueError, match="role must be one of"):
        probe("top_key", minilm)
    with pytest.raises(SystemExit):
        cli.main(["explain", SEED, "--out", "", "--probe", "syntax"])
    with pytest.raises(SystemExit):
        cli.main(["explain", SEED, "--compare", "The dog sat.", "--token", "sat", "--probe", "induction"])


def test_uniform_score_on_causal_maps_by_hand():
    # BOS, then [5, 6] twice; causal: query i sees keys 0..i. Rows 3 and 4 repeat an earlier token; their
    # induction targets (keys 2 and 3) get 1/4 and 1/5 from even weight: (1/4 + 1/5) / 2.
    causal = torch.ones(5, 5).tril()[None, None] / torch.arange(1, 6)[:, None]
    maps = AttentionMaps([causal], [list("xabab")], [[0, 5, 6, 5, 6]], "toy", (0,), (0,))
    assert uniform_score(maps, "induction") == pytest.approx((1 / 4 + 1 / 5) / 2)
    # First token: every row's even share of key 0, 1/(i + 1), averaged over the 5 rows.
    assert uniform_score(maps, "first_token") == pytest.approx(sum(1 / (i + 1) for i in range(5)) / 5)
    with pytest.raises(ValueError, match="role must be one of"):
        uniform_score(maps, "syntax")
    once = AttentionMaps([causal], [list("xabcd")], [[0, 5, 6, 7, 8]], "toy", (0,), (0,))
    with pytest.raises(ValueError, match="induction has no score on these tokens: no token repeats"):
        uniform_score(once, "induction")


@pytest.mark.slow  # six MiniLM runs
def test_specificity_benchmark_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "specificity.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "specificity.json").read_text())
    assert data["machine"]["description"] and len(data["readings"]) == 6
    # The table's figures are the JSON's, and the ranking is by difference.
    diffs = [h["difference"] for h in data["specific"]]
    assert diffs == sorted(diffs, reverse=True)
    assert all(h["difference"] == pytest.approx(h["weight"] - h["column_mean"]) for h in data["specific"])
    assert (tmp_path / "specificity.md").read_text().startswith("Machine: ")


def test_specific_heads_on_a_hand_made_map_and_its_refusals():
    a = torch.full((1, 2, 6, 6), 0.1)
    a[0, 0, :, 1] = 0.5  # head 0: every query gives token 1 0.5, so query 5's 0.5 is the average
    a[0, 1, 5, 1] = 0.5  # head 1: only query 5 does; column 1's mean is (5 * 0.1 + 0.5) / 6 = 1/6
    maps = AttentionMaps([a], [list("abcdef")], None, "toy", (0,), (0, 1))
    best, other = specific_heads(maps, 5, n=2)
    assert (best.head, best.key) == (1, 1)
    assert (best.weight, best.column_mean, best.difference, best.ratio) == pytest.approx((0.5, 1 / 6, 1 / 3, 3.0))
    # Head 0: query 5 gives every key exactly its column mean: no key stands out.
    assert other.head == 0 and other.difference == pytest.approx(0.0) and other.ratio == pytest.approx(1.0)
    assert specific_heads(maps, 5, skip_keys=range(6)) == []
    # The column-head caveat names the right key: the weight is everyone's only when the column is this key.
    tokens = list("abcdef")
    assert "of all heads and keys more than 2 tokens away, it gives 'b'" in best.why(tokens)  # |5 - 1| > 2
    near = SpecificHead(5, 0, 0, 4, 0.5, 0.2, 0.3, 2.5, False, 0)  # a short input's fallback: a near key
    assert "of all heads and keys, it gives 'e'" in near.why(tokens)
    on_it = SpecificHead(5, 0, 0, 1, 0.5, 0.5, 0.0, 1.0, column_head=True, column_key=1)
    assert "most of its queries look at 'b', so its weight says little about 'f'" in on_it.why(tokens)
    elsewhere = SpecificHead(5, 0, 0, 1, 0.5, 0.2, 0.3, 2.5, column_head=True, column_key=0)
    assert "look at 'a' (a column head there), not at 'b'" in elsewhere.why(tokens)
    assert "column" not in SpecificHead(5, 0, 0, 1, 0.5, 0.2, 0.3, 2.5, False, 0).why(tokens).split(")")[-1]
    with pytest.raises(ValueError, match="n must be"):
        specific_heads(maps, 5, n=0)
    with pytest.raises(ValueError, match=r"query must be a query row in \[0, 6\); got 6"):
        specific_heads(maps, 6)
    cross = AttentionMaps([a[:, :, :3]], [list("abc")], None, "toy", (0,), (0, 1), key_tokens=[list("abcdef")])
    with pytest.raises(ValueError, match="maps must be self-attention"):
        specific_heads(cross, 0)
