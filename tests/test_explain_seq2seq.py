"""``attnkit explain --target`` (encoder-decoder folders) and ``--generate N`` (decoders), on tiny
random models saved to folders, and their usage errors (exit 2, naming the option)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from attnkit import cli
from attnkit.inspect import capture, capture_generation
from tiny_seq_models import bart, gpt2

from conftest import assert_drawn

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bart_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bart")
    bart(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    gpt2(folder)
    return folder


def embedded(path):
    text = path.read_text(encoding="utf-8")
    return json.loads(re.search(r'<script type="application/json" id="attnkit-data">(.*?)</script>', text,
                                re.S).group(1))


def test_explain_target_writes_the_cross_attention_report(bart_folder, tmp_path, capsys):
    out, pngs = tmp_path / "x.html", tmp_path / "png"
    args = ["explain", "the bank of the river", "--model", str(bart_folder), "--target", "la rive du fleuve",
            "--out", str(out), "--top", "2"]
    assert cli.main(args + (["--png", str(pngs)] if _has_matplotlib() else [])) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "6 source tokens -> 6 target tokens" in printed and "layer 1" in printed
    data = embedded(out)
    assert data["kind"] == "seq2seq" and data["source"] == ["the", "bank", "of", "the", "river", "</s>"]
    assert data["parts"]["cross"]["tokens"] == ["<s>", "la", "rive", "du", "fleuve", "</s>"]
    # The same capture in this process: the CLI's maps are the library's.
    model, tokenizer = bart()
    want = capture(model, "the bank of the river", target="la rive du fleuve", tokenizer=tokenizer).cross
    from attnkit.viz.encode import QUANTUM, decode

    got = decode(data["parts"]["cross"]["encoding"]).double()
    assert (got - want.attentions[0].double().reshape(got.shape)).abs().max() <= 0.001 + QUANTUM
    if _has_matplotlib():
        assert_drawn(pngs / "alignment.png")


def test_explain_generate_writes_the_generation_report(gpt2_folder, tmp_path, capsys):
    out = tmp_path / "g.html"
    assert cli.main(["explain", "the bank of", "--model", str(gpt2_folder), "--generate", "3", "--out",
                     str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "4 prompt tokens + 3 generated, greedy" in printed
    data = embedded(out)
    model, tokenizer = gpt2()
    gen = capture_generation(model, "the bank of", tokenizer, max_new_tokens=3, do_sample=False)
    assert data["kind"] == "generation" and data["prompt"] == 4
    assert data["tokens"] == tokenizer.convert_ids_to_tokens(gen.sequences[0].tolist())
    assert data["cross"] is None


@pytest.mark.parametrize("folder, args, match", [
    ("gpt2", ["--target", "la rive"], r"--target needs an encoder-decoder model .* decoder-only model"),
    ("bart", ["--target", "la", "--generate", "2"], "--target and --generate do not go together"),
    ("bart", ["--target", "la", "--layers", "0"], "--layers does not go with --target"),
    ("gpt2", ["--generate", "2", "--compare", "x"], "--compare does not go with --generate"),
    ("gpt2", ["--generate", "0"], "--generate"),
])
def test_usage_errors_exit_2_naming_the_option(folder, args, match, bart_folder, gpt2_folder, capsys):
    path = {"bart": bart_folder, "gpt2": gpt2_folder}[folder]
    with pytest.raises(SystemExit) as exit_:
        cli.main(["explain", "the bank", "--model", str(path), "--out", "", *args])
    assert exit_.value.code == 2
    assert re.search(match, capsys.readouterr().err.replace("\n", " "))


def test_generate_on_an_encoder_only_model_is_a_usage_error(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from tiny_seq_models import WORDS, word_tokenizer

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(tmp_path, safe_serialization=True)
    word_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["explain", "the bank", "--model", str(tmp_path), "--generate", "2", "--out", ""])
    assert exit_.value.code == 2
    assert "--generate needs a model that generates" in capsys.readouterr().err.replace("\n", " ")


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
