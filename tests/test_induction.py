"""attnkit induction: the induction-head phase change of Olsson et al. (2022), fast setting."""

from __future__ import annotations

import json
import math

import pytest
import torch

from attnkit.cli import main
from attnkit.inspect.induction import InductionConfig, _sequences, train_induction

from conftest import assert_drawn


def test_sequences_repeat_a_block_of_random_length():
    config = InductionConfig(vocab_size=50, half_length=10)
    seqs, first, second = _sequences(config, 64, torch.Generator().manual_seed(0))
    assert seqs.shape == (64, 21) and (seqs[:, 0] == 0).all() and (seqs[:, 1:] > 0).all()
    lengths = set()
    for row, f, s in zip(seqs.tolist(), first, second):
        n = int(f.sum())  # targets 1..n are the first copy
        lengths.add(n)
        assert row[1:n + 1] == row[n + 1:2 * n + 1]
        assert s.nonzero().flatten().tolist() == list(range(n + 1, 2 * n))  # targets n+2..2n
    assert lengths == set(range(5, 11))  # every block length N/2..N occurs


@pytest.fixture(scope="module")
def trained(one_thread):
    """The CLI's --fast setting: the phase change happens within it (the slow tier)."""
    return train_induction(InductionConfig(steps=1000, eval_every=100))


@pytest.fixture(scope="module")
def brief(one_thread):
    """A few steps, for what does not need the phase change (the default tier)."""
    return train_induction(InductionConfig(steps=40, eval_every=20))


@pytest.mark.slow
def test_an_induction_head_forms_in_the_second_layer(trained):
    """Thresholds: uniform causal attention scores ~0.05 on induction (chance_induction) and
    ~0.08 on previous-token; a trained induction head puts most of its attention on the
    key after the earlier copy. 0.3 is 6x chance and well below the ~0.6 seen at 1000 steps."""
    chance = trained.chance_induction
    assert 0.02 < chance < 0.08
    layer, _, score = trained.best_head("induction")
    assert layer == 1 and score > 0.3
    assert float(trained.induction[0].max()) < 0.1  # it was not there at initialisation
    # the previous-token heads of layer 0 grow with it (the circuit's first half)
    assert float(trained.previous_token[-1, 0].max()) > 1.5 * float(trained.previous_token[0, 0].max())


@pytest.mark.slow
def test_second_half_loss_falls_far_below_first_half(trained):
    first, second = trained.first_half_loss[-1], trained.second_half_loss[-1]
    assert first > 0.9 * math.log(63)  # random tokens stay unpredictable
    assert second < 0.3 * first
    assert trained.second_half_loss[0] > 0.9 * math.log(63)


def test_plot_and_json(brief, tmp_path):
    pytest.importorskip("matplotlib")
    path = brief.plot(tmp_path / "induction.png")
    assert_drawn(path)
    data = json.loads(json.dumps(brief.to_dict()))
    assert data["steps"] == [0, 20, 40] and len(data["induction"]) == 3
    # The evidence: every held-out sequence's second copy repeats its block (at least N/2 tokens, the last of
    # which may be the one token not read); at most every token read but BOS (2N read) can be a repeat.
    config = brief.config
    n, count = config.half_length, config.eval_sequences
    assert count * (math.ceil(n / 2) - 1) <= data["repeated_tokens"] == brief.repeated_tokens <= count * (2 * n - 1)


def test_config_is_checked():
    with pytest.raises(ValueError, match="half_length"):
        InductionConfig(half_length=1)
    with pytest.raises(ValueError, match="lr"):
        InductionConfig(lr=0)
    with pytest.raises(ValueError, match="multiple of heads"):
        InductionConfig(dim=30, heads=4)


def test_cli_rejects_bad_options(capsys):
    assert main(["induction", "--steps", "0", "--plot", ""]) == 1
    assert "attnkit induction: error: steps must be >= 1; got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["induction", "--step", "x"])
    assert exc.value.code == 2 and "usage: attnkit induction" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["induction", "--threads", "0"])
    assert exc.value.code == 2 and "--threads" in capsys.readouterr().err


def test_cli_trains_on_the_threads_asked_and_restores_them(monkeypatch):
    import attnkit.inspect.induction as induction

    seen = []
    real = induction.train_induction

    def spy(config, progress=None):
        seen.append(torch.get_num_threads())
        return real(config, progress=progress)

    monkeypatch.setattr(induction, "train_induction", spy)
    before = torch.get_num_threads()
    assert main(["induction", "--steps", "2", "--plot", "", "--threads", "2"]) == 0
    assert main(["induction", "--steps", "2", "--plot", ""]) == 0
    assert seen == [2, 1]  # auto starts by timing one thread
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("cost, best", [({1: 1.0, 2: 3.0}, 1), ({1: 2.0, 2: 1.0}, 2)])
def test_thread_tuner_keeps_the_faster_count(cost, best):
    from attnkit.cli.induction import ThreadTuner

    now = [0.0]
    current = [0]
    log = []

    def set_threads(n):
        current[0] = n

    tuner = ThreadTuner((1, 2), every=50, probe=5, set_threads=set_threads, clock=lambda: now[0])
    for done in range(1, 121):
        now[0] += cost[current[0]] + (100.0 if done % 25 == 1 else 0.0)  # an evaluation step now and then
        log.append(current[0])
        tuner.step(done)
    assert log[:5] == [1] * 5 and log[5:10] == [2] * 5  # probes: 5 steps on each count
    assert set(log[10:50]) == {best} and tuner.chosen == best  # then the faster one
    assert log[50:55] == [1] * 5 and log[55:60] == [2] * 5  # probed again after `every` steps


def test_cli_runs_and_writes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.chdir(tmp_path)  # the run prints where it wrote: a short path, whatever the temp folder's name
    out = tmp_path / "ind.json"
    assert main(["induction", "--steps", "20", "--plot", "", "--json", "ind.json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 80
    assert any("strongest induction head" in line for line in lines)
    # progress: a line per 5% of the steps (stdout is not a terminal here), ending at 20/20
    progress = [line.split(" (")[0] for line in lines if line.startswith("[")]
    assert progress[-1] == "[20/20] training" and 10 <= len(progress) <= 21
    data = json.loads(out.read_text())
    assert len(data["steps"]) >= 2
    last = next(line for line in lines if line.split() and line.split()[0] == str(data["steps"][-1]))
    assert last.split()[1:3] == [f"{data['first_half_loss'][-1]:.3f}", f"{data['second_half_loss'][-1]:.3f}"]
