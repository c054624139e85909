"""Linear attention: kernel feature maps that drop the quadratic term.

Softmax attention weighs key ``j`` for query ``i`` by ``exp(q_i . k_j)``. Linear
attention replaces that by ``phi(q_i) . phi(k_j)`` for a positive feature map ``phi``, so
the sum over keys factors::

    out_i = phi(q_i) S / (phi(q_i) . z),   S = sum_j phi(k_j) v_j^T  (F x Dv),  z = sum_j phi(k_j)

Cost is O(L F Dv) instead of O(L^2 D), and decoding carries only (S, z): constant memory.

Feature maps:

- ``"elu"``: ``phi(x) = elu(x) + 1`` (Katharopoulos et al. 2020). Its own kernel, not an
  estimate of softmax.
- ``"favor"``: Performer's positive orthogonal random features (Choromanski et al. 2021),
  ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(F)`` with ``x`` scaled by ``scale ** 0.5``.
  ``phi(q) . phi(k)`` is an unbiased estimate of the softmax kernel ``exp(scale q . k)``;
  the output, a ratio of two such estimates, is consistent but slightly biased, and its
  error falls as ``1 / sqrt(F)``.
- any callable ``phi(x) -> (..., F)`` with positive outputs.

Causal mode uses the chunked form: exact quadratic attention (with the feature map)
inside each chunk of ``chunk_size`` tokens, and the running state across chunks. It
allocates O(L (chunk_size + F Dv / chunk_size)) per head, never (L x L).

Legend: b batch, h KV heads, g query heads per KV head, n chunks, c and e positions in a
chunk, l positions, f features, d value dims.

>>> import torch
>>> from attnkit.functional.linear import linear_attention
>>> q, k, v = torch.randn(1, 4, 1000, 32), torch.randn(1, 2, 1000, 32), torch.randn(1, 2, 1000, 32)
>>> linear_attention(q, k, v, causal=True).shape
torch.Size([1, 4, 1000, 32])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit._checks import describe, require_int, require_real
from attnkit.functional._call import make_call

__all__ = ["LinearAttentionState", "favor_projection", "linear_attention", "linear_attention_step"]

FeatureMap = Callable[[Tensor], Tensor]


def favor_projection(dim: int, num_features: int, seed: int | None = 0, *,
                     generator: torch.Generator | None = None) -> Tensor:
    """FAVOR+'s random projection (num_features, dim), float64: blocks of ``dim`` orthogonal
    rows, each row scaled to the norm of an independent Gaussian vector (so that every row
    is marginally Gaussian, as the unbiased estimate needs).

    The same ``seed`` gives the same projection on every machine; ``seed=None`` draws from
    ``generator`` (or torch's global generator).
    """
    dim = require_int("dim", dim, minimum=1)
    num_features = require_int("num_features", num_features, minimum=1)
    g = generator
    if seed is not None:
        g = torch.Generator().manual_seed(require_int("seed", seed))
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        gauss = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        ortho, r = torch.linalg.qr(gauss)
        # QR's sign convention biases the rows' directions; fixing the signs by diag(R) makes
        # ortho Haar-distributed, so each row is a uniformly random direction
        ortho = ortho * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
        blocks.append(ortho.t())  # rows orthonormal
    rows = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, dim, generator=g, dtype=torch.float64).norm(dim=1, keepdim=True)
    return rows * norms


@functools.lru_cache(maxsize=32)
def _seeded_projection(dim: int, num_features: int, seed: int | None) -> Tensor:
    return favor_projection(dim, num_features, seed)  # never written to; shared between calls


def _elu(x: Tensor) -> Tensor:
    return F.elu(x) + 1


@dataclass(frozen=True)
class _Spec:
    """A checked feature-map choice: how to turn q and k into features."""

    kind: str  # "elu", "favor" or "callable"
    fn: FeatureMap | None
    projection: Tensor | None  # favor: (F, D), float64
    scale: float

    def queries(self, q: Tensor) -> tuple[Tensor, Tensor | None]:
        """Query features and the per-row shift taken out of them (FAVOR), which cancels."""
        if self.kind == "favor":
            logits = self._logits(q * math.sqrt(self.scale))
            shift = logits.detach().amax(-1)
            return torch.exp(logits - shift[..., None]), shift
        return self._apply(q), None

    def keys(self, k: Tensor) -> tuple[Tensor, Tensor | None]:
        """Key features and the shift taken out of them (FAVOR: one per batch and head, the
        largest key logit), which cancels in the ratio."""
        if self.kind == "favor":
            logits = self.key_logits(k)
            shift = logits.detach().flatten(2).amax(-1)  # (b, h)
            return torch.exp(logits - shift[..., None, None]), shift
        return self._apply(k), None

    def key_logits(self, k: Tensor) -> Tensor:
        return self._logits(k * math.sqrt(self.scale))

    def _logits(self, x: Tensor) -> Tensor:
        assert self.projection is not None  # only FAVOR+ has logits, and it always has a projection
        w = self.projection.to(device=x.device, dtype=x.dtype)
        return x @ w.t() - 0.5 * (x * x).sum(-1, keepdim=True) - 0.5 * math.log(w.shape[0])

    def _apply(self, x: Tensor) -> Tensor:
        if self.kind == "elu":
            return _elu(x)
        assert self.fn is not None  # kind == "callable"
        out = self.fn(x)
        if not isinstance(out, Tensor) or out.shape[:-1] != x.shape[:-1]:
            raise ValueError(f"feature_map must return (..., F) features for x of shape {tuple(x.shape)}; "
                             f"got {describe(out)}")
        if bool((out.detach() < 0).any()):
            raise ValueError("feature_map must return non-negative features (the weights phi(q).phi(k) must be "
                             "positive); it returned negative values. Try elu(x) + 1 or relu(x) + eps")
        return out.to(x.dtype)


def _spec(feature_map: object, dim: int, num_features: int | None, seed: int | None, redraw: bool,
          scale: float | None) -> _Spec:
    if not isinstance(redraw, bool):
        raise TypeError(f"redraw must be a bool; got {describe(redraw)}")
    if redraw and feature_map != "favor":
        raise ValueError("redraw=True applies to feature_map='favor' only (the other maps have no random features)")
    if callable(feature_map) and not isinstance(feature_map, str):
        if num_features is not None or scale is not None:
            raise ValueError("num_features and scale apply to feature_map='favor' only")
        return _Spec("callable", feature_map, None, 1.0)
    if feature_map == "elu":
        if num_features is not None or scale is not None:
            raise ValueError("num_features and scale apply to feature_map='favor' only; "
                             "'elu' has D features and no temperature")
        return _Spec("elu", None, None, 1.0)
    if feature_map != "favor":
        raise ValueError(f"feature_map must be 'elu', 'favor' or a callable; got {describe(feature_map)}")
    if dim < 1:
        raise ValueError(f"feature_map='favor' needs head_dim >= 1; got {dim}")
    if seed is not None:
        require_int("seed", seed)
    if num_features is None:
        num_features = max(1, round(dim * math.log(max(dim, 2))))  # Performer's default, D ln D
    num_features = require_int("num_features", num_features, minimum=1)
    if scale is None:
        scale = 1.0 / math.sqrt(dim)
    if require_real("scale", scale) <= 0:
        raise ValueError(f"scale must be > 0 for feature_map='favor'; got {scale}")
    projection = (favor_projection(dim, num_features, None) if redraw or seed is None
                  else _seeded_projection(dim, num_features, seed).clone())  # the cache stays untouched
    return _Spec("favor", None, projection, scale)


def _ratio(num: Tensor, den: Tensor, eps: float, q_shift: Tensor | None, k_shift: Tensor | None) -> Tensor:
    """``num / (den + eps)`` in unshifted units: features that had ``exp(shift)`` taken out
    get ``eps`` scaled alike, so the result does not depend on the shifts. ``k_shift`` is
    (b, h) or (b, h, g, l). A row whose weights all underflow to 0 outputs 0."""
    if q_shift is not None and k_shift is not None:
        if k_shift.dim() == 2:
            k_shift = k_shift[:, :, None, None]
        den = den + eps * torch.exp(-(q_shift + k_shift))
    else:
        den = den + eps
    den = torch.where(den == 0, torch.ones_like(den), den)  # num is 0 there too: features are >= 0
    return num / den[..., None]


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def linear_attention(q: Tensor, k: Tensor, v: Tensor, *, feature_map: str | FeatureMap = "elu",
                     causal: bool = False, num_features: int | None = None, seed: int | None = 0,
                     redraw: bool = False, eps: float = 1e-6, chunk_size: int = 64,
                     scale: float | None = None) -> Tensor:
    """Linear attention ``phi(q) S / (phi(q) . z)``; see the module docstring.

    Args:
        q: (B, H, Lq, D). k: (B, Hkv, Lk, D). v: (B, Hkv, Lk, Dv). H a multiple of Hkv (GQA,
            MQA), as in :func:`attnkit.attention`; K/V are never copied per query head.
        feature_map: ``"elu"``, ``"favor"`` or a callable ``phi(x) -> (..., F)``.
        causal: query ``i`` sees keys ``j <= i``; needs Lq == Lk (decode with
            :func:`linear_attention_step`).
        num_features: FAVOR's F, default ``round(D ln D)``.
        seed: FAVOR's projection seed (same seed, same features). ``seed=None`` or
            ``redraw=True`` draws a new projection from torch's global generator at each
            call (Performer's training-time redraw).
        eps: added to the denominator (in the features' own units: FAVOR's stabilising
            shifts do not change the result).
        chunk_size: tokens per chunk in causal mode (memory/speed trade-off, not accuracy).
        scale: FAVOR's softmax temperature, default ``1 / sqrt(D)``; FAVOR only.

    Returns:
        (B, H, Lq, Dv) in q's dtype, computed in float32 (float64 for float64 inputs).
        Lk = 0 gives zeros.
    """
    call = make_call(q, k, v, mask=None, bias=None, scale=None, softcap=None, dropout_p=0.0, return_lse=False)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool; got {describe(causal)}")
    chunk_size = require_int("chunk_size", chunk_size, minimum=1)
    if require_real("eps", eps) < 0:
        raise ValueError(f"eps must be >= 0; got {eps}")
    if causal and call.q_len != call.k_len:
        raise ValueError(f"causal linear attention needs Lq == Lk; got Lq {call.q_len}, Lk {call.k_len}. "
                         "For decoding, use linear_attention_step")
    spec = _spec(feature_map, q.shape[-1], num_features, seed, redraw, scale)
    batch, heads, q_len, _ = q.shape
    kv_heads, groups, dv = call.kv_heads, call.groups, v.shape[-1]
    if q_len == 0 or call.k_len == 0:  # zeros that stay in the graph, so backward gives zero gradients
        return q.new_zeros(batch, heads, q_len, dv) + (q.sum() + k.sum() + v.sum()) * 0
    cd = _compute_dtype(q)
    qg = q.to(cd).view(batch, kv_heads, groups, q_len, q.shape[-1])  # (b, h, g, l, D): no K/V copies
    pq, q_shift = spec.queries(qg)  # (b, h, g, l, f)
    vv = v.to(cd)
    if causal and spec.kind == "favor":
        state = _State.empty(batch, kv_heads, pq.shape[-1], dv, cd, q.device)
        out, _ = _favor_scan(spec, state, pq, q_shift, k.to(cd), vv, min(chunk_size, q_len), eps)
        return out.reshape(batch, heads, q_len, dv).to(q.dtype)
    pk, k_shift = spec.keys(k.to(cd))  # (b, h, l, f)
    _check_features(pq, pk)
    if not causal:
        s = torch.einsum("bhlf,bhld->bhfd", pk, vv)
        z = pk.sum(2)  # (b, h, f)
        num = torch.einsum("bhglf,bhfd->bhgld", pq, s)
        den = torch.einsum("bhglf,bhf->bhgl", pq, z)
    else:
        num, den = _chunked_causal(pq, pk, vv, min(chunk_size, q_len))
    return _ratio(num, den, eps, q_shift, k_shift).reshape(batch, heads, q_len, dv).to(q.dtype)


def _check_features(pq: Tensor, pk: Tensor) -> None:
    if pq.shape[-1] != pk.shape[-1]:
        raise ValueError(f"feature_map gave {pq.shape[-1]} features for q but {pk.shape[-1]} for k; "
                         "it must give the same number for both")


@dataclass
class _State:
    kv: Tensor  # (b, h, f, d): sum of phi(k) v^T, in units of exp(key_max)
    z: Tensor  # (b, h, f): sum of phi(k), same units
    key_max: Tensor  # (b, h): FAVOR's running largest key logit (-inf before any key); 0 otherwise

    @staticmethod
    def empty(b: int, h: int, f: int, d: int, dtype: torch.dtype, device: torch.device) -> _State:
        return _State(torch.zeros(b, h, f, d, dtype=dtype, device=device),
                      torch.zeros(b, h, f, dtype=dtype, device=device),
                      torch.full((b, h), float("-inf"), dtype=dtype, device=device))


def _favor_scan(spec: _Spec, state: _State, pq: Tensor, q_shift: Tensor | None, k: Tensor, v: Tensor, size: int,
                eps: float) -> tuple[Tensor, _State]:
    """Causal FAVOR+ over chunks with a running maximum of the key logits, as online softmax
    keeps one: the state is rescaled whenever a chunk brings a larger key, so no feature
    overflows and no key's features underflow because of a *later* key."""
    length = pq.shape[3]
    tril = torch.ones(size, size, dtype=torch.bool, device=pq.device).tril()
    outs = []
    for start in range(0, length, size):
        sl = slice(start, min(start + size, length))
        n = sl.stop - sl.start
        logits = spec.key_logits(k[:, :, sl])  # (b, h, c, f)
        key_max = torch.maximum(state.key_max, logits.detach().flatten(2).amax(-1))  # (b, h)
        decay = torch.exp(state.key_max - key_max)  # (b, h); 0 before the first key
        fk = torch.exp(logits - key_max[..., None, None])  # (b, h, c, f), each <= 1
        kv, z = state.kv * decay[..., None, None], state.z * decay[..., None]
        pqc, vc = pq[:, :, :, sl], v[:, :, sl]
        num = torch.einsum("bhgcf,bhfd->bhgcd", pqc, kv)
        den = torch.einsum("bhgcf,bhf->bhgc", pqc, z)
        scores = torch.einsum("bhgcf,bhef->bhgce", pqc, fk) * tril[:n, :n]
        num = num + torch.einsum("bhgce,bhed->bhgcd", scores, vc)
        den = den + scores.sum(-1)
        shift = None if q_shift is None else q_shift[:, :, :, sl]
        outs.append(_ratio(num, den, eps, shift, key_max[:, :, None, None]))
        state = _State(kv + torch.einsum("bhcf,bhcd->bhfd", fk, vc), z + fk.sum(2), key_max)
    return torch.cat(outs, dim=3), state


def _chunked_causal(pq: Tensor, pk: Tensor, v: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Numerator (b, h, g, l, d) and denominator (b, h, g, l) of causal linear attention."""
    b, h, g, length, f = pq.shape
    n = math.ceil(length / size)  # size <= length: padding stays below one chunk
    pad = n * size - length
    if pad:  # zero features add nothing to any sum; padded query rows are cut off below
        pq = F.pad(pq, (0, 0, 0, pad))
        pk = F.pad(pk, (0, 0, 0, pad))
        v = F.pad(v, (0, 0, 0, pad))
    cq = pq.view(b, h, g, n, size, f)
    ck = pk.view(b, h, n, size, f)
    cv = v.view(b, h, n, size, v.shape[-1])
    # state before each chunk: exclusive prefix sums over chunks
    kv = torch.einsum("bhncf,bhncd->bhnfd", ck, cv).cumsum(2)
    state = torch.cat((torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1]), dim=2)  # (b, h, n, f, d)
    zs = ck.sum(3).cumsum(2)
    zstate = torch.cat((torch.zeros_like(zs[:, :, :1]), zs[:, :, :-1]), dim=2)  # (b, h, n, f)
    num = torch.einsum("bhgncf,bhnfd->bhgncd", cq, state)
    den = torch.einsum("bhgncf,bhnf->bhgnc", cq, zstate)
    # inside a chunk: the quadratic form with the feature kernel, masked causally
    scores = torch.einsum("bhgncf,bhnef->bhgnce", cq, ck)
    scores = scores * torch.ones(size, size, dtype=torch.bool, device=pq.device).tril()
    num = num + torch.einsum("bhgnce,bhned->bhgncd", scores, cv)
    den = den + scores.sum(-1)
    num = num.reshape(b, h, g, n * size, -1)[:, :, :, :length]
    den = den.reshape(b, h, g, n * size)[:, :, :, :length]
    return num, den


@dataclass
class LinearAttentionState:
    """What causal linear attention carries between decoding steps: constant memory.

    ``kv`` (B, Hkv, F, Dv) is ``sum_j phi(k_j) v_j^T`` and ``z`` (B, Hkv, F) is
    ``sum_j phi(k_j)``, with FAVOR+ in units of ``exp(key_max)``, its running largest key
    logit. ``length`` counts the tokens seen.
    """

    kv: Tensor
    z: Tensor
    key_max: Tensor
    length: int
    spec: _Spec
    head_dim: int


def linear_attention_step(state: LinearAttentionState | None, q: Tensor, k: Tensor, v: Tensor, *,
                          feature_map: str | FeatureMap = "elu", num_features: int | None = None,
                          seed: int | None = 0, eps: float = 1e-6,
                          scale: float | None = None) -> tuple[LinearAttentionState, Tensor]:
    """One causal decoding step: add token t's key and value, attend with its query.

    Args:
        state: None for the first token, then the state this function returned.
        q: (B, H, 1, D). k: (B, Hkv, 1, D). v: (B, Hkv, 1, Dv).
        feature_map, num_features, seed, eps, scale: as :func:`linear_attention`; read
            on the first step and kept in the state.

    Returns:
        ``(state, out)`` with ``out`` (B, H, 1, Dv), equal to the matching row of
        ``linear_attention(..., causal=True)`` up to rounding.

    >>> import torch
    >>> q = k = v = torch.randn(1, 2, 5, 8)
    >>> state, rows = None, []
    >>> for t in range(5):
    ...     state, out = linear_attention_step(state, q[:, :, t:t+1], k[:, :, t:t+1], v[:, :, t:t+1])
    ...     rows.append(out)
    >>> torch.allclose(torch.cat(rows, 2), linear_attention(q, k, v, causal=True), atol=1e-5)
    True
    """
    call = make_call(q, k, v, mask=None, bias=None, scale=None, softcap=None, dropout_p=0.0, return_lse=False)
    if call.q_len != 1 or call.k_len != 1:
        raise ValueError(f"linear_attention_step takes one token: q (B, H, 1, D) and k, v (B, Hkv, 1, ·); "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if require_real("eps", eps) < 0:
        raise ValueError(f"eps must be >= 0; got {eps}")
    batch, heads, _, dim = q.shape
    kv_heads, groups, dv = call.kv_heads, call.groups, v.shape[-1]
    cd = _compute_dtype(q)
    if state is None:
        spec = _spec(feature_map, dim, num_features, seed, False, scale)
        f = spec.projection.shape[0] if spec.projection is not None else spec.queries(q[:1, :1].to(cd))[0].shape[-1]
        inner = _State.empty(batch, kv_heads, f, dv, cd, q.device)
        if spec.kind != "favor":
            inner.key_max.zero_()
        state = LinearAttentionState(inner.kv, inner.z, inner.key_max, 0, spec, dim)
    else:
        if not isinstance(state, LinearAttentionState):
            raise TypeError(f"state must be None or a LinearAttentionState; got {describe(state)}")
        want = (batch, kv_heads, state.head_dim, dv, state.kv.dtype)
        got = (batch, kv_heads, dim, dv, cd)
        if want != got:
            raise ValueError(f"q, k, v with (batch, KV heads, head_dim, Dv, compute dtype) = {got} do not match "
                             f"the state's {want}")
    spec = state.spec
    pq, q_shift = spec.queries(q.to(cd).view(batch, kv_heads, groups, 1, dim))  # (b, h, g, 1, f)
    if spec.kind == "favor":
        inner = _State(state.kv, state.z, state.key_max)
        out, inner = _favor_scan(spec, inner, pq, q_shift, k.to(cd), v.to(cd), 1, eps)
        kv, z, key_max = inner.kv, inner.z, inner.key_max
    else:
        pk, _ = spec.keys(k.to(cd))
        _check_features(pq, pk)
        kv = state.kv + torch.einsum("bhlf,bhld->bhfd", pk, v.to(cd))
        z = state.z + pk.sum(2)
        key_max = state.key_max
        num = torch.einsum("bhglf,bhfd->bhgld", pq, kv)
        den = torch.einsum("bhglf,bhf->bhgl", pq, z)
        out = _ratio(num, den, eps, None, None)
    out = out.reshape(batch, heads, 1, dv).to(q.dtype)
    return LinearAttentionState(kv, z, key_max, state.length + 1, spec, dim), out
