"""Exact attention statistics streamed block by block: no (Lq x Lk) tensor, ever.

Given a call and its rows' log-sum-exp (the forward keeps it), each block of scores that
the tiled backend's plan visits (:func:`attnkit.functional.tiled.recompute.log_prob_blocks`)
becomes probabilities ``p = exp(s - lse)``, as FlashAttention's backward recomputes them,
and is reduced at once to per-query, per-key and per-head statistics
(:class:`CallStats`). Memory: the statistics themselves, O(B * H * (Lq * top_k + Lk)),
plus one block of at most ``_SCORE_BUDGET`` scores.

Einsum letters as in :mod:`attnkit._blocks`; a block's layout is (B, Hkv, bq, G, bk).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit._blocks import ScoreBlock
from attnkit._checks import describe
from attnkit.functional._call import AttentionCall
from attnkit.functional.tiled.recompute import fold_heads, log_prob_blocks
from attnkit.functional.tiled.translate import query_offset

__all__ = ["CallStats", "StatsOptions", "call_stats", "distance_edges"]


@dataclass(frozen=True)
class StatsOptions:
    """What :func:`call_stats` (and ``attnkit.attention(..., stats=)``, :func:`attnkit.inspect.stats`) keep.

    ``top_k``: keys kept per query, by weight (0: none; the row maximum is still found).
    ``sinks``: how many leading keys count as the sink (StreamingLLM keeps 4).
    """

    top_k: int = 8
    sinks: int = 4

    def __post_init__(self) -> None:
        for name in ("top_k", "sinks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0; got {value!r}")


@dataclass(frozen=True)
class CallStats:
    """Statistics of one attention call's probabilities ``p[b, h, i, j]`` (B batch, H query heads).

    Positions are the call's: queries ``0..Lq-1``, keys ``0..Lk-1``. For distances query ``i``
    sits at key position ``i + offset``: the diagonal of the mask's causal or sliding-window part
    in its own alignment (``causal()``, top-left: ``i``; ``causal(align="bottom_right")``:
    ``i + Lk - Lq``), else ``i + Lk - Lq`` (bottom-right, as in decoding with a cache). With
    Lq == Lk it is ``i``. Only *counted* queries enter: those with ``query_valid`` and at
    least one allowed key; every per-query field is 0 for the others (top indices -1).
    Computed in the call's compute dtype (float32, float64 for float64 inputs), before dropout.

    Fields:
        received: (B, H, Lk) column sums over counted queries: ``sum_i p[b, h, i, j]`` (H2O's
            accumulated attention; a sink's is large).
        entropy: (B, H, Lq) ``-sum_j p log p`` in nats.
        sink_mass: (B, H, Lq) ``sum_j p[b, h, i, j]`` over the sink keys
            ``sink_start[b] <= j < sink_start[b] + sinks``.
        distance: (B, H, Lq) mean distance ``sum_j p[b, h, i, j] * |pos(i) - j|``.
        distance_hist: (B, H, nbins) probability mass summed over counted queries at distances
            ``edges[t] <= |pos(i) - j| < edges[t + 1]`` (``distance_edges``: 0, 1, 2, 4, ...).
            Divided by :attr:`counted` per head, a distribution.
        distance_edges: (nbins + 1,) int64 bin edges, see :func:`distance_edges`.
        top_index: (B, H, Lq, top_k) int64 keys of largest weight, descending; -1 where a
            query has fewer than ``top_k`` keys of nonzero weight. Keys of equal weight come in
            no set order, and which of them fills the last place is not set either (as ``torch.topk``).
        top_weight: (B, H, Lq, top_k) their probabilities (0 where the index is -1).
        row_max: (B, H, Lq) the largest logit of each query: the largest score that enters the
            softmax (after scale, softcap and biases); -inf for a query not counted.
        max_logit: (B, H) ``row_max``'s maximum per head (QK-clip's statistic).
        lse: (B, H, Lq) each row's log-sum-exp (-inf for a query not counted).
        query_valid: (B, Lq) bool, the queries counted when they have a key.
        sinks: the number of sink keys.
    """

    received: Tensor
    entropy: Tensor
    sink_mass: Tensor
    distance: Tensor
    distance_hist: Tensor
    distance_edges: Tensor
    top_index: Tensor
    top_weight: Tensor
    row_max: Tensor
    max_logit: Tensor
    lse: Tensor
    query_valid: Tensor
    sinks: int

    @property
    def counted(self) -> Tensor:
        """(B, H) the number of counted queries per head."""
        return torch.isfinite(self.lse).sum(-1)

    def __repr__(self) -> str:
        b, h, lq = self.entropy.shape
        return (f"CallStats(batch={b}, heads={h}, queries={lq}, keys={self.received.shape[-1]}, "
                f"top_k={self.top_index.shape[-1]}, sinks={self.sinks}, {self.entropy.dtype})")


def distance_edges(q_len: int, k_len: int, offset: int | None = None) -> Tensor:
    """Bin edges ``[0, 1, 2, 4, ..., 2**m]`` with ``2**m`` above every distance of a (Lq, Lk) call whose
    query ``i`` sits at key position ``i + offset`` (default ``Lk - Lq``, bottom-right).

    >>> distance_edges(5, 5).tolist()
    [0, 1, 2, 4, 8]
    """
    off = k_len - q_len if offset is None else offset
    widest = max(abs(off + q_len - 1), abs(k_len - 1 - off), 1)
    return torch.tensor([0] + [1 << t for t in range(widest.bit_length() + 1)], dtype=torch.int64)


class _Accumulator:
    """Running statistics in the folded row layout (B, Hkv, Lq, G) and key layout (B, Hkv, G, Lk)."""

    def __init__(self, call: AttentionCall, lse: Tensor, options: StatsOptions, query_valid: Tensor | None,
                 sink_start: Tensor | None):
        b, hkv, g, lq, lk = call.batch, call.kv_heads, call.groups, call.q_len, call.k_len
        cd, dev = call.compute_dtype, call.q.device
        self.call, self.options, self.offset = call, options, query_offset(call.mask, lq, lk)
        valid = torch.ones(b, lq, dtype=torch.bool, device=dev) if query_valid is None else query_valid.to(dev)
        self.query_valid = valid
        lse_rows = fold_heads(lse.detach().to(cd), hkv).view(b, hkv, lq, g)
        counted = valid.view(b, 1, lq, 1) & torch.isfinite(lse_rows)
        self.lse = torch.where(counted, lse_rows, float("-inf"))  # reported
        # p = exp(s - shift): 0 for a row not counted (a finite shift: inf would meet 0 in the product)
        self.shift = torch.where(counted, lse_rows, torch.finfo(cd).max / 4)
        self.sink_start = (torch.zeros(b, dtype=torch.int64, device=dev) if sink_start is None
                           else sink_start.to(dev, torch.int64))
        self.edges = distance_edges(lq, lk, self.offset).to(dev)
        self.k = max(1, options.top_k)  # the top weight gives the row maximum
        rows = (b, hkv, lq, g)
        self.entropy, self.sink, self.distance = (torch.zeros(rows, dtype=cd, device=dev) for _ in range(3))
        self.rowsum = torch.zeros(rows, dtype=cd, device=dev)
        self.hist = torch.zeros(*rows, self.edges.numel() - 1, dtype=cd, device=dev)
        self.received = torch.zeros(b, hkv, g, lk, dtype=cd, device=dev)
        self.top_w = torch.full((*rows, self.k), -1.0, dtype=cd, device=dev)
        self.top_i = torch.full((*rows, self.k), -1, dtype=torch.int64, device=dev)

    def add(self, block: ScoreBlock, t: Tensor) -> None:
        """One block's log-probabilities ``t`` (B, Hkv, bq, G, bk), finite."""
        rows = slice(block.q_start, block.q_stop)
        p = t.exp()
        self.entropy[:, :, rows] -= torch.einsum("...j,...j->...", p, t)
        self.received[..., block.k_start : block.k_stop] += p.sum(2)
        cum = p.cumsum(-1)  # running row sums: the histogram, the sinks and the row sums read it
        total = cum[..., -1]
        self.rowsum[:, :, rows] += total
        self._distance(block, p, total, rows)
        self._hist(block, cum, rows)
        self._sinks(block, cum, rows)
        self._top(block, p, rows)

    def _distance(self, block: ScoreBlock, p: Tensor, total: Tensor, rows: slice) -> None:
        b, hkv, bq, g, bk = p.shape
        first, last = block.q_start + self.offset, block.q_stop - 1 + self.offset
        qi = torch.arange(block.q_start, block.q_stop, device=p.device).view(1, 1, -1, 1) + self.offset
        if block.k_stop - 1 <= first or block.k_start >= last:  # every key on one side: |i - j| = +-(i - j)
            sign = 1.0 if block.k_stop - 1 <= first else -1.0
            # key positions relative to the block's first keep float32's precision
            weighted = (p.reshape(-1, bk) @ torch.arange(bk, dtype=p.dtype, device=p.device)).view(b, hkv, bq, g)
            self.distance[:, :, rows] += sign * ((qi - block.k_start).to(p.dtype) * total - weighted)
        else:
            kj = torch.arange(block.k_start, block.k_stop, device=p.device)
            d = (qi.view(-1, 1) - kj).abs().to(p.dtype).view(1, 1, bq, 1, bk)
            self.distance[:, :, rows] += (p * d).sum(-1)

    @staticmethod
    def _before(cum: Tensor, k_start: int, bounds: Tensor) -> Tensor:
        """``sum_{k_start <= j < bound} p[.., j]`` from the running sums ``cum`` (B, Hkv, bq, G, bk), for
        ``bounds`` (B|1, 1, bq|1, 1, n) key positions: (B, Hkv, bq, G, n)."""
        rel = bounds - k_start
        index = (rel - 1).clamp(0, cum.shape[-1] - 1).expand(*cum.shape[:-1], rel.shape[-1])
        return cum.gather(-1, index) * (rel > 0).to(cum.dtype)

    def _hist(self, block: ScoreBlock, cum: Tensor, rows: slice) -> None:
        """Mass per distance bin: differences of the running sums at each bin's boundaries."""
        qi = torch.arange(block.q_start, block.q_stop, device=cum.device).view(-1, 1) + self.offset
        e = self.edges.view(1, -1)
        left = qi + 1 - e  # bin t on the left: keys [left[t + 1], left[t])
        right = qi + e.clamp(min=1)  # bin t on the right: keys [right[t], right[t + 1])
        n = self.edges.numel()
        before = self._before(cum, block.k_start, torch.cat([left, right], 1).view(1, 1, qi.numel(), 1, 2 * n))
        pl, pr = before[..., :n], before[..., n:]
        self.hist[:, :, rows] += (pl[..., :-1] - pl[..., 1:]) + (pr[..., 1:] - pr[..., :-1])

    def _sinks(self, block: ScoreBlock, cum: Tensor, rows: slice) -> None:
        n = self.options.sinks
        lo, hi = int(self.sink_start.min()), int(self.sink_start.max()) + n
        if n == 0 or block.k_stop <= lo or block.k_start >= hi:
            return
        bounds = torch.stack([self.sink_start, self.sink_start + n], -1).view(-1, 1, 1, 1, 2)
        before = self._before(cum, block.k_start, bounds)
        self.sink[:, :, rows] += before[..., 1] - before[..., 0]

    def _top(self, block: ScoreBlock, p: Tensor, rows: slice) -> None:
        w, i = p.topk(min(self.k, p.shape[-1]), -1)
        w = torch.cat([self.top_w[:, :, rows], w], -1)
        i = torch.cat([self.top_i[:, :, rows], i + block.k_start], -1)
        self.top_w[:, :, rows], pick = w.topk(self.k, -1)
        self.top_i[:, :, rows] = i.gather(-1, pick)

    def result(self) -> CallStats:
        call = self.call
        b, h, lq = call.batch, call.heads, call.q_len

        def rows(t: Tensor) -> Tensor:  # (B, Hkv, Lq, G, ...) -> (B, H, Lq, ...)
            return t.transpose(2, 3).reshape(b, h, lq, *t.shape[4:])

        # The lse may carry its dtype's rounding (0.5 ulp of |lse|: 1e-6 at 20 in float32), which every
        # exp(s - lse) of a row shares as a factor r = sum_j exp(s - lse) != 1. Dividing the row's sums by r,
        # and log r off every log p, cancels it: what the row is, not what the lse rounded it to.
        kept = self.top_w > 0
        r = torch.where(self.rowsum > 0, self.rowsum, 1.0)
        top1 = self.top_w[..., 0].clamp(min=torch.finfo(self.top_w.dtype).tiny)
        row_max = rows(torch.where(kept[..., 0], self.lse + torch.log(top1), float("-inf")))  # exp(max - lse) = top1
        top_w = torch.where(kept, self.top_w / r.unsqueeze(-1), 0.0)
        top_i = torch.where(kept, self.top_i, -1)
        entropy = self.entropy / r + torch.log(r)
        hist = (self.hist / r.unsqueeze(-1)).sum(2)  # (B, Hkv, G, nbins)
        k = self.options.top_k
        return CallStats(
            received=self.received.reshape(b, h, call.k_len), entropy=rows(entropy), sink_mass=rows(self.sink / r),
            distance=rows(self.distance / r), distance_hist=hist.reshape(b, h, -1), distance_edges=self.edges,
            top_index=rows(top_i)[..., :k], top_weight=rows(top_w)[..., :k], row_max=row_max,
            max_logit=row_max.amax(-1) if lq else row_max.new_full((b, h), float("-inf")),
            lse=rows(self.lse + torch.log(r)), query_valid=self.query_valid,
            sinks=self.options.sinks)


def call_stats(call: AttentionCall, lse: Tensor, options: StatsOptions | None = None, *,
               query_valid: Tensor | None = None, sink_start: Tensor | None = None) -> CallStats:
    """:class:`CallStats` of one validated call, from its rows' log-sum-exp, block by block.

    Args:
        call: the call (:func:`attnkit.functional._call.make_call`); ``v`` is not read.
        lse: (B, H, Lq) the log-sum-exp of each row, as :func:`attnkit.attention` returns it
            with ``return_lse=True`` (-inf for a row with no allowed key).
        options: :class:`StatsOptions` (default: top 8 keys, 4 sink keys).
        query_valid: (B, Lq) bool, the real queries (default: all); the others are not counted.
        sink_start: (B,) int, each sequence's first sink key (default 0; a left-padded
            sequence's first real token).

    Nothing of size (Lq x Lk) is allocated: one block of scores at a time (see
    :func:`~attnkit.functional.tiled.recompute.log_prob_blocks`).
    """
    options = StatsOptions() if options is None else options
    if not isinstance(options, StatsOptions):
        raise TypeError(f"options must be a StatsOptions; got {describe(options)}")
    want = (call.batch, call.heads, call.q_len)
    if not isinstance(lse, Tensor) or tuple(lse.shape) != want:
        raise ValueError(f"lse must be a tensor of shape {want} (batch, heads, queries); got {describe(lse)}")
    if query_valid is not None and (not isinstance(query_valid, Tensor) or query_valid.dtype != torch.bool
                                    or tuple(query_valid.shape) != (call.batch, call.q_len)):
        raise ValueError(f"query_valid must be a bool tensor of shape {(call.batch, call.q_len)}; got "
                         f"{describe(query_valid)}")
    if sink_start is not None and (not isinstance(sink_start, Tensor) or tuple(sink_start.shape) != (call.batch,)):
        raise ValueError(f"sink_start must be an int tensor of shape ({call.batch},); got {describe(sink_start)}")
    acc = _Accumulator(call, lse, options, query_valid, sink_start)
    if call.q_len and call.k_len:
        for block, t in log_prob_blocks(call, acc.shift):
            acc.add(block, t)
    return acc.result()
