"""The benchmark cases: one attention problem each, with what every implementation needs
to compute it (attnkit's structured mask and bias, SDPA's native flags or dense mask,
FlexAttention's ``mask_mod``/``score_mod``, a dense additive mask for eager code).

Legend: B batch, H query heads, Hkv key/value heads, Lq queries, Lk keys, D head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnkit import biases, masks
from attnkit.biases import Bias
from attnkit.masks import Mask
from attnkit.masks.flex import mask_mod as to_flex_mod

__all__ = ["CASES", "DEFAULT_CASES", "Problem", "make_problem"]

CASES = {
    "dense": "no mask",
    "causal": "causal mask",
    "window": "causal sliding window of W keys (W = --window, itself included)",
    "alibi": "causal mask + ALiBi bias",
    "document": "8 packed documents of random lengths, causal within each",
    "gqa": "causal, H query heads sharing --kv-heads key/value heads",
    "cross": "Lq = L queries on Lk = L/4 context keys, the last 10% of them padding",
    "decode": "one new query on a cache of L keys",
    "chunked": "Llama 4's chunked local attention: causal within chunks of W (--window) tokens",
    "strided": "Sparse Transformer's strided pattern, stride W (--window)",
    "dilated": "a causal window of 2W keys that keeps every 2nd (Longformer/LongNet dilation)",
    "bigbird": "BigBird: 64-token blocks, 3-block window, 64 global tokens, 3 random blocks",
    "blocks": "a user's block map: 128 x 128 blocks, a random quarter of them (the diagonal always)",
}
DEFAULT_CASES = ("dense", "causal", "window", "alibi", "document", "gqa", "cross", "decode")
"""The cases ``attnkit bench`` runs unless told otherwise; the sparse patterns of the literature
(chunked, strided, dilated, bigbird, blocks) run when named."""


@dataclass
class Problem:
    """One case at one length: inputs and each implementation's description of the work."""

    case: str
    length: int
    q: Tensor  # (B, H, Lq, D)
    k: Tensor  # (B, Hkv, Lk, D)
    v: Tensor  # (B, Hkv, Lk, D)
    mask: Mask | None
    bias: Bias | None
    pairs: float  # allowed (query, key) pairs, summed over batch and heads
    sdpa_native: dict = field(default_factory=dict)  # SDPA kwargs when no dense mask is needed
    dense_mask: Callable[[], Tensor] | None = None  # bool (Lq, Lk) or (B|1, 1, Lq, Lk)
    dense_bias: Callable[[], Tensor] | None = None  # float (1, H, Lq, Lk)
    mask_mod: Callable | None = None  # FlexAttention's (b, h, q_idx, kv_idx) -> bool
    score_mod: Callable | None = None  # FlexAttention's (score, b, h, q_idx, kv_idx) -> score

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        (b, h, lq, d), hkv, lk = self.q.shape, self.k.shape[1], self.k.shape[2]
        return b, h, hkv, lq, lk, d

    def dense_bytes(self) -> int:
        """Bytes of one (B, H, Lq, Lk) float32 score tensor: what materialising code holds."""
        b, h, _, lq, lk, _ = self.shape
        return 4 * b * h * lq * lk

    def additive_mask(self) -> Tensor | None:
        """Mask and bias as one float tensor added to the scores, as model files do."""
        mask = self.dense_mask() if self.dense_mask is not None else None
        if self.dense_bias is None:
            if mask is None:
                return None
            return torch.zeros(mask.shape, dtype=self.q.dtype, device=self.q.device).masked_fill_(~mask, float("-inf"))
        total = self.dense_bias().to(self.q.dtype)
        if mask is not None:
            total.masked_fill_(~mask, float("-inf"))
        return total


def _pairs(mask: Mask | None, batch: int, heads: int, q_len: int, k_len: int) -> float:
    if mask is None:
        return float(batch * heads * q_len * k_len)
    b, h = mask.extent()  # sparsity is averaged over the mask's own batch and head extent
    per_pair = round((1.0 - mask.sparsity(q_len, k_len)) * b * h * q_len * k_len)  # an integer count
    return float(per_pair * (batch // b) * (heads // h))


def _document_ids(length: int, docs: int, generator: torch.Generator) -> Tensor:
    """Document id per token: ``docs`` documents of random lengths (at least 1 token each)."""
    docs = min(docs, length)
    cuts = torch.randperm(length - 1, generator=generator)[: docs - 1].sort().values + 1
    sizes = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([length])]))
    return torch.repeat_interleave(torch.arange(docs), sizes)


def make_problem(case: str, length: int, *, batch: int = 1, heads: int = 8, kv_heads: int = 2,
                 head_dim: int = 64, window: int = 512, documents: int = 8,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 requires_grad: bool = False, seed: int = 0) -> Problem:
    """Build ``case`` (a key of :data:`CASES`) at sequence length ``length``."""
    if case not in CASES:
        raise ValueError(f"case must be one of {', '.join(CASES)}; got {case!r}")
    g = torch.Generator().manual_seed(seed)
    q_len, k_len, kv = length, length, heads
    if case == "gqa":
        kv = kv_heads
    elif case == "cross":
        k_len = max(1, length // 4)
    elif case == "decode":
        q_len = 1

    def rand(h: int, n: int) -> Tensor:
        t = torch.randn(batch, h, n, head_dim, generator=g).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    q, k, v = rand(heads, q_len), rand(kv, k_len), rand(kv, k_len)
    dev = q.device
    mask: Mask | None = None
    bias: Bias | None = None
    p = Problem(case, length, q, k, v, None, None, 0.0)

    if case in ("causal", "gqa"):
        mask = masks.causal()
        p.sdpa_native = {"is_causal": True, **({"enable_gqa": True} if kv != heads else {})}
    elif case == "window":
        mask = masks.sliding_window(left=window - 1)
    elif case == "alibi":
        mask, bias = masks.causal(), biases.alibi(heads)
        slopes = biases.alibi_slopes(heads).to(dev)

        def alibi_mod(score: Tensor, b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            return score - slopes[h] * (qi - ki).abs()

        p.score_mod = alibi_mod
        p.dense_bias = lambda: bias.to_dense(q_len, k_len, heads=heads, device=dev)
    elif case == "document":
        mask = masks.document(_document_ids(length, documents, g).to(dev)) & masks.causal()
    elif case == "cross":
        mask = masks.key_padding([k_len - k_len // 10] * batch)
    elif case == "chunked":
        mask = masks.chunked(window) & masks.causal()
    elif case == "strided":
        mask = masks.strided(window)
    elif case == "dilated":
        mask = masks.dilated(2 * window, 2)
    elif case == "bigbird":
        mask = masks.bigbird(window=1, global_tokens=64, random_blocks=3, block_size=64, seed=seed)
    elif case == "blocks":
        n = -(-length // 128)
        block_map = (torch.rand(n, n, generator=g) < 0.25) | torch.eye(n, dtype=torch.bool)
        mask = masks.from_blocks(block_map.to(dev), 128)
    if mask is not None:  # Flex's mask_mod and the dense mask come from the mask itself
        p.mask_mod = to_flex_mod(mask, q_len, k_len)
        per_batch = batch if mask.extent()[0] > 1 else None
        p.dense_mask = lambda: mask.to_dense(q_len, k_len, batch=per_batch, device=dev)
    p.mask, p.bias = mask, bias
    p.pairs = _pairs(mask, batch, heads, q_len, k_len)
    return p
