"""The tiled backend's kernel is decided once per call (``tiled.choose``), with its reasons, and travels into the
backward; ``attnkit.explain_call`` and ``attnkit backends --explain-call`` say why a call runs where it runs."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import biases, masks
from attnkit.cli import main
from attnkit.functional import tiled
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
