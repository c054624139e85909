"""attnkit.bench and ``attnkit bench``: every implementation sees the same problem, wrong or
failing peers are reported and never timed, and the report keeps every row."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

import pytest
import torch

import attnkit
from attnkit import bench, masks
from attnkit.bench import runner
from attnkit.bench.runner import BenchResult, Row
from attnkit.cli import main

from conftest import assert_drawn


def _grid(p):
    _, _, _, lq, lk, _ = p.shape
    return torch.arange(lq)[:, None], torch.arange(lk)[None, :]


@pytest.mark.parametrize("case", list(bench.CASES))
def test_every_description_of_a_case_is_the_same_problem(case):
    """The FlexAttention mask_mod/score_mod, written as index arithmetic, describe the same
    attention as attnkit's structured mask and bias (from which SDPA's and eager code's dense
    mask and bias are materialised)."""
    p = bench.make_problem(case, 200, heads=4, kv_heads=2, window=37)
    b, h, _, lq, lk, _ = p.shape
    qi, ki = _grid(p)
    ours = torch.ones(b, 1, lq, lk, dtype=torch.bool) if p.mask is None else \
        p.mask.to_dense(lq, lk, batch=b).expand(b, 1, lq, lk) if p.mask.extent()[0] > 1 else \
        p.mask.to_dense(lq, lk).expand(b, 1, lq, lk)
    if p.mask_mod is not None:
        flex = torch.stack([p.mask_mod(bi, 0, qi, ki).expand(lq, lk) for bi in range(b)])[:, None]
        assert torch.equal(flex, ours)
    if p.score_mod is not None:
        zero = torch.zeros(lq, lk)
        flex_bias = torch.stack([p.score_mod(zero, 0, hi, qi, ki) for hi in range(h)])
        torch.testing.assert_close(flex_bias, p.dense_bias()[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(p.bias.to_dense(lq, lk, heads=h)[0], flex_bias, rtol=0, atol=1e-6)
    assert p.pairs == pytest.approx(float(ours.sum()) * h)


def test_case_shapes_and_allowed_pairs():
    length, heads = 96, 4
    causal = bench.make_problem("causal", length, heads=heads)
    assert causal.pairs == heads * length * (length + 1) / 2
    window = bench.make_problem("window", length, heads=heads, window=10)
    assert window.pairs == heads * sum(min(i + 1, 10) for i in range(length))
    decode = bench.make_problem("decode", length, heads=heads)
    assert decode.q.shape[2] == 1 and decode.pairs == heads * length
    cross = bench.make_problem("cross", length, heads=heads)
    assert cross.k.shape[2] == length // 4
    assert cross.pairs == heads * length * (length // 4 - length // 4 // 10)
    gqa = bench.make_problem("gqa", length, heads=8, kv_heads=2)
    assert gqa.q.shape[1] == 8 and gqa.k.shape[1] == 2
    doc = bench.make_problem("document", length)
    ids = doc.mask.to_dense(length, length)
    assert ids.sum() < length * (length + 1) / 2  # several documents, causal within each


@pytest.mark.parametrize("case", list(bench.CASES))
def test_naive_peer_matches_float64_reference(case):
    """The eager peer's own matmul-softmax code, on the case's dense mask and bias, equals
    attnkit's float64 reference."""
    p = bench.make_problem(case, 80, heads=4, kv_heads=2, window=9, dtype=torch.float64)
    want = attnkit.attention(p.q, p.k, p.v, mask=p.mask, bias=p.bias, backend="reference")
    torch.testing.assert_close(runner._naive(p)(), want, rtol=1e-10, atol=1e-10)


def test_run_checks_and_times_every_implementation():
    result = bench.run(list(bench.CASES), [64, 128], peers=["sdpa", "naive"], repeats=1, memory=False)
    assert len(result.rows) == len(bench.CASES) * 2 * 5
    for row in result.rows:
        assert row.status == "ok", row
        assert row.ms > 0 and row.gflops > 0
        if row.impl != "attnkit:auto":  # the first implementation is the one the others are checked against
            assert row.max_err is not None and row.max_err < 1e-4
    ups = result.speedups("causal", 128, "attnkit:tiled")
    assert set(ups) == {"sdpa", "naive"}
    tiled, sdpa = result.row("causal", 128, "attnkit:tiled"), result.row("causal", 128, "sdpa")
    assert ups["sdpa"] == pytest.approx(sdpa.ms / tiled.ms)
    data = result.to_dict()
    assert json.loads(json.dumps(data))["settings"]["peers"] == ["sdpa", "naive"]


def test_backward_is_checked_on_gradients():
    result = bench.run(["gqa", "alibi"], [48], peers=["sdpa", "naive", "flex"], backward=True, repeats=1,
                       memory=False)
    by_impl = {(r.case, r.impl): r for r in result.rows}
    for case in ("gqa", "alibi"):
        for impl in ("attnkit:tiled", "attnkit:reference", "sdpa", "naive"):
            assert by_impl[case, impl].status == "ok"
        assert by_impl[case, "flex"].status == "skipped"
        assert "CPU backward" in by_impl[case, "flex"].note


def test_a_wrong_peer_is_reported_and_not_timed(monkeypatch):
    def off_by_a_scale(p):
        return lambda: runner.F.scaled_dot_product_attention(p.q, p.k, p.v, scale=0.5)

    monkeypatch.setattr(runner, "_naive", off_by_a_scale)
    result = bench.run(["dense"], [32], peers=["naive"], repeats=1, memory=False)
    row = result.row("dense", 32, "naive")
    assert row.status == "wrong" and row.ms is None and row.max_err > 1e-3
    assert "naive" not in result.speedups("dense", 32, "attnkit:auto")
    assert "| wrong" in bench.markdown(result) and "max error" in bench.markdown(result)


def test_a_wrong_gradient_is_reported(monkeypatch):
    class HalfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g / 2

    original = runner._naive

    def half_gradient(p):
        fn = original(p)
        return lambda: HalfGrad.apply(fn())

    monkeypatch.setattr(runner, "_naive", half_gradient)
    result = bench.run(["causal"], [32], peers=["naive"], backward=True, repeats=1, memory=False)
    assert result.row("causal", 32, "naive").status == "wrong"


def test_a_failing_peer_is_reported(monkeypatch):
    def broken(p):
        def run():
            raise RuntimeError("no kernel for this\nsecond line")
        return run

    monkeypatch.setattr(runner, "_naive", broken)
    result = bench.run(["causal"], [32], peers=["naive", "sdpa"], repeats=1, memory=False)
    row = result.row("causal", 32, "naive")
    assert row.status == "failed" and row.ms is None
    assert row.note == "RuntimeError: no kernel for this"
    assert result.row("causal", 32, "sdpa").status == "ok"


def test_dense_implementations_are_skipped_past_the_limit():
    result = bench.run(["alibi"], [64], peers=["sdpa", "naive"], repeats=1, memory=False, max_dense_gib=1e-6)
    status = {r.impl: r.status for r in result.rows}
    assert status == {"attnkit:auto": "ok", "attnkit:tiled": "ok", "attnkit:reference": "skipped",
                      "sdpa": "skipped", "naive": "skipped"}


def _require_measured(*peaks):
    """Linux CPUs reset and read the peak resident set (/proc/self/clear_refs): there a missing figure is the
    failure these tests look for. Elsewhere no peak is measurable, and they skip."""
    if all(p is not None for p in peaks):
        return
    assert not (sys.platform.startswith("linux") and os.path.exists("/proc/self/clear_refs")), \
        "peak memory was not measured on Linux"
    pytest.skip("peak memory is not measurable on this platform")


def test_peak_memory_sees_the_dense_scores():
    """The reference backend holds (B, H, L, L) float32 scores; tiled holds none."""
    length = 1024
    result = bench.run(["dense"], [length], backends=["tiled", "reference"], peers=[], repeats=1)
    tiled, ref = result.row("dense", length, "attnkit:tiled"), result.row("dense", length, "attnkit:reference")
    _require_measured(ref.peak_mib, tiled.peak_mib)
    scores_mib = 8 * length * length * 4 / 2**20
    assert ref.peak_mib >= 0.9 * scores_mib
    assert tiled.peak_mib < 0.5 * scores_mib


def test_peak_memory_of_peers_counts_their_dense_bias():
    """SDPA with ALiBi needs a (1, H, L, L) float bias, built for the call: it must count."""
    length = 1024
    result = bench.run(["alibi"], [length], backends=["tiled"], peers=["sdpa", "naive"], repeats=1)
    bias_mib = 8 * length * length * 4 / 2**20
    for impl in ("sdpa", "naive"):
        peak = result.row("alibi", length, impl).peak_mib
        _require_measured(peak)
        assert peak >= 0.9 * bias_mib, impl


def test_peers_are_not_timed_without_an_attnkit_output():
    result = bench.run(["dense"], [64], backends=["reference"], peers=["sdpa"], repeats=1, memory=False,
                       max_dense_gib=0)
    assert result.row("dense", 64, "attnkit:reference").status == "skipped"
    row = result.row("dense", 64, "sdpa")
    assert row.status == "unchecked" and row.ms is None


def test_exponent_is_the_log_log_slope():
    rows = [Row("dense", n, "x", "ok", ms=3e-6 * n**2) for n in (256, 512, 1024, 2048)]
    rows += [Row("window", n, "x", "ok", ms=0.01 * n) for n in (256, 512, 1024)]
    rows += [Row("window", 2048, "x", "wrong")]
    result = BenchResult("m", {"peers": [], "lengths": [256, 512]}, 100.0, rows)
    assert result.exponent("dense", "x") == pytest.approx(2.0)
    assert result.exponent("window", "x") == pytest.approx(1.0)
    assert result.exponent("causal", "x") is None


def test_markdown_keeps_losing_and_failed_rows():
    settings = {"peers": ["sdpa"], "lengths": [128], "batch": 1, "heads": 8, "head_dim": 64, "dtype": "float32",
                "device": "cpu", "backward": False, "repeats": 3}
    rows = [Row("dense", 128, "attnkit:auto", "ok", ms=2.0, gflops=1.0, pct_of_matmul=1.0),
            Row("dense", 128, "sdpa", "ok", ms=1.0, gflops=2.0, pct_of_matmul=2.0),
            Row("window", 128, "attnkit:auto", "ok", ms=1.0, gflops=1.0, pct_of_matmul=1.0),
            Row("window", 128, "sdpa", "failed", note="RuntimeError: boom")]
    text = bench.markdown(BenchResult("test machine", settings, 100.0, rows))
    assert "test machine" in text
    assert "| dense | 128 | attnkit:auto | 2.00 |" in text and "**0.50x**" in text
    assert "| window | 128 | sdpa |" in text and "failed: RuntimeError: boom" in text


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    result = bench.run(["causal", "window"], [32, 64], peers=["sdpa"], repeats=1, window=16)
    path = bench.plot(result, tmp_path / "bench.png")
    assert_drawn(path)


@pytest.mark.slow  # compiling FlexAttention takes a minute on 2 cores; the peer's masks are checked uncompiled above
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile needs a C++ compiler on CPU")
def test_flex_peer_is_compiled_checked_and_timed():
    result = bench.run(["window"], [256], backends=["tiled"], peers=["flex"], window=64, repeats=1,
                       memory=False)
    row = result.row("window", 256, "flex")
    assert row.status == "ok", row
    assert row.compile_s is not None and row.compile_s > 0 and row.max_err < 1e-4
    assert "block mask" in row.note


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="cases"):
        bench.run(["sparse"], [64])
    with pytest.raises(ValueError, match="peers"):
        bench.run(["dense"], [64], peers=["xformers"])
    with pytest.raises(ValueError, match="lengths"):
        bench.run(["dense"], [0])
    with pytest.raises(ValueError, match="kv_heads"):
        bench.run(["gqa"], [64], heads=8, kv_heads=3)
    with pytest.raises(TypeError, match="dtype"):
        bench.run(["dense"], [64], dtype=torch.int32)
    for name in ("batch", "heads", "kv_heads", "head_dim", "window", "repeats"):
        with pytest.raises(ValueError, match=name):
            bench.run(["dense"], [64], **{name: 0})
    with pytest.raises(ValueError, match="max_dense_gib"):
        bench.run(["dense"], [64], max_dense_gib=-1)


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--cases", "causal,decode", "--lengths", "32,64", "--peers", "sdpa,naive",
                 "--repeats", "1", "--json", str(out), "--markdown"]) == 0
    text = capsys.readouterr().out
    assert "| causal | 64 | attnkit:tiled |" in text and "Fitted exponent" in text
    data = json.loads(out.read_text())
    assert {r["case"] for r in data["rows"]} == {"causal", "decode"}
    assert all(r["status"] == "ok" for r in data["rows"])
    assert all(math.isfinite(r["ms"]) for r in data["rows"])


@pytest.mark.parametrize("argv, message", [
    (["--cases", "dense,sparse"], "unknown sparse"),
    (["--cases", "causl"], "did you mean 'causal'?"),
    (["--lengths", "64,abc"], "ints separated by commas"),
    (["--peers", "xformers"], "unknown xformers"),
    (["--lenghts", "64"], "did you mean '--lengths'?"),
])
def test_cli_usage_errors_show_the_bench_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("usage: attnkit bench ")


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "0"], "lengths must be positive integers; got [0]"),
    (["--heads", "8", "--kv-heads", "3"], "heads (8) must be a multiple of kv_heads (3)"),
    (["--repeats", "0"], "repeats must be >= 1; got 0"),
    (["--max-dense-gib", "-1"], "max_dense_gib must be >= 0; got -1.0"),
])
def test_cli_values_the_library_rejects_exit_1(argv, message, capsys):
    assert main(["bench", "--cases", "causal", *argv]) == 1
    err = capsys.readouterr().err
    assert f"attnkit bench: error: {message}\n" in err and "Traceback" not in err


def test_cli_table_fits_80_columns_with_every_figure_whole(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.chdir(tmp_path)  # the run prints the JSON's path: a short one, whatever the temp folder's name
    out = tmp_path / "bench.json"
    assert main(["bench", "--cases", "causal,gqa", "--lengths", "48", "--peers", "sdpa,naive", "--repeats", "1",
                 "--json", "bench.json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 80, [line for line in lines if len(line) > 80]
    # one line per step of the run while it goes (stdout is not a terminal here)
    assert [line.split(" (")[0] for line in lines if line.startswith("[")] == [
        "[0/2] causal L=48", "[1/2] gqa L=48", "[2/2] done"]
    data = json.loads(out.read_text())
    rows = [line.split() for line in lines[lines.index(next(x for x in lines if x.startswith("----"))) + 1:]
            if line.split() and line.split()[0] in ("causal", "gqa")]
    assert len(rows) == len(data["rows"]) == 2 * 5
    for r, words in zip(data["rows"], rows):
        assert words[:3] == [r["case"], "48", r["impl"].removeprefix("attnkit:")]
        assert f"{r['ms']:.2f}" in words and f"{r['peak_mib']:.0f}" in words  # figures printed whole
        assert f"{r['gflops']:.1f}" in words


def test_cli_quick_preset_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--quick" in text and "took" in text and "minutes" in text and "(default: 1024,2048,4096" in text
    assert "--quick: 128,256" in text and "peers sdpa,naive" in text


def test_document_case_packs_several_documents():
    p = bench.make_problem("document", 512)
    dense = p.mask.to_dense(512, 512)
    starts = [i for i in range(512) if not dense[i, :i].any()]  # first token of each document
    assert len(starts) == 8 and starts[0] == 0
    assert torch.equal(dense, dense & masks.causal().to_dense(512, 512))
