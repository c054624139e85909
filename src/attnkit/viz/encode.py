"""Compact encoding of attention maps for the HTML pages.

A report holds many (Lq, Lk) probability matrices: one per layer and head, plus the
rollout up to each layer. bertviz's ``head_view`` writes each value as JSON text, twice
(about 46 bytes a value, measured by ``benchmarks/bertviz_size.py``). Here each row is stored as its
**peaks** plus a coarse **background**:

- **Peaks.** Row by row, entries in decreasing order until what is left carries at most
  ``tolerance`` of the row's mass, and at most ``peaks`` entries. Each is a column and a
  value rounded to a multiple of 1/65535 (``QUANTUM``): within one quantum (1.5e-5) of
  the float32 probability (half a quantum, except that a kept value below half a
  quantum is stored as one quantum rather than vanish).
- **Background** (when ``blocks`` > 0). The rest of the row's mass, summed over blocks
  of ``ceil(Lk / blocks)`` adjacent keys and spread evenly over the keys of its block
  that are not peaks. No mass is lost; each background value is off by at most the
  largest value that went into the background, which is at most the row's smallest peak.
  Without a background, the rest (at most ``tolerance`` of the row) is dropped and shows
  as 0.

Short inputs keep every peak that matters and need no background. Long inputs to real
models have diffuse heads whose rows spread over hundreds of keys; there the peaks are
capped and the background keeps the rest, so the file stays bounded (``max_bytes``)
without losing any row's mass.

Layout (little-endian; zlib-deflated, then base64): ``uint16 counts[M * Lq]`` (peaks per
row), ``uint16 columns[N]`` (per row ascending, each as the gap from the previous one,
the first as its index), ``uint16 values[N]`` (probability / QUANTUM), then, with a
background, ``uint16 background[M * Lq * blocks]`` (block mass / QUANTUM). Lq and Lk are
at most 65,535.
"""

from __future__ import annotations

import base64
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from attnkit._checks import describe, require_int, require_real

__all__ = ["PLANS", "QUANTUM", "BudgetError", "Encoded", "decode", "encode", "encode_peaks"]

QUANTUM = 1.0 / 65535
MAX_LENGTH = 65535
# (peaks per row, background blocks) from the most faithful to the most compact; "auto"
# takes the first whose encoding fits max_bytes. None: no cap on peaks.
PLANS: tuple[tuple[int | None, int], ...] = (
    (None, 0), (256, 64), (128, 64), (64, 64), (32, 64), (32, 32), (16, 32), (8, 32), (8, 16), (4, 16), (2, 8),
)


class BudgetError(ValueError):
    """No plan fits ``max_bytes``."""


@dataclass(frozen=True)
class Encoded:
    """Matrices encoded by :func:`encode`.

    Attributes:
        blob: base64 text of the deflated layout.
        shape: (M, Lq, Lk).
        tolerance: mass a row may leave out of its peaks.
        peaks: the cap on peaks per row (None: no cap).
        blocks, block: background blocks per row and keys per block (0, 0: no background).
        kept: peaks stored, of ``M * Lq * Lk`` entries.
        raw_bytes: size of the layout before compression.
        dropped_max, dropped_mean: per matrix, the largest and the mean mass a row lost
            (0 with a background, up to rounding).
        blurred_max, blurred_mean: per matrix, the largest value that went into a row's
            background (a bound on any background value's error), the largest over rows
            and the mean.
    """

    blob: str
    shape: tuple[int, int, int]
    tolerance: float
    peaks: int | None
    blocks: int
    block: int
    kept: int
    raw_bytes: int
    dropped_max: list[float]
    dropped_mean: list[float]
    blurred_max: list[float]
    blurred_mean: list[float]

    def to_json(self) -> dict:
        m, lq, lk = self.shape

        def r(xs: list[float]) -> list[float]:
            return [round(x, 7) for x in xs]

        return {
            "blob": self.blob, "matrices": m, "n_q": lq, "n_k": lk, "quantum": QUANTUM,
            "tolerance": self.tolerance, "peaks": self.peaks, "blocks": self.blocks, "block": self.block,
            "kept": self.kept, "entries": m * lq * lk, "raw_bytes": self.raw_bytes,
            "dropped_max": r(self.dropped_max), "dropped_mean": r(self.dropped_mean),
            "blurred_max": r(self.blurred_max), "blurred_mean": r(self.blurred_mean),
        }


def _largest(p: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's ``k`` largest values (all of them when ``k >= Lk``) in decreasing order,
    their columns, and the mass of the row from each of them on (float64)."""
    if k >= p.shape[-1]:
        values, order = torch.sort(p, dim=-1, descending=True, stable=True)
    else:
        values, order = torch.topk(p, k, dim=-1, sorted=True)
    total = p.sum(-1, dtype=torch.float64)[:, None]
    tail = total - (values.cumsum(-1, dtype=torch.float64) - values)
    return values, order, tail


def _plan_bytes(rows: int, kept: int, blocks: int) -> int:
    return 2 * rows + 4 * kept + 2 * rows * blocks


def encode(
    matrices: Sequence[Tensor] | Tensor,
    *,
    tolerance: float = 0.001,
    plan: tuple[int | None, int] | str = "auto",
    max_bytes: int = 20_000_000,
    progress: Callable[[int, int], None] | None = None,
) -> Encoded:
    """Encode probability matrices (M, Lq, Lk), or a sequence of (Lq, Lk), compactly.

    Args:
        matrices: attention probabilities (rows sum to 1, or 0 for a row that sees no key).
        tolerance: mass a row's peaks may leave out, in [0, 1) (default 0.001).
        plan: ``(peaks, blocks)``: the cap on peaks per row (None: none) and the background
            blocks per row (0: none); or ``"auto"`` (default): the first of :data:`PLANS`
            whose base64 text fits ``max_bytes`` (each plan's size is predicted from its
            exact uncompressed size and the compression of a few of the matrices; the one
            chosen is encoded and checked).
        max_bytes: budget for the base64 text with ``"auto"`` (default 20,000,000).
        progress: called as ``progress(done, total)``, or None.

    >>> import torch
    >>> p = torch.tensor([[[0.7, 0.2995, 0.0005], [1.0, 0.0, 0.0]]])
    >>> enc = encode(p, plan=(None, 0))
    >>> enc.kept, enc.dropped_max
    (3, [0.0005...])
    >>> decode(enc.to_json())
    tensor([[[0.7000, 0.2995, 0.0000],
             [1.0000, 0.0000, 0.0000]]])
    >>> decode(encode(p, plan=(1, 1)).to_json())  # one peak per row, the rest spread evenly
    tensor([[[0.7000, 0.1500, 0.1500],
             [1.0000, 0.0000, 0.0000]]])
    """
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable progress(done, total) or None; got {describe(progress)}")
    mats = _matrices(matrices)
    m, lq, lk = len(mats), mats[0].shape[0], mats[0].shape[1]
    tol = require_real("tolerance", tolerance)
    if not 0 <= tol < 1:
        raise ValueError(f"tolerance must be in [0, 1) (the mass a row may leave out of its peaks); got {tolerance!r}")
    if isinstance(plan, str):
        if plan != "auto":
            raise ValueError(f'plan must be (peaks, blocks) or "auto"; got {plan!r}')
        max_bytes = require_int("max_bytes", max_bytes, minimum=1)
        plans = [(k, min(b, lk)) for k, b in PLANS]
    else:
        if not (isinstance(plan, tuple) and len(plan) == 2):
            raise TypeError(f"plan must be a (peaks, blocks) tuple or \"auto\"; got {plan!r}")
        peaks = None if plan[0] is None else require_int("plan[0] (peaks)", plan[0], minimum=1)
        blocks = require_int("plan[1] (blocks)", plan[1], minimum=0)
        plans = [(peaks, min(blocks, lk))]
    total = 2 * m if len(plans) > 1 else m
    step = 0

    def tick() -> None:
        nonlocal step
        step += 1
        if progress:
            progress(min(step, total), total)

    if len(plans) > 1:
        # Peaks per row under the tolerance, counted up to the largest cap; a row past it
        # is counted as Lk peaks for the uncapped plan (an upper bound).
        cap = max(k for k, _ in plans if k is not None)
        kept = torch.zeros(len(plans), dtype=torch.int64)
        for p in mats:
            values, _, tail = _largest(p, cap + 1)
            under_tol = ((tail > tol) & (values > 0)).sum(-1)
            uncapped = torch.where(under_tol > cap, lk, under_tol)
            kept += torch.stack([uncapped.sum() if k is None else under_tol.clamp(max=k).sum() for k, _ in plans])
            tick()
        estimates = [_plan_bytes(m * lq, int(n), b) for (_, b), n in zip(plans, kept)]
    else:
        estimates = [0]
    # A few matrices spread over the layers (about 256 rows of each) predict compression.
    sample = [p[:: max(1, lq // 256)] for p in mats[:: max(1, m // 4)]]
    for (peaks, blocks), estimate in zip(plans, estimates):
        if len(plans) > 1 and (len(sample) < m or lq > 256):
            trial = _encode(sample, tol, peaks, blocks, None)
            # The estimate can run high (rows past the largest cap count as Lk): try, and
            # check, any plan predicted within 15% of the budget.
            if estimate * len(trial.blob) / trial.raw_bytes > 1.15 * max_bytes:
                continue
        encoded = _encode(mats, tol, peaks, blocks, tick if len(plans) == 1 or step < total else None)
        if len(plans) == 1 or len(encoded.blob) <= max_bytes:
            return encoded
    raise BudgetError(
        f"max_bytes={max_bytes:,} is too small for {m} matrices of {lq}x{lk}, even as {plans[-1][0]} peaks and "
        f"{plans[-1][1]} background blocks per row. Raise max_bytes, or keep fewer layers/heads"
    )


def _encode(mats: list[Tensor], tol: float, peaks: int | None, blocks: int,
            tick: Callable[[], None] | None) -> Encoded:
    m, (lq, lk) = len(mats), mats[0].shape
    block = math.ceil(lk / blocks) if blocks else 0
    counts, columns, values, background = [], [], [], []
    stats: dict[str, list[float]] = {"dropped_max": [], "dropped_mean": [], "blurred_max": [], "blurred_mean": []}
    for p in mats:
        # One more than the cap, so that the largest value left out is known.
        sorted_values, order, tail = _largest(p, lk if peaks is None else peaks + 1)
        keep_sorted = (tail > tol) & (sorted_values > 0)  # an exact 0 is never a peak, whatever rounding says
        if peaks is not None:
            keep_sorted[:, peaks:] = False
        row_counts = keep_sorted.sum(-1)
        first_out = row_counts.clamp(max=sorted_values.shape[-1] - 1)[:, None]
        all_in = row_counts >= lk
        rest = torch.where(all_in, 0.0, tail.gather(1, first_out)[:, 0])  # mass not in the peaks
        largest_out = torch.where(all_in, 0.0, sorted_values.gather(1, first_out)[:, 0].double())
        keep = torch.zeros(lq, lk, dtype=torch.bool).scatter_(1, order, keep_sorted)
        rows, cols = keep.nonzero(as_tuple=True)
        gaps = cols.clone()
        if len(rows):
            same_row = torch.zeros_like(rows, dtype=torch.bool)
            same_row[1:] = rows[1:] == rows[:-1]
            gaps[1:] = torch.where(same_row[1:], cols[1:] - cols[:-1], cols[1:])
        counts.append(row_counts.numpy().astype("<u2"))
        columns.append(gaps.numpy().astype("<u2"))
        values.append(torch.round(p[rows, cols].double() / QUANTUM).clamp(1, 65535).numpy().astype("<u2"))
        if blocks:
            out = torch.nn.functional.pad(p.double().masked_fill(keep, 0.0), (0, blocks * block - lk))
            sums = out.view(lq, blocks, block).sum(-1)
            background.append(torch.round(sums / QUANTUM).clamp(0, 65535).numpy().astype("<u2"))
            dropped = torch.zeros_like(rest)
            blurred = largest_out
        else:
            dropped, blurred = rest, torch.zeros_like(rest)
        stats["dropped_max"].append(float(dropped.max()))
        stats["dropped_mean"].append(float(dropped.mean()))
        stats["blurred_max"].append(float(blurred.max()))
        stats["blurred_mean"].append(float(blurred.mean()))
        if tick:
            tick()
    raw = b"".join(a.tobytes() for a in (*counts, *columns, *values, *background))
    return Encoded(
        blob=base64.b64encode(zlib.compress(raw, 6)).decode("ascii"),
        shape=(m, lq, lk), tolerance=tol, peaks=peaks, blocks=blocks, block=block,
        kept=sum(len(c) for c in columns), raw_bytes=len(raw), **stats,
    )


def _matrices(matrices: Sequence[Tensor] | Tensor) -> list[Tensor]:
    if isinstance(matrices, Tensor):
        if matrices.dim() != 3:
            raise ValueError(f"matrices must be (M, Lq, Lk); got {describe(matrices)}")
        mats = list(matrices)
    elif isinstance(matrices, Sequence) and not isinstance(matrices, str):
        mats = list(matrices)
        bad = [i for i, t in enumerate(mats) if not isinstance(t, Tensor) or t.dim() != 2]
        if bad:
            raise TypeError(f"matrices must be (Lq, Lk) tensors; item {bad[0]} is {describe(mats[bad[0]])}")
    else:
        raise TypeError(f"matrices must be a tensor (M, Lq, Lk) or a sequence of (Lq, Lk) tensors; "
                        f"got {describe(matrices)}")
    if not mats:
        raise ValueError("matrices must hold at least one matrix; got none")
    shape = tuple(mats[0].shape)
    if any(tuple(t.shape) != shape for t in mats):
        raise ValueError(f"matrices must all have one shape; got {sorted({tuple(t.shape) for t in mats})}")
    if min(shape) < 1:
        raise ValueError(f"matrices must have at least one query and one key; got {shape}")
    if max(shape) > MAX_LENGTH:
        raise ValueError(f"matrices must be at most {MAX_LENGTH} x {MAX_LENGTH} to encode; got {shape}")
    out = []
    for t in mats:
        if not t.dtype.is_floating_point:
            raise TypeError(f"matrices must hold floating-point probabilities; got {describe(t)}")
        t = t.detach().to("cpu", torch.float32)
        low, high = torch.aminmax(t)
        if not (bool(low >= 0) and bool(high < math.inf)):  # NaN fails both: min/max propagate it
            raise ValueError("matrices must hold probabilities (finite, >= 0); got negative or non-finite values")
        largest_row = float(t.sum(-1, dtype=torch.float64).max())
        if largest_row > 1.02:  # bfloat16 maps round rows to about 1.004; scores sum far higher
            raise ValueError(f"matrices must hold probabilities, rows summing to at most 1; a row sums to "
                             f"{largest_row:.4g}. Pass softmax outputs, not scores")
        out.append(t)
    return out


def decode(data: dict) -> Tensor:
    """The matrices (M, Lq, Lk) float32 back from ``Encoded.to_json()``: the peaks, and
    each block's background spread over its keys that are not peaks (0 without one)."""
    m, lq, lk, blocks, block = data["matrices"], data["n_q"], data["n_k"], data["blocks"], data["block"]
    rows = m * lq
    raw = zlib.decompress(base64.b64decode(data["blob"]))
    counts = np.frombuffer(raw, "<u2", rows).astype(np.int64)
    n = int(counts.sum())
    expected = 2 * (rows + 2 * n + rows * blocks)
    if len(raw) != expected:
        raise ValueError(f"the blob holds {len(raw)} bytes; its counts say {expected}")
    gaps = np.frombuffer(raw, "<u2", n, offset=2 * rows).astype(np.int64)
    values = np.frombuffer(raw, "<u2", n, offset=2 * (rows + n)).astype(np.float64) * data["quantum"]
    row_of = np.repeat(np.arange(rows), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    first = np.zeros(n, dtype=bool)
    first[starts[counts > 0]] = True
    # Columns: cumulative sums of the gaps, restarted at each row's first entry.
    cumulative = np.cumsum(gaps)
    base = np.maximum.accumulate(np.where(first, cumulative - gaps, -1)) if n else gaps
    cols = cumulative - base
    out = np.zeros((rows, lk), dtype=np.float64)
    if blocks:
        sums = np.frombuffer(raw, "<u2", rows * blocks, offset=2 * (rows + 2 * n)).astype(np.float64)
        width = np.minimum(block, lk - block * np.arange(blocks))  # keys per block (the last may be short)
        peaks_in = np.zeros((rows, blocks), dtype=np.int64)
        np.add.at(peaks_in, (row_of, cols // block), 1)
        free = width[None, :] - peaks_in
        spread = np.where(free > 0, sums.reshape(rows, blocks) * data["quantum"] / np.maximum(free, 1), 0.0)
        out[:] = np.repeat(spread, block, axis=1)[:, :lk]
    out[row_of, cols] = values
    return torch.from_numpy(out.astype(np.float32).reshape(m, lq, lk))


def encode_peaks(columns: Tensor, weights: Tensor, n_keys: int) -> Encoded:
    """Rows given by their largest entries (top-k keys and weights), in :func:`encode`'s layout without a
    background: what a page shows where the dense rows were never held.

    Args:
        columns: (M, Lq, k) integer key indices, each row's distinct keys in any order.
        weights: (M, Lq, k) their probabilities. An entry of weight 0 is left out, whatever its index
            (a row that saw fewer than k keys pads with them, e.g. as index -1).
        n_keys: Lk, the keys of each row (the columns are below it).

    ``dropped_max``/``dropped_mean`` give, per matrix, the most and the mean mass a row has outside
    its stored entries (``1 - sum(weights)`` for a row that sees a key; 0 for one that sees none).

    >>> import torch
    >>> enc = encode_peaks(torch.tensor([[[2, 0], [1, 0]]]), torch.tensor([[[0.6, 0.3], [1.0, 0.0]]]), 3)
    >>> decode(enc.to_json()), round(enc.dropped_max[0], 6)
    (tensor([[[0.3000, 0.0000, 0.6000],
             [0.0000, 1.0000, 0.0000]]]), 0.1)
    """
    if not isinstance(columns, Tensor) or columns.dtype.is_floating_point or columns.dim() != 3:
        raise TypeError(f"columns must be an (M, Lq, k) integer tensor; got {describe(columns)}")
    if not isinstance(weights, Tensor) or not weights.dtype.is_floating_point or weights.shape != columns.shape:
        raise TypeError(f"weights must be a float tensor of the columns' shape {tuple(columns.shape)}; "
                        f"got {describe(weights)}")
    n_keys = require_int("n_keys", n_keys, minimum=1)
    m, lq, _ = columns.shape
    if max(lq, n_keys) > MAX_LENGTH:
        raise ValueError(f"rows must be at most {MAX_LENGTH} x {MAX_LENGTH} to encode; got {lq} x {n_keys}")
    w = weights.detach().cpu().double()
    cols = columns.detach().cpu().long().masked_fill(w <= 0, 0)  # an entry of weight 0 (index -1, say) is left out
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= n_keys):
        raise ValueError(f"columns must be in [0, n_keys={n_keys}); got values in [{int(cols.min())}, "
                         f"{int(cols.max())}]")
    if w.numel() and not (bool((w >= 0).all()) and bool((w <= 1.0 + 1e-6).all())):
        raise ValueError("weights must be probabilities in [0, 1]; got values outside (or NaN)")
    order = cols.masked_fill(w <= 0, n_keys).argsort(dim=-1, stable=True)  # ascending columns, zeros last
    cols, w = cols.gather(-1, order), w.gather(-1, order)
    keep = (w > 0).reshape(m * lq, -1)
    row_counts = keep.sum(-1)
    flat_cols, flat_w = cols.reshape(m * lq, -1)[keep], w.reshape(m * lq, -1)[keep]
    rows = torch.arange(m * lq).repeat_interleave(row_counts)
    gaps = flat_cols.clone()
    if len(rows):
        same_row = torch.zeros_like(rows, dtype=torch.bool)
        same_row[1:] = rows[1:] == rows[:-1]
        gaps[1:] = torch.where(same_row[1:], flat_cols[1:] - flat_cols[:-1], flat_cols[1:])
    values = torch.round(flat_w / QUANTUM).clamp(1, 65535)
    totals = w.sum(-1)  # (M, Lq)
    dropped = torch.where(totals > 0, (1.0 - totals).clamp(min=0.0), 0.0)
    raw = b"".join(a.numpy().astype("<u2").tobytes() for a in (row_counts, gaps, values))
    return Encoded(blob=base64.b64encode(zlib.compress(raw, 6)).decode("ascii"), shape=(m, lq, n_keys),
                   tolerance=0.0, peaks=int(columns.shape[-1]), blocks=0, block=0, kept=int(row_counts.sum()),
                   raw_bytes=len(raw), dropped_max=[float(d.max()) for d in dropped],
                   dropped_mean=[float(d.mean()) for d in dropped], blurred_max=[0.0] * m, blurred_mean=[0.0] * m)
