"""Token sets: which tokens belong to a set of words (stop words, domain terms), and the share of
each head's attention on them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attnkit._checks import describe
from attnkit.inspect._patterns import set_mass
from attnkit.inspect._views import key_mask, resolve
from attnkit.inspect.tokens import special_mask

if TYPE_CHECKING:
    from attnkit.inspect.maps import AttentionMaps

__all__ = ["STOP_WORDS", "token_set", "token_set_mass"]

# Common English function words (pronouns, articles, auxiliaries, prepositions, conjunctions).
STOP_WORDS: frozenset[str] = frozenset(
    {
        "a", "about", "above", "after", "again", "against", "all", "also", "am", "an", "and", "any", "are", "as", "at",
        "be", "because", "been", "before", "being", "below", "between", "both", "but", "by", "can", "could", "did",
        "do", "does", "doing", "down", "during", "each", "either", "every", "few", "for", "from", "further", "had",
        "has", "have", "having", "he", "her", "here", "hers", "herself", "him", "himself", "his", "how", "i", "if",
        "in", "into", "is", "it", "its", "itself", "just", "may", "me", "might", "more", "most", "must", "my", "myself",
        "neither", "no", "nor", "not", "now", "of", "off", "on", "once", "only", "or", "other", "our", "ours",
        "ourselves", "out", "over", "own", "same", "shall", "she", "should", "so", "some", "such", "than", "that",
        "the", "their", "theirs", "them", "themselves", "then", "there", "these", "they", "this", "those", "through",
        "to", "too", "under", "until", "up", "upon", "us", "very", "was", "we", "were", "what", "when", "where",
        "which", "while", "who", "whom", "whose", "why", "will", "with", "would", "yet", "you", "your", "yours",
        "yourself", "yourselves",
    }
)


def token_set_mass(
    attn: Tensor | AttentionMaps, key_set: Tensor | Sequence[int], *, input_index: int = 0
) -> Tensor:
    """Share of each head's attention on a set of keys, e.g. stop words or domain terms.

    Counted rows: all queries (a fully masked row drops out). Works for Lq != Lk.

    Args:
        attn: probabilities (..., Lq, Lk), or an ``AttentionMaps``.
        key_set: bool (Lk,) mask (see :func:`token_set`), or a list of key indices.
        input_index: which input of an ``AttentionMaps`` to read (default 0).

    Returns:
        float64 (...), in [0, 1]; 0 for an empty set.

    >>> import torch
    >>> tokens = ["the", "cat", "sat", "on", "the", "mat"]
    >>> A = torch.full((6, 6), 1 / 6)
    >>> token_set_mass(A, token_set(tokens, STOP_WORDS))  # 3 of 6 keys are stop words
    tensor(0.5000, dtype=torch.float64)
    >>> token_set_mass(A, [1, 5])
    tensor(0.3333, dtype=torch.float64)
    """
    view = resolve("attn", attn, input_index)
    return set_mass(view.attn, key_mask(key_set, view.attn.shape[-1]))


# Word-start markers: GPT-2 byte-level space, newline and tab, and SentencePiece's space.
_WORD_START = "Ġ▁Ċĉ"


def token_set(tokens: Sequence[str], words: Iterable[str], *, case_sensitive: bool = False,
              special: Sequence[bool] | None = None) -> Tensor:
    """Which tokens belong to a word in ``words``: a bool (L,) mask for :func:`token_set_mass`.

    Tokens are joined back into words first, and every piece of a matching word is marked:

    - WordPiece (BERT): ``##ing`` continues the word before it.
    - GPT-2 byte-level BPE and SentencePiece: ``Ġ`` / ``▁`` (and GPT-2's newline ``Ċ`` and
      tab ``ĉ``) start a new word; a piece without one continues the word before it when
      both are letters or digits (``Ġun`` ``believ`` ``able`` is one word, ``cat`` ``,``
      is two). Seen only when some token in ``tokens`` has such a marker.
    - Anything else (plain words, ``str(id)``) is one word per token.
    - Punctuation is its own word. Special tokens never match and end a word: those
      ``special`` flags (the maps' ``special`` or ``key_special``, the tokenizer's answer),
      else those spelled like one (``[CLS]``, ``<s>``, ``<|endoftext|>``, any ``[NAME]`` or
      ``<name>``; :func:`attnkit.inspect.tokens.special_mask`).

    Args:
        tokens: (L,) token strings, as an ``AttentionMaps`` holds them.
        words: the word set, e.g. :data:`STOP_WORDS`; not a single string.
        case_sensitive: compare case too (default False: ``The`` matches ``the``).
        special: (L,) bools, True for special tokens; default: guessed from the spelling.

    Returns:
        bool (L,).

    >>> token_set(["[CLS]", "the", "play", "##ing", "cat", "[SEP]"], {"the", "playing"}).tolist()
    [False, True, True, True, False, False]
    >>> token_set(["The", "Ġcat", "Ġsat", ",", "Ġun", "believ", "able"], STOP_WORDS | {"unbelievable"}).tolist()
    [True, False, False, False, True, True, True]
    """
    if isinstance(tokens, str) or not isinstance(tokens, Sequence):
        raise TypeError(f"tokens must be a list of token strings; got {describe(tokens)}")
    if isinstance(words, str):
        raise TypeError(f"words must be a collection of words, such as a set; got the single string {words!r}")
    if not isinstance(case_sensitive, bool):
        raise TypeError(f"case_sensitive must be a bool; got {describe(case_sensitive)}")

    def fold(word: str) -> str:
        return word if case_sensitive else word.casefold()

    words = list(words)
    bad = next((w for w in words if not isinstance(w, str)), None)
    if bad is not None:
        raise TypeError(f"words must hold strings; got {describe(bad)} among them")
    targets = {fold(w) for w in words}
    position = next((i for i, t in enumerate(tokens) if not isinstance(t, str)), None)
    if position is not None:
        raise TypeError(f"tokens must hold strings; tokens[{position}] is {describe(tokens[position])}")
    flags = special_mask(tokens, special)
    space_marked = any(isinstance(t, str) and t[:1] in _WORD_START for t in tokens)
    word_of: list[int | None] = []  # word index of each token; None for special tokens and bare spaces
    spelled: list[str] = []  # each word's text
    for position, token in enumerate(tokens):
        last = spelled[-1] if word_of and word_of[-1] is not None else None
        if flags[position]:
            word_of.append(None)
            continue
        if token.startswith("##") and len(token) > 2:
            piece, joins = token[2:], last is not None
        elif space_marked and token[:1] in _WORD_START:
            piece, joins = token.lstrip(_WORD_START), False
            if not piece:
                word_of.append(None)
                continue
        else:
            piece = token
            joins = space_marked and last is not None and last[-1:].isalnum() and piece[:1].isalnum()
        if joins:
            spelled[-1] += piece
        else:
            spelled.append(piece)
        word_of.append(len(spelled) - 1)
    matched = [fold(w) in targets for w in spelled]
    return torch.tensor([w is not None and matched[w] for w in word_of], dtype=torch.bool)
