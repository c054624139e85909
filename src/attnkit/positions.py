"""Positions: sinusoidal and learned absolute embeddings, rotary embeddings with scaling.

ALiBi is a bias on the scores; it lives in :mod:`attnkit.biases` (``biases.alibi``).

Rotary embeddings (RoPE, Su et al. 2021) rotate each pair of features of q and k by an
angle ``position * inv_freq[i]``, so that ``<R_m q, R_n k>`` depends only on ``m - n``.
Two layouts pair the features differently::

    layout="half"         pairs (x[i], x[i + d/2])    GPT-NeoX, Llama in transformers
    layout="interleaved"  pairs (x[2i], x[2i + 1])    the paper, Meta's Llama, GPT-J

Scaling stretches a model's trained context (``RopeScaling``):

- ``linear``: position interpolation, positions divided by ``factor`` (Chen et al. 2023).
- ``ntk``: NTK-aware, the base raised to ``base * factor ** (d / (d - 2))``.
- ``dynamic``: NTK-aware with a factor that grows with the sequence once it passes
  ``original_max_position`` (transformers' "dynamic").
- ``yarn``: per-frequency blend of interpolation and extrapolation, with cos/sin scaled
  by the attention factor ``0.1 ln(factor) + 1`` (Peng et al. 2023).
- ``llama3``: low frequencies divided by ``factor``, high ones kept, a smooth ramp
  between (Meta's Llama 3.1).

cos and sin are always computed in float32 (float64 for float64 inputs), whatever the
dtype of q and k, because positions in the thousands lose their fraction in half
precision.

>>> import torch
>>> from attnkit.positions import RotaryEmbedding
>>> rope = RotaryEmbedding(8)
>>> q = torch.randn(1, 2, 5, 8)
>>> rope(q).shape
torch.Size([1, 2, 5, 8])
>>> torch.allclose(rope(q).norm(dim=-1), q.norm(dim=-1), atol=1e-5)
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnkit._checks import describe, require_choice, require_int, require_real, require_tensor

__all__ = [
    "LearnedPositionalEmbedding",
    "RopeScaling",
    "RotaryEmbedding",
    "SinusoidalPositionalEmbedding",
    "ntk_base",
    "rope_inv_freq",
    "sinusoidal",
    "yarn_attention_factor",
]

_KINDS = ("linear", "ntk", "dynamic", "yarn", "llama3")
_LAYOUTS = ("half", "interleaved")


def sinusoidal(positions: Tensor | int, dim: int, *, base: float = 10000.0) -> Tensor:
    """The fixed sinusoidal embeddings of Vaswani et al. 2017, (..., dim), float32.

    ``PE[p, 2i] = sin(p / base^(2i/dim))`` and ``PE[p, 2i+1] = cos(p / base^(2i/dim))``.
    ``positions`` is an int (giving positions ``0 .. n-1``) or an integer tensor of any shape.

    >>> sinusoidal(2, 4)
    tensor([[0.0000, 1.0000, 0.0000, 1.0000],
            [0.8415, 0.5403, 0.0100, 0.9999]])
    """
    dim = require_int("dim", dim, minimum=2)
    if dim % 2:
        raise ValueError(f"dim must be even (sin/cos pairs); got {dim}")
    if require_real("base", base) <= 1:
        raise ValueError(f"base must be > 1; got {base}")
    if isinstance(positions, int):
        positions = torch.arange(require_int("positions", positions, minimum=0))
    require_tensor("positions", positions)
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angle = positions.to(torch.float64)[..., None] * inv  # (..., dim/2)
    out = torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(-2)
    return out.to(torch.float32)


class SinusoidalPositionalEmbedding(nn.Module):
    """Adds nothing learnable: ``forward(positions)`` returns :func:`sinusoidal` embeddings."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim, self.base = require_int("dim", dim, minimum=2), require_real("base", base)
        if dim % 2:
            raise ValueError(f"dim must be even (sin/cos pairs); got {dim}")

    def forward(self, positions: Tensor) -> Tensor:
        return sinusoidal(positions, self.dim, base=self.base).to(positions.device)


class LearnedPositionalEmbedding(nn.Embedding):
    """A learned table of ``max_length`` absolute positions (BERT, GPT-2).

    A position at or past ``max_length`` raises ValueError instead of an index error.
    """

    def __init__(self, max_length: int, dim: int):
        super().__init__(require_int("max_length", max_length, minimum=1), require_int("dim", dim, minimum=1))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, positions: Tensor) -> Tensor:
        if positions.numel() and (int(positions.max()) >= self.num_embeddings or int(positions.min()) < 0):
            raise ValueError(
                f"positions must lie in [0, {self.num_embeddings}) for this learned embedding "
                f"(max_length={self.num_embeddings}); got {int(positions.min())}..{int(positions.max())}. "
                "Use rotary or sinusoidal positions for longer sequences"
            )
        return super().forward(positions)


@dataclass(frozen=True)
class RopeScaling:
    """How to stretch rotary embeddings past the trained context. See the module docstring.

    Args:
        kind: ``"linear"``, ``"ntk"``, ``"dynamic"``, ``"yarn"`` or ``"llama3"``.
        factor: the stretch, > 1 to extend (e.g. 4 for 4x the context).
        original_max_position: the trained context (``dynamic``, ``yarn``, ``llama3``).
        beta_fast, beta_slow: YaRN's ramp ends, in rotations over the trained context.
        attention_factor: YaRN's cos/sin scale; default ``0.1 ln(factor) + 1``.
        low_freq_factor, high_freq_factor: Llama 3's ramp ends.
    """

    kind: str
    factor: float
    original_max_position: int = 2048
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self) -> None:
        require_choice("kind", self.kind, _KINDS)
        if require_real("factor", self.factor) < 1.0:
            raise ValueError(f"factor must be >= 1 (it stretches the context); got {self.factor}")
        require_int("original_max_position", self.original_max_position, minimum=1)
        if self.kind == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"llama3 scaling needs 0 < low_freq_factor < high_freq_factor; "
                             f"got {self.low_freq_factor} and {self.high_freq_factor}")
        if self.kind == "yarn" and not 0 < self.beta_slow < self.beta_fast:
            raise ValueError(f"yarn scaling needs 0 < beta_slow < beta_fast; got {self.beta_slow} and {self.beta_fast}")
        if self.attention_factor is not None and require_real("attention_factor", self.attention_factor) <= 0:
            raise ValueError(f"attention_factor must be > 0; got {self.attention_factor}")


def ntk_base(base: float, factor: float, dim: int) -> float:
    """The NTK-aware base: ``base * factor ** (dim / (dim - 2))``.

    >>> round(ntk_base(10000.0, 4.0, 128), 1)
    40889.9
    """
    return base * factor ** (dim / (dim - 2))


def yarn_attention_factor(factor: float) -> float:
    """YaRN's scale on cos and sin: ``0.1 ln(factor) + 1`` (1 for factor <= 1).

    >>> round(yarn_attention_factor(4.0), 5)
    1.13863
    """
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def rope_inv_freq(dim: int, base: float = 10000.0, scaling: RopeScaling | None = None,
                  seq_len: int | None = None) -> Tensor:
    """Rotary frequencies ``1 / base^(2i/dim)``, i < dim/2, float64, after ``scaling``.

    ``seq_len`` is the current sequence length; only ``dynamic`` scaling reads it.

    >>> f = rope_inv_freq(128)
    >>> [round(float(x), 6) for x in (f[0], f[1])], f"{float(f[63]):.5e}"
    ([1.0, 0.865964], '1.15478e-04')
    """
    dim = require_int("dim", dim, minimum=2)
    if dim % 2:
        raise ValueError(f"dim must be even (rotation pairs); got {dim}")
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    if scaling is None:
        return 1.0 / base**exponents
    s = scaling
    if s.kind == "linear":
        return 1.0 / base**exponents / s.factor
    if s.kind == "ntk":
        return 1.0 / ntk_base(base, s.factor, dim) ** exponents
    if s.kind == "dynamic":
        length = s.original_max_position if seq_len is None else max(seq_len, s.original_max_position)
        grow = s.factor * length / s.original_max_position - (s.factor - 1)
        return 1.0 / ntk_base(base, grow, dim) ** exponents
    inv = 1.0 / base**exponents
    if s.kind == "yarn":
        def rotations_to_dim(rotations: float) -> float:
            # the feature index whose wavelength fits `rotations` times in the trained context
            return dim * math.log(s.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(rotations_to_dim(s.beta_fast)), 0)
        high: float = min(math.ceil(rotations_to_dim(s.beta_slow)), dim - 1)
        if high == low:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        keep = 1.0 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
        return inv / s.factor * (1 - keep) + inv * keep
    # llama3
    wavelength = 2 * math.pi / inv
    long_wave = s.original_max_position / s.low_freq_factor
    short_wave = s.original_max_position / s.high_freq_factor
    smooth = (s.original_max_position / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv / s.factor + smooth * inv
    out = torch.where(wavelength > long_wave, inv / s.factor, inv)
    middle = (wavelength <= long_wave) & (wavelength >= short_wave)
    return torch.where(middle, blended, out)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding for q or k of shape (B, H, L, head_dim).

    ``forward(x, positions=None)`` rotates ``x``; ``positions`` are absolute token
    positions, (L,) or (B, L) integers, default ``0 .. L-1``. The result has ``x``'s dtype;
    the rotation is computed in float32 (float64 for float64 ``x``). With ``yarn`` scaling
    cos and sin carry the attention factor, as in the paper.

    Args:
        head_dim: features per head, even.
        base: the frequency base (10000 in most models, 500000 in Llama 3).
        layout: ``"half"`` or ``"interleaved"`` pairing of features (module docstring).
        scaling: a :class:`RopeScaling`, or None.

    ``dynamic`` scaling picks its base from the largest position seen in the call, so keys
    cached from an earlier, shorter call keep the rotation they had then (as in
    transformers); decoding with a cache is exact only without dynamic scaling.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, layout: str = "half",
                 scaling: RopeScaling | None = None):
        super().__init__()
        self.head_dim = require_int("head_dim", head_dim, minimum=2)
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings; got {head_dim}")
        self.base = require_real("base", base)
        if base <= 1:
            raise ValueError(f"base must be > 1; got {base}")
        self.layout = require_choice("layout", layout, _LAYOUTS)
        if scaling is not None and not isinstance(scaling, RopeScaling):
            raise TypeError(f"scaling must be a RopeScaling or None; got {describe(scaling)}")
        self.scaling = scaling
        self._inv_freq: Tensor | None = None
        self.attention_factor = 1.0
        if scaling is not None and scaling.kind == "yarn":
            self.attention_factor = (scaling.attention_factor if scaling.attention_factor is not None
                                     else yarn_attention_factor(scaling.factor))

    def inv_freq(self, seq_len: int | None = None) -> Tensor:
        """The frequencies (head_dim/2,), float64; only dynamic scaling depends on ``seq_len``."""
        if self.scaling is not None and self.scaling.kind == "dynamic":
            return rope_inv_freq(self.head_dim, self.base, self.scaling, seq_len)
        if self._inv_freq is None:
            self._inv_freq = rope_inv_freq(self.head_dim, self.base, self.scaling)
        return self._inv_freq

    def cos_sin(self, positions: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """cos and sin of shape (*positions.shape, head_dim/2) in ``dtype`` (float32/64)."""
        dynamic = self.scaling is not None and self.scaling.kind == "dynamic"
        seq_len = int(positions.max()) + 1 if dynamic and positions.numel() else None  # a device sync: dynamic only
        inv = self.inv_freq(seq_len).to(positions.device)
        angle = positions.to(torch.float64)[..., None] * inv  # (..., d/2), float64 keeps large positions exact
        return ((angle.cos() * self.attention_factor).to(dtype),
                (angle.sin() * self.attention_factor).to(dtype))

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        require_tensor("x", x)
        if x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"x must be (B, H, L, head_dim={self.head_dim}); got {describe(x)}")
        batch, _, length, _ = x.shape
        if positions is None:
            positions = torch.arange(length, device=x.device)
        require_tensor("positions", positions)
        if positions.dtype.is_floating_point or positions.dtype == torch.bool:
            raise TypeError(f"positions must be an integer tensor; got {describe(positions)}")
        if positions.shape not in ((length,), (batch, length)):
            raise ValueError(f"positions must be (L,) = ({length},) or (B, L) = ({batch}, {length}); "
                             f"got shape {tuple(positions.shape)}")
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = self.cos_sin(positions, compute)
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, L, d/2)
        xc = x.to(compute)
        if self.layout == "half":
            x1, x2 = xc.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = xc[..., 0::2], xc[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, layout={self.layout!r}, scaling={self.scaling}"
