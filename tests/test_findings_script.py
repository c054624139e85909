"""benchmarks/findings.py: its measures against hand-built cases, and (slow) one quick run end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from attnkit.nn import TransformerConfig, TransformerLM

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def findings():
    sys.path.insert(0, str(BENCHMARKS))
    from published import script

    return script("findings")


def test_no_preference_baseline_is_a_uniform_causal_map(findings):
    for length in (2, 7, 64):
        uniform = torch.ones(length, length, dtype=torch.float64).tril()
        uniform = uniform / uniform.sum(-1, keepdim=True)  # each query spreads evenly over its keys
        got = findings.first_token_mass(uniform.expand(3, 2, 4, length, length))  # (inputs, layers, heads, L, L)
        assert got.shape == (2, 4)
        torch.testing.assert_close(got, torch.full((2, 4), findings.uniform_first_token_mass(length),
                                                   dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("positions", ["rope", "alibi"])
def test_every_cache_policy_equals_a_full_forward_until_the_window_binds(findings, positions):
    torch.manual_seed(0)
    lm = TransformerLM(TransformerConfig(vocab_size=256, dim=32, depth=2, num_heads=4, positions=positions)).eval()
    stream = torch.randint(0, 256, (2, 50))  # 50 tokens: under 4 sinks + 59 recent, and under the window of 64
    with torch.no_grad():
        logits = lm(stream)[:, :-1]
    want = torch.nn.functional.cross_entropy(logits.transpose(1, 2), stream[:, 1:], reduction="none")
    for policy in ("dense", "window", "sinks"):
        torch.testing.assert_close(findings.stream_losses(lm, stream, policy), want, atol=1e-5, rtol=0)


def test_the_sentence_pairs_shipped_with_the_repo(findings):
    pairs = findings.pairs(quick=False)
    assert len(pairs) == 30 and all(a and b and a != b for a, b in pairs)


@pytest.mark.slow
def test_a_quick_run_writes_every_part(findings, tmp_path):
    findings.main(["--quick", "--out", str(tmp_path), "--img", str(tmp_path)])
    for part in ("clark", "sinks", "streaming"):
        data = json.loads((tmp_path / f"findings-{part}.json").read_text())
        assert data["quick"] and (tmp_path / f"findings-{part}.png").stat().st_size > 10_000
        assert (tmp_path / f"findings-{part}.md").read_text().strip() == findings.RENDER[part](data)
    clark = json.loads((tmp_path / "findings-clark.json").read_text())
    for layer in range(6):  # shares of one query's attention: never more than all of it
        assert sum(clark["by_layer"][k][layer] for k in ("cls", "sep", "punct")) <= 1 + 1e-9
