"""One validated attention call, and the score math every backend shares.

``transform_scores`` (softcap, then biases) and ``dropout_keep`` are the single
definitions that the reference and the tiled backends both evaluate, block by block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit._blocks import ScoreBlock
from attnkit._checks import describe, require_real, require_tensor
from attnkit.biases import Bias, as_bias
from attnkit.masks import Mask, as_mask

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttentionCall:
    q: Tensor  # (B, H, Lq, D)
    k: Tensor  # (B, Hkv, Lk, D)
    v: Tensor  # (B, Hkv, Lk, Dv)
    mask: Mask | None
    bias: Bias | None
    scale: float
    softcap: float | None
    dropout_p: float
    dropout_seed: int
    return_lse: bool

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    @property
    def q_len(self) -> int:
        return self.q.shape[2]

    @property
    def k_len(self) -> int:
        return self.k.shape[2]

    @property
    def compute_dtype(self) -> torch.dtype:
        """float64 for float64 inputs, float32 for everything else."""
        return torch.float64 if self.q.dtype == torch.float64 else torch.float32

    def scale_positive_in(self, dtype: torch.dtype) -> bool:
        """Whether the scale is still > 0 once cast to ``dtype``, as a kernel computing in that
        dtype sees it (2.7e-263 is 0.0 in float32). PyTorch's causal kernels mask before they
        scale, so a scale of 0 or below turns the masked -inf into NaN (or +inf)."""
        return float(torch.tensor(self.scale, dtype=dtype)) > 0

    @property
    def requires_grad(self) -> bool:
        from attnkit.biases import tensor_bias_parts

        tensors = [self.q, self.k, self.v, *(b.tensor for b in tensor_bias_parts(self.bias))]
        return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def make_call(q: object, k: object, v: object, *, mask: object, bias: object, scale: object,
              softcap: object, dropout_p: object, return_lse: object) -> AttentionCall:
    """Validate the arguments of :func:`attnkit.attention`; raise naming the culprit."""
    q, k, v = require_tensor("q", q), require_tensor("k", k), require_tensor("v", v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, heads, length, head_dim); got {describe(t)}"
            )
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {describe(t)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"q, k and v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}. "
            "Cast them with .to(dtype)"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device; got q {q.device}, k {k.device}, v {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(
            f"q, k and v must share the batch size; got q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}"
        )
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads; got k {k.shape[1]}, v {v.shape[1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"q's heads ({q.shape[1]}) must be a multiple of k's and v's heads ({k.shape[1]}) "
            "for grouped-query attention"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head_dim; got q {q.shape[3]}, k {k.shape[3]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length; got k {k.shape[2]}, v {v.shape[2]}")

    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3]) if q.shape[3] else 1.0
    scale = require_real("scale", scale)
    if softcap is not None:
        softcap = require_real("softcap", softcap)
        if softcap <= 0:
            raise ValueError(f"softcap must be > 0 (scores become softcap * tanh(s / softcap)); got {softcap}")
    dropout_p = require_real("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool; got {describe(return_lse)}")

    mask_ = None if mask is None else as_mask("mask", mask)
    bias_ = None if bias is None else as_bias("bias", bias)
    sizes = (q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device)
    if mask_ is not None:
        mask_.check(*sizes)
    if bias_ is not None:
        bias_.check(*sizes)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout_p > 0 else 0
    return AttentionCall(q, k, v, mask_, bias_, scale, softcap, dropout_p, seed, return_lse)


def transform_scores(raw: Tensor, block: ScoreBlock, call: AttentionCall,
                     leaves: dict[int, Tensor] | None = None) -> Tensor:
    """Scaled scores -> soft-capped -> biased. 5-D, in ``block``'s layout."""
    s = raw
    if call.softcap is not None:
        s = torch.tanh(s / call.softcap) * call.softcap
    if call.bias is not None:
        s = call.bias.apply(s, block, leaves)
    return s


_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (murmur3-style finaliser) on int64 tensors holding 32-bit values.

    The multipliers are below 2**31 so that no product leaves int64's range.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x1B873593) & _M32
    return x ^ (x >> 16)


def dropout_keep(call: AttentionCall, block: ScoreBlock) -> Tensor:
    """Which probabilities dropout keeps in ``block``: a pure function of (seed, b, h, i, j).

    Being a hash of absolute positions, not a draw from a stateful generator, it gives
    the same mask in the forward and the backward pass, on every backend and device,
    whatever the block sizes.
    """
    index = ((block.b * call.heads + block.h) * call.q_len + block.i) * call.k_len + block.j
    lo, hi = index & _M32, index >> 32
    x = _mix32(lo ^ call.dropout_seed)
    x = _mix32(x ^ hi ^ (call.dropout_seed >> 7))
    threshold = int(call.dropout_p * (1 << 24))
    return (x >> 8) >= threshold
