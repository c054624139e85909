"""Differential fuzzing: every backend against an independent dense float64 reference.

The reference below is written from the math, not from attnkit's code: scores
``scale * q.k``, soft-capping, each bias in order, the mask, then a softmax whose empty
rows output 0 with lse -inf. Masks are defined elementwise from their definitions
(``allowed(b, i, j)`` on index grids), never through attnkit's block maps or
``to_dense``. Gradients come from autograd on that reference.

Each drawn case runs on one backend (reference, tiled with the fused or the math kernel,
sdpa, auto), forward and backward, and checks ``out``, ``lse`` and the gradients of q,
k, v and every tensor bias. A backend that cannot run a call must refuse it with a
ValueError; it may never answer wrongly. Failures shrink to a minimal case
(hypothesis). 2,000 cases run by default, 20,000 more with ``--run-slow``.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnkit
from attnkit import biases, masks
from attnkit.functional import tiled

from conftest import native_only_if, under_ci

# Under CI the draws are derandomised, so a run is reproducible; locally they vary.
_CI = under_ci()


def _settings(n: int) -> settings:
    n = int(os.environ.get("ATTNKIT_FUZZ_EXAMPLES", n))  # to try a different count by hand
    return settings(max_examples=n, deadline=None, derandomize=_CI, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- masks from their definitions --------------------------------------------------------
#
# A mask spec is a nested tuple; ``allowed`` evaluates it on numpy index grids
# b (B,1,1), i (1,Lq,1), j (1,1,Lk) and returns a (B|1, Lq, Lk) bool array.


def _off(align: str, lq: int, lk: int) -> int:
    return 0 if align == "top_left" else lk - lq


def allowed(spec, b, i, j, lq: int, lk: int) -> np.ndarray:
    kind = spec[0]
    if kind == "causal":  # j <= i + offset
        return j <= i + _off(spec[1], lq, lk)
    if kind == "window":  # -left <= j - (i + offset) <= right
        _, left, right, align = spec
        d = j - (i + _off(align, lq, lk))
        return (d >= -left) & (d <= right)
    if kind == "prefix":  # bidirectional over the first p keys, causal after
        _, p, align = spec
        return (j < np.asarray(p).reshape(-1, 1, 1)) | (j <= i + _off(align, lq, lk))
    if kind == "global":  # global positions see and are seen by everyone
        pos = set(spec[1])
        gq = np.isin(i, list(pos))
        gk = np.isin(j, list(pos))
        return gq | gk
    if kind == "document":  # same document id
        _, qid, kid = spec
        return np.asarray(qid)[:, :, None] == np.asarray(kid)[:, None, :]
    if kind == "padding":  # the first lengths[b] keys are real
        return j < np.asarray(spec[1]).reshape(-1, 1, 1)
    if kind == "dense":
        return np.asarray(spec[1])
    if kind == "chunked":  # the same chunk of spec[1] positions
        return i // spec[1] == j // spec[1]
    if kind == "strided":  # Child et al. 2019: j <= i and (i - j < s or (i - j) % s == 0)
        d, s = i - j, spec[1]
        return (d >= 0) & ((d < s) | (d % s == 0))
    if kind == "dilated":  # 0 <= i - j < window and (i - j) % dilation == 0
        d = i - j
        return (d >= 0) & (d < spec[1]) & (d % spec[2] == 0)
    if kind == "function":  # from_function(lambda b, h, q, k: (q + m * k + b) % n < t)
        _, m, n, t = spec
        return (i + m * j + b) % n < t
    if kind == "causal_seq":  # per-sequence bottom-right: j - kpad <= i - qpad + lk_b - lq_b (flash-attn)
        _, q_lengths, k_lengths, padding = spec
        lq_b, lk_b = np.asarray(q_lengths).reshape(-1, 1, 1), np.asarray(k_lengths).reshape(-1, 1, 1)
        shift = lk_b - lq_b + ((lk - lk_b) - (lq - lq_b) if padding == "left" else 0)
        return j <= i + shift
    if kind == "and":
        return allowed(spec[1], b, i, j, lq, lk) & allowed(spec[2], b, i, j, lq, lk)
    if kind == "or":
        return allowed(spec[1], b, i, j, lq, lk) | allowed(spec[2], b, i, j, lq, lk)
    if kind == "not":
        return ~allowed(spec[1], b, i, j, lq, lk)
    raise AssertionError(kind)


def build_mask(spec):
    kind = spec[0]
    if kind == "causal":
        return masks.causal(spec[1])
    if kind == "window":
        return masks.sliding_window(spec[1], spec[2], spec[3])
    if kind == "prefix":
        p = spec[1]
        return masks.prefix_lm(torch.tensor(p) if isinstance(p, list) else p, spec[2])
    if kind == "global":
        return masks.global_tokens(list(spec[1]))
    if kind == "document":
        return masks.document(torch.tensor(spec[1]), torch.tensor(spec[2]))
    if kind == "padding":
        return masks.key_padding(spec[1])
    if kind == "dense":
        return masks.from_tensor(torch.from_numpy(np.asarray(spec[1]))[:, None])  # (B|1, 1, Lq, Lk)
    if kind == "chunked":
        return masks.chunked(spec[1])
    if kind == "strided":
        return masks.strided(spec[1])
    if kind == "dilated":
        return masks.dilated(spec[1], spec[2])
    if kind == "function":
        _, m, n, t = spec
        return masks.from_function(lambda b, h, q_idx, kv_idx: (q_idx + m * kv_idx + b) % n < t, name="fuzz")
    if kind == "causal_seq":
        return masks.causal("bottom_right", q_lengths=spec[1], k_lengths=spec[2], padding=spec[3])
    if kind == "and":
        return build_mask(spec[1]) & build_mask(spec[2])
    if kind == "or":
        return build_mask(spec[1]) | build_mask(spec[2])
    if kind == "not":
        return ~build_mask(spec[1])
    raise AssertionError(kind)


LEAF_KINDS = ["causal", "window", "prefix", "global", "document", "padding", "dense", "chunked", "strided", "dilated",
              "function", "causal_seq"]
NATIVE_KINDS = ["causal", "window", "document", "padding", "causal_seq"]  # what the native kernel's band form holds


@st.composite
def leaf_masks(draw, batch: int, lq: int, lk: int, kinds: tuple[str, ...] = tuple(LEAF_KINDS)):
    align = st.sampled_from(["top_left", "bottom_right"])
    kind = draw(st.sampled_from(kinds))
    if kind in ("chunked", "strided"):
        return (kind, draw(st.integers(1, max(lq, lk) + 1)))
    if kind == "dilated":
        return ("dilated", draw(st.integers(1, max(lq, lk) + 1)), draw(st.integers(1, 5)))
    if kind == "function":
        return ("function", draw(st.integers(0, 3)), draw(st.integers(1, 7)), draw(st.integers(0, 7)))
    if kind == "causal_seq":
        lengths = st.lists(st.integers(0, lk), min_size=batch, max_size=batch)
        q_lengths = draw(st.lists(st.integers(0, lq), min_size=batch, max_size=batch))
        return ("causal_seq", q_lengths, draw(lengths), draw(st.sampled_from(["right", "left"])))
    if kind == "causal":
        return ("causal", draw(align))
    if kind == "window":
        hi = max(lk, 1)
        return ("window", draw(st.integers(0, hi)), draw(st.integers(0, hi)), draw(align))
    if kind == "prefix":
        per_batch = draw(st.booleans())
        n = st.integers(0, lk)
        p = draw(st.lists(n, min_size=batch, max_size=batch)) if per_batch else draw(n)
        return ("prefix", p, draw(align))
    if kind == "global":
        top = max(lq, lk)
        return ("global", tuple(draw(st.lists(st.integers(0, top - 1), min_size=0, max_size=3))))
    if kind == "document":
        docs = draw(st.integers(1, 4))
        rows = draw(st.sampled_from([1, batch]))

        def ids(length):
            cuts = sorted(draw(st.lists(st.integers(0, length), min_size=docs - 1, max_size=docs - 1)))
            out = np.zeros(length, dtype=np.int64)
            for c in cuts:
                out[c:] += 1
            return out.tolist()

        return ("document", [ids(lq) for _ in range(rows)], [ids(lk) for _ in range(rows)])
    if kind == "padding":
        return ("padding", draw(st.lists(st.integers(0, lk), min_size=batch, max_size=batch)))
    seed = draw(st.integers(0, 2**31 - 1))
    rows = draw(st.sampled_from([1, batch]))
    density = draw(st.sampled_from([0.1, 0.5, 0.9]))
    dense = np.random.default_rng(seed).random((rows, lq, lk)) < density
    return ("dense", dense.tolist())


@st.composite
def mask_specs(draw, batch: int, lq: int, lk: int, depth: int = 2, native: bool = False):
    """A mask: leaves combined by &, | and ~; for the native kernel, its leaves and & only."""
    kinds, ops = (tuple(NATIVE_KINDS), ["and"]) if native else (tuple(LEAF_KINDS), ["and", "or", "not"])
    if depth == 0 or draw(st.integers(0, 2)) > 0:
        return draw(leaf_masks(batch, lq, lk, kinds))
    op = draw(st.sampled_from(ops))
    a = draw(mask_specs(batch, lq, lk, depth - 1, native))
    if op == "not":
        return ("not", a)
    return (op, a, draw(mask_specs(batch, lq, lk, depth - 1, native)))


# -- biases from their definitions -------------------------------------------------------


def standard_slopes(n: int) -> list[float]:
    """ALiBi's slopes as the paper defines them (Press et al. 2022, and its code)."""
    def pow2(m):
        return [2.0 ** (-8.0 * (k + 1) / m) for k in range(m)]

    m = 2 ** math.floor(math.log2(n))
    return pow2(m) + pow2(2 * m)[0::2][: n - m]


SCORE_MODS = {
    # name: (fn for attnkit, the same rule on dense float64 grids)
    "relative": lambda s, b, h, i, j: s - 0.05 * (i - j).abs(),
    "head_scale": lambda s, b, h, i, j: s * (1.0 + 0.25 * h) - 0.1 * b,
    "tanh": lambda s, b, h, i, j: 3.0 * torch.tanh(s / 3.0) + 0.01 * j,
}


@dataclass
class Case:
    batch: int
    heads: int
    kv_heads: int
    lq: int
    lk: int
    d: int
    dv: int
    dtype: torch.dtype
    seed: int
    magnitude: float
    scale: float | None
    softcap: float | None
    mask: object
    bias_specs: list = field(default_factory=list)
    backend: str = "reference"
    kernel: str = "auto"
    grads: bool = True


@st.composite
def bias_specs(draw, batch: int, heads: int, lq: int, lk: int, native: bool = False):
    """Biases in order; for the native kernel, at most one ALiBi."""
    n = draw(st.integers(0, 1 if native else 2))
    specs = []
    for _ in range(n):
        kind = draw(st.sampled_from(["alibi"] if native else ["tensor", "alibi", "score_mod", "repeat"]))
        if kind == "repeat" and specs:
            specs.append(("repeat", draw(st.integers(0, len(specs) - 1))))
        elif kind == "alibi":
            custom = draw(st.booleans())
            slopes = (draw(st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=heads, max_size=heads))
                      if custom else standard_slopes(heads))
            specs.append(("alibi", slopes, custom, draw(st.sampled_from(["top_left", "bottom_right"]))))
        elif kind == "score_mod":
            specs.append(("score_mod", draw(st.sampled_from(sorted(SCORE_MODS)))))
        else:
            shape = tuple(draw(st.sampled_from([1, full])) for full in (batch, heads, lq, lk))
            ndim = draw(st.integers(2, 4))
            shape = shape[4 - ndim:] if all(s == 1 for s in shape[: 4 - ndim]) else shape
            specs.append(("tensor", shape, draw(st.sampled_from([0.0, 0.0, 0.1, 1.0])),
                          draw(st.booleans()), draw(st.integers(0, 2**31 - 1))))
    return specs


# Mostly short; about one length in eight crosses the tiled backend's block boundaries.
LENGTHS = st.one_of(*[st.integers(1, 24)] * 7, st.sampled_from([127, 128, 129, 255, 256, 257]))
# tiled's kernels pinned: auto (the batched engine where it applies), math, fused (per chunk), native (C++,
# built on first use; calls it does not support run as under auto)
BACKENDS = ["reference", "tiled", "tiled-math", "tiled-fused", "tiled-native", "sdpa", "auto"]


@st.composite
def cases(draw, native: bool = False):
    """A call; ``native``: one the native kernel can run (its masks, ALiBi, no softcap), pinned to it."""
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.integers(1, 3))
    lq, lk = draw(LENGTHS), draw(LENGTHS)
    batch = draw(st.integers(1, 2))
    if lq * lk > 24 * 24:  # keep the long cases small in batch
        batch = 1
    d = draw(st.integers(1, 20))
    dv = draw(st.sampled_from([d, d, max(1, d - 3), d + 5]))
    # the native kernel's bfloat16/float16 block GEMMs are a path of their own: drawn as often as float64 there
    low = [torch.float16, torch.bfloat16] * (3 if native else 1)
    dtype = draw(st.sampled_from([torch.float64] * 6 + [torch.float32] * 2 + low))
    # Logits near 1e4 in low precision: q and k large enough that scale * q.k reaches it.
    magnitude = draw(st.sampled_from([1.0, 1.0, 1.0, 4.0, 12.0]))
    scale = draw(st.one_of(st.none(), st.floats(-1.0, 2.0, allow_nan=False), st.just(0.0)))
    softcap = None if native else draw(st.one_of(st.none(), st.none(), st.floats(0.5, 30.0)))
    mask = draw(st.one_of(st.none(), mask_specs(batch, lq, lk, native=native)))
    specs = draw(bias_specs(batch, heads, lq, lk, native))
    backend = "tiled-native" if native else draw(st.sampled_from(BACKENDS))
    return Case(batch, heads, kv_heads, lq, lk, d, dv, dtype, draw(st.integers(0, 2**31 - 1)), magnitude,
                scale, softcap, mask, specs, backend.split("-")[0], [*backend.split("-"), "auto"][1],
                draw(st.integers(0, 3)) > 0)


# -- inputs, the independent reference, and the check ------------------------------------


def make_inputs(case: Case):
    g = torch.Generator().manual_seed(case.seed)

    def t(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * case.magnitude).to(case.dtype)

    q = t(case.batch, case.heads, case.lq, case.d)
    k = t(case.batch, case.kv_heads, case.lk, case.d)
    v = torch.randn(case.batch, case.kv_heads, case.lk, case.dv, generator=g, dtype=torch.float64).to(case.dtype)
    tensors = []
    for spec in case.bias_specs:
        if spec[0] == "tensor":
            _, shape, neg_inf_share, _, seed = spec
            r = np.random.default_rng(seed)
            values = torch.from_numpy(r.standard_normal(shape))
            values[torch.from_numpy(r.random(shape) < neg_inf_share)] = float("-inf")
            tensors.append(values)
        else:
            tensors.append(None)
    return q, k, v, tensors


def attnkit_bias(case: Case, tensors):
    """attnkit's bias list for the case: repeated entries are the same Python object."""
    objs: list = []
    for spec, tensor in zip(case.bias_specs, tensors):
        kind = spec[0]
        if kind == "tensor":
            objs.append(biases.from_tensor(tensor))
        elif kind == "alibi":
            _, slopes, custom, align = spec
            objs.append(biases.alibi(slopes=torch.tensor(slopes, dtype=torch.float64), align=align)
                        if custom else biases.alibi(case.heads, align=align))
        elif kind == "score_mod":
            objs.append(biases.score_mod(SCORE_MODS[spec[1]], spec[1]))
        else:
            objs.append(objs[spec[1]])
    return objs or None


def reference(case: Case, q, k, v, tensors):
    """(out, lse) in float64 from the definitions; differentiable in q, k, v and the tensors."""
    g = case.heads // case.kv_heads
    k = k.repeat_interleave(g, 1)
    v = v.repeat_interleave(g, 1)
    scale = case.scale if case.scale is not None else (1.0 / math.sqrt(case.d))
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if case.softcap is not None:
        s = case.softcap * torch.tanh(s / case.softcap)
    b_ = torch.arange(case.batch).view(-1, 1, 1, 1)
    h_ = torch.arange(case.heads).view(1, -1, 1, 1)
    i_ = torch.arange(case.lq).view(1, 1, -1, 1)
    j_ = torch.arange(case.lk).view(1, 1, 1, -1)
    resolved = [case.bias_specs[s_[1]] if s_[0] == "repeat" else s_ for s_ in case.bias_specs]
    for n, spec in enumerate(resolved):
        kind = spec[0]
        if kind == "tensor":
            origin = n if case.bias_specs[n][0] == "tensor" else case.bias_specs[n][1]
            s = s + tensors[origin].reshape((1,) * (4 - len(spec[1])) + tuple(spec[1]))
        elif kind == "alibi":
            _, slopes, _, align = spec
            dist = (i_ + _off(align, case.lq, case.lk) - j_).abs().double()
            s = s - torch.tensor(slopes, dtype=torch.float64).view(1, -1, 1, 1) * dist
        else:
            s = SCORE_MODS[spec[1]](s, b_, h_, i_, j_)
    if case.mask is not None:
        bi, ii, ji = np.arange(case.batch)[:, None, None], np.arange(case.lq)[None, :, None], \
            np.arange(case.lk)[None, None, :]
        ok = np.broadcast_to(allowed(case.mask, bi, ii, ji, case.lq, case.lk), (case.batch, case.lq, case.lk))
        s = s.masked_fill(~torch.from_numpy(ok.copy())[:, None], float("-inf"))
    live = torch.isfinite(s).any(-1, keepdim=True)  # rows with at least one allowed key
    s_live = torch.where(live, s, 0.0)
    p = torch.softmax(s_live, -1) * live
    lse = torch.where(live.squeeze(-1), torch.logsumexp(s_live, -1), float("-inf"))
    return p @ v, lse


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (a.sign() == b.sign())
    d = torch.where(both_inf, 0.0, (a - b).abs())
    return float(d.max()) if d.numel() else 0.0


def _tolerance(case: Case, ref: torch.Tensor, grad: bool) -> float:
    """float64: tight. Lower precision: a multiple of the dtype's unit roundoff at the
    reference's magnitude, allowing for scores accumulated over D and summed over Lk."""
    if case.dtype == torch.float64:
        return 1e-9 * (1.0 + float(ref.detach().abs().max()) if ref.numel() else 1.0)
    eps = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[case.dtype]
    mag = float(ref.detach().abs().max()) if ref.numel() else 0.0
    grow = 4.0 if grad else 1.0
    # Large logits amplify the inputs' own rounding; the inputs are the same for both,
    # so only the kernel's arithmetic (fp32 on CPU) remains.
    return grow * (8 * eps * (1.0 + mag) + 1e-5 * (1.0 + mag) * case.magnitude**2)


def check(case: Case) -> None:
    q, k, v, tensors = make_inputs(case)
    grad_tensors = [t is not None and case.bias_specs[n][3] for n, t in enumerate(tensors)
                    if case.bias_specs[n][0] == "tensor"]
    leaves = [q, k, v] + [t for t in tensors if t is not None]
    wants = [True, True, True, *grad_tensors] if case.grads else [False] * len(leaves)
    for t, w in zip(leaves, wants):
        t.requires_grad_(w)
    bias = attnkit_bias(case, tensors)
    mask = None if case.mask is None else build_mask(case.mask)

    # The reference sees the very same (rounded) inputs, in float64.
    ref_in = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    rq, rk, rv, *rt = ref_in
    rtensors = []
    it = iter(rt)
    for t in tensors:
        rtensors.append(None if t is None else next(it))
    ref_out, ref_lse = reference(case, rq, rk, rv, rtensors)

    want_lse = case.backend != "sdpa"
    pinned = contextlib.ExitStack()
    pinned.enter_context(tiled.kernel(case.kernel))
    pinned.enter_context(native_only_if(case.kernel == "native"))
    try:
        try:
            result = attnkit.attention(q, k, v, mask=mask, bias=bias, scale=case.scale, softcap=case.softcap,
                                       backend=case.backend, return_lse=want_lse)
        except ValueError as e:
            # Only sdpa may decline, and only with its reason, never for a call it serves.
            assert case.backend == "sdpa", f"{case.backend} refused: {e}"
            assert "cannot run this call" in str(e)
            return
        out, lse = result if want_lse else (result, None)
        assert out.dtype == case.dtype and out.shape == ref_out.shape
        assert torch.isfinite(out).all(), "non-finite output"
        assert _err(out, ref_out) <= _tolerance(case, ref_out, False), \
            f"out: {_err(out, ref_out):.3g} > {_tolerance(case, ref_out, False):.3g}"
        if lse is not None:
            assert _err(lse, ref_lse) <= _tolerance(case, ref_lse.clamp(-1e30, 1e30), False) * 4, \
                f"lse: {_err(lse, ref_lse):.3g}"
        if not case.grads:
            return
        g = torch.Generator().manual_seed(case.seed + 1)
        w_out = torch.randn(ref_out.shape, generator=g, dtype=torch.float64)
        w_lse = torch.randn(ref_lse.shape, generator=g, dtype=torch.float64)

        def loss(o, l_):
            total = (o.double() * w_out).sum()
            if l_ is not None:  # the lse of empty rows (-inf) is left out, as users do
                total = total + torch.where(torch.isfinite(l_), l_.double() * w_lse, 0.0).sum()
            return total

        got = torch.autograd.grad(loss(out, lse), [t for t in leaves if t.requires_grad], allow_unused=True)
        ref_g = torch.autograd.grad(loss(ref_out, ref_lse if lse is not None else None),
                                    [t for t in ref_in if t.requires_grad], allow_unused=True)
    finally:
        pinned.close()
    names = [n for n, t in zip(["dq", "dk", "dv", *[f"dbias{n}" for n in range(len(rt))]], leaves)
             if t.requires_grad]
    for name, a, b in zip(names, got, ref_g):
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        assert torch.isfinite(a).all(), f"{name}: non-finite gradient"
        assert _err(a, b) <= _tolerance(case, b, True), f"{name}: {_err(a, b):.3g} > {_tolerance(case, b, True):.3g}"


# Small calls: one thread is faster, and immune to a busy machine's descheduled threads.
@pytest.mark.native
@_settings(2_000)
@given(case=cases())
def test_every_backend_matches_the_float64_definition(one_thread, case):
    check(case)


@pytest.mark.slow
@pytest.mark.native
@_settings(20_000)
@given(case=cases())
def test_every_backend_matches_the_float64_definition_at_scale(one_thread, case):
    check(case)


# The native kernel on the calls it runs (the draws above reach it only now and then): its masks and their
# intersections, ALiBi, every dtype, scales of 0, negative and tiny, lengths across its 64-row blocks, and
# gradients (its backward recomputes from the native out and lse). It builds on first use (about 20 s).
@pytest.mark.native
@_settings(300)
@given(case=cases(native=True))
def test_the_native_kernel_matches_the_float64_definition(one_thread, case):
    check(case)


@pytest.mark.slow
@pytest.mark.native
@_settings(5_000)
@given(case=cases(native=True))
def test_the_native_kernel_matches_the_float64_definition_at_scale(one_thread, case):
    check(case)


# -- the defects this suite found, kept as plain regression tests ------------------------


def _inputs(seed=0, lq=5, lk=5, heads=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, n, 4, generator=g, dtype=torch.float64, requires_grad=True)
            for n in (lq, lk, lk)]


@pytest.mark.parametrize("backend", ["reference", "tiled", "auto"])
def test_a_bias_object_used_twice_gets_the_summed_gradient_once(backend):
    q, k, v = _inputs()
    t = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    b = biases.from_tensor(t)
    twice = [[b, b], b + b]
    for bias in twice:
        (g_obj,) = torch.autograd.grad(attnkit.attention(q, k, v, bias=bias, backend=backend).sum(), [t])
        case = Case(1, 2, 2, 5, 5, 4, 4, torch.float64, 0, 1.0, None, None, None,
                    [("tensor", (1, 2, 5, 5), 0.0, True, 0), ("repeat", 0)])
        ref_out, _ = reference(case, q, k, v, [t, None])
        (g_ref,) = torch.autograd.grad(ref_out.sum(), [t])
        assert _err(g_obj, g_ref) < 1e-12


@pytest.mark.parametrize("backend", ["reference", "tiled", "auto"])
def test_a_row_masked_by_a_bias_gives_finite_gradients_through_the_lse(backend):
    q, k, v = _inputs()
    bias = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    bias[..., 0, :] = float("-inf")
    out, lse = attnkit.attention(q, k, v, bias=bias, backend=backend, return_lse=True)
    assert lse[..., 0].eq(float("-inf")).all() and out[..., 0, :].eq(0).all()
    dq, dk, dv = torch.autograd.grad(out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum(), [q, k, v])
    for gr in (dq, dk, dv):
        assert torch.isfinite(gr).all()
    assert dq[..., 0, :].eq(0).all()


@pytest.mark.parametrize("length", [9, 300])
@pytest.mark.parametrize("scale", [0.0, -0.7])
def test_causal_with_a_non_positive_scale_is_exact(scale, length):
    """PyTorch's causal kernels mask before they scale (NaN for scale 0); neither sdpa nor the tiled
    engine's is_causal part may be used then."""
    q, k, v = (t.detach() for t in _inputs(lq=length, lk=length))
    case = Case(1, 2, 2, length, length, 4, 4, torch.float64, 0, 1.0, scale, None, ("causal", "top_left"))
    ref, _ = reference(case, q, k, v, [])
    for backend in ("auto", "tiled"):
        out = attnkit.attention(q, k, v, mask=masks.causal(), scale=scale, backend=backend)
        assert _err(out, ref) < 1e-12, backend
    with pytest.raises(ValueError, match="scale is <= 0"):
        attnkit.attention(q, k, v, mask=masks.causal(), scale=scale, backend="sdpa")


@pytest.mark.parametrize("length", [2, 300])
def test_causal_with_a_scale_that_is_zero_in_float32_is_exact(length):
    """Found by the fuzz suite: scale=2.7e-263 is > 0 in Python but 0.0 in float32, the dtype the
    kernels compute in, and the causal kernels then gave NaN. Causal attention with a vanishing
    scale is uniform over each row's allowed keys."""
    scale = 2.744993521758066e-263
    q, k, v = (t.detach() for t in _inputs(lq=length, lk=length))
    case = Case(1, 2, 2, length, length, 4, 4, torch.float64, 0, 1.0, scale, None, ("causal", "top_left"))
    ref, _ = reference(case, q, k, v, [])
    for backend in ("auto", "tiled"):
        out = attnkit.attention(q.float(), k.float(), v.float(), mask=masks.causal(), scale=scale, backend=backend)
        assert _err(out, ref) < 1e-5, backend
    with pytest.raises(ValueError, match=r"scale is <= 0 in torch\.float32"):
        attnkit.attention(q.float(), k.float(), v.float(), mask=masks.causal(), scale=scale, backend="sdpa")


def test_float64_alibi_slopes_stay_float64():
    lq = 300
    q, k, v = (t.detach() for t in _inputs(lq=lq, lk=lq, heads=1))
    slopes = [0.1]
    case = Case(1, 1, 1, lq, lq, 4, 4, torch.float64, 0, 1.0, None, None, None,
                [("alibi", slopes, True, "top_left")])
    ref, _ = reference(case, q, k, v, [None])
    bias = biases.alibi(slopes=torch.tensor(slopes, dtype=torch.float64))
    for backend in ("reference", "tiled"):
        assert _err(attnkit.attention(q, k, v, bias=bias, backend=backend), ref) < 1e-13
    assert biases.alibi_slopes(12, torch.float64).dtype == torch.float64
    paper = torch.tensor(standard_slopes(12), dtype=torch.float64)
    assert torch.allclose(biases.alibi_slopes(12, torch.float64), paper, rtol=1e-15, atol=0)
