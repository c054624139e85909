"""The tiled backend never allocates an (Lq x Lk) tensor, forward or backward."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnkit
from attnkit import biases, masks


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kw", [
    {}, {"mask": masks.causal()}, {"mask": masks.sliding_window(300)},
    {"mask": masks.causal(), "bias": biases.alibi(2)}, {"softcap": 20.0, "mask": masks.causal()},
    pytest.param({"mask": masks.document(torch.arange(6000) // 1000), "dropout_p": 0.1}, marks=pytest.mark.slow),
], ids=["dense", "causal", "window", "alibi", "softcap", "document+dropout"])
def test_no_op_returns_an_l_by_l_tensor(kw):
    length = 6000
    q, k, v = (torch.randn(1, 2, length, 32, requires_grad=True) for _ in range(3))
    with LargestTensor() as probe:
        out = attnkit.attention(q, k, v, backend="tiled", **kw)
        out.sum().backward()
    # One (L x L) score matrix for one head would be 36M elements; the tiled path's
    # blocks stay within its 4M-element budget.
    assert probe.largest <= 1 << 22, probe.largest
    assert probe.largest < length * length / 8


@pytest.mark.slow
def test_peak_memory_at_16k_stays_far_below_one_l_by_l_matrix():
    """Forward+backward at L=16384, H=1, D=64 in a fresh process: the peak resident
    memory above the inputs stays far below the 1 GiB that one (L x L) fp32 matrix takes."""
    script = textwrap.dedent("""
        import torch, attnkit
        from attnkit._timing import peak_rss_mib
        torch.set_num_threads(2)
        q, k, v = (torch.randn(1, 1, 16384, 64, requires_grad=True) for _ in range(3))
        base = peak_rss_mib()
        out = attnkit.attention(q, k, v, mask=attnkit.masks.causal(), backend="tiled")
        out.sum().backward()
        print(peak_rss_mib() - base)
        # The same probe sees one (L x L) fp32 matrix: ~1 GiB.
        base = peak_rss_mib()
        torch.empty(16384, 16384).fill_(1.0)
        print(peak_rss_mib() - base)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    extra_mib, probe_mib = map(float, done.stdout.split()[-2:])
    assert probe_mib > 900, "the memory probe must be able to see an (L x L) matrix"
    assert extra_mib < 256, f"peak grew by {extra_mib:.0f} MiB"
