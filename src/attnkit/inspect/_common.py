"""Argument helpers that :func:`~attnkit.inspect.capture` and :func:`~attnkit.inspect.stats` share."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

from attnkit._checks import describe

__all__ = ["index_list", "layer_progress"]


def index_list(name: str, given: Iterable[int] | int | None) -> tuple[int, ...] | None:
    """``given`` (None, an int >= 0 or a non-empty sequence of them) as sorted unique indices; None stays None.

    >>> index_list("layers", [3, 1, 3]), index_list("heads", None)
    ((1, 3), None)
    """
    if given is None:
        return None
    values = [given] if isinstance(given, int) else list(given)
    if not values or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in values):
        raise ValueError(f"{name} must be None, an int >= 0 or a non-empty sequence of them; got {given!r}")
    return tuple(sorted(set(values)))


def layer_progress(label: str, progress: bool | Callable[[int, int], None]) -> Callable[[int, int], None] | None:
    """The ``progress=`` argument as a callable ``(done, total)``: a callable as given, True a printer of
    ``"{label}: layer i/n"`` on stderr (one line, rewritten), False None.

    >>> layer_progress("stats", False) is None
    True
    """
    if callable(progress):
        return progress
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool or a callable (done, total); got {describe(progress)}")
    if not progress:
        return None

    def show(done: int, total: int) -> None:
        print(f"\r{label}: layer {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    return show
