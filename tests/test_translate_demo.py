"""attnkit translate-demo: the corpus, the two model options it relies on (the encoder
without mixing, the cross-attention mask of the intervention), a tiny training run (default
tier); the --fast setting and the claim over several seeds with the real training (slow)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from attnkit import masks
from attnkit.cli import main, translate_demo
from attnkit.demos.translate import (
    AMBIGUOUS,
    ENCODERS,
    SENSES,
    TEMPLATES,
    TranslateConfig,
    build_corpus,
    shown_example,
    train_translation,
)
from attnkit.nn import EncoderDecoder, EncoderDecoderConfig

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
    text = json.dumps(brief.to_dict(), allow_nan=False)  # raises on NaN, which is not JSON
    data = json.loads(text)
    assert brief.train_loss[0] != brief.train_loss[0] and data["train_loss"][0] is None  # no step taken yet
    assert data["train_loss"][1:] == brief.train_loss[1:]
    assert data["rive_head"]["layer"] == 0 and len(data["examples"]) in (2, 3)
    assert data["examples"][0]["source"] == ["the", "bank", "of", "the", "river"]
    assert data["examples"][0]["reference"] == "la rive de la rivière"
    assert data["examples"][0]["correct"] == (data["examples"][0]["translation"] == "la rive de la rivière")


def test_the_evidence_is_reported_in_range(brief):
    """Shapes and ranges only: the figures themselves are the slow tests' business."""
    assert set(brief.controls) == {"context_at_sense", "context_at_other_steps", "ambiguous_at_sense", "uniform"}
    assert brief.controls["context_at_sense"] == pytest.approx(brief.rive_head()[2])
    assert all(0 <= v <= 1 for v in brief.controls.values())
    groups = brief.intervention
    assert set(groups) == {"all", "context_after", "context_before", *SENSES}
    assert groups["all"]["probes"] == groups["context_after"]["probes"] + groups["context_before"]["probes"]
    assert groups["all"]["probes"] == sum(groups[s]["probes"] for s in SENSES)
    for g in groups.values():
        assert 0 <= g["right"] <= g["probes"]
        for key in ("flip_context", "flip_other"):
            assert (g[key] is None) == (g["right"] == 0) and (g[key] is None or 0 <= g[key] <= 1)
    assert 0 <= brief.probe["test"] <= 1 and brief.probe["test_sentences"] > 0
    lines = brief.findings()
    assert any(line.startswith("Intervention: hiding the context word") for line in lines)
    assert any("--encoder none" in line for line in lines)  # the default (mixing) run points to the other half


def test_hiding_a_source_word_from_cross_attention_is_decoding_without_it(one_thread):
    """The intervention's mechanism, against an independent route: cross-attention has no
    positions, so hiding source token j with decode's cross_mask must equal decoding each
    sentence alone from its encoder output with row j (and its padding) deleted, in
    float64. As in the demo, the batch is padded and each sentence hides another word, so
    the padding mask and the cross mask act together."""
    torch.manual_seed(0)
    model = EncoderDecoder(EncoderDecoderConfig(src_vocab_size=11, tgt_vocab_size=13, dim=16, num_heads=2)).double()
    src, tgt = torch.randint(3, 11, (2, 6)), torch.randint(3, 13, (2, 4))
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])  # the second sentence: 4 words and 2 pads
    memory = model.encode(src, valid)
    keep = valid.clone()
    keep[0, 3] = keep[1, 1] = False
    hidden = model.decode(tgt, memory, src_padding_mask=valid, cross_mask=masks.key_padding(valid=keep))
    for b in range(2):
        without = model.decode(tgt[b:b + 1], memory[b:b + 1, keep[b]])
        torch.testing.assert_close(hidden[b:b + 1], without, rtol=0, atol=1e-12)
    assert not torch.allclose(hidden, model.decode(tgt, memory, src_padding_mask=valid))  # the hidden words mattered


def test_encoder_without_mixing_keeps_each_position_to_its_own_token(one_thread):
    torch.manual_seed(0)
    config = EncoderDecoderConfig(src_vocab_size=11, tgt_vocab_size=13, dim=16, num_heads=2, encoder_window=1)
    model = EncoderDecoder(config).double()
    src = torch.randint(3, 11, (1, 6))
    other = src.clone()
    other[0, [0, 2, 4, 5]] = (other[0, [0, 2, 4, 5]] - 3 + 1) % 8 + 3  # every other word changed
    out, changed = model.encode(src), model.encode(other)
    torch.testing.assert_close(out[0, [1, 3]], changed[0, [1, 3]], rtol=0, atol=1e-12)
    assert not torch.allclose(out[0, 0], changed[0, 0])
    attention = model(src, torch.tensor([[1, 5]]), return_attention=True).encoder_attentions
    assert all(torch.equal(a[0, h], torch.eye(6, dtype=a.dtype)) for a in attention for h in range(2))
    mixing = EncoderDecoder(EncoderDecoderConfig(src_vocab_size=11, tgt_vocab_size=13, dim=16, num_heads=2)).double()
    assert not torch.allclose(mixing.encode(src)[0, 1], mixing.encode(other)[0, 1])  # the control: it mixes
    with pytest.raises(ValueError, match="encoder_window must be >= 1"):
        EncoderDecoderConfig(src_vocab_size=11, tgt_vocab_size=13, encoder_window=0)


def _with(result, encoder="mixing", probe=1.0, **flips):
    """``result`` with the measurements the lesson reads replaced: ``flips`` per group
    (``all`` and the senses, the rest 0), the probe's test accuracy, the encoder setting."""
    result = copy.copy(result)
    result.config = dataclasses.replace(result.config, encoder=encoder)
    result.intervention = {name: {"probes": 24, "right": 24, "flip_context": flips.get(name, 0.0), "flip_other": 0.0}
                           for name in ("all", "context_after", "context_before", *SENSES)}
    result.probe = {**result.probe, "test": probe}
    return result.findings()


def test_the_lesson_claims_only_what_the_measurements_give(brief):
    """The lesson line follows the intervention and the probe it is given, not the setting's
    expected story: a mixing encoder under which one sense still flips often, or whose probe
    reads nothing, is not described as settling the sense in the encoder."""
    settled = _with(brief)[-len(brief.examples) - 1]  # the lesson precedes the example lines
    assert "rarely changes the choice" in settled and "the probe reads the sense" in settled
    banque = _with(brief, all=0.12, banque=0.46)[-len(brief.examples) - 1]
    assert "rarely" not in banque and "46.0% of the 'banque' choices" in banque
    blind = _with(brief, probe=0.5)[-len(brief.examples) - 1]
    assert "in only 50.0%" in blind and "and the probe reads" not in blind
    guess = _with(brief, "none", all=0.5, rive=1.0, batte=1.0)[-len(brief.examples) - 1]
    assert "hiding it flips 50.0% of the choices" in guess and "--encoder none" in guess
    kept = _with(brief, "none", all=0.05)[-len(brief.examples) - 1]
    assert "yet hiding it flips only 5.0%" in kept and "undersells" not in kept
    nothing = _with(brief, all=None)[-len(brief.examples) - 1]
    assert "says nothing" in nothing


@pytest.mark.slow
def test_fast_setting_translates_held_out_sentences_and_shows_one_it_gets_right(one_thread):
    """The CLI's --fast setting (120 steps). Thresholds: the held-out sentences combine a
    sense, a context word and a template never seen together, so exact translations need
    generalisation. The example the page shows is one it translates right (a short run
    may get "the bank of the river" wrong; then the findings say so)."""
    result = train_translation(TranslateConfig(steps=120, eval_every=20))
    assert result.accuracy["all"] >= 0.8
    assert result.accuracy["bank"] >= 0.9 and result.accuracy["bat"] >= 0.9
    assert result.held_out_loss[-1] < 0.1 * result.held_out_loss[0]
    shown = shown_example(result)
    pairs = {" ".join(s.english): " ".join(s.french) for s in result.corpus.train + result.corpus.held_out}
    assert shown["translation"] == pairs[" ".join(shown["source"])] and "rive" in shown["translation"].split()
    showcase = result.examples[0]
    if showcase["translation"] != "la rive de la rivière":
        assert any(line.startswith(f"'the bank of the river' -> '{showcase['translation']}' (wrong: the reference "
                                   "is 'la rive de la rivière'") for line in result.findings())


SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def seeds(one_thread):
    """The demo's default setting (the CLI's 400 steps), both encoders, over SEEDS."""
    return {(encoder, seed): train_translation(TranslateConfig(steps=400, eval_every=400, seed=seed, encoder=encoder))
            for encoder in ("mixing", "none") for seed in SEEDS}


@pytest.mark.slow
def test_without_encoder_mixing_hiding_the_context_word_flips_the_sense_and_a_random_word_does_not(seeds):
    """The demo's claim, over several seeds of the real training. With each source position
    holding only its own token and position, the decoder can learn the sense only through
    cross-attention to the context word: hidden, the choice can only be a guess, so about
    half the right choices flip (each ambiguous word has two senses); hiding any other
    word leaves the context in view. The probe on the encoder output at "bank" then has
    nothing to read (a coin flip, 50%)."""
    for seed in SEEDS:
        run = seeds["none", seed]
        every = run.intervention["all"]
        assert run.accuracy["bank"] >= 0.9, seed
        assert every["right"] >= 0.9 * every["probes"], seed
        assert every["flip_context"] >= 0.35, seed
        assert every["flip_other"] <= 0.1, seed
        assert every["flip_context"] >= every["flip_other"] + 0.3, seed
        assert run.probe["test"] <= 0.65, seed


@pytest.mark.slow
def test_with_encoder_mixing_the_encoder_carries_the_sense_and_hiding_the_context_word_matters_less(seeds):
    """The other half of the lesson: with the encoder's self-attention, "bank"'s own encoder
    output carries its sense (the probe reads it), and hiding the context word from
    cross-attention flips the choice less often than without mixing, seed by seed."""
    for seed in SEEDS:
        mixing, none = seeds["mixing", seed], seeds["none", seed]
        assert mixing.probe["test"] >= 0.8, seed
        assert mixing.probe["test"] >= none.probe["test"] + 0.2, seed
        assert mixing.intervention["all"]["flip_context"] < none.intervention["all"]["flip_context"], seed
        assert mixing.intervention["all"]["flip_other"] <= 0.1, seed


def test_config_is_checked():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TranslateConfig(steps=0)
    with pytest.raises(ValueError, match="ambiguous_share"):
        TranslateConfig(ambiguous_share=1.5)
    with pytest.raises(ValueError, match="multiple of heads"):
        TranslateConfig(dim=30, heads=4)
    with pytest.raises(ValueError, match="encoder must be one of 'mixing', 'none'; got 'off'"):
        TranslateConfig(encoder="off")
    assert translate_demo.ENCODERS == ENCODERS  # the CLI's copy, kept to leave torch out of --help


def test_cli_rejects_bad_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["translate-demo", "--steps", "0"])
    assert exc.value.code == 2 and "expected an int >= 1; got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["translate-demo", "--fats"])
    assert exc.value.code == 2 and "did you mean '--fast'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["translate-demo", "--encoder", "off"])
    assert exc.value.code == 2 and "invalid choice: 'off'" in capsys.readouterr().err


def test_cli_runs_and_writes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.chdir(tmp_path)  # the run prints where it wrote: a short path, whatever the temp folder's name
    assert main(["translate-demo", "--steps", "2", "--no-plot", "--out", "."]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 80
    progress = [line.split(" (")[0] for line in lines if line.startswith("[")]
    assert progress[-1] == "[2/2] training"
    data = json.loads((tmp_path / "translate.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    head = data["rive_head"]
    text = " ".join(" ".join(lines).split())
    assert f"layer {head['layer']} head {head['head']} (the cross-attention head that looks hardest) puts " \
           f"{head['mass']:.3f}" in text
    assert f"{100 * data['accuracy']['all']:.1f}% exact of {data['counts']['all']}" in text
    assert "Intervention: hiding the context word from every cross-attention layer" in text
    assert "(encoder: mixing)" in text and data["config"]["encoder"] == "mixing"
    assert (tmp_path / "translate.html").exists() and not (tmp_path / "translate.png").exists()
