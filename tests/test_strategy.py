"""The tiled backend's kernel is decided once per call (``tiled.choose``), with its reasons, and travels into the
backward; ``attnkit.explain_call`` and ``attnkit backends --explain-call`` say why a call runs where it runs."""

from __future__ import annotations

import itertools
import json
import time
import warnings

import pytest
import torch

import attnkit
from attnkit import biases, masks
from attnkit.cli import main
from attnkit.functional import tiled, tuning
from attnkit.functional._call import make_call

from conftest import native_only_if, qkv


def _call(q, k, v, **kw):
    options = dict(mask=None, bias=None, scale=None, softcap=None, dropout_p=0.0, return_lse=False)
    return make_call(q, k, v, **{**options, **kw})


def _qkv(dtype=torch.float32, grad=False, dv=None):
    return qkv(batch=1, heads=4, kv_heads=2, q_len=300, head_dim=16, v_dim=dv, dtype=dtype, requires_grad=grad)


@pytest.mark.parametrize(("name", "kwargs", "pinned", "forward", "fused_backward", "why"), [
    ("window", dict(mask=masks.sliding_window(40)), "auto", "banded", True, "batched engine"),
    ("softcap", dict(mask=masks.causal(), softcap=20.0), "auto", "math", False, "not used (softcap)"),
    ("score_mod", dict(bias=biases.score_mod(lambda s, b, h, i, j: s * 0.5)), "auto", "math", False,
     "a score_mod bias"),
    ("dropout", dict(dropout_p=0.1), "auto", "math", False, "not used (dropout)"),
    ("Dv != D", dict(dv=24), "auto", "math", False, "Dv != D"),
    ("pinned math", dict(mask=masks.causal()), "math", "math", False, "kernel pinned to 'math'"),
    ("pinned fused", dict(mask=masks.causal()), "fused", "fused", True, "per-chunk loop, fused kernel"),
    ("pinned banded", dict(mask=masks.causal()), "banded", "banded", True, "batched engine"),
    ("pinned banded, softcap", dict(mask=masks.causal(), softcap=20.0), "banded", "math", False, "not used (softcap)"),
    ("tensor bias with its gradient", dict(tensor_bias=True, grad=True), "auto", "fused", False,
     "a tensor bias needs its gradient"),
])
def test_choose_gives_the_kernel_and_says_why(name, kwargs, pinned, forward, fused_backward, why):
    kwargs = dict(kwargs)
    q, k, v = _qkv(grad=kwargs.pop("grad", False), dv=kwargs.pop("dv", None))
    if kwargs.pop("tensor_bias", False):
        kwargs["bias"] = biases.from_tensor(torch.zeros(300, 300, dtype=torch.float32, requires_grad=True))
    with tiled.kernel(pinned):
        strategy = tiled.choose(_call(q, k, v, **kwargs))
    assert (strategy.forward, strategy.fused_backward) == (forward, fused_backward), str(strategy)
    assert any(why in r for r in strategy.reasons), str(strategy)
    assert strategy.reasons[0].startswith(f"kernel pinned: {pinned!r}")


def test_the_native_kernel_is_chosen_only_where_auto_takes_it(monkeypatch):
    """Off (ATTNKIT_NATIVE=0): the reason says so, and the window runs banded."""
    q, k, v = _qkv()
    strategy = tiled.choose(_call(q, k, v, mask=masks.sliding_window(40)))
    assert strategy.forward == "banded" and strategy.native is None
    assert any("ATTNKIT_NATIVE=0" in r for r in strategy.reasons)
    q64, k64, v64 = _qkv(torch.float64)
    with native_only_if(True):
        reasons = tiled.choose(_call(q64, k64, v64, mask=masks.sliding_window(40))).reasons
    assert any("for float32 only; this call computes in float64" in r for r in reasons)


@pytest.mark.parametrize("mask", [masks.sliding_window(40), masks.causal()], ids=["window", "causal"])
def test_the_strategy_is_decided_once_per_call_forward_and_backward(monkeypatch, mask):
    import attnkit.functional.tiled.autograd as autograd

    decided = []
    real = autograd.choose

    def counted(call):
        decided.append(call)
        return real(call)

    monkeypatch.setattr(autograd, "choose", counted)
    q, k, v = _qkv(grad=True)
    out, lse = attnkit.attention(q, k, v, mask=mask, backend="tiled", return_lse=True)
    (out.sum() + torch.where(torch.isinf(lse), 0.0, lse).sum()).backward()  # the lse's gradient: per-chunk backward
    assert len(decided) == 1
    ref = attnkit.attention(q.detach().double(), k.detach().double(), v.detach().double(), mask=mask,
                            backend="reference")
    assert (out.double() - ref).abs().max() < 1e-5


def test_explain_call_names_the_backend_and_kernel_that_run():
    q, k, v = _qkv()
    plan = attnkit.explain_call(q, k, v, mask=masks.causal())
    assert plan.backend == "sdpa" and plan.tiled is None and "without a dense mask" in str(plan)
    plan = attnkit.explain_call(q, k, v, mask=masks.sliding_window(40))
    assert plan.backend == "tiled" and plan.tiled.forward == "banded"
    assert any(r.startswith("auto: sdpa declined (it takes the sliding_window") for r in plan.reasons)
    small = qkv(q_len=7)
    plan = attnkit.explain_call(*small, mask=masks.sliding_window(2))
    assert plan.backend == "reference" and "materialising is cheaper" in plan.reasons[-1]
    with tiled.kernel("math"):
        assert "tiled forward: math" in str(attnkit.explain_call(q, k, v, backend="tiled"))
    with pytest.raises(ValueError, match="backend='sdpa' cannot run this call: it has no soft-capping"):
        attnkit.explain_call(q, k, v, softcap=5.0, backend="sdpa")
    with pytest.raises(TypeError, match="backend must be a str"):
        attnkit.explain_call(q, k, v, backend=None)


def test_cli_explains_a_benchmark_case(capsys):
    assert main(["backends", "--explain-call", "window", "--length", "1024", "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert "window: B=1, H=8" in out and "Lq=1024" in out and "float64" in out
    assert "backend: tiled" in out and "tiled forward: banded" in out
    assert main(["backends", "--explain-call", "document", "--backend", "sdpa"]) == 1
    assert "refused: backend='sdpa' cannot run this call" in capsys.readouterr().out


# -- the tuning cache: `attnkit backends --tune` measures, `auto` follows ------------------------------------------

class FakeClock:
    """A clock that advances only when a fake kernel 'runs', by that kernel's cost."""

    def __init__(self):
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def kernel(self, name, cost, first=None):
        runs = []

        def run():
            self.now += first if first is not None and not runs else cost
            runs.append(1)
            self.calls.append(name)

        return run


def _measured_ranking(costs, first=None, repeats=5):
    clock = FakeClock()
    runners = {name: clock.kernel(name, cost, (first or {}).get(name)) for name, cost in costs.items()}
    medians, firsts, _ = tuning.time_kernels(runners, repeats=repeats, clock=clock)
    return tuning.rank({k: 1e3 * s for k, s in medians.items()}), medians, firsts, clock


def test_the_faster_kernel_wins_and_first_calls_are_kept_out_of_the_medians():
    ranking, medians, firsts, clock = _measured_ranking(
        {"native": 0.012, "fused": 0.010, "math": 0.030, "flex": 0.011}, first={"flex": 30.0, "math": 0.035})
    assert ranking == ("fused", "flex", "native", "math")  # flex and native: 10% apart, not tied
    assert medians == pytest.approx({"native": 0.012, "fused": 0.010, "math": 0.030, "flex": 0.011})
    assert firsts["flex"] == pytest.approx(30.0)  # the compile, reported apart
    # each kernel: a first call (the warm-up), a probe, then 5 timed runs, interleaved (no kernel twice in a row)
    timed = clock.calls[8:]
    assert len(timed) == 20 and all(a != b for a, b in itertools.pairwise(timed))


def test_a_kernel_whose_probe_after_the_warm_up_is_far_slower_is_not_timed_further():
    clock = FakeClock()
    runners = {"math": clock.kernel("math", 0.040), "fused": clock.kernel("fused", 0.010, first=1.0),
               "flex": clock.kernel("flex", 0.008, first=20.0)}  # first calls (JIT, compile) do not count
    medians, first, dropped = tuning.time_kernels(runners, repeats=3, clock=clock)
    assert first["flex"] == pytest.approx(20.0)
    assert set(medians) == {"fused", "flex"} and clock.calls.count("math") == 2
    assert dropped == {"math": "its probe call took 5.0x the fastest's: not timed further"}


@pytest.mark.parametrize(("costs", "winner"), [
    ({"native": 10.0, "banded": 10.0, "fused": 10.0, "math": 10.0}, "math"),  # all tied: the simplest
    ({"native": 10.0, "banded": 10.2}, "banded"),  # within 3%: the simpler
    ({"native": 10.0, "banded": 10.5}, "native"),  # 5% apart: the faster
    ({"flex": 9.9, "native": 10.0}, "native"),  # compiled Flex is the least simple
])
def test_ties_go_to_the_simpler_kernel(costs, winner):
    assert tuning.SIMPLICITY == ("math", "fused", "banded", "native", "flex")
    assert _measured_ranking({k: v / 1e3 for k, v in costs.items()})[0][0] == winner


@pytest.mark.parametrize(("mask", "dtype", "length", "expected"), [
    (masks.sliding_window(40), torch.float32, 300, ("window", "float32", 300)),
    (masks.sliding_window(40, align="bottom_right"), torch.bfloat16, 300, ("window", "bfloat16", 300)),
    (masks.causal(), torch.float16, 300, ("causal", "bfloat16", 300)),
    (masks.document(torch.arange(300) // 70) & masks.causal(), torch.float32, 300, ("document", "float32", 300)),
    (masks.document(torch.arange(300) // 70), torch.float32, 300, ("document", "float32", 300)),
    (None, torch.float32, 300, ("dense", "float32", 300)),
    (masks.key_padding([250]), torch.float32, 300, ("dense", "float32", 300)),
    (masks.prefix_lm(torch.tensor([100])), torch.float32, 300, "none of the tuned families"),
    (masks.causal(), torch.float64, 300, "float64 calls are not tuned"),
])
def test_how_a_call_maps_to_a_tuned_case(mask, dtype, length, expected):
    q, k, v = qkv(batch=1, heads=2, q_len=length, head_dim=8, dtype=dtype)
    case = tuning.case_of(_call(q, k, v, mask=mask))
    if isinstance(expected, str):
        assert isinstance(case, str) and expected in case
    else:
        assert case == expected


def _tuning(cases, **machine):
    return tuning.Tuning({**tuning.this_machine(), **machine}, time.time() - 7200, 2, tuple(cases))


def test_the_nearest_tuned_length_on_a_log_scale():
    t = _tuning([tuning.TunedCase("window", "float32", n, {"math": 1.0}) for n in (1024, 4096)])
    assert [t.find("window", "float32", n).length for n in (100, 1500, 2048, 3000, 100_000)] == \
        [1024, 1024, 4096, 4096, 4096]  # 2048: equally far from both, the longer
    assert t.find("window", "bfloat16", 1024) is None and t.find("causal", "float32", 1024) is None


def test_the_cache_folder_follows_attnkit_cache_dir_then_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNKIT_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning.cache_path() == tmp_path / "mine" / "tuning.json"
    monkeypatch.delenv("ATTNKIT_CACHE_DIR")
    assert tuning.cache_path() == tmp_path / "xdg" / "attnkit" / "tuning.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tuning.cache_path() == tmp_path / "home" / ".cache" / "attnkit" / "tuning.json"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNKIT_CACHE_DIR", str(tmp_path))
    return tmp_path


def _window_call(grad=False):
    q, k, v = _qkv(grad=grad)
    return q, k, v, _call(q, k, v, mask=masks.sliding_window(40))


def test_auto_follows_the_cache_for_the_nearest_case_and_says_so(cache_dir, capsys):
    *_, call = _window_call()
    static = tiled.choose(call)
    assert static.forward == "banded" and any("kernel policy: static (no tuning cache at" in r for r in static.reasons)
    tuning.save(_tuning([tuning.TunedCase("window", "float32", 256, {"banded": 9.0, "fused": 4.0, "math": 8.0}),
                         tuning.TunedCase("window", "float32", 8192, {"banded": 4.0, "fused": 9.0})]))
    assert (cache_dir / "tuning.json").exists()
    measured = tiled.choose(call)  # L=300: nearest 256
    assert measured.forward == "fused", str(measured)
    assert any("kernel policy: measured on this machine" in r and "window float32 call at L=300" in r
               and "L=256: fused 4.0 ms" in r for r in measured.reasons)
    q, k, v, _ = _window_call()
    out = attnkit.attention(q, k, v, mask=masks.sliding_window(40))
    ref = attnkit.attention(q.double(), k.double(), v.double(), mask=masks.sliding_window(40), backend="reference")
    assert (out.double() - ref).abs().max() < 1e-5
    grad = tiled.choose(_window_call(grad=True)[3])  # the tuner times forwards: a training call keeps the policy
    assert grad.forward == "banded" and any("this call needs gradients" in r for r in grad.reasons)
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "measured 2 h ago with 2 threads" in out and "window float32 L=256" in out and "fused" in out
    assert main(["backends", "--explain-call", "window", "--length", "1024"]) == 0
    assert "kernel policy: measured on this machine" in capsys.readouterr().out


def test_a_measured_kernel_that_cannot_run_the_call_is_passed_over(cache_dir):
    tuning.save(_tuning([tuning.TunedCase("window", "float32", 256, {"fused": 1.0, "math": 8.0})]))
    q, k, v = _qkv()
    strategy = tiled.choose(_call(q, k, v, mask=masks.sliding_window(40), softcap=30.0))  # no fused kernel
    assert strategy.forward == "math" and "math: the fastest measured kernel" in strategy.reasons[-1]


@pytest.mark.parametrize("stale", [{"torch": "1.0.0"}, {"cpu": "another CPU"}, {"attnkit": "0.0.1"}])
def test_a_cache_from_another_machine_or_version_is_ignored(cache_dir, capsys, stale):
    tuning.save(_tuning([tuning.TunedCase("window", "float32", 256, {"fused": 1.0, "banded": 9.0})], **stale))
    strategy = tiled.choose(_window_call()[3])
    assert strategy.forward == "banded"
    (key, value), = stale.items()
    assert any(f"ignored: it was measured with another {key} {value!r}" in r for r in strategy.reasons)
    assert main(["backends"]) == 0
    assert f"ignored: it was measured with another {key} {value!r}" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["{not json", '{"format": 1, "cases": []}', "[]", '{"format": 99}'])
def test_a_corrupt_cache_warns_once_and_is_ignored(cache_dir, text):
    (cache_dir / "tuning.json").write_text(text)
    with pytest.warns(RuntimeWarning, match="ignoring the tuning cache .*tuning.json: it cannot be read"):
        strategy = tiled.choose(_window_call()[3])
    assert strategy.forward == "banded" and any("ignored: it cannot be read" in r for r in strategy.reasons)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiled.choose(_window_call()[3])  # the same file: no second warning


@pytest.mark.parametrize(("field", "value"), [("medians_ms", {"fused": float("nan"), "math": 2.0}),
                                              ("medians_ms", {"fused": -1.0}), ("length", 0)])
def test_a_cache_with_values_auto_cannot_use_warns_and_is_ignored_not_crashing_the_call(cache_dir, field, value):
    data = json.loads(_tuning([tuning.TunedCase("window", "float32", 256, {"fused": 1.0})]).to_json())
    data["cases"][0][field] = value
    (cache_dir / "tuning.json").write_text(json.dumps(data))
    q, k, v, call = _window_call()
    with pytest.warns(RuntimeWarning, match="ignoring the tuning cache .*tuning.json: it cannot be read"):
        strategy = tiled.choose(call)
    assert strategy.forward == "banded" and any("ignored: it cannot be read" in r for r in strategy.reasons)
    out = attnkit.attention(q, k, v, mask=masks.sliding_window(40))
    ref = attnkit.attention(q, k, v, mask=masks.sliding_window(40), backend="reference")
    assert (out - ref).abs().max() < 1e-5  # float32


def test_auto_never_times_inside_a_call(cache_dir, monkeypatch):
    tuning.save(_tuning([tuning.TunedCase("window", "float32", 256, {"fused": 1.0})]))

    def forbidden(*args, **kwargs):
        raise AssertionError("timed inside a user's call")

    for name in ("time_kernels", "interleaved_median_seconds", "tune"):
        monkeypatch.setattr(tuning, name, forbidden)
    q, k, v, _ = _window_call()
    plan = attnkit.explain_call(q, k, v, mask=masks.sliding_window(40))
    assert plan.tiled.forward == "fused" and any("measured on this machine" in r for r in plan.tiled.reasons)
    assert attnkit.attention(q, k, v, mask=masks.sliding_window(40)).shape == q.shape  # the cache followed, untimed


def test_the_tuner_measures_and_the_cli_saves_and_shows_the_table(cache_dir, capsys, monkeypatch):
    real = tuning.tune

    def small(progress=None):
        return real(["window", "dense"], ["float32"], [256], kernels=("math", "fused", "banded", "native"),
                    repeats=1, heads=2, head_dim=16, progress=progress)

    monkeypatch.setattr(tuning, "tune", small)
    assert main(["backends", "--tune"]) == 0
    out = capsys.readouterr().out
    saved = tuning.load_cache().tuning
    assert saved is not None and [(c.family, c.length) for c in saved.cases] == [("window", 256), ("dense", 256)]
    window = saved.cases[0]
    timed, dropped = set(window.medians_ms), {k for k, why in window.skipped.items() if "not timed further" in why}
    assert timed and timed | dropped == {"math", "fused", "banded"} and not timed & dropped  # timings decide which
    assert "ATTNKIT_NATIVE=0" in window.skipped["native"]
    assert "window float32 L=256" in out and "saved to" in out and "tuning.json" in out


def test_the_tuner_resets_flex_compiles_and_autos_count_of_them_before_a_case_that_times_flex(monkeypatch):
    from attnkit.functional import flex

    monkeypatch.setattr(flex, "_COMPILED", {("another variant", n) for n in range(flex.AUTO_COMPILES)})
    clock = FakeClock()
    monkeypatch.setattr(tuning, "_runners", lambda *a: ({"flex": clock.kernel("flex", 0.01),
                                                         "math": clock.kernel("math", 0.02)}, {}))
    result = tuning.tune(["window"], ["float32"], [256], repeats=1, clock=clock)
    assert result.cases[0].ranking == ("flex", "math") and not flex._COMPILED


def test_tune_into_a_folder_it_cannot_write_fails_at_once_saying_why(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("ATTNKIT_CACHE_DIR", str(blocker / "attnkit"))  # a folder under a file: never writable

    def never(**kwargs):
        raise AssertionError("tuned for minutes before finding the cache folder unwritable")

    monkeypatch.setattr(tuning, "tune", never)
    assert main(["backends", "--tune"]) == 1
    err = capsys.readouterr().err
    assert f"cannot write the tuning cache in {blocker / 'attnkit'} ($ATTNKIT_CACHE_DIR)" in err
    assert "set ATTNKIT_CACHE_DIR to a folder you can write" in err


def test_a_save_that_fails_leaves_the_old_cache_whole_and_no_temporary_file(cache_dir, monkeypatch):
    old = _tuning([tuning.TunedCase("window", "float32", 256, {"fused": 1.0})])
    tuning.save(old)
    before = (cache_dir / "tuning.json").read_text()

    def interrupted(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(tuning.os, "replace", interrupted)
    with pytest.raises(OSError, match="disk full"):
        tuning.save(_tuning([tuning.TunedCase("window", "float32", 256, {"math": 1.0})]))
    assert (cache_dir / "tuning.json").read_text() == before and sorted(p.name for p in cache_dir.iterdir()) == \
        ["tuning.json"]


def test_on_cuda_auto_chooses_sdpa_then_flex_then_tiled(monkeypatch):
    import attnkit.functional.core as core

    monkeypatch.setattr(core, "device_type", lambda call: "cuda")
    q, k, v = _qkv(grad=True)
    assert attnkit.explain_call(q, k, v, mask=masks.causal()).backend == "sdpa"
    plan = attnkit.explain_call(q, k, v, mask=masks.sliding_window(40), bias=biases.alibi(4), return_lse=True)
    assert plan.backend == "flex" and "compiled FlexAttention" in plan.reasons[-1]  # gradients and lse: fine on CUDA
    plan = attnkit.explain_call(q, k, v, mask=masks.sliding_window(40), dropout_p=0.1)
    assert plan.backend == "tiled" and any("flex declined (it has no dropout)" in r for r in plan.reasons)
    import attnkit.functional.flex as flex

    monkeypatch.setattr(flex, "_COMPILED", {("another variant", n) for n in range(flex.AUTO_COMPILES)})
    plan = attnkit.explain_call(q, k, v, mask=masks.sliding_window(40))
    assert plan.backend == "tiled" and any("flex declined (it has compiled 8 variants" in r for r in plan.reasons)
    seen = flex._variant(_call(q, k, v, mask=masks.sliding_window(40)))  # the same parameters: no new compile
    monkeypatch.setattr(flex, "_COMPILED", {seen, *(("another variant", n) for n in range(flex.AUTO_COMPILES))})
    assert attnkit.explain_call(q, k, v, mask=masks.sliding_window(40)).backend == "flex"


def test_on_cpu_auto_takes_flex_only_where_the_tuner_measured_it_fastest(cache_dir):
    q, k, v = _qkv()
    assert attnkit.explain_call(q, k, v, mask=masks.sliding_window(40)).backend == "tiled"
    tuning.save(_tuning([tuning.TunedCase("window", "float32", 256, {"flex": 1.0, "banded": 9.0})]))
    plan = attnkit.explain_call(q, k, v, mask=masks.sliding_window(40))
    assert plan.backend == "flex" and "measured compiled Flex fastest for window, float32, L=256" in plan.reasons[-1]
    assert attnkit.explain_call(q, k, v, mask=masks.sliding_window(40), return_lse=True).backend == "tiled"
