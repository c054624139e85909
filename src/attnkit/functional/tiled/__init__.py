"""The tiled backend: FlashAttention's algorithm in PyTorch, O(L) memory, with its own backward.

For each chunk of queries, the mask's block map (computed analytically) splits the
keys into *segments*: runs of full blocks, which need no mask work, and runs of partial
blocks, whose mask is evaluated for that segment alone. Empty blocks are skipped. Each
segment yields a partial output and its log-sum-exp; partial results merge by
log-sum-exp (the online softmax, one segment at a time). Nothing of size (Lq x Lk) is
ever allocated, forward or backward.

Each segment runs on one of two kernels that compute the same thing:

* ``math``: plain PyTorch ops, any device and every option (softcap, score_mod,
  dropout, Dv != D). Its scores are at most ``_SCORE_BUDGET`` elements.
* ``fused``: PyTorch's fused CPU flash kernel (``aten._scaled_dot_product_flash_attention_for_cpu``
  and its backward), used on CPU when the segment needs only a mask and additive biases.
  It receives the segment's mask and biases as a small additive tensor and returns the
  log-sum-exp that the merge needs. It is checked against the math kernel on first use.

The backward is a custom autograd function that recomputes each segment's
probabilities from q, k, v, the output and the log-sum-exp (FlashAttention-2): any
segment can be differentiated by either kernel given the global statistics.

Queries are folded by key/value group, rows ordered (i, g), so GQA/MQA never copies
keys or values.

That per-chunk loop dispatches ops in proportion to L. When the fused kernel applies,
the default ``kernel("auto")`` runs the batched engine instead: consecutive chunks with
the same band of keys are one fused call, and the full part below a causal diagonal is
the kernel's own ``is_causal`` (see :func:`.plan.band_plan`); the op count is then
independent of L.

An optional C++ kernel (:mod:`.native`, ``kernel("native")``) runs one parallel loop
over (batch, head, query block) with block GEMMs and arithmetic edge masks, for the masks
:func:`.plan.native_params` describes, and its own FlashAttention-2 backward over
(batch, kv head, key block); bfloat16/float16 block GEMMs where the CPU has the units.
``kernel("auto")`` uses it for float32 sliding windows and causal documents once a build
is cached (see :func:`.strategy.choose`); it is never required.

Modules: :mod:`.plan` (the per-chunk and the batched plans), :mod:`.kernels`,
:mod:`.autograd` (the autograd functions), :mod:`.strategy` (the :func:`kernel` switch and
:func:`choose`, which decides each call's kernel once);
the log-sum-exp merge is :func:`attnkit.functional._merge.lse_merge`, shared with ring
attention.
"""

from __future__ import annotations

from torch import Tensor

from attnkit.functional._call import AttentionCall
from attnkit.functional.tiled.autograd import partial_gradients, tiled_forward
from attnkit.functional.tiled.native import native_status
from attnkit.functional.tiled.strategy import KERNELS, Strategy, choose, kernel

__all__ = ["KERNELS", "Strategy", "TiledBackend", "choose", "kernel", "native_status", "partial_gradients",
           "tiled_forward"]


class TiledBackend:
    name = "tiled"
    summary = "FlashAttention's algorithm in PyTorch: O(L) memory, skips masked-out blocks"
    features: tuple[str, ...] = ("every mask, block-sparse", "every bias, per block", "softcap", "dropout",
                "GQA/MQA without copies", "Lq != Lk", "Dv != D", "return_lse",
                "custom backward", "any device")

    def supports(self, call: AttentionCall) -> str | None:
        return None

    def run(self, call: AttentionCall) -> tuple[Tensor, Tensor]:
        return tiled_forward(call)
