"""The optional native forward (attnkit.functional.tiled.native): exactness, gradients, fallback, the build cache.

Where a C++ compiler exists the kernel must build (about 20 s, cached in torch's extension folder for the
later runs): the default tier then runs a smoke test of every dtype, gradients across several 64-row blocks
and per-sequence ALiBi; it fails, never skips, if the build does. Without a compiler those tests skip (under
CI=true they fail too). The rest of the native grid is slow-marked. tests/test_fuzz.py checks the kernel
against its own float64 definition, written apart from attnkit's masks. The fallback logic
(ATTNKIT_NATIVE=0, a failed build remembered, unsupported calls) and the build cache's rules are tested
without building anything.
"""

from __future__ import annotations

import concurrent.futures
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from unittest import mock

import pytest
import torch

import attnkit
from attnkit import biases, masks
from attnkit.functional import tiled
from attnkit.functional._call import make_call
from attnkit.functional.tiled import native
from attnkit.functional.tiled.plan import native_params
from attnkit.functional.tiled.strategy import _native_faster, choose, native_ok

from conftest import assert_within, max_err, under_ci

pytestmark = pytest.mark.native  # these tests choose when the native kernel may run


def _compiler() -> str | None:
    return shutil.which("c++") or shutil.which("g++")


@pytest.fixture(scope="session")
def ext():
    module = native.load()
    if module is None:
        if (_compiler() or under_ci()) and not native.disabled():
            pytest.fail(f"the native kernel must build where a compiler exists ({_compiler()}): "
                        f"{native.native_status()}")
        pytest.skip(f"native kernel unavailable: {native.native_status()}")
    return module


def _call(q, k, v, mask=None, bias=None):
    return make_call(q, k, v, mask=mask, bias=bias, scale=None, softcap=None, dropout_p=0.0, return_lse=True)


def _qkv(b, h, hkv, lq, lk, d, dv, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, lq, d, generator=g, dtype=dtype), torch.randn(b, hkv, lk, d, generator=g, dtype=dtype),
            torch.randn(b, hkv, lk, dv, generator=g, dtype=dtype))


_IDS = torch.tensor([0] * 70 + [1] * 100 + [2] * 130)
MASKS = {
    "none": lambda: (None, None),
    "causal": lambda: (masks.causal(), None),
    "causal-bottom-right": lambda: (masks.causal("bottom_right"), None),
    "window-left-right": lambda: (masks.sliding_window(30, 5), None),
    "window-bottom-right": lambda: (masks.sliding_window(64, align="bottom_right"), None),
    "document": lambda: (masks.document(_IDS[:200], _IDS), None),
    "document-causal-batch": lambda: (masks.document(torch.stack([_IDS[:200], _IDS[100:]]), torch.stack(
        [_IDS, _IDS.flip(0)])) & masks.causal(), None),
    "key-padding-empty-rows": lambda: (masks.key_padding([0, 150]), None),
    "causal-per-sequence": lambda: (masks.causal("bottom_right", q_lengths=[150, 200], k_lengths=[300, 120]), None),
    "alibi": lambda: (None, biases.alibi(4)),
    "causal+padding+alibi": lambda: (masks.causal() & masks.key_padding([250, 17]), biases.alibi(4)),
    "window+alibi-bottom-right": lambda: (masks.sliding_window(40, align="bottom_right"),
                                          biases.alibi(4, align="bottom_right")),
    "causal+alibi-per-sequence": lambda: (
        masks.causal("bottom_right", q_lengths=[150, 200], k_lengths=[300, 120]),
        biases.alibi(4, align="bottom_right", q_lengths=[150, 200], k_lengths=[300, 120])),
}
# in the default tier: one of each family (window, documents, padding with ALiBi, per-sequence ALiBi)
DEFAULT_TIER = {"window-left-right", "document-causal-batch", "causal+padding+alibi", "causal+alibi-per-sequence"}
GRID = [name if name in DEFAULT_TIER else pytest.param(name, marks=pytest.mark.slow) for name in MASKS]


class _Spy:
    """Counts the native kernel's forward and backward calls and records the dtype each forward was handed."""

    def __init__(self, module):
        self.module, self.calls, self.backward_calls, self.dtypes = module, 0, 0, []

    def forward(self, *args):
        self.calls += 1
        self.dtypes.append(args[0].dtype)
        return self.module.forward(*args)

    def backward(self, *args):
        self.backward_calls += 1
        return self.module.backward(*args)


@pytest.fixture
def spy(ext, monkeypatch):
    for dtype in (torch.bfloat16, torch.float16):  # their one-off check runs the real kernel, not the spy
        native.low_precision_path(dtype)
    watching = _Spy(ext)
    monkeypatch.setattr(native, "_state", {"module": watching, "reason": "built", "tried": True})
    return watching


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_smoke_every_dtype_within_the_plain_runs_error(spy, dtype):
    """A window with per-head ALiBi, GQA, Lq = 200 (four query blocks): the native output's error against float64
    is at most twice a plain materialising run's in the same dtype (flash-attn's rule)."""
    mask, bias = masks.sliding_window(40, 3), biases.alibi(4)
    q, k, v = (t.to(dtype) for t in _qkv(2, 4, 2, 200, 200, 64, 64, dtype=torch.float32, seed=3))
    with tiled.kernel("native"):
        out = attnkit.attention(q, k, v, mask=mask, bias=bias, backend="tiled")
    assert spy.calls == 1 and out.dtype == dtype
    ref = attnkit.attention(q.double(), k.double(), v.double(), mask=mask, bias=bias, backend="reference")
    plain = attnkit.attention(q, k, v, mask=mask, bias=bias, backend="reference")
    assert_within((out.double() - ref).abs().max().item(), (plain.double() - ref).abs().max().item(), 2.0, 1e-6,
                  f"native {dtype}")


@pytest.mark.parametrize("scale", [0.0, -0.7, 1e-30, 3.0])
def test_smoke_scales_and_gradients_across_blocks(spy, scale):
    """Zero, negative, tiny and large scales, forward and backward, 200 rows over four 64-row blocks, in float64:
    equal to the reference backend to 1e-10 (the native backward recomputes from the native out and lse)."""
    mask, bias = MASKS["causal+alibi-per-sequence"]()
    q, k, v = (t.requires_grad_(True) for t in _qkv(2, 4, 2, 200, 300, 16, 24, seed=4))
    with tiled.kernel("native"):
        out, lse = attnkit.attention(q, k, v, mask=mask, bias=bias, scale=scale, backend="tiled", return_lse=True)
    assert spy.calls == 1
    ref, ref_lse = attnkit.attention(q, k, v, mask=mask, bias=bias, scale=scale, backend="reference",
                                     return_lse=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    weights = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    got = torch.autograd.grad((out * weights).sum(), (q, k, v))
    want = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    assert spy.backward_calls == 1
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"d{name}")


# -- the native backward (FlashAttention-2 from the saved lse) ------------------------------------------------


def _assert_native_grads_match_float64(spy, mask, bias, shape, seed):
    """dq, dk, dv of a loss on out and lse (rows with no key left out, as users do) through the native backward,
    against float64 autograd through the reference backend, to 1e-10."""
    q, k, v = (t.requires_grad_(True) for t in _qkv(*shape, seed=seed))
    with tiled.kernel("native"):
        assert choose(_call(q, k, v, mask, bias)).native_backward
        out, lse = attnkit.attention(q, k, v, mask=mask, bias=bias, backend="tiled", return_lse=True)
    ref, ref_lse = attnkit.attention(q, k, v, mask=mask, bias=bias, backend="reference", return_lse=True)
    g = torch.Generator().manual_seed(seed + 1)
    w_out, w_lse = torch.randn(out.shape, generator=g, dtype=torch.float64), torch.randn(lse.shape, generator=g,
                                                                                        dtype=torch.float64)

    def loss(o, lse_):
        return (o * w_out).sum() + torch.where(torch.isfinite(lse_), lse_ * w_lse, 0.0).sum()

    got = torch.autograd.grad(loss(out, lse), (q, k, v))
    want = torch.autograd.grad(loss(ref, ref_lse), (q, k, v))
    assert spy.backward_calls == 1
    for which, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"d{which}")


@pytest.mark.parametrize("name", GRID)
def test_native_backward_matches_float64_autograd(spy, name):
    """Every mask family the native forward runs, GQA (2 groups), Lq != Lk, Dv != D, rows with no allowed key,
    several 64-row and 64-key blocks with tails."""
    _assert_native_grads_match_float64(spy, *MASKS[name](), (2, 4, 2, 200, 300, 16, 24), seed=9)


ODD_SIZE_MASKS = {
    "causal+padding+alibi": lambda: (masks.causal() & masks.key_padding([71, 0]), biases.alibi(4)),
    "window+alibi-bottom-right": MASKS["window+alibi-bottom-right"],
}


@pytest.mark.parametrize("name", list(ODD_SIZE_MASKS))
def test_native_backward_odd_sizes_one_kv_head(spy, name):
    """Odd D and Dv (5, 3), odd Lq and Lk (131, 77: tails of 3 and 13), four query heads on one kv head; with
    padding, 71 keys in one sequence and none (every row empty) in the other."""
    _assert_native_grads_match_float64(spy, *ODD_SIZE_MASKS[name](), (2, 4, 1, 131, 77, 5, 3), seed=14)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_native_backward_is_the_same_bits_at_every_thread_count(spy, kv_heads):
    """Under torch.use_deterministic_algorithms(True), float32 gradients at 1, 3 and 8 threads (twice) are
    bit-for-bit equal: dq is summed over key blocks in key-block order whatever the schedule. (Summed under a lock
    per query block, the default, dq differs in thousands of elements between such runs.)"""
    mask, bias = masks.causal(), biases.alibi(4)
    q, k, v = (t.float().requires_grad_(True) for t in _qkv(1, 4, kv_heads, 1000, 1000, 32, 32, seed=15))
    do = torch.randn(1, 4, 1000, 32, generator=torch.Generator().manual_seed(16))
    threads, runs, deterministic = torch.get_num_threads(), [], torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for n in (1, 3, 8, 8):
            torch.set_num_threads(n)
            with tiled.kernel("native"):
                out = attnkit.attention(q, k, v, mask=mask, bias=bias, backend="tiled")
            runs.append(torch.autograd.grad(out, (q, k, v), do))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    assert spy.backward_calls == 4
    for grads in runs[1:]:
        for which, a, b in zip("qkv", grads, runs[0]):
            assert torch.equal(a, b), f"d{which} differs between thread counts"


def test_the_kernel_rejects_bad_tensors_with_a_reason(ext):
    """The extension's own checks (it is reachable as native.load()): a tensor off the CPU, wrong shapes of the
    backward's lse/dout and of the mask parameters raise RuntimeError saying what was expected, not a crash."""
    q, k, v = _qkv(1, 2, 1, 10, 12, 4, 4, dtype=torch.float32)
    p = native_params(_call(q, k, v, masks.causal()))
    band = (p.dlo, p.dhi, p.klen, p.q_ids, p.kv_ids, p.slopes, p.aoff, 64, 64)
    out, lse = ext.forward(q, k, v, 0.5, *band)
    with pytest.raises(RuntimeError, match="runs on the CPU"):
        ext.forward(q.to("meta"), k, v, 0.5, *band)
    with pytest.raises(RuntimeError, match=r"lse and delta must be \(B, H, Lq\)"):
        ext.backward(q, k, v, out, lse[..., :5].contiguous(), lse, 0.5, *band, False)
    with pytest.raises(RuntimeError, match=r"dout must be \(B, H, Lq, Dv\)"):
        ext.backward(q, k, v, out[..., :3].contiguous(), lse, lse, 0.5, *band, False)
    with pytest.raises(RuntimeError, match=r"dlo, dhi, klen, aoff: contiguous CPU \(B,\)"):
        ext.forward(q, k, v, 0.5, torch.zeros(3, dtype=torch.int64), *band[1:])
    with pytest.raises(RuntimeError, match=r"slopes: contiguous CPU \(H,\)"):
        ext.forward(q, k, v, 0.5, *band[:5], torch.ones(3), *band[6:])
    with pytest.raises(RuntimeError, match=r"q \(B, H, Lq, D\), k"):
        ext.forward(q, k[..., :3].contiguous(), v, 0.5, *band)


def test_native_backward_of_float32_is_within_the_plain_runs_error(spy):
    """float32 window with ALiBi and GQA: gradients at most 3x as far from float64 autograd as the float32
    reference backend's (flash-attn's rule for gradients)."""
    mask, bias = masks.sliding_window(100, 7), biases.alibi(4)
    q64, k64, v64 = (t.requires_grad_(True) for t in _qkv(1, 4, 2, 300, 300, 64, 64, seed=11))
    q, k, v = (t.detach().float().requires_grad_(True) for t in (q64, k64, v64))
    do = torch.randn(1, 4, 300, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    with tiled.kernel("native"):
        grads = torch.autograd.grad(attnkit.attention(q, k, v, mask=mask, bias=bias, backend="tiled"), (q, k, v),
                                    do.float())
    assert spy.backward_calls == 1
    plain = torch.autograd.grad(attnkit.attention(q, k, v, mask=mask, bias=bias, backend="reference"), (q, k, v),
                                do.float())
    ref = torch.autograd.grad(attnkit.attention(q64, k64, v64, mask=mask, bias=bias, backend="reference"),
                              (q64, k64, v64), do)
    for which, a, p, r in zip("qkv", grads, plain, ref):
        assert_within(max_err(a, r), max_err(p, r), 3, 1e-6, f"d{which}")


def test_native_backward_allocates_no_l_by_l_tensor(spy):
    """A window at L=6000, forward and backward through the native kernel: no op returns a tensor of more than
    O(L) elements (one (L x L) score matrix would be 36M)."""
    from test_memory import LargestTensor

    length = 6000
    q, k, v = (torch.randn(1, 2, length, 32, requires_grad=True) for _ in range(3))
    with LargestTensor() as probe, tiled.kernel("native"):
        attnkit.attention(q, k, v, mask=masks.sliding_window(300), backend="tiled").sum().backward()
    assert spy.calls == 1 and spy.backward_calls == 1
    assert probe.largest <= 4 * 2 * length * 32, probe.largest


# -- bfloat16 / float16: block GEMMs in the low-precision dtype where the CPU has the units ---------------------

LOW_PRECISION_MASKS = {
    "window": masks.sliding_window(40, 3),
    "window-bottom-right": masks.sliding_window(64, align="bottom_right"),
    "document-causal-batch": MASKS["document-causal-batch"]()[0],
    "causal+padding": masks.causal() & masks.key_padding([250, 17]),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(LOW_PRECISION_MASKS))
def test_low_precision_within_sdpas_error(spy, dtype, name):
    """Output and gradients in bfloat16/float16 (GQA, Lq != Lk, several 64-row blocks): against the float64
    reference, at most 2x (outputs) and 3x (gradients) the error of PyTorch's SDPA run in the same dtype on the
    same rounded inputs with the dense mask (flash-attn's rule). The kernel takes the dtype
    :func:`native.gemm_dtype` says: the low-precision one where the CPU has the units, else float32."""
    mask = LOW_PRECISION_MASKS[name]
    q64, k64, v64 = (t.to(dtype).double().requires_grad_() for t in _qkv(2, 4, 2, 200, 300, 64, 64, seed=6))
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64))
    do = torch.randn(2, 4, 200, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    with tiled.kernel("native"):
        out = attnkit.attention(q, k, v, mask=mask, backend="tiled")
        explained = str(choose(_call(q, k, v, mask)))
    grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    assert spy.dtypes == [native.gemm_dtype(dtype)] and out.dtype == dtype
    path = native.low_precision_path(dtype)[0]
    assert f"native block GEMMs in {path}" in explained and "backward: native" in explained
    ref = attnkit.attention(q64, k64, v64, mask=mask, backend="reference")
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do)
    dense = mask.to_dense(200, 300, batch=2)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            attn_mask=dense.view(2, -1, 200, 300))
    sdpa_grads = torch.autograd.grad(sdpa, (q, k, v), do.to(dtype))
    assert_within(max_err(out, ref), max_err(sdpa, ref), 2, 1e-6, f"{dtype} output")
    for which, g, sg, rg in zip("qkv", grads, sdpa_grads, ref_grads):
        assert_within(max_err(g, rg), max_err(sg, rg), 3, 1e-6, f"{dtype} d{which}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_keys_past_the_padding_are_never_read(spy, dtype):
    """Key padding to 71 and 17 keys (odd: in bfloat16 the last key block's VNNI pair partner is a padded key),
    with NaN in k and v past them: the output is finite and bit-equal to the same call with zeros there."""
    q, k, v = _qkv(2, 4, 2, 100, 128, 64, 64, dtype=dtype, seed=17)
    mask = masks.causal("bottom_right") & masks.key_padding([71, 17])
    outs = []
    for fill in (0.0, float("nan")):
        kf, vf = k.clone(), v.clone()
        for b, n in enumerate((71, 17)):
            kf[b, :, n:], vf[b, :, n:] = fill, fill
        with tiled.kernel("native"):
            outs.append(attnkit.attention(q, kf, vf, mask=mask, backend="tiled"))
    assert spy.dtypes == [native.gemm_dtype(dtype)] * 2
    assert bool(outs[1].isfinite().all()) and torch.equal(outs[0], outs[1])


def _capabilities(monkeypatch, **flags):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags)
    monkeypatch.setattr(native, "available", lambda: False)  # the decision alone, no self-check


def test_low_precision_path_follows_the_cpus_units(monkeypatch):
    _capabilities(monkeypatch, amx_bf16=True, avx512_bf16=True)
    path, reason = native.low_precision_path(torch.bfloat16)
    assert path == "bfloat16" and "AMX-BF16" in reason
    assert native.low_precision_path(torch.float16)[0] == "float32"
    _capabilities(monkeypatch, avx512_bf16=True, avx512_fp16=True)
    assert native.low_precision_path(torch.bfloat16) == ("bfloat16", native.low_precision_path()[1])
    assert "AVX512-BF16" in native.low_precision_path()[1]
    assert native.low_precision_path(torch.float16)[0] == "float16"
    assert native.gemm_dtype(torch.float16) == torch.float16
    _capabilities(monkeypatch, avx2=True)
    path, reason = native.low_precision_path(torch.bfloat16)
    assert path == "float32" and "without amx_bf16 or avx512_bf16" in reason
    assert native.gemm_dtype(torch.bfloat16) == torch.float32 and native.gemm_dtype(torch.float64) == torch.float64
    _capabilities(monkeypatch, amx_bf16=True)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert native.low_precision_path(torch.bfloat16)[0] == "float32"
    with pytest.raises(ValueError, match=r"dtype=torch\.float32 is not a low-precision dtype"):
        native.low_precision_path(torch.float32)


def test_a_low_precision_path_that_fails_its_check_falls_back(monkeypatch):
    _capabilities(monkeypatch, avx512_bf16=True)
    monkeypatch.setattr(native, "available", lambda: True)
    monkeypatch.setattr(native, "_self_check", lambda name: "max difference 3")
    path, reason = native.low_precision_path(torch.bfloat16)
    assert path == "float32" and "failed their check" in reason and "max difference 3" in reason


def test_the_self_check_runs_once_per_dtype_and_warns_its_reason(monkeypatch):
    """Concurrent first calls run one check per dtype; a failing check (a raising kernel counts) warns once,
    with its reason, since it hides the low-precision path from every later call."""
    _capabilities(monkeypatch, avx512_bf16=True, avx512_fp16=True)
    monkeypatch.setattr(native, "available", lambda: True)
    monkeypatch.setattr(native, "_checked", {})
    runs = []

    class Broken:
        def forward(self, *args):
            runs.append(args[0].dtype)
            time.sleep(0.05)  # a slow check: the other threads arrive while it runs
            raise IndexError("ukernel said no")

    monkeypatch.setattr(native, "_state", {"module": Broken(), "reason": "built", "tried": True})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            paths = list(pool.map(native.low_precision_path, [torch.bfloat16] * 4 + [torch.float16] * 4))
    assert sorted(runs, key=str) == [torch.bfloat16, torch.float16]
    assert {p for p, _ in paths} == {"float32"}
    assert all("IndexError: ukernel said no" in reason for _, reason in paths)
    assert sorted(str(w.message).split()[2] for w in caught) == ["bfloat16", "float16"]
    assert all("IndexError: ukernel said no" in str(w.message) for w in caught)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_low_precision_kernel_passes_its_check_where_the_cpu_has_the_units(ext, dtype):
    """Where this CPU has the units, the real kernel's low-precision GEMMs agree with its float32 path, so the
    low-precision tests above ran the low-precision path and not its float32 fallback."""
    with mock.patch.object(native, "available", lambda: False):
        decision = native.low_precision_path(dtype)
    if decision[0] == "float32":
        pytest.skip(f"no {dtype} units here: {decision[1]}")
    assert native._run_check(decision[0]) is None
    assert native.low_precision_path(dtype) == decision


# -- the build cache: names, the lock, concurrent loads (nothing is built) -------------------------------------


def test_the_build_name_follows_the_source_flags_torch_and_python(monkeypatch, tmp_path):
    source = tmp_path / "attention.cpp"
    names = []
    for text, flags in (("int a;", ["-O3"]), ("int a;", ["-O3"]), ("int b;", ["-O3"]), ("int a;", ["-O2"])):
        source.write_text(text)
        monkeypatch.setattr(native, "_SOURCE", source)
        monkeypatch.setattr(native, "_CFLAGS", flags)
        native._name.cache_clear()
        names.append(native._name())
    native._name.cache_clear()
    assert names[0] == names[1] and len(set(names)) == 3
    assert all(n.startswith("attnkit_native_") for n in names)


def test_a_build_counts_as_cached_only_when_finished_and_unlocked(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_folder", lambda: tmp_path)
    monkeypatch.setattr(native, "_name", lambda: "attnkit_native_test")
    assert not native.cached()
    (tmp_path / "attnkit_native_test.so").write_bytes(b"")
    assert native.cached()
    (tmp_path / "lock").write_text("")  # torch's build lock: a build is under way
    assert not native.cached()
    monkeypatch.setattr(native, "_folder", lambda: None)
    assert not native.cached()


@pytest.mark.skipif(sys.platform == "win32", reason="the build guard is an fcntl lock")
def test_a_lock_left_by_a_killed_build_is_removed_and_a_live_build_is_waited_for(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_folder", lambda: tmp_path)
    (tmp_path / "lock").write_text("")  # torch's lock file, left by a build that was killed
    with pytest.warns(RuntimeWarning, match="did not finish"), native._no_stale_lock():
        assert not (tmp_path / "lock").exists()
    # a build in another process holds the guard: a second build waits for it, and leaves its lock alone
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, sys, time
        with open({str(tmp_path / "attnkit.lock")!r}, "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            open({str(tmp_path / "lock")!r}, "w").close()
            print("held", flush=True)
            time.sleep(1.0)
            import os; os.remove({str(tmp_path / "lock")!r})
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the live build's lock is not called stale
            with native._no_stale_lock():
                assert not (tmp_path / "lock").exists()  # entered only once the holder finished
    finally:
        holder.wait(timeout=30)


def test_concurrent_first_loads_share_one_build(monkeypatch):
    tries, built = [], object()

    def slow_build():
        tries.append(1)
        time.sleep(0.2)
        return built, "built"

    monkeypatch.delenv("ATTNKIT_NATIVE", raising=False)
    monkeypatch.setattr(native, "_build", slow_build)
    monkeypatch.setattr(native, "_state", {"module": None, "reason": "not built yet", "tried": False})
    start = threading.Barrier(6)
    got = []

    def first_load():
        start.wait()
        got.append(native.load())

    threads = [threading.Thread(target=first_load) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tries == [1] and got == [built] * 6 and native.native_status() == "built"


def test_unsupported_calls_stay_on_the_pure_pytorch_path():
    q, k, v = _qkv(1, 2, 2, 8, 8, 4, 4)
    for mask, bias in ((masks.prefix_lm(3), None), (masks.causal() | masks.global_tokens([0]), None),
                       (None, biases.from_tensor(torch.zeros(8, 8)))):
        assert native_params(_call(q, k, v, mask, bias)) is None
    assert native_params(_call(q, k, v, masks.causal(), biases.alibi(2))) is not None


def test_disabled_by_environment_falls_back(monkeypatch):
    monkeypatch.setenv("ATTNKIT_NATIVE", "0")
    q, k, v = _qkv(1, 4, 2, 40, 50, 8, 8)
    with tiled.kernel("native"):
        assert not native_ok(_call(q, k, v, masks.causal()))
        out, lse = attnkit.attention(q, k, v, mask=masks.causal(), backend="tiled", return_lse=True)
    assert "ATTNKIT_NATIVE=0" in tiled.native_status()
    ref, ref_lse = attnkit.attention(q, k, v, mask=masks.causal(), backend="reference", return_lse=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)


def test_a_failed_build_is_remembered_and_not_retried(monkeypatch):
    tries = []

    def failing_build():
        tries.append(1)
        return None, "build failed: no compiler"

    monkeypatch.delenv("ATTNKIT_NATIVE", raising=False)
    monkeypatch.setattr(native, "_build", failing_build)
    monkeypatch.setattr(native, "_state", {"module": None, "reason": "not built yet", "tried": False})
    assert native.load() is None and native.load() is None
    assert tries == [1]
    assert tiled.native_status() == "build failed: no compiler"
    q, k, v = _qkv(1, 2, 2, 16, 16, 4, 4)
    with tiled.kernel("native"):  # pinned but unavailable: the other kernels run
        out = attnkit.attention(q, k, v, mask=masks.sliding_window(3), backend="tiled")
    torch.testing.assert_close(out, attnkit.attention(q, k, v, mask=masks.sliding_window(3), backend="reference"),
                               rtol=0, atol=1e-12)


def test_auto_prefers_native_for_windows_and_causal_documents_only():
    # The shapes where the native forward measured faster than the batched fused kernel (docs/core.md).
    q, k, v = _qkv(1, 4, 2, 64, 64, 8, 8, dtype=torch.float32)
    ids = torch.arange(64) // 16
    expected = {
        "window": (masks.sliding_window(15), True),
        "window bottom-right, Lq < Lk": (masks.sliding_window(7, align="bottom_right"), True),
        "window+alibi": ((masks.sliding_window(15), biases.alibi(4)), True),
        "causal documents": (masks.document(ids) & masks.causal(), True),
        "window wider than the sequence": (masks.sliding_window(100), False),
        "documents, not causal": (masks.document(ids), False),
        "causal": (masks.causal(), False),
        "causal+alibi": ((masks.causal(), biases.alibi(4)), False),
        "key padding": (masks.key_padding([40]), False),
        "no mask": (None, False),
    }
    for name, (spec, faster) in expected.items():
        mask, bias = spec if isinstance(spec, tuple) else (spec, None)
        qq = q[:, :, :16] if "Lq < Lk" in name else q
        call = _call(qq, k, v, mask, bias)
        assert _native_faster(call, native_params(call)) is faster, name


def _count_builds(monkeypatch, cached):
    tries = []

    def failing_build():
        tries.append(1)
        return None, "build failed: test"

    monkeypatch.setattr(native, "_build", failing_build)
    monkeypatch.setattr(native, "cached", lambda: cached)
    monkeypatch.setattr(native, "_state", {"module": None, "reason": "not built yet", "tried": False})
    return tries


def test_auto_never_compiles_unasked(monkeypatch):
    monkeypatch.delenv("ATTNKIT_NATIVE", raising=False)
    tries = _count_builds(monkeypatch, cached=False)
    q, k, v = _qkv(1, 4, 2, 64, 64, 8, 8, dtype=torch.float32)
    window = _call(q, k, v, masks.sliding_window(15))
    assert not native_ok(window) and tries == []  # auto: no cached build, so no compile
    monkeypatch.setenv("ATTNKIT_NATIVE", "1")
    assert not native_ok(window) and tries == [1]  # asked: auto builds (here the build fails)


def test_auto_loads_a_cached_build_for_float32_windows_only(monkeypatch):
    monkeypatch.delenv("ATTNKIT_NATIVE", raising=False)
    tries = _count_builds(monkeypatch, cached=True)
    q, k, v = _qkv(1, 4, 2, 64, 64, 8, 8, dtype=torch.float64)
    assert not native_ok(_call(q, k, v, masks.sliding_window(15)))  # float64: the batched kernel
    assert not native_ok(_call(q.float(), k.float(), v.float(), masks.causal()))  # causal: the fused kernel
    assert tries == []
    native_ok(_call(q.float(), k.float(), v.float(), masks.sliding_window(15)))
    assert tries == [1]  # loads (here: a build that fails, remembered)
    with tiled.kernel("math"):
        monkeypatch.setattr(native, "_state", {"module": object(), "reason": "built", "tried": True})
        assert not native_ok(_call(q.float(), k.float(), v.float(), masks.sliding_window(15)))


@pytest.mark.slow
@pytest.mark.parametrize("backward", [False, True])
def test_native_op_count_does_not_grow_with_length(ext, backward):
    from test_engine import _Count

    def ops(length):
        q, k, v = (t.requires_grad_(backward) for t in _qkv(1, 4, 2, length, length, 16, 16, dtype=torch.float32))
        with _Count() as count, tiled.kernel("native"):
            out = attnkit.attention(q, k, v, mask=masks.sliding_window(511), bias=biases.alibi(4), backend="tiled")
            if backward:
                out.sum().backward()
        return sum(count.ops.values())

    assert ops(16384) <= 1.5 * ops(2048)


@pytest.mark.slow
def test_auto_runs_windows_on_the_native_kernel(ext, monkeypatch):
    calls = []
    real = ext.forward

    class Spy:
        def forward(self, *args):
            calls.append(1)
            return real(*args)

    monkeypatch.setattr(native, "_state", {"module": Spy(), "reason": "built", "tried": True})
    q, k, v = _qkv(1, 4, 2, 300, 300, 64, 64, dtype=torch.float32, seed=2)
    out = attnkit.attention(q, k, v, mask=masks.sliding_window(40), backend="tiled")
    assert calls == [1]
    ref = attnkit.attention(q.double(), k.double(), v.double(), mask=masks.sliding_window(40), backend="reference")
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    attnkit.attention(q, k, v, mask=masks.causal(), backend="tiled")
    assert calls == [1]  # causal stays on PyTorch's fused kernel


@pytest.mark.parametrize("name", GRID)
def test_float64_matches_reference(ext, name):
    mask, bias = MASKS[name]()
    q, k, v = _qkv(2, 4, 2, 200, 300, 16, 24)  # GQA (2 groups), Lq != Lk, Dv != D
    with tiled.kernel("native"):
        assert native_ok(_call(q, k, v, mask, bias))
        out, lse = attnkit.attention(q, k, v, mask=mask, bias=bias, backend="tiled", return_lse=True)
    ref, ref_lse = attnkit.attention(q, k, v, mask=mask, bias=bias, backend="reference", return_lse=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))  # rows with no key: lse -inf, output 0
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], rtol=0, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MASKS))
def test_float32_error_within_the_reference_backends(ext, name):
    # float32 runs the oneDNN block GEMMs (float64 the hand-written loops): against the float64
    # reference its error stays within twice the float32 reference backend's.
    mask, bias = MASKS[name]()
    q, k, v = _qkv(2, 4, 2, 200, 300, 64, 48, dtype=torch.float32, seed=1)
    with tiled.kernel("native"):
        assert native_ok(_call(q, k, v, mask, bias))
        out, lse = attnkit.attention(q, k, v, mask=mask, bias=bias, backend="tiled", return_lse=True)
    ref, ref_lse = attnkit.attention(q.double(), k.double(), v.double(), mask=mask, bias=bias, backend="reference",
                                     return_lse=True)
    plain, plain_lse = attnkit.attention(q, k, v, mask=mask, bias=bias, backend="reference", return_lse=True)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert (out.double() - ref).abs().max() <= 2 * (plain.double() - ref).abs().max() + 1e-6
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    bound = 2 * (plain_lse[fin].double() - ref_lse[fin]).abs().max() + 1e-6
    assert (lse[fin].double() - ref_lse[fin]).abs().max() <= bound


@pytest.mark.slow
@pytest.mark.parametrize("name", ["causal+padding+alibi", "document"])
def test_gradcheck_through_native_forward(ext, name):
    mask, bias = {"causal+padding+alibi": (masks.causal() & masks.key_padding([9, 4]), biases.alibi(4)),
                  "document": (masks.document(torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])), None)}[name]
    q, k, v = (t.requires_grad_(True) for t in _qkv(2, 4, 2, 9, 9, 4, 3))

    def f(q, k, v):
        with tiled.kernel("native"):
            out, lse = attnkit.attention(q, k, v, mask=mask, bias=bias, backend="tiled", return_lse=True)
        return out, torch.where(torch.isinf(lse), 0.0, lse)

    with tiled.kernel("native"):
        assert native_ok(_call(q, k, v, mask, bias))
    assert torch.autograd.gradcheck(f, (q, k, v))
