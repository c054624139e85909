"""Argument checks that name the argument, what was given and what was expected."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor


def describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dim()}-D {str(x.dtype).removeprefix('torch.')} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__} {x!r}"


def require_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {describe(x)}")
    return x


def require_int(name: str, x: object, *, minimum: int | None = None) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {describe(x)}")
    x = int(x)
    if minimum is not None and x < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {x}")
    return x


def require_real(name: str, x: object) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {describe(x)}")
    x = float(x)
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite; got {x}")
    return x


def require_choice(name: str, x: object, choices: tuple[str, ...]) -> str:
    if not isinstance(x, str) or x not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {x!r}")
    return x


def check_broadcast_4d(name: str, t: Tensor, target: tuple[int, int, int, int]) -> Tensor:
    """Return ``t`` viewed as 4-D, after checking it broadcasts to (B, H, Lq, Lk)."""
    if t.dim() > 4:
        raise ValueError(
            f"{name} must broadcast to (batch, heads, Lq, Lk) = {target}; "
            f"got {t.dim()} dims, shape {tuple(t.shape)}"
        )
    t4 = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    labels = ("batch", "heads", "Lq", "Lk")
    for dim, (have, want) in enumerate(zip(t4.shape, target)):
        if have not in (1, want):
            raise ValueError(
                f"{name} of shape {tuple(t.shape)} cannot broadcast to (batch, heads, Lq, Lk) = "
                f"{target}: its {labels[dim]} dim is {have}, expected 1 or {want}"
            )
    return t4


def int_vector(name: str, x: object, device: torch.device | None = None) -> Tensor:
    """A 1-D int64 tensor from a sequence of ints or an integer tensor."""
    if isinstance(x, Tensor):
        if x.dtype.is_floating_point or x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"{name} must hold integers; got {describe(x)}")
        t = x.to(torch.int64)
    else:
        try:
            t = torch.as_tensor(list(x), dtype=torch.int64)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a sequence of ints or an int tensor; got {describe(x)}") from None
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(t.shape)}")
    return t if device is None else t.to(device)
