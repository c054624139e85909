"""Which tokens are special (``[CLS]``, ``<s>``, ``<|endoftext|>``): the one rule of attnkit.inspect.

Maps from :func:`attnkit.inspect.capture` carry the tokenizer's own answer, ``special`` (and
``key_special`` for cross-attention keys), from its special-tokens mask. That answer is used
whenever it is there. Only for tokens without it (maps saved before the field existed, maps
built by hand, a model without a tokenizer) is the spelling guessed: ``[NAME]`` or
``<name>`` with no space inside.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from attnkit._checks import describe

__all__ = ["looks_special", "special_mask"]

_SPECIAL_TOKEN = re.compile(r"\[[A-Za-z0-9_]+\]|<[^<>\s]+>")


def looks_special(token: str) -> bool:
    """Whether ``token`` is spelled like a special token: ``[NAME]`` or ``<name>`` (no spaces).

    The fallback guess; prefer the maps' ``special`` flags (:func:`special_mask`).

    >>> [looks_special(t) for t in ["[CLS]", "<s>", "<|endoftext|>", "cat", "< b >"]]
    [True, True, True, False, False]
    """
    return bool(_SPECIAL_TOKEN.fullmatch(token))


def special_mask(tokens: Sequence[str], special: Sequence[bool] | None = None) -> list[bool]:
    """Per token, whether it is special: ``special`` (the tokenizer's answer, one bool per token)
    when given, else :func:`looks_special` of each token.

    Raises:
        ValueError: ``special`` of another length than ``tokens``.
        TypeError: ``special`` holding something other than bools.

    >>> special_mask(["<s>", "cat", "</s>"], [True, False, False])  # the tokenizer says "</s>" is not
    [True, False, False]
    >>> special_mask(["<s>", "cat", "</s>"])
    [True, False, True]
    """
    if special is None:
        return [looks_special(t) for t in tokens]
    flags = list(special)
    if len(flags) != len(tokens):
        raise ValueError(f"special must hold one flag per token ({len(tokens)}); got {len(flags)}")
    bad = next((f for f in flags if not isinstance(f, bool)), None)
    if bad is not None:
        raise TypeError(f"special must hold bools (True = special token); got {describe(bad)} among them")
    return flags
