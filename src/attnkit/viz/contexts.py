"""One word in two contexts: how a model's reading of ``token`` differs between two sentences.

:func:`compare_contexts` runs the model once on each sentence and keeps, for the chosen token
(its first occurrence in each), where it attends (per layer: the mean of the heads and the
best head) and its hidden state after the embeddings and after every layer. The cosine
similarity of the two hidden states, layer by layer, says from where the model reads the word
differently ("bank" of a river against "bank" of interest rates). The same cosine for the
other words both sentences share is the baseline: context moves every token. The word *moves
more than the words around it* at a layer only when its cosine is more than :data:`GAP` below
every shared word's; the summary, the page's headline and its chart read the same numbers.
One shared word, the *anchor*, is drawn and tabled beside the word.

The anchor rule: the word token (one holding a letter or digit) other than ``token`` that the
two sentences share most often, counting its occurrences in both (ties: the one that comes
first in the first sentence); tokens match as :func:`~attnkit.viz.explainer.find_tokens` does
(case-insensitive, without ``##``/``Ġ``/``▁``). Special tokens ([CLS], [SEP], ...) never count.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnkit._checks import describe
from attnkit.inspect.maps import AttentionMaps
from attnkit.viz._html import page
from attnkit.viz.explainer import explain, find_tokens, special_positions

__all__ = ["ContextComparison", "TokenNotFound", "compare_contexts", "compare_html", "hidden_states",
           "write_compare_report"]

GAP = 0.02  # how far below every shared word's cosine the token's must fall to count as moving more
MIN_SHARED = 3  # shared words the claim "moves more than the words around it" needs, the anchor included


class TokenNotFound(ValueError):
    """A word that is not a token of one of the sentences; ``argument`` is ``"token"`` or ``"anchor"``."""

    def __init__(self, argument: str, word: str, sentence: str, tokens: list[str]) -> None:
        self.argument, self.word, self.sentence, self.tokens = argument, word, sentence, tokens
        super().__init__(f"{argument} {word!r} is not a token of {sentence!r}; its tokens are " + " ".join(tokens))


@dataclass
class ContextComparison:
    """What :func:`compare_contexts` found.

    Attributes:
        texts: the two sentences.
        token, anchor: the compared word and the shared word, as the tokenizer writes them.
        positions, anchor_positions: their first positions in each sentence's tokens.
        token_cosine, anchor_cosine: per hidden state (index 0: after the embeddings, n: after
            layer n-1, i.e. the model's layer numbers shifted by one), the cosine similarity of
            the word's hidden state in the two sentences.
        maps: the two sentences' attention maps.
        attends: per sentence, per layer: ``{"mean": [(key, weight)] * 3, "head": h, "head_key":
            key, "head_weight": w}``: the token's top keys in the mean of the heads, and the head
            that puts the most weight on one key that is not a special token.
    """

    texts: tuple[str, str]
    token: str
    anchor: str
    positions: tuple[int, int]
    anchor_positions: tuple[int, int]
    token_cosine: list[float]
    anchor_cosine: list[float]
    maps: tuple[AttentionMaps, AttentionMaps]
    attends: tuple[list[dict[str, Any]], list[dict[str, Any]]]
    shared: dict[str, list[float]] = field(default_factory=dict)

    def baseline(self) -> dict[str, list[float]]:
        """The shared words' cosines the token is measured against: ``shared``, the anchor always included."""
        return {self.anchor: self.anchor_cosine, **self.shared}

    def moves_more(self, gap: float = GAP) -> list[int]:
        """The hidden states (1 = after the first captured layer) at which the token's cosine is more than
        ``gap`` below every shared word's: there the context moved the token more than the words around it.
        [] when the sentences share fewer than :data:`MIN_SHARED` words: too few to tell (:meth:`summary` says so).

        >>> c = ContextComparison(texts=("a", "b"), token="bank", anchor="the", positions=(1, 1),
        ...     anchor_positions=(2, 2), token_cosine=[1.0, 0.9, 0.5], anchor_cosine=[1.0, 0.95, 0.4],
        ...     maps=(None, None), attends=([], []), shared={"she": [1.0, 0.99, 0.6], "to": [1.0, 0.97, 0.7]})
        >>> c.moves_more()       # after layer 0: 0.9 is more than 0.02 below 0.95, 0.99 and 0.97; not after 1
        [1]
        """
        others = list(self.baseline().values())
        if len(others) < MIN_SHARED:
            return []
        return [n for n in range(1, len(self.token_cosine))
                if self.token_cosine[n] < min(c[n] for c in others) - gap]

    def diverges_from(self, gap: float = GAP) -> int | None:
        """The first of :meth:`moves_more`'s hidden states; None if there is none."""
        found = self.moves_more(gap)
        return found[0] if found else None

    def axis_floor(self) -> float:
        """The bottom of the chart's cosine axis: a tenth below the lowest cosine drawn (the word's and
        every shared word's), rounded down to a tenth, and not below -1. The lines then fill the chart
        instead of its top fifth; the axis's tick labels say where it starts.

        >>> c = ContextComparison(texts=("a", "b"), token="bank", anchor="the", positions=(1, 1),
        ...     anchor_positions=(2, 2), token_cosine=[1.0, 0.84], anchor_cosine=[1.0, 0.61],
        ...     maps=(None, None), attends=([], []))
        >>> c.axis_floor()        # lowest 0.61: 0.6, a tenth lower
        0.5
        """
        lowest = min(*self.token_cosine, *(c for cos in self.baseline().values() for c in cos))
        return max(-1.0, round(math.floor(lowest * 10) / 10 - 0.1, 1))

    def rule(self) -> str:
        """The threshold, in words, as the page states it."""
        return (f'"{self.token}" moves more than the words around it at a layer when its cosine is more than {GAP} '
                f"below that of every other word both sentences share ({len(self.baseline())}: "
                + ", ".join(self.baseline()) + f"), and they share at least {MIN_SHARED}.")

    def summary(self) -> str:
        """The comparison in words, for the terminal and the page's headline: at which layers the token
        moves more than every shared word (:meth:`moves_more`), and where they all end after the last layer."""
        tok, layers = self.token, self.maps[0].layers
        t, others = self.token_cosine, self.baseline()
        found = self.moves_more()
        if len(others) < MIN_SHARED:
            words = [f'"{tok}" is compared with {len(others)} shared word{"" if len(others) == 1 else "s"} only ('
                     + ", ".join(others) + f"): too few (at least {MIN_SHARED}) to say whether it moves more than the "
                     "words around it; sentences that share more words can"]
        elif not found:
            words = [f'"{tok}" never moves more than the words around it: at no layer is its cosine more than '
                     f"{GAP} below every other shared word's"]
        else:
            words = [f'"{tok}" moves more than every other shared word after layer'
                     f"{'s' if len(found) > 1 else ''} " + ", ".join(str(layers[n - 1]) for n in found)
                     + f" (first: cos {t[found[0]]:.2f} against at least "
                     f"{min(c[found[0]] for c in others.values()):.2f})"]
        last = len(t) - 1
        lowest = min(others, key=lambda w: others[w][last])
        spread = sorted(c[last] for c in others.values())
        words.append(f'after the last layer "{tok}" is at cos {t[last]:.2f}, the shared words at '
                     + (f"{spread[0]:.2f}" if len(spread) == 1 else f"{spread[0]:.2f} to {spread[-1]:.2f}")
                     + (f' ("{lowest}" has moved most)' if spread[0] < t[last] else ""))
        return "; ".join(words) + "."

    def to_dict(self) -> dict[str, Any]:
        """The numbers as JSON (the maps left out)."""
        layers = self.maps[0].layers
        return {"texts": list(self.texts), "token": self.token, "anchor": self.anchor,
                "positions": list(self.positions), "anchor_positions": list(self.anchor_positions),
                "model": self.maps[0].model_name, "layers": list(layers),
                "token_cosine": self.token_cosine, "anchor_cosine": self.anchor_cosine, "shared": self.baseline(),
                "gap": GAP, "moves_more_after_layers": [layers[n - 1] for n in self.moves_more()],
                "attends": [list(a) for a in self.attends], "rule": self.rule(), "axis_floor": self.axis_floor(),
                "summary": self.summary()}

    def plot(self, path: str | Path) -> str:
        """A PNG of both cosines against the layer (needs the ``plot`` extra)."""
        from attnkit._plot import pyplot

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        xs = list(range(len(self.token_cosine)))
        ax.plot(xs, self.token_cosine, "o-", color="#e15759", label=f"'{self.token}'")
        ax.plot(xs, self.anchor_cosine, "s--", color="#4e79a7", label=f"'{self.anchor}' (shared word)")
        others = [c for w, c in self.shared.items() if w != self.anchor]
        for n, cos in enumerate(others):
            ax.plot(xs, cos, "-", color="#bbb", linewidth=1, label="other shared words" if n == 0 else None)
        for n in self.moves_more():
            ax.axvspan(n - 0.4, n + 0.4, color="#e15759", alpha=0.08, linewidth=0)
        ax.set_xticks(xs, ["emb"] + [str(n) for n in self.maps[0].layers])
        ax.set_xlabel("hidden state after the embeddings (emb) and after each layer")
        ax.set_ylabel("cosine similarity between the sentences")
        ax.set_ylim(self.axis_floor(), 1.02)
        ax.set_title(f"{self.maps[0].model_name.rsplit('/', 1)[-1]}: '{self.token}' in two contexts", fontsize=10)
        ax.legend(fontsize=8, loc="lower left")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return str(path)


def _layer_list(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer layers: the ModuleList with ``num_hidden_layers`` entries."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} layers of {type(model).__name__} (a ModuleList of num_hidden_layers "
                     "modules); compare_contexts needs a Hugging Face transformer")


@contextlib.contextmanager
def hidden_states(model: nn.Module) -> Iterator[list[Tensor]]:
    """Inside the block, the list fills with each forward's hidden states: the first layer's input
    (the embeddings' output), then each layer's output, as (batch, length, dim) tensors.

    For a model with a norm after its last layer (Llama), the last entry is before that norm;
    for BERT-like models the entries equal ``output_hidden_states``.
    """
    layers = _layer_list(model)
    states: list[Tensor] = []

    def first(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        states.clear()
        states.append((args[0] if args else kwargs["hidden_states"]).detach())

    def after(_module: nn.Module, _args: tuple, output: Any) -> None:
        states.append((output[0] if isinstance(output, tuple) else output).detach())

    handles = [layers[0].register_forward_pre_hook(first, with_kwargs=True)]
    handles += [layer.register_forward_hook(after) for layer in layers]
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


def _bare(token: str) -> str:
    return token.removeprefix("##").removeprefix("Ġ").removeprefix("▁").lower()


def pick_anchor(tokens_a: list[str], tokens_b: list[str], token: str) -> str | None:
    """The anchor by the module's rule, or None when the sentences share no other word token.

    >>> pick_anchor(["[CLS]", "the", "bank", "of", "the", "river", ".", "[SEP]"],
    ...             ["[CLS]", "the", "bank", "rose", ".", "[SEP]"], "bank")
    'the'
    """
    special = set(special_positions(tokens_a)), set(special_positions(tokens_b))
    words = [Counter(_bare(t) for i, t in enumerate(toks) if i not in sp and any(c.isalnum() for c in t))
             for toks, sp in zip((tokens_a, tokens_b), special)]
    shared = [w for w in dict.fromkeys(_bare(t) for t in tokens_a) if w in words[0] and w in words[1]
              and w != _bare(token)]
    if not shared:
        return None
    return max(shared, key=lambda w: (words[0][w] + words[1][w], -shared.index(w)))


def compare_contexts(text: str, other: str, token: str, model: tuple[Any, Any], *,
                     anchor: str | None = None) -> ContextComparison:
    """Compare how ``model`` reads ``token`` in ``text`` and in ``other``.

    Args:
        text, other: the two sentences.
        token: a token's text as :func:`~attnkit.viz.explainer.find_tokens` matches it (e.g.
            ``"bank"``); its first occurrence in each sentence is compared.
        model: a ``(model, tokenizer)`` pair (a Hugging Face transformer).
        anchor: the shared word to compare against (default: the module's rule).

    Raises:
        TokenNotFound: (a ValueError) naming ``token`` (or ``anchor``) when it is not a token of a
            sentence, with that sentence's tokens.
        ValueError: when the sentences share no word to anchor on.
    """
    for name, value in (("text", text), ("other", other), ("token", token)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str; got {describe(value)}")
    if anchor is not None and not isinstance(anchor, str):
        raise TypeError(f"anchor must be a str or None; got {describe(anchor)}")
    net, _ = model
    maps, states = [], []
    for sentence in (text, other):
        with hidden_states(net) as got:
            maps.append(explain(sentence, model))
        states.append([s[0].double() for s in got])  # (length, dim) per hidden state, batch of one
    tokens = [[str(t) for t in m.tokens[0]] for m in maps]

    def first(word: str, name: str) -> tuple[int, int]:
        found = []
        for sentence, toks in zip((text, other), tokens):
            hits = [i for i in find_tokens(toks, word) if i not in special_positions(toks)]
            if not hits:
                raise TokenNotFound(name, word, sentence, toks)
            found.append(hits[0])
        return found[0], found[1]

    positions = first(token, "token")
    if anchor is None:
        anchor = pick_anchor(tokens[0], tokens[1], token)
        if anchor is None:
            raise ValueError(f"the two sentences share no word token besides {token!r} to compare against; "
                             "pass anchor= (the CLI's --anchor) or choose sentences with a common word")
    anchor_positions = first(anchor, "anchor")

    def cosines(i: int, j: int) -> list[float]:
        return [float(torch.nn.functional.cosine_similarity(a[i], b[j], dim=0)) for a, b in zip(*states)]

    shared = {tokens[0][i]: cosines(i, j) for i, j in _shared_positions(tokens[0], tokens[1], token)}
    return ContextComparison(
        texts=(text, other), token=tokens[0][positions[0]], anchor=tokens[0][anchor_positions[0]],
        positions=positions, anchor_positions=anchor_positions, token_cosine=cosines(*positions),
        anchor_cosine=cosines(*anchor_positions), maps=(maps[0], maps[1]),
        attends=(_attends(maps[0], positions[0]), _attends(maps[1], positions[1])), shared=shared)


def _shared_positions(tokens_a: list[str], tokens_b: list[str], token: str) -> list[tuple[int, int]]:
    """The first positions, in each sentence, of every word token both share other than ``token`` (as
    :func:`pick_anchor` matches them), in the first sentence's order."""
    special = set(special_positions(tokens_a)), set(special_positions(tokens_b))
    first: list[dict[str, int]] = [{}, {}]  # bare word -> its first position
    for side, toks in enumerate((tokens_a, tokens_b)):
        for i, t in enumerate(toks):
            if i not in special[side] and any(c.isalnum() for c in t) and _bare(t) != _bare(token):
                first[side].setdefault(_bare(t), i)
    return [(i, first[1][w]) for w, i in first[0].items() if w in first[1]]


def _attends(maps: AttentionMaps, i: int, k: int = 3) -> list[dict[str, Any]]:
    """Per layer, where token ``i`` attends: the top ``k`` keys of the mean of the heads, and the head
    that puts the most weight on one key; special tokens left out of both (heads park weight there,
    which says little about the text), weights the model's (not renormalised)."""
    tokens = [str(t) for t in maps.tokens[0]]
    special = special_positions(tokens)
    out = []
    for li in range(len(maps.layers)):
        rows = maps.attentions[0][li, :, i].double()  # (heads, Lk)
        plain = rows.clone()
        plain[:, special] = -1.0
        mean = plain.mean(0)
        top = mean.topk(min(k, mean.numel() - len(special)))
        best = int(plain.flatten().argmax())
        h, j = divmod(best, rows.shape[1])
        out.append({"mean": [(tokens[int(t)], round(float(w), 4)) for w, t in zip(top.values, top.indices)],
                    "head": maps.heads[h], "head_key": tokens[j], "head_key_index": j,
                    "head_weight": round(float(rows[h, j]), 4)})
    return out


def compare_html(comparison: ContextComparison) -> str:
    """The comparison as one self-contained HTML page: the summary, the per-layer cosines, where the
    token attends in each sentence, and both sentences' explorers (one above the other; side by
    side on a screen wide enough for both), each opening on the token and its best head in the
    last layer."""
    from attnkit.viz.report import report_data

    if not isinstance(comparison, ContextComparison):
        raise TypeError(f"comparison must be a ContextComparison (from compare_contexts); got {describe(comparison)}")
    sides = [report_data(maps, title=text, focus=i, view=(maps.layers[-1], [attends[-1]["head"]]))
             for maps, text, i, attends in zip(comparison.maps, comparison.texts, comparison.positions,
                                               comparison.attends)]
    data = {**comparison.to_dict(), "left": sides[0], "right": sides[1]}
    return page(f"attnkit · '{comparison.token}' in two contexts", css=["explorer.css"],
                js=["units.js", "report_cost.js", "explorer.js", "report_compare.js"],
                body='<div id="attnkit-compare"></div>', data=data)


def write_compare_report(comparison: ContextComparison, path: str | Path) -> Path:
    """Write :func:`compare_html` to ``path`` (UTF-8) and return the path."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"path must be a file to write, not a folder; got {str(out)!r}")
    out.write_text(compare_html(comparison), encoding="utf-8")
    return out
