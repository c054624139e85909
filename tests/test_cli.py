"""The command line and the benchmark script run end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from attnkit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_checks_variants_and_prints_pictures(capsys):
    assert main(["demo", "--length", "256"]) == 0
    out = capsys.readouterr().out
    assert "causal + ALiBi" in out and "FAIL" not in out
    assert out.count("ok") >= 14  # 7 variants x tiled and auto, each within 1e-4 of float64
    assert "█···············" in out  # the causal picture's first row
    assert "speed vs SDPA" in out


def test_backends_command(capsys):
    assert main(["backends"]) == 0
    assert "tiled" in capsys.readouterr().out


def test_benchmark_script_runs_quick():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "core.py"), "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n| ") >= 8  # header + 7 rows


def test_decode_benchmark_runs_quick():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "speed-up" in done.stdout and done.stdout.count("\n| ") >= 6  # header + 5 rows


def test_linear_benchmark_runs_quick():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "linear.py"), "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "FAVOR+ relative error" in done.stdout and done.stdout.count("\n| 256 |") == 1


def test_kv_cache_command_published_figures(capsys):
    assert main(["kv-cache", "--preset", "llama-2-70b", "--tokens", "4096"]) == 0
    out = capsys.readouterr().out
    assert "1.25 GiB" in out and "10 GiB" in out  # GQA (8 KV heads) against MHA (64)
    assert main(["kv-cache", "--preset", "mistral-7b", "--tokens", "32768"]) == 0
    out = capsys.readouterr().out
    assert "512 MiB" in out and "4 GiB" in out  # capped by its 4096 window; 4 GiB without it
    assert main(["kv-cache", "--layers", "32", "--kv-heads", "32", "--head-dim", "128"]) == 0
    assert "2 GiB" in capsys.readouterr().out  # Llama-2-7B's shape at 4096 tokens, fp16


def test_kv_cache_command_errors(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["kv-cache", "--layers", "2"])
    assert "needs --preset NAME, or all of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["kv-cache", "--layers", "2", "--kv-heads", "3", "--heads", "4", "--head-dim", "8"])
    assert "must be a multiple of --kv-heads" in capsys.readouterr().err


def test_ring_benchmark_runs_quick():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ring.py"), "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| 1 |", "| 2 |", "| 4 |"))]
    assert len(rows) == 3
    # the bytes each rank sent equal the formula's (the last two columns)
    assert all(r.split("|")[4].strip() == r.split("|")[5].strip() for r in rows), rows
