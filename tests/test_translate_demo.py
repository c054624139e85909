"""attnkit translate-demo: the corpus, a tiny training run (default tier) and the --fast
setting's accuracy and cross-attention finding (slow tier)."""

from __future__ import annotations

import json

import pytest
import torch

from attnkit.cli import main
from attnkit.demos.translate import AMBIGUOUS, TEMPLATES, TranslateConfig, build_corpus, train_translation

from conftest import assert_drawn


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(0)


def test_held_out_cells_are_unseen_in_training(corpus):
    pairs = [(sense, ctx) for senses in AMBIGUOUS.values() for sense, ctxs in senses.items() for ctx in ctxs]
    assert sorted((s, c) for s, c, _ in corpus.held_out_cells) == sorted(pairs)  # one template per pair
    held = set(corpus.held_out_cells)
    assert {(s.sense, s.context, s.template) for s in corpus.held_out} == held
    seen = {(s.sense, s.context, s.template) for s in corpus.train if s.sense}
    assert not seen & held
    # every pair and every template still occurs in training, only not together
    assert {(s, c) for s, c, _ in seen} == set(pairs) and {t for _, _, t in seen} == set(range(len(TEMPLATES)))


def test_sentences_put_the_adjective_after_the_noun_and_the_sense_by_its_context(corpus):
    by_english = {" ".join(s.english): " ".join(s.french) for s in corpus.train + corpus.held_out}
    assert by_english["the bank of the river"] == "la rive de la rivière"
    assert by_english["the red car of the river"] == "la voiture rouge de la rivière"
    assert by_english["we saw the dark bank near the money"] == "nous avons vu la banque sombre près de l' argent"
    assert by_english["the stream and the quiet bank"] == "le ruisseau et la rive calme"
    assert by_english["the bat with the game"] == "la batte avec le match"
    for s in corpus.train + corpus.held_out:
        if s.sense:
            assert s.english[s.context_index] == s.context and s.sense in s.french
            assert s.context in AMBIGUOUS[s.ambiguous][s.sense] and s.ambiguous in s.english


def test_encode_pads_on_the_right_with_bos_and_eos(corpus):
    sentences = corpus.held_out[:3]
    src, valid, tgt_in, tgt_out = corpus.encode(sentences)
    for i, s in enumerate(sentences):
        n, m = len(s.english), len(s.french)
        assert valid[i].tolist() == [True] * n + [False] * (src.shape[1] - n)
        assert [corpus.src_vocab[j] for j in src[i, :n]] == list(s.english)
        assert tgt_in[i, 0] == 1 and tgt_out[i, m] == 2 and (tgt_out[i, m + 1:] == 0).all()
        assert corpus.words(tgt_in[i].tolist()) == list(s.french)


TINY = dict(dim=16, heads=2, encoder_depth=1, decoder_depth=1, batch_size=16, eval_every=10, probes=2, lr=1e-2)


@pytest.fixture(scope="module")
def brief(one_thread):
    """A few steps of a tiny model, for what does not need a trained translator (the default tier)."""
    return train_translation(TranslateConfig(steps=20, **TINY))


def test_a_few_steps_learn_and_report_every_head(brief):
    assert brief.steps == [0, 10, 20]
    assert brief.held_out_loss[-1] < 0.8 * brief.held_out_loss[0]
    assert brief.rive_mass.shape == brief.banque_mass.shape == (1, 2)
    assert ((brief.rive_mass >= 0) & (brief.rive_mass <= 1)).all()
    rive = [s for s in brief.corpus.train + brief.corpus.held_out if s.sense == "rive"]
    assert min(1 / len(s.english) for s in rive) <= brief.uniform <= max(1 / len(s.english) for s in rive)
    assert set(brief.accuracy) == {"all", "bank", "bat", "rive", "banque", "chauve-souris", "batte"}
    assert brief.counts["all"] == len(brief.corpus.held_out)


def test_training_is_reproducible_under_a_seed(brief, one_thread):
    again = train_translation(TranslateConfig(steps=20, **TINY))
    assert again.held_out_loss == brief.held_out_loss and torch.equal(again.rive_mass, brief.rive_mass)
    other = train_translation(TranslateConfig(steps=20, seed=1, **TINY))
    assert other.held_out_loss != brief.held_out_loss


def test_plot_and_json(brief, tmp_path):
    pytest.importorskip("matplotlib")
    assert_drawn(brief.plot(tmp_path / "translate.png"))
    data = json.loads(json.dumps(brief.to_dict()))
    assert data["rive_head"]["layer"] == 0 and len(data["examples"]) == 2
    assert data["examples"][0]["source"] == ["the", "bank", "of", "the", "river"]


@pytest.mark.slow
def test_fast_setting_translates_held_out_sentences_and_reads_the_context_word(one_thread):
    """The CLI's --fast setting (120 steps). Thresholds: the held-out sentences combine a
    sense, a context word and a template never seen together, so exact translations need
    generalisation; the "rive" head's mass on the context word is compared with uniform
    attention over the same probes' source tokens, computed here from the sentences."""
    result = train_translation(TranslateConfig(steps=120, eval_every=20))
    assert result.accuracy["all"] >= 0.8
    assert result.accuracy["bank"] >= 0.9 and result.accuracy["bat"] >= 0.9
    mass = result.rive_head()[2]
    assert mass == float(result.rive_mass.max())
    rive = [s for s in result.corpus.train + result.corpus.held_out if s.sense == "rive"]
    assert result.uniform <= max(1 / len(s.english) for s in rive)
    assert mass > 2 * result.uniform
    assert result.held_out_loss[-1] < 0.1 * result.held_out_loss[0]


def test_config_is_checked():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TranslateConfig(steps=0)
    with pytest.raises(ValueError, match="ambiguous_share"):
        TranslateConfig(ambiguous_share=1.5)
    with pytest.raises(ValueError, match="multiple of heads"):
        TranslateConfig(dim=30, heads=4)


def test_cli_rejects_bad_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["translate-demo", "--steps", "0"])
    assert exc.value.code == 2 and "expected an int >= 1; got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["translate-demo", "--fats"])
    assert exc.value.code == 2 and "did you mean '--fast'" in capsys.readouterr().err


def test_cli_runs_and_writes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.chdir(tmp_path)  # the run prints where it wrote: a short path, whatever the temp folder's name
    assert main(["translate-demo", "--steps", "2", "--no-plot", "--out", "."]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 80
    progress = [line.split(" (")[0] for line in lines if line.startswith("[")]
    assert progress[-1] == "[2/2] training"
    data = json.loads((tmp_path / "translate.json").read_text())
    head = data["rive_head"]
    text = " ".join(" ".join(lines).split())
    assert f"layer {head['layer']} head {head['head']} puts {head['mass']:.3f}" in text
    assert f"{100 * data['accuracy']['all']:.1f}% exact of {data['counts']['all']}" in text
    assert not (tmp_path / "translate.png").exists()
