"""Biases: shifts of the attention scores before the softmax.

The order inside attention is: ``scores = (q @ k^T) * scale``, then soft-capping
(``softcap * tanh(scores / softcap)``), then each bias in turn, then the mask.

Biases combine with ``+`` and are evaluated one block at a time, so the tiled backend
never materialises an (Lq x Lk) bias that the user did not give it.

>>> from attnkit import biases
>>> biases.alibi_slopes(8)
tensor([0.5000, 0.2500, 0.1250, 0.0625, 0.0312, 0.0156, 0.0078, 0.0039])
>>> biases.alibi(8).to_dense(3, 3)[0, 0]  # batch 0, head 0: slope 1/2
tensor([[ 0.0000, -0.5000, -1.0000],
        [-0.5000,  0.0000, -0.5000],
        [-1.0000, -0.5000,  0.0000]])
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from attnkit._blocks import ScoreBlock
from attnkit._checks import check_broadcast_4d, describe, require_choice, require_int, require_tensor
from attnkit._index_fn import IndexFunction
from attnkit.masks import Lengths

__all__ = ["ALiBi", "Bias", "Chain", "ScoreModBias", "Shifted", "TensorBias", "alibi", "alibi_slopes", "from_tensor",
           "score_mod"]

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def _moved(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated and will be removed in the next release: a bias says how scores shift, "
                  f"and each kernel translates it itself; use attnkit.functional.tiled.translate.{new}",
                  DeprecationWarning, stacklevel=3)


class Bias:
    """Base class. ``additive`` biases add a term that does not depend on the score.

    A bias knows nothing of kernels: the tiled engines' views of the built-in biases (whether one reads only
    positions, splits into row and column terms, or is a distance times a slope) are
    :mod:`attnkit.functional.tiled.translate`'s, from the biases' public fields.
    """

    additive = True

    def values(self, block: ScoreBlock, dtype: torch.dtype) -> Tensor:
        """The additive term, broadcastable to ``block.shape`` (additive biases only)."""
        raise NotImplementedError

    def apply(self, scores: Tensor, block: ScoreBlock, leaves: dict[int, Tensor] | None = None) -> Tensor:
        """Return shifted scores (5-D, in ``block``'s layout). ``leaves`` substitutes the
        block slices of tensor biases, so the tiled backward can differentiate them."""
        return scores + self.values(block, scores.dtype)

    # -- the tiled engines' translations, moved to attnkit.functional.tiled.translate (deprecated here) ---

    @property
    def by_position(self) -> bool:
        """Deprecated: :func:`attnkit.functional.tiled.translate.bias_by_position` (``bias``)."""
        from attnkit.functional.tiled import translate

        _moved("Bias.by_position", "bias_by_position(bias)")
        return translate.bias_by_position(self)

    @property
    def splits_by_side(self) -> bool:
        """Deprecated: :func:`attnkit.functional.tiled.translate.splits_by_side` (``bias``)."""
        from attnkit.functional.tiled import translate

        _moved("Bias.splits_by_side", "splits_by_side(bias)")
        return translate.splits_by_side(self)

    def separable(self, block: ScoreBlock, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """Deprecated: :func:`attnkit.functional.tiled.translate.separable` (``bias``, ``block``, ``dtype``)."""
        from attnkit.functional.tiled import translate

        _moved("Bias.separable()", "separable(bias, block, dtype)")
        return translate.separable(self, block, dtype)

    def distance_form(self, q_len: int, k_len: int) -> tuple[Tensor, Tensor] | None:
        """Deprecated: :func:`attnkit.functional.tiled.translate.distance_form` (``bias``, ``q_len``, ``k_len``)."""
        from attnkit.functional.tiled import translate

        _moved("Bias.distance_form()", "distance_form(bias, q_len, k_len)")
        return translate.distance_form(self, q_len, k_len)

    def check(self, batch: int, heads: int, q_len: int, k_len: int, device: torch.device) -> None:
        """Raise ValueError if this bias cannot apply to a call of these sizes."""

    def parts(self) -> tuple[Bias, ...]:
        """The biases this one sums, in order (itself for a single bias)."""
        return (self,)

    def shifted(self, q_offset: int, k_offset: int, *, q_total: int | None = None,
                k_total: int | None = None) -> Bias:
        """This bias seen from a piece of a longer sequence.

        Query ``i`` of the piece is query ``q_offset + i`` of the whole, key ``j`` is key
        ``k_offset + j``; ``q_total`` and ``k_total`` are the whole's lengths (they place
        ``bottom_right`` diagonals). If not given, the whole is taken as square and as long
        as the piece reaches, as in :meth:`attnkit.masks.Mask.shifted`.
        """
        q_offset = require_int("q_offset", q_offset, minimum=0)
        k_offset = require_int("k_offset", k_offset, minimum=0)
        if q_offset == k_offset == 0 and q_total is None and k_total is None:
            return self
        return Shifted(self, q_offset, k_offset, q_total, k_total)

    def to_dense(self, q_len: int, k_len: int, *, batch: int = 1, heads: int | None = None,
                 device: torch.device | str = "cpu") -> Tensor:
        """Materialise the bias as a (B, H, Lq, Lk) float32 tensor of score shifts."""
        heads = heads if heads is not None else getattr(self, "num_heads", 1)
        device = torch.device(device)
        self.check(batch, heads, q_len, k_len, device)
        block = ScoreBlock(batch, heads, 1, q_len, k_len, 0, q_len, 0, k_len, device)
        zeros = torch.zeros(block.shape, device=device)
        return self.apply(zeros, block).squeeze(3)

    def __add__(self, other: Bias) -> Bias:
        return Chain((*self.parts(), *as_bias("other", other).parts()))


class Chain(Bias):
    def __init__(self, items: tuple[Bias, ...]):
        self.items = items
        self.additive = all(b.additive for b in items)
        heads = {getattr(b, "num_heads", None) for b in items} - {None}
        if len(heads) == 1:
            self.num_heads = heads.pop()

    def parts(self) -> tuple[Bias, ...]:
        return self.items

    def values(self, block: ScoreBlock, dtype: torch.dtype) -> Tensor:
        out = self.items[0].values(block, dtype)
        for b in self.items[1:]:
            out = out + b.values(block, dtype)
        return out

    def apply(self, scores: Tensor, block: ScoreBlock, leaves: dict[int, Tensor] | None = None) -> Tensor:
        for b in self.items:
            scores = b.apply(scores, block, leaves)
        return scores

    def check(self, batch: int, heads: int, q_len: int, k_len: int, device: torch.device) -> None:
        for b in self.items:
            b.check(batch, heads, q_len, k_len, device)

    def __repr__(self) -> str:
        return " + ".join(map(repr, self.items))


class Shifted(Bias):
    """``inner`` on queries [q_offset, ...) and keys [k_offset, ...) of a longer sequence."""

    def __init__(self, inner: Bias, q_offset: int, k_offset: int, q_total: int | None, k_total: int | None):
        self.inner, self.q_offset, self.k_offset = inner, q_offset, k_offset
        self.q_total, self.k_total = q_total, k_total
        self.additive = inner.additive
        if hasattr(inner, "num_heads"):
            self.num_heads = inner.num_heads

    def whole(self, block: ScoreBlock) -> ScoreBlock:
        """``block`` in the whole sequence's coordinates."""
        side = max(self.q_offset + block.q_len, self.k_offset + block.k_len)
        return ScoreBlock(block.batch, block.kv_heads, block.groups, self.q_total or side, self.k_total or side,
                          block.q_start + self.q_offset, block.q_stop + self.q_offset,
                          block.k_start + self.k_offset, block.k_stop + self.k_offset, block.device)

    def values(self, block: ScoreBlock, dtype: torch.dtype) -> Tensor:
        return self.inner.values(self.whole(block), dtype)

    def apply(self, scores: Tensor, block: ScoreBlock, leaves: dict[int, Tensor] | None = None) -> Tensor:
        return self.inner.apply(scores, self.whole(block), leaves)

    def check(self, batch: int, heads: int, q_len: int, k_len: int, device: torch.device) -> None:
        side = max(self.q_offset + q_len, self.k_offset + k_len)
        self.inner.check(batch, heads, self.q_total or side, self.k_total or side, device)
        if torch.is_grad_enabled() and any(p.tensor.requires_grad for p in tensor_bias_parts(self.inner)):
            # The backends take a tensor bias's gradient from the tensor itself; through a shift
            # that slice would be lost on the tiled path, so it is refused rather than dropped.
            raise ValueError(f"{self!r}: a shifted tensor bias cannot require grad; detach it, or pass the "
                             "slice of the tensor for this piece as its own bias")

    def __repr__(self) -> str:
        return f"{self.inner!r}.shifted({self.q_offset}, {self.k_offset})"


def alibi_slopes(num_heads: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """ALiBi's head slopes (Press et al. 2022), for any head count.

    For a power of two ``n`` the slopes are ``2^(-8/n), 2^(-16/n), ..., 2^(-8)``. For
    other ``n`` they are the slopes of the nearest lower power of two ``m``, followed
    by every other slope of ``2m`` (the reference implementation's rule). They are
    computed in float64 and returned in ``dtype``.

    >>> alibi_slopes(12)[:3]
    tensor([0.5000, 0.2500, 0.1250])
    """
    n = require_int("num_heads", num_heads, minimum=1)

    def power_of_two(m: int) -> list[float]:
        start = 2.0 ** (-8.0 / m)
        return [start ** (k + 1) for k in range(m)]

    m = 2 ** math.floor(math.log2(n))
    slopes = power_of_two(m)
    if m < n:
        slopes += power_of_two(2 * m)[0::2][: n - m]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype; got {describe(dtype)}")
    return torch.tensor(slopes, dtype=dtype)


class ALiBi(Bias):
    lengths: Lengths | None = None  # per-sequence alignment, if given

    def __init__(self, slopes: Tensor, align: str):
        # float64 slopes stay float64, so a float64 call computes ALiBi in float64;
        # each block casts them to the call's compute dtype.
        keep = torch.float64 if slopes.dtype == torch.float64 else torch.float32
        self.slopes = slopes.detach().to(keep)
        self.num_heads = slopes.numel()
        self.align = require_choice("align", align, ("top_left", "bottom_right"))

    def offset(self, block: ScoreBlock) -> int:
        """The diagonal's offset at the block's lengths (``align``; per-sequence lengths aside)."""
        return 0 if self.align == "top_left" else block.k_len - block.q_len

    def _offsets(self, block: ScoreBlock) -> Tensor | int:
        """The offset, or (B, 1, 1, 1, 1) offsets with per-sequence lengths."""
        if self.lengths is None:
            return self.offset(block)
        return self.lengths.offsets(self.align, block.q_len, block.k_len, block.device).view(-1, 1, 1, 1, 1)

    def values(self, block: ScoreBlock, dtype: torch.dtype) -> Tensor:
        slopes = self.slopes.to(device=block.device, dtype=dtype)[block.h]  # (1, Hkv, 1, G, 1)
        distance = (block.i + self._offsets(block) - block.j).abs().to(dtype)  # (B|1, 1, bq, 1, bk)
        return -slopes * distance

    def check(self, batch: int, heads: int, q_len: int, k_len: int, device: torch.device) -> None:
        if self.num_heads != heads:
            raise ValueError(f"alibi has {self.num_heads} slopes but the query has {heads} heads")
        if self.lengths is not None:
            self.lengths.check(batch, q_len, k_len)

    def __repr__(self) -> str:
        lengths = "" if self.lengths is None else f", {self.lengths!r}"
        return f"alibi({self.num_heads} heads, align={self.align!r}{lengths})"


def alibi(num_heads: int | None = None, *, slopes: Tensor | None = None, align: str = "top_left",
          q_lengths: Sequence[int] | Tensor | None = None, k_lengths: Sequence[int] | Tensor | None = None,
          padding: str = "right") -> Bias:
    """ALiBi: ``-slope_h * |i + offset - j|`` added to head ``h``'s scores.

    Give ``num_heads`` for the standard slopes (:func:`alibi_slopes`), or ``slopes``,
    a (H,) tensor. ``align`` places the diagonal as for :func:`attnkit.masks.causal`.
    Slopes are constants: they get no gradient. ``q_lengths``, ``k_lengths`` and
    ``padding`` place the diagonal per sequence of a padded batch, as for
    :func:`attnkit.masks.causal`.
    """
    if (num_heads is None) == (slopes is None):
        raise TypeError("alibi needs exactly one of num_heads or slopes=")
    if slopes is None:
        slopes = alibi_slopes(num_heads, torch.float64)  # type: ignore[arg-type]
    require_tensor("slopes", slopes)
    if slopes.dim() != 1 or not slopes.dtype.is_floating_point:
        raise ValueError(f"slopes must be a 1-D float tensor (one per head); got {describe(slopes)}")
    out = ALiBi(slopes, align)
    if q_lengths is not None or k_lengths is not None:
        out.lengths = Lengths(q_lengths, k_lengths, padding)
    else:
        require_choice("padding", padding, ("right", "left"))
    return out


class TensorBias(Bias):
    def __init__(self, tensor: Tensor):
        require_tensor("bias", tensor)
        if not tensor.dtype.is_floating_point:
            raise TypeError(f"bias tensor must be floating point; got {describe(tensor)}")
        if tensor.dim() > 4:
            raise ValueError(f"bias tensor must broadcast to (batch, heads, Lq, Lk); got shape {tuple(tensor.shape)}")
        self.tensor = tensor

    @property
    def tensor4(self) -> Tensor:
        """The tensor viewed as 4-D, (B|1, H|1, Lq|1, Lk|1)."""
        return self.tensor.reshape((1,) * (4 - self.tensor.dim()) + tuple(self.tensor.shape))

    def values(self, block: ScoreBlock, dtype: torch.dtype) -> Tensor:
        return block.take(self.tensor4).to(dtype)

    def apply(self, scores: Tensor, block: ScoreBlock, leaves: dict[int, Tensor] | None = None) -> Tensor:
        if leaves is not None and id(self) in leaves:
            return scores + leaves[id(self)]
        return scores + self.values(block, scores.dtype)

    def check(self, batch: int, heads: int, q_len: int, k_len: int, device: torch.device) -> None:
        check_broadcast_4d("bias", self.tensor, (batch, heads, q_len, k_len))
        if self.tensor.device != device:
            raise ValueError(f"bias tensor is on {self.tensor.device} but the inputs are on {device}")

    def __repr__(self) -> str:
        return f"from_tensor(shape {tuple(self.tensor.shape)})"


def from_tensor(bias: Tensor) -> Bias:
    """An additive float bias, broadcastable to (B, H, Lq, Lk). It may require grad:
    every backend returns its gradient. ``-inf`` entries act as a mask."""
    return TensorBias(bias)


class ScoreModBias(Bias):
    additive = False

    def __init__(self, fn: ScoreMod, name: str | None):
        if not callable(fn):
            raise TypeError(f"score_mod needs a callable fn(score, b, h, i, j); got {describe(fn)}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "fn")
        self.evaluator = IndexFunction(fn, f"score_mod {self.name!r}", with_score=True, index_dtype=torch.int64)

    def apply(self, scores: Tensor, block: ScoreBlock, leaves: dict[int, Tensor] | None = None) -> Tensor:
        return self.evaluator.on_block(block, scores).expand(scores.shape).to(scores.dtype).contiguous()

    def __repr__(self) -> str:
        return f"score_mod({self.name})"


def score_mod(fn: ScoreMod, name: str | None = None) -> Bias:
    """Any elementwise score modification, as in FlexAttention.

    ``fn(score, b, h, i, j) -> score`` is FlexAttention's ``score_mod``, under the contract of
    :func:`attnkit.masks.from_function` with int64 indices: called on a block with ``score``
    (B, H, bq, bk) and index tensors ``b`` (B, 1, 1, 1), ``h`` (1, H, 1, 1), ``i`` (1, 1, bq, 1)
    and ``j`` (1, 1, 1, bk), it returns scores that broadcast to (B, H, bq, bk). A function
    written for Flex's per-position calls (``score + table[h][i][j]``) is called through
    ``torch.vmap`` with 0-d arguments instead, exactly and one to two orders of magnitude slower. It must be
    elementwise: the result at a position may depend only on that position's inputs.
    The tiled backend differentiates it with respect to the score; tensors captured
    inside ``fn`` get gradients only on the reference backend.

    >>> import torch, attnkit
    >>> relative = attnkit.biases.score_mod(lambda s, b, h, i, j: s - 0.1 * (i - j).abs())
    >>> q = k = v = torch.randn(1, 2, 5, 8)
    >>> out = attnkit.attention(q, k, v, bias=relative)
    >>> ref = attnkit.attention(q, k, v, bias=attnkit.biases.alibi(slopes=torch.full((2,), 0.1)))
    >>> torch.allclose(out, ref, atol=1e-6)
    True
    """
    return ScoreModBias(fn, name)


def as_bias(name: str, bias: object) -> Bias:
    if isinstance(bias, Bias):
        return bias
    if isinstance(bias, Tensor):
        return TensorBias(bias)
    if isinstance(bias, Sequence) and not isinstance(bias, str) and bias:
        items = [as_bias(f"{name}[{n}]", b) for n, b in enumerate(bias)]
        return items[0] if len(items) == 1 else Chain(tuple(p for b in items for p in b.parts()))
    raise TypeError(f"{name} must be an attnkit bias, a float tensor or a list of them; got {describe(bias)}")


def tensor_bias_parts(bias: Bias | None) -> list[TensorBias]:
    """The distinct ``from_tensor`` biases in ``bias``, in order of first use."""
    if bias is None:
        return []
    parts = {id(b): b for b in bias.parts() if isinstance(b, TensorBias)}
    # One entry per object: a bias given twice (``[b, b]``, ``b + b``) is one input whose
    # gradient is the sum over its uses, not one input per use.
    return list(parts.values())
