"""The command line and the benchmark script run end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import attnkit
from attnkit.cli import build_parser, main
from attnkit.cli._common import Column, render_table

ROOT = Path(__file__).resolve().parents[1]


def test_demo_checks_variants_and_prints_pictures(capsys):
    assert main(["demo", "--length", "256"]) == 0
    out = capsys.readouterr().out
    assert "causal + ALiBi" in out and "FAIL" not in out
    # the variants table: each variant's tiled and auto rows say "ok" (within 1e-4 of float64)
    rows = re.findall(r"^(\S.*?)\s{2,}(tiled|sdpa|auto)\s+(\S.*?)\s+(ok|FAIL)$", out, re.M)
    variants = {variant for variant, *_ in rows}
    assert len(variants) >= 7
    assert {(variant, backend) for variant, backend, _, check in rows if check == "ok"} >= \
        {(variant, backend) for variant in variants for backend in ("tiled", "auto")}
    assert "█···············" in out  # the causal picture's first row
    assert "speed vs SDPA" in out


def test_backends_command(capsys):
    assert main(["backends"]) == 0
    assert "tiled" in capsys.readouterr().out


def test_backends_says_whether_the_native_kernel_is_built(capsys, monkeypatch):
    from attnkit.functional.tiled import native

    monkeypatch.delenv("ATTNKIT_NATIVE", raising=False)
    monkeypatch.setattr(native, "cached", lambda: False)
    def out() -> str:  # the console wraps long lines
        return " ".join(capsys.readouterr().out.split())

    assert main(["backends"]) == 0
    assert "--build-native` builds it" in out()
    monkeypatch.setattr(native, "cached", lambda: True)
    assert main(["backends"]) == 0
    assert "native kernel: built and cached" in out()
    monkeypatch.setattr(native, "_build", lambda: (None, "build failed: no compiler"))
    monkeypatch.setattr(native, "_state", {"module": None, "reason": "not built yet", "tried": False})
    assert main(["backends", "--build-native"]) == 1  # a failed build is a failed command, with the reason
    assert "native kernel: build failed: no compiler" in out()


@pytest.mark.slow
def test_benchmark_script_runs_quick():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "core.py"), "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n| ") >= 8  # header + 7 rows


@pytest.mark.slow
def test_decode_benchmark_runs_quick():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "speed-up" in done.stdout and done.stdout.count("\n| ") >= 6  # header + 5 rows


@pytest.mark.slow
def test_linear_benchmark_runs_quick():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "linear.py"), "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "FAVOR+ relative error" in done.stdout and done.stdout.count("\n| 256 |") == 1


def _kv_rows(out: str) -> dict[str, list[str]]:
    """The kv-cache table's rows by variant: the words after the variant's name."""
    rows = {}
    for line in out.splitlines():
        for variant in ("this model", "same model as MHA", "same model as MQA", "without its window"):
            if line.startswith(variant + " "):
                rows[variant] = line[len(variant):].split()
    return rows


def test_kv_cache_command_published_figures(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["kv-cache", "--preset", "llama-2-70b", "--tokens", "4096"]) == 0
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) <= 80
    rows = _kv_rows(out)  # KV heads, window, per token, total
    # 2 (K, V) x 80 layers x 8 KV heads x 128 x 2 bytes = 320 KiB a token; 4096 tokens: 1.25 GiB
    assert rows["this model"] == ["8", "none", "320", "KiB", "1.25", "GiB"]
    assert rows["same model as MHA"] == ["64", "none", "2.5", "MiB", "10", "GiB"]  # 64 heads: 8x
    assert rows["same model as MQA"] == ["1", "none", "40", "KiB", "160", "MiB"]
    assert main(["kv-cache", "--preset", "mistral-7b", "--tokens", "32768"]) == 0
    rows = _kv_rows(capsys.readouterr().out)
    assert rows["this model"][-2:] == ["512", "MiB"]  # 2 x 32 x 8 x 128 x 2 B x 4096 (its window)
    assert rows["without its window"][-2:] == ["4", "GiB"]  # the same x 32768
    assert main(["kv-cache", "--layers", "32", "--kv-heads", "32", "--head-dim", "128"]) == 0
    rows = _kv_rows(capsys.readouterr().out)
    assert rows["this model"][-2:] == ["2", "GiB"]  # Llama-2-7B's shape at 4096 tokens, fp16: 2^31 bytes
    assert "same model as MHA" not in rows


def test_kv_cache_command_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["kv-cache", "--layers", "2"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("usage: attnkit kv-cache")
    assert "needs --preset NAME, or all of" in err
    assert main(["kv-cache", "--layers", "2", "--kv-heads", "3", "--heads", "4", "--head-dim", "8"]) == 1
    assert "attnkit kv-cache: error: heads (4) must be a multiple of kv_heads (3)" in capsys.readouterr().err
    from attnkit.nn.cache import KVShape

    with pytest.raises(ValueError, match=r"heads \(4\) must be a multiple of kv_heads \(3\)"):
        KVShape("x", 2, 4, 3, 8)  # the check lives in the library; the CLI only reports it
    with pytest.raises(ValueError, match="window must be >= 1; got 0"):
        KVShape("x", 2, 4, 2, 8, window=0)
    assert main(["kv-cache", "--preset", "gpt-2", "--tokens", "-1"]) == 1
    assert "tokens must be >= 0; got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["kv-cache", "--preset", "lama-2-7b"])
    assert exc.value.code == 2 and "did you mean 'llama-2-7b'" in capsys.readouterr().err


@pytest.mark.slow
def test_ring_benchmark_runs_quick():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ring.py"), "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| 1 |", "| 2 |", "| 4 |"))]
    assert len(rows) == 3
    # the bytes each rank sent equal the formula's (the last two columns)
    assert all(r.split("|")[4].strip() == r.split("|")[5].strip() for r in rows), rows


def test_version_and_bare_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out == f"attnkit {attnkit.__version__}\n"
    assert main([]) == 0  # no command: the help, on stdout
    out = capsys.readouterr().out
    assert out.startswith("usage: attnkit ") and "kv-cache" in out and "numbered from 0" in out


def test_python_dash_m_matches_the_script():
    done = subprocess.run([sys.executable, "-m", "attnkit", "benh"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "invalid choice: 'benh'" in done.stderr and "did you mean 'bench'?" in done.stderr


def test_unknown_option_shows_the_subcommand_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--lenght", "5"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("usage: attnkit demo ")
    assert "unrecognized arguments: --lenght 5; did you mean '--length'?" in err
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--length", "0"])
    assert exc.value.code == 2 and "expected an int >= 1; got 0" in capsys.readouterr().err


def test_every_option_has_help_and_shows_its_default(capsys):
    parser = build_parser()
    assert set(parser.commands) == {"demo", "backends", "kv-cache", "bench", "explain", "serve", "lab", "induction",
                                    "translate-demo", "profile"}
    for name, sub in parser.commands.items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            assert action.help, (name, action.dest)
            if action.nargs == 0 and action.default is True:  # a --no-X flag: "(default: True)" would read
                assert "by default" in action.help, (name, action.dest)  # as "skipped by default"; say it in words
                assert "(default: True)" not in text, name
            elif action.option_strings and action.default not in (None, False) and action.dest != "help":
                forms = ([sep.join(map(str, action.default)) for sep in (",", ", ")]
                         if isinstance(action.default, list) else [action.default])
                assert any(f"default: {f!r}" in text or f"default: {f}" in text for f in forms), (name, action.dest)


def test_tables_fit_the_width_and_never_cut_an_entry():
    cols = ("name", Column("long header words", right=True), Column("note", wrap=True))
    rows = [("alpha", "123456.78", "a rather long free text that wraps onto several lines"), ("b", "1.5", "ok")]
    lines = render_table("a title", cols, rows, max_width=40)
    assert max(map(len, lines)) <= 40
    assert any("123456.78" in line.split() for line in lines)  # the number whole
    body = lines[lines.index(next(x for x in lines if x.startswith("---"))) + 1:]
    assert len(body) > 2  # the note wrapped, its words in order, nothing lost
    assert " ".join(" ".join(body).split()) == ("alpha 123456.78 a rather long free text that wraps onto several "
                                                "lines b 1.5 ok")
    # too wide even at its narrowest: split into tables that repeat the first column
    wide = render_table("t", ["tok", *(f"layer {i}" for i in range(6))],
                        [("8 it", *(f"because{i} .4{i}\nmat .12" for i in range(6)))], max_width=50)
    assert max(map(len, wide)) <= 50 and "t (1 of 2)" in wide and "t (2 of 2)" in wide
    assert sum(line.startswith("8 it") for line in wide) == 2
    assert all(any(f"because{i} .4{i}" in line for line in wide) for i in range(6))
    with pytest.raises(ValueError, match="every row must have 2 cells"):
        render_table("t", ["a", "b"], [("x",)])
