"""Head roles: per-head scores that say what kind of pattern each head draws.

Every function takes attention probabilities either as a tensor ``(..., Lq, Lk)`` (most
often ``(layers, heads, Lq, Lk)``) or as an ``AttentionMaps`` from
:func:`attnkit.inspect.capture`, of which it reads input ``input_index``. Scores come back
as float64 tensors with the leading dims of the input, ``(layers, heads)`` for captured maps.

A *share* score follows TransformerLens's ``detect_head`` "mul" definition: the share of
a head's attention that lands on a pattern ``P`` (a bool ``(Lq, Lk)`` matrix),
``sum(A * P) / sum(A)`` over the query rows it counts. Rows sum to 1, so this is the mean
over those rows of the mass on the pattern. Unlike ``detect_head``, a query row with no
eligible key (the first token has no previous token) is left out rather than scored 0,
and a fully masked row (all zeros) adds nothing to either sum, so it drops out too. A
head with no counted row scores NaN.

Legend: ``i`` is a query position, ``j`` a key position, ``A[i, j]`` the weight query
``i`` puts on key ``j``.

>>> import torch
>>> from attnkit.inspect.roles import previous_token_score
>>> A = torch.eye(4).roll(-1, dims=1).tril()  # a perfect previous-token head; row 0 is all zeros
>>> A[0, 0] = 1.0                             # the first token can only look at itself
>>> previous_token_score(A)
tensor(1., dtype=torch.float64)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attnkit._checks import describe, int_vector, require_int, require_tensor
from attnkit.inspect.tokens import special_mask

if TYPE_CHECKING:
    from attnkit.inspect.maps import AttentionMaps

__all__ = [
    "CROSS_ROLES",
    "ROLES",
    "STOP_WORDS",
    "HeadRoles",
    "alignment_monotonicity",
    "attention_entropy",
    "diagonal_score",
    "duplicate_token_score",
    "first_token_score",
    "head_roles",
    "induction_score",
    "mean_attention_distance",
    "pattern_score",
    "previous_token_score",
    "rollout",
    "token_set",
    "token_set_mass",
    "top_attended",
    "top_key_share",
]

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


@dataclass(frozen=True)
class _Input:
    """One input's attention, checked and in float64, with what the maps knew about it."""

    attn: Tensor  # (..., Lq, Lk) float64
    tokens: list[str] | None
    token_ids: Sequence[int] | Tensor | None
    layers: tuple[int, ...] | None
    heads: tuple[int, ...] | None
    model_name: str | None
    key_tokens: list[str] | None = None  # cross-attention maps: the key side's tokens
    special: list[bool] | None = None  # per query token: one of the tokenizer's special tokens
    key_special: list[bool] | None = None  # per key token, for cross-attention maps
    model_layers: int | None = None  # how many layers and heads the model has (None: unknown)
    model_heads: int | None = None

    @property
    def keys(self) -> list[str] | None:
        """The key tokens: ``key_tokens`` for cross-attention maps, else ``tokens``."""
        return self.tokens if self.key_tokens is None else self.key_tokens

    @property
    def keys_special(self) -> list[bool] | None:
        """Per key token, whether it is special: ``key_special`` for cross maps, else ``special``."""
        return self.special if self.key_tokens is None else self.key_special


def _entry(maps: object, field: str, index: int) -> list | None:
    """``maps.<field>[index]`` as a list, or None where the maps (or a stand-in) lack the field."""
    value = getattr(maps, field, None)
    return None if value is None or value[index] is None else list(value[index])


def _resolve(name: str, attn: object, input_index: object, *, dims: int | None = None, cast: bool = True) -> _Input:
    """Read a tensor or one input of an AttentionMaps (duck-typed), check it, cast to float64
    (with ``cast=False`` the caller casts and checks the values, a piece at a time)."""
    index = require_int("input_index", input_index, minimum=0)
    if isinstance(attn, Tensor):
        if index != 0:
            raise ValueError(
                f"input_index applies to AttentionMaps, which hold several inputs; {name} is a tensor "
                f"(one input), so leave input_index at 0; got {index}"
            )
        t, tokens, ids, layers, heads, model_name = attn, None, None, None, None, None
        facts: dict = {}
    elif hasattr(attn, "attentions"):
        n = len(attn.attentions)
        if index >= n:
            raise ValueError(f"input_index must be in [0, {n}) for {name} holding {n} inputs; got {index}")
        t = require_tensor(f"{name}.attentions[{index}]", attn.attentions[index])
        tokens = list(attn.tokens[index]) if attn.tokens else None
        ids = attn.token_ids[index] if attn.token_ids is not None else None
        layers, heads = tuple(attn.layers), tuple(attn.heads)
        model_name = getattr(attn, "model_name", None)
        facts = {"key_tokens": _entry(attn, "key_tokens", index), "special": _entry(attn, "special", index),
                 "key_special": _entry(attn, "key_special", index),
                 "model_layers": getattr(attn, "model_layers", None), "model_heads": getattr(attn, "model_heads", None)}
        if t.dim() != 4 or tuple(t.shape[:2]) != (len(layers), len(heads)):
            raise ValueError(
                f"{name}.attentions[{index}] must be (layers, heads, Lq, Lk) with {len(layers)} layers and "
                f"{len(heads)} heads, as {name}.layers and {name}.heads say; got {describe(t)}"
            )
    else:
        raise TypeError(
            f"{name} must be a torch.Tensor of attention probabilities (..., Lq, Lk) or an AttentionMaps "
            f"from attnkit.inspect.capture; got {describe(attn)}"
        )
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must hold floating-point attention probabilities; got {describe(t)}")
    if dims is not None and t.dim() != dims:
        shape = "(Lq, Lk)" if dims == 2 else "(layers, heads, Lq, Lk)"
        raise ValueError(f"{name} must be {dims}-D, {shape}; got {describe(t)}")
    if t.dim() < 2:
        raise ValueError(f"{name} must be at least 2-D, (..., Lq, Lk); got {describe(t)}")
    return _Input(_probabilities(name, t) if cast else t, tokens, ids, layers, heads, model_name, **facts)


def _probabilities(name: str, t: Tensor, where: str = "") -> Tensor:
    """``t`` as float64, checked to hold probabilities; ``where`` says which part of ``name`` it is."""
    t = t.detach().to(torch.float64)
    low, high = torch.aminmax(t) if t.numel() else (t.new_zeros(()), t.new_zeros(()))
    if not (bool(low >= 0) and bool(high < math.inf)):  # NaN fails both: min/max propagate it
        part = where or describe(t)
        raise ValueError(
            f"{name} must hold attention probabilities (finite, >= 0); got negative or non-finite values in "
            f"{part}. Pass the softmax output, not the scores"
        )
    return t


def _require_square(name: str, t: Tensor, what: str) -> int:
    if t.shape[-2] != t.shape[-1]:
        raise ValueError(
            f"{what} needs self-attention, where query i and key i are the same token (Lq == Lk); "
            f"{name} has shape {tuple(t.shape)}, Lq = {t.shape[-2]}, Lk = {t.shape[-1]}"
        )
    return t.shape[-1]


def _ids(view: _Input, token_ids: object, length: int, what: str) -> Tensor:
    if token_ids is None:
        token_ids = view.token_ids
    if token_ids is None:
        raise ValueError(
            f"token_ids is required for {what}: got None, and attn carries no token ids. Pass "
            f"token_ids=[...] with one id per token ({length})"
        )
    ids = int_vector("token_ids", token_ids, device=torch.device("cpu"))  # the patterns are built on the CPU
    if ids.numel() != length:
        raise ValueError(f"token_ids must have one id per token, {length}; got {ids.numel()}")
    return ids


def _share(t: Tensor, pattern: Tensor) -> Tensor:
    """sum(A * P) / sum(A) over the rows where ``pattern`` has any key; (..., Lq, Lk) -> (...)."""
    pattern = pattern.to(t.device)
    rows = pattern.any(-1)  # (Lq,)
    qi, kj = pattern.nonzero(as_tuple=True)  # patterns are sparse: read only their entries
    return t[..., qi, kj].sum(-1) / t.sum(-1)[..., rows].sum(-1)


def _earlier_same(ids: Tensor) -> Tensor:
    """(L, L) bool: token j is an earlier occurrence of token i (j < i, ids[j] == ids[i])."""
    return (ids[:, None] == ids[None, :]).tril(-1)


def _previous_pattern(length: int) -> Tensor:
    return torch.ones(length, length, dtype=torch.bool).tril(-1).triu(-1)


def _induction_pattern(ids: Tensor) -> Tensor:
    pattern = torch.zeros(len(ids), len(ids), dtype=torch.bool)
    pattern[:, 1:] = _earlier_same(ids)[:, :-1]  # key j follows an earlier occurrence j - 1 of token i
    return pattern


def _first_pattern(q_len: int, k_len: int) -> Tensor:
    pattern = torch.zeros(q_len, k_len, dtype=torch.bool)
    pattern[:, :1] = True
    return pattern


def _distance(t: Tensor) -> Tensor:
    pos = torch.arange(t.shape[-1], dtype=torch.float64, device=t.device)
    return (t * (pos[:, None] - pos[None, :]).abs()).sum((-2, -1)) / t.sum((-2, -1))


def _entropy(t: Tensor, allowed: Tensor | None) -> Tensor:
    """Mean row entropy in nats; with ``allowed`` (Lq, Lk), divided by log(keys allowed in the row)."""
    total = t.sum(-1, keepdim=True)  # (..., Lq, 1)
    p = t / total.where(total > 0, 1.0)
    h = -torch.xlogy(p, p).sum(-1)  # (..., Lq), 0 log 0 = 0
    if allowed is None:
        counted = total.squeeze(-1) > 0
    else:
        keys = allowed.to(t.device).sum(-1, dtype=torch.float64)  # (Lq,)
        counted = (keys >= 2) & (total.squeeze(-1) > 0)
        h = h / keys.clamp(min=2).log()
    return (h * counted).sum(-1) / counted.sum(-1)


def _visible(t: Tensor) -> Tensor:
    """(Lq, Lk) bool: keys that some head gives weight to; the mask is shared by the heads."""
    return (t > 0).flatten(0, -3).any(0) if t.dim() > 2 else t > 0


def pattern_score(attn: Tensor | AttentionMaps, pattern: Tensor, *, input_index: int = 0) -> Tensor:
    """Share of each head's attention that lands on ``pattern`` (TransformerLens's "mul" score).

    ``sum(A * P) / sum(A)`` over the query rows where ``pattern`` allows at least one key;
    other rows are left out. The built-in scores are this with a fixed pattern.

    Args:
        attn: probabilities (..., Lq, Lk), or an ``AttentionMaps``.
        pattern: bool (Lq, Lk); True where a key belongs to the pattern.
        input_index: which input of an ``AttentionMaps`` to read (default 0).

    Returns:
        float64 (...), in [0, 1]; NaN for a head with no counted row that has any mass.

    >>> import torch
    >>> A = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    >>> pattern_score(A, torch.tensor([[False, False], [True, False]]))  # row 0 is not counted
    tensor(0.2500, dtype=torch.float64)
    """
    view = _resolve("attn", attn, input_index)
    require_tensor("pattern", pattern)
    if pattern.dtype != torch.bool:
        raise TypeError(f"pattern must be a bool tensor (True = key in the pattern); got {describe(pattern)}")
    if tuple(pattern.shape) != tuple(view.attn.shape[-2:]):
        raise ValueError(
            f"pattern must be (Lq, Lk) = {tuple(view.attn.shape[-2:])} to match attn; got {describe(pattern)}"
        )
    return _share(view.attn, pattern)


def previous_token_score(attn: Tensor | AttentionMaps, *, input_index: int = 0) -> Tensor:
    """Share of each head's attention on the previous token (key ``j = i - 1``).

    Counted rows: queries ``i >= 1``; the first token has no previous token, so its row is
    left out (TransformerLens counts it as 0). Needs Lq == Lk.

    Args:
        attn: probabilities (..., L, L), or an ``AttentionMaps``.
        input_index: which input of an ``AttentionMaps`` to read (default 0).

    Returns:
        float64 (...), in [0, 1]: 1 for a perfect previous-token head. NaN when L == 1.

    Uniform causal attention puts 1/(i+1) on the previous token: (1/2 + 1/3 + 1/4) / 3 = 0.3611.

    >>> import torch
    >>> A = torch.ones(4, 4).tril()
    >>> previous_token_score(A / A.sum(-1, keepdim=True))
    tensor(0.3611, dtype=torch.float64)
    """
    view = _resolve("attn", attn, input_index)
    length = _require_square("attn", view.attn, "previous_token_score")
    return _share(view.attn, _previous_pattern(length))


def duplicate_token_score(
    attn: Tensor | AttentionMaps, token_ids: Sequence[int] | Tensor | None = None, *, input_index: int = 0
) -> Tensor:
    """Share of each head's attention on earlier copies of the current token.

    Pattern: keys ``j < i`` with ``token_ids[j] == token_ids[i]``. Counted rows: only the
    queries whose token occurred earlier; the rest have no eligible key. Needs Lq == Lk.

    Args:
        attn: probabilities (..., L, L), or an ``AttentionMaps``.
        token_ids: (L,) ints; default: the maps' ``token_ids``. Required for a tensor.
        input_index: which input of an ``AttentionMaps`` to read (default 0).

    Returns:
        float64 (...), in [0, 1]. NaN when no token repeats.

    >>> import torch
    >>> A = torch.eye(4)
    >>> A[3] = torch.tensor([0.5, 0.0, 0.0, 0.5])  # token 3 repeats token 0 and looks half at it
    >>> duplicate_token_score(A, token_ids=[7, 8, 9, 7])
    tensor(0.5000, dtype=torch.float64)
    """
    view = _resolve("attn", attn, input_index)
    length = _require_square("attn", view.attn, "duplicate_token_score")
    ids = _ids(view, token_ids, length, "duplicate_token_score")
    return _share(view.attn, _earlier_same(ids))


def induction_score(
    attn: Tensor | AttentionMaps, token_ids: Sequence[int] | Tensor | None = None, *, input_index: int = 0
) -> Tensor:
    """Share of each head's attention on the token after an earlier copy of the current token.

    In ``... A B ... A``, an induction head at the second ``A`` looks at ``B``. Pattern:
    keys ``j`` with ``token_ids[j - 1] == token_ids[i]`` and ``j - 1 < i`` (so ``j <= i``).
    Counted rows: only the queries whose token occurred earlier. The pattern is built from
    the tokens, so on ``[BOS, r1..rN, r1..rN]`` it is exactly the stripe ``j = i - N + 1``
    for the second half. The diagonal stripe used in tutorials (ARENA's
    ``diagonal(offset=1 - N)``) also credits query ``N``, whose token has no earlier copy;
    TransformerLens's own token-built pattern matches this one, but its "mul" score divides
    by every row, where this one counts only rows with an earlier copy. Needs Lq == Lk.

    Args:
        attn: probabilities (..., L, L), or an ``AttentionMaps``.
        token_ids: (L,) ints; default: the maps' ``token_ids``. Required for a tensor.
        input_index: which input of an ``AttentionMaps`` to read (default 0).

    Returns:
        float64 (...), in [0, 1]. NaN when no token repeats.

    >>> import torch
    >>> ids = [0, 5, 6, 5, 6]                # BOS, then [5, 6] twice
    >>> A = torch.eye(5)
    >>> A[3] = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])  # the second 5 looks at the 6 after the first 5
    >>> A[4] = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.5])  # the second 6: half on the 5 after the first 6
    >>> induction_score(A, ids)                         # rows 3 and 4 count: (1 + 0.5) / 2
    tensor(0.7500, dtype=torch.float64)
    """
    view = _resolve("attn", attn, input_index)
    length = _require_square("attn", view.attn, "induction_score")
    ids = _ids(view, token_ids, length, "induction_score")
    return _share(view.attn, _induction_pattern(ids))


def first_token_score(attn: Tensor | AttentionMaps, *, input_index: int = 0) -> Tensor:
    """Share of each head's attention on key 0: an *attention sink* (often BOS or [CLS]).

    Counted rows: all queries. Under a causal mask query 0 can only see key 0, so its row
    adds 1 by construction. Works for Lq != Lk.

    Args:
        attn: probabilities (..., Lq, Lk), or an ``AttentionMaps``.
        input_index: which input of an ``AttentionMaps`` to read (default 0).

    Returns:
        float64 (...), in [0, 1]. Uniform causal attention over L tokens gives H_L / L.

    >>> import torch
    >>> A = torch.ones(3, 3).tril()
    >>> first_token_score(A / A.sum(-1, keepdim=True))  # (1 + 1/2 + 1/3) / 3
    tensor(0.6111, dtype=torch.float64)
    """
    view = _resolve("attn", attn, input_index)
    return _share(view.attn, _first_pattern(*view.attn.shape[-2:]))


def mean_attention_distance(attn: Tensor | AttentionMaps, *, input_index: int = 0) -> Tensor:
    """How far each head looks, in tokens: ``sum_j A[i, j] * |i - j|``, averaged over rows.

    Counted rows: all queries (a fully masked row drops out). Needs Lq == Lk.

    Args:
        attn: probabilities (..., L, L), or an ``AttentionMaps``.
        input_index: which input of an ``AttentionMaps`` to read (default 0).

    Returns:
        float64 (...), in [0, L - 1]. Uniform causal attention gives (L - 1) / 4.

    >>> import torch
    >>> A = torch.ones(5, 5).tril()
    >>> round(mean_attention_distance(A / A.sum(-1, keepdim=True)).item(), 6)
    1.0
    """
    view = _resolve("attn", attn, input_index)
    _require_square("attn", view.attn, "mean_attention_distance")
    return _distance(view.attn)


def attention_entropy(
    attn: Tensor | AttentionMaps, *, normalized: bool = False, allowed: Tensor | None = None, input_index: int = 0
) -> Tensor:
    """Mean entropy of each head's rows, in nats: low = focused, high = spread out.

    Each row is renormalised to sum to 1, then ``-sum_j p_j log p_j`` (with 0 log 0 = 0).
    With ``normalized=True`` row ``i``'s entropy is divided by ``log(n_i)``, ``n_i`` the
    number of keys row ``i`` may see, so 1 means uniform over them and 0 all on one key.
    Those keys are ``allowed[i]`` when given; by default, the keys that *any* map in
    ``attn`` (any layer, any head) gives weight to: masks are shared by the heads, so this
    recovers a causal or padding mask, unless every head puts exactly 0 on an allowed key.

    Counted rows: rows with any mass; with ``normalized=True``, only rows that may see two
    or more keys (a row with one key has no choice to make, e.g. the first row under a
    causal mask). Works for Lq != Lk.

    Args:
        attn: probabilities (..., Lq, Lk), or an ``AttentionMaps``.
        normalized: divide by ``log(n_i)`` (default False).
        allowed: bool (Lq, Lk), True where a key is visible; only with ``normalized=True``.
        input_index: which input of an ``AttentionMaps`` to read (default 0).

    Returns:
        float64 (...), in [0, log Lk], or [0, 1] when normalized; NaN with no counted row.

    >>> import torch
    >>> A = torch.ones(4, 4).tril()
    >>> A = A / A.sum(-1, keepdim=True)      # row i uniform over i + 1 keys
    >>> attention_entropy(A)                 # (log 1 + log 2 + log 3 + log 4) / 4
    tensor(0.7945, dtype=torch.float64)
    >>> round(attention_entropy(A, normalized=True).item(), 6)  # rows 1-3 uniform; row 0 has one key, not counted
    1.0
    >>> attention_entropy(torch.eye(4), normalized=True, allowed=torch.ones(4, 4).tril().bool())
    tensor(0., dtype=torch.float64)
    """
    view = _resolve("attn", attn, input_index)
    if not isinstance(normalized, bool):
        raise TypeError(f"normalized must be a bool; got {describe(normalized)}")
    if allowed is not None:
        if not normalized:
            raise ValueError("allowed is only used with normalized=True; pass normalized=True or drop allowed")
        require_tensor("allowed", allowed)
        if allowed.dtype != torch.bool or tuple(allowed.shape) != tuple(view.attn.shape[-2:]):
            raise ValueError(
                f"allowed must be a bool (Lq, Lk) = {tuple(view.attn.shape[-2:])} tensor; got {describe(allowed)}"
            )
    elif normalized:
        allowed = _visible(view.attn)
    return _entropy(view.attn, allowed)


def _diagonal_pattern(q_len: int, k_len: int) -> Tensor:
    """(Lq, Lk) bool: the keys the diagonal gives row i when the Lq rows are spread evenly over
    the Lk keys: row i covers ``[i * Lk / Lq, (i + 1) * Lk / Lq)`` and key j covers ``[j, j + 1)``;
    the keys that overlap it, ``floor(i * Lk / Lq) <= j <= max(floor(i * Lk / Lq), ceil((i + 1) * Lk / Lq) - 1)``.
    ``j == i`` when Lq == Lk, a run of about Lk / Lq keys when the keys are more, one or two when fewer."""
    i = torch.arange(q_len)
    low = i * k_len // q_len
    high = torch.maximum(low, -(-(i + 1) * k_len // q_len) - 1)
    j = torch.arange(k_len)
    return (j[None, :] >= low[:, None]) & (j[None, :] <= high[:, None])


def _top_key(t: Tensor) -> Tensor:
    """Share of all the attention on the single most attended key; (..., Lq, Lk) -> (...)."""
    per_key = t.sum(-2)  # (..., Lk)
    return per_key.amax(-1) / per_key.sum(-1)


def _monotonicity(t: Tensor, rows: Tensor) -> Tensor:
    """Share of successive counted rows whose argmax key does not move back; (..., Lq, Lk) -> (...)."""
    top = t[..., rows.to(t.device), :].argmax(-1)  # (..., counted rows); ties: the earliest key
    return (top[..., 1:] >= top[..., :-1]).to(torch.float64).mean(-1)  # NaN with fewer than two rows


def diagonal_score(attn: Tensor | AttentionMaps, *, input_index: int = 0) -> Tensor:
    """Share of each head's attention on the source position a straight diagonal alignment
    predicts, ``j ~ i * Lk / Lq``: a cross-attention head that reads the source in order.

    Row i's predicted keys are ``floor(i * Lk / Lq)`` up to ``ceil((i + 1) * Lk / Lq) - 1``
    (at least one): spread the Lq rows evenly over the Lk keys, and take the keys that
    overlap row i's stretch ``[i * Lk / Lq, (i + 1) * Lk / Lq)``. ``j == i`` when Lq == Lk.
    Counted rows: all queries (a fully masked row drops out). Start and end tokens on either
    side shift a real alignment off this line a little.

    Args:
        attn: probabilities (..., Lq, Lk), or an ``AttentionMaps``.
        input_index: which input of an ``AttentionMaps`` to read (default 0).

    Returns:
        float64 (...), in [0, 1]: 1 for a perfect diagonal; uniform attention gives the mean
        span over Lk (1 / Lk when Lq == Lk).

    >>> import torch
    >>> A = torch.zeros(2, 4)
    >>> A[0, 0] = A[1, 3] = 1.0     # row 0's span is keys 0-1, row 1's keys 2-3
    >>> diagonal_score(A)
    tensor(1., dtype=torch.float64)
    """
    view = _resolve("attn", attn, input_index)
    return _share(view.attn, _diagonal_pattern(*view.attn.shape[-2:]))


def alignment_monotonicity(attn: Tensor | AttentionMaps, *, input_index: int = 0) -> Tensor:
    """How much each head's alignment moves forward: the share of successive query rows whose
    most attended key (argmax) is not before the previous row's.

    Counted rows: those that may see any key (in any head); the steps between successive
    counted rows are scored. Ties go to the earliest key, so a row split evenly counts as its
    first key, and a uniform head, which never moves, scores 1: read it with
    :func:`diagonal_score`.

    Args:
        attn: probabilities (..., Lq, Lk), or an ``AttentionMaps``.
        input_index: which input of an ``AttentionMaps`` to read (default 0).

    Returns:
        float64 (...), in [0, 1]: 1 for a monotone alignment, 0 for a reversed one; NaN with
        fewer than two counted rows.

    >>> import torch
    >>> alignment_monotonicity(torch.eye(4).flip(-1))  # a reversed alignment
    tensor(0., dtype=torch.float64)
    """
    view = _resolve("attn", attn, input_index)
    return _monotonicity(view.attn, _visible(view.attn).any(-1))


def top_key_share(attn: Tensor | AttentionMaps, *, input_index: int = 0) -> Tensor:
    """Share of each head's attention on its single most attended key (summed over the rows):
    1 for a head that reads one key from every row (a sink, or one source word).

    Counted rows: all queries (a fully masked row drops out). Works for Lq != Lk.

    Args:
        attn: probabilities (..., Lq, Lk), or an ``AttentionMaps``.
        input_index: which input of an ``AttentionMaps`` to read (default 0).

    Returns:
        float64 (...), in [1 / Lk, 1]; 1 / Lk for uniform attention.

    >>> import torch
    >>> top_key_share(torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]]))  # key 1 gets 1.5 of 2
    tensor(0.7500, dtype=torch.float64)
    """
    view = _resolve("attn", attn, input_index)
    return _top_key(view.attn)


def _key_mask(key_set: object, k_len: int) -> Tensor:
    """A bool (Lk,) mask from a bool tensor or a sequence of key indices."""
    if isinstance(key_set, Tensor) and key_set.dtype == torch.bool:
        if tuple(key_set.shape) != (k_len,):
            raise ValueError(f"key_set as a bool mask must be (Lk,) = ({k_len},); got {describe(key_set)}")
        return key_set
    if isinstance(key_set, (list, tuple)) and any(isinstance(x, bool) for x in key_set):
        raise TypeError(
            "key_set must be a bool tensor or a list of key indices; got a list of bools. "
            "Pass torch.tensor(key_set) for a mask"
        )
    index = int_vector("key_set", key_set)
    if index.numel() and (index.min() < 0 or index.max() >= k_len):
        raise ValueError(f"key_set indices must be in [0, {k_len}) (Lk = {k_len}); got {index.tolist()}")
    mask = torch.zeros(k_len, dtype=torch.bool)
    mask[index] = True
    return mask


def _set_mass(t: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(t.device)
    return t[..., mask].sum((-2, -1)) / t.sum((-2, -1))


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
    view = _resolve("attn", attn, input_index)
    return _set_mass(view.attn, _key_mask(key_set, view.attn.shape[-1]))


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


def _position(name: str, value: object, held: tuple[int, ...], what: str) -> int:
    """Position on the tensor's axis of a model layer/head index held there."""
    index = require_int(name, value)
    if index not in held:
        raise ValueError(f"{name} must be one of the {what} held, {held}; got {index}")
    return held.index(index)


def top_attended(
    attn: Tensor | AttentionMaps,
    tokens: Sequence[str] | None = None,
    *,
    layer: int | None = None,
    head: int | str = "mean",
    k: int = 3,
    input_index: int = 0,
) -> list[list[tuple[int, str, float]]]:
    """For each query, the ``k`` keys it attends to most: ``(key index, key token, weight)``.

    Args:
        attn: probabilities (layers, heads, Lq, Lk) or one map (Lq, Lk) (e.g. from
            :func:`rollout`), or an ``AttentionMaps``.
        tokens: (Lk,) key tokens; default: the maps' key tokens (``key_tokens`` of
            cross-attention maps, else ``tokens``), else ``str(j)``.
        layer: which layer; the model's layer index for ``AttentionMaps``, the position on
            the first axis for a tensor. Required for 4-D input, left None for (Lq, Lk).
        head: a head index (like ``layer``), or ``"mean"`` (default) to average the heads.
        k: keys per query (default 3), >= 1.
        input_index: which input of an ``AttentionMaps`` to read (default 0).

    Returns:
        A list with one entry per query: up to ``k`` tuples, heaviest first, ties to the
        earlier key. Keys with weight 0 (masked) are left out, so a row may list fewer.

    >>> import torch
    >>> A = torch.tensor([[1.0, 0.0, 0.0], [0.3, 0.7, 0.0], [0.5, 0.2, 0.3]], dtype=torch.float64)
    >>> top_attended(A, ["the", "cat", "sat"], k=2)
    [[(0, 'the', 1.0)], [(1, 'cat', 0.7), (0, 'the', 0.3)], [(0, 'the', 0.5), (2, 'sat', 0.3)]]
    """
    view = _resolve("attn", attn, input_index, cast=False)  # cast only the layer read
    t = view.attn
    k = require_int("k", k, minimum=1)
    if t.dim() == 2:
        if layer is not None or head != "mean":
            raise ValueError(
                f"layer and head apply to (layers, heads, Lq, Lk) maps; attn is {describe(t)}, one map. "
                f"Leave them out; got layer={layer!r}, head={head!r}"
            )
        grid = _probabilities("attn", t)
    elif t.dim() == 4:
        if layer is None:
            raise ValueError(f"layer is required for (layers, heads, Lq, Lk) maps; attn is {describe(t)}")
        layers = view.layers or tuple(range(t.shape[0]))
        heads = view.heads or tuple(range(t.shape[1]))
        if isinstance(head, str) and head != "mean":
            raise ValueError(f'head must be a head index or "mean"; got {head!r}')
        at = _position("layer", layer, layers, "layers")
        per_head = _probabilities("attn", t[at], f"layer {layer} (of {describe(t)})")  # (heads, Lq, Lk)
        grid = per_head.mean(0) if head == "mean" else per_head[_position("head", head, heads, "heads")]
    else:
        raise ValueError(f"attn must be (Lq, Lk) or (layers, heads, Lq, Lk); got {describe(t)}")
    if tokens is None:
        tokens = view.keys or [str(j) for j in range(grid.shape[-1])]
    if len(tokens) != grid.shape[-1]:
        raise ValueError(f"tokens must have one entry per key, Lk = {grid.shape[-1]}; got {len(tokens)}")
    weights, keys = torch.sort(grid, dim=-1, descending=True, stable=True)
    return [
        [(j, tokens[j], w) for j, w in zip(row_keys[:k].tolist(), row_weights[:k].tolist()) if w > 0]
        for row_keys, row_weights in zip(keys, weights)
    ]


def rollout(
    attn: Tensor | AttentionMaps, *, input_index: int = 0, every_layer: bool = False, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): how much each token draws on each input token.

    For each layer: average the heads, add the residual path ``0.5 * A + 0.5 * I``,
    renormalise the rows; then multiply from the first layer to the last,
    ``R = A_L ... A_2 A_1``. Row ``i`` of ``R`` is how output ``i`` of the last layer
    mixes the input tokens; rows sum to 1. A fully masked row becomes an identity row.

    Rollout is defined over the whole model: every layer from 0, in order, and every
    head. An ``AttentionMaps`` must hold ``layers == (0, ..., n-1)`` and
    ``heads == (0, ..., h-1)``, and, where the maps know the model's counts
    (``model_layers``, ``model_heads``), all of them, or this raises: capture every layer
    and head, and don't ``select`` a subset. A tensor is taken to hold all of them. (Maps
    without ``model_heads``, such as files saved before it existed, can't tell a leading
    subset of heads, such as ``select(heads=[0, 1])``, from all heads; don't roll one out.)

    Args:
        attn: probabilities (layers, heads, L, L), or an ``AttentionMaps``; Lq == Lk.
        input_index: which input of an ``AttentionMaps`` to read (default 0).
        every_layer: also return the rollout up to each layer: (layers, L, L), whose
            entry ``l`` is ``A_l ... A_1`` and whose last entry is the whole rollout.
        dtype: torch.float64 (default) or torch.float32 (about 3x faster on a CPU for
            thousands of tokens, for pictures).

    Returns:
        (L, L) in ``dtype`` (``every_layer``: (layers, L, L)), rows summing to 1.

    >>> import torch
    >>> A = torch.tensor([[1.0, 0.0], [1.0, 0.0]])[None, None]  # one layer, one head: all on token 0
    >>> rollout(A)
    tensor([[1.0000, 0.0000],
            [0.5000, 0.5000]], dtype=torch.float64)
    """
    view = _resolve("attn", attn, input_index, dims=4, cast=False)
    t = view.attn
    n_layers, n_heads = t.shape[:2]
    if view.layers is not None and view.layers != tuple(range(n_layers)):
        raise ValueError(
            f"rollout needs every layer of the model, from 0 in order; attn holds layers {view.layers}. "
            "Capture all layers, and don't select a subset"
        )
    if view.heads is not None and view.heads != tuple(range(n_heads)):
        raise ValueError(
            f"rollout needs every head of the model, from 0 in order; attn holds heads {view.heads}. "
            "Capture all heads, and don't select a subset"
        )
    for what, held, model in (("layers", n_layers, view.model_layers), ("heads", n_heads, view.model_heads)):
        if model is not None and held != model:
            raise ValueError(f"rollout needs every {what[:-1]} of the model; attn holds {held} of its {model} {what} "
                             f"(model_{what}). Capture all {what}, and don't select a subset")
    if n_layers == 0:
        raise ValueError(f"rollout needs at least one layer; got {describe(t)}")
    length = _require_square("attn", t, "rollout")
    if not isinstance(every_layer, bool):
        raise TypeError(f"every_layer must be a bool; got {describe(every_layer)}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64; got {dtype!r}")
    eye = torch.eye(length, dtype=dtype, device=t.device)
    result, steps = eye, []
    for n, layer in enumerate(t):  # (heads, L, L); layers are 0..n-1 here
        mixed = 0.5 * _probabilities("attn", layer, f"layer {n} (of {describe(t)})").mean(0).to(dtype) + 0.5 * eye
        result = (mixed / mixed.sum(-1, keepdim=True)) @ result
        if every_layer:
            steps.append(result)
    return torch.stack(steps) if every_layer else result


@dataclass(frozen=True)
class _Context:
    """What a role's score may read besides one layer's probabilities."""

    ids: Tensor | None  # (L,) token ids, for the token-built patterns
    visible: Tensor  # (Lq, Lk) bool: keys some head of some layer gives weight to
    key_set: Tensor | None  # (Lk,) bool, for token_set_mass


@dataclass(frozen=True)
class _Role:
    """One head role: its score of a (1, heads, Lq, Lk) float64 layer, the maps it is for
    (``"self"``, ``"cross"``), what it needs (``"token_ids"``, ``"key_set"``) and why it can be
    undefined for every head."""

    score: Callable[[Tensor, _Context], Tensor]
    kinds: tuple[str, ...]
    needs: str | None
    undefined: str


_SELF, _BOTH, _CROSS = ("self",), ("self", "cross"), ("cross",)
# The registry: every role's score, requirements and "why undefined" together, in display order.
_REGISTRY: dict[str, _Role] = {
    "previous_token": _Role(lambda t, c: _share(t, _previous_pattern(t.shape[-1])), _SELF, None,
                            "a single token has no previous token"),
    "duplicate_token": _Role(lambda t, c: _share(t, _earlier_same(c.ids)), _SELF, "token_ids",
                             "no token repeats an earlier one"),
    "induction": _Role(lambda t, c: _share(t, _induction_pattern(c.ids)), _SELF, "token_ids",
                       "no token repeats an earlier one (feed a repeated sequence)"),
    "first_token": _Role(lambda t, c: _share(t, _first_pattern(*t.shape[-2:])), _BOTH, None, "no keys"),
    "mean_distance": _Role(lambda t, c: _distance(t), _SELF, None, "no row has any mass"),
    "normalized_entropy": _Role(lambda t, c: _entropy(t, c.visible), _BOTH, None,
                                "no row may see two or more keys"),
    "top_key": _Role(lambda t, c: _top_key(t), _CROSS, None, "no row has any mass"),
    "monotonicity": _Role(lambda t, c: _monotonicity(t, c.visible.any(-1)), _CROSS, None,
                          "fewer than two query rows"),
    "diagonal": _Role(lambda t, c: _share(t, _diagonal_pattern(*t.shape[-2:])), _CROSS, None,
                      "no row has any mass"),
    "token_set_mass": _Role(lambda t, c: _set_mass(t, c.key_set), _BOTH, "key_set", "no row has any mass"),
}

# The roles head_roles scores by default on self-attention maps (Lq == Lk) ...
ROLES = tuple(name for name, role in _REGISTRY.items() if "self" in role.kinds and role.needs != "key_set")
# ... and on cross-attention maps (queries: target tokens; keys: source tokens).
CROSS_ROLES = tuple(name for name, role in _REGISTRY.items() if "cross" in role.kinds and role.needs != "key_set")


@dataclass(frozen=True, eq=False)
class HeadRoles:
    """Every applicable head-role score of one input, from :func:`head_roles`.

    Attributes:
        scores: role name -> float64 (layers, heads) scores, in :data:`ROLES` order.
        skipped: role name -> why it was not scored (no token ids, Lq != Lk, no repeats).
        layers, heads: the model's layer and head indices on the scores' two axes.
        n_tokens: query rows (Lq) of the input.
        model_name: where the maps came from, if known.
    """

    scores: dict[str, Tensor]
    skipped: dict[str, str]
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    n_tokens: int
    model_name: str | None = None

    def __getitem__(self, role: str) -> Tensor:
        if role in self.scores:
            return self.scores[role]
        if role in self.skipped:
            raise KeyError(f"role {role!r} was skipped: {self.skipped[role]}")
        raise KeyError(f"role must be one of {', '.join(map(repr, _REGISTRY))}; got {role!r}")

    def top(self, role: str, n: int = 5, *, largest: bool = True) -> list[tuple[int, int, float]]:
        """The ``n`` heads with the highest (or, ``largest=False``, lowest) score for ``role``.

        Returns ``(layer, head, score)`` with the model's indices, best first, ties in
        (layer, head) order; NaN scores are left out.
        """
        n = require_int("n", n, minimum=1)
        return _top(self[role], self.layers, self.heads, n, largest)

    def __str__(self) -> str:
        source = f"{self.model_name}: " if self.model_name else ""
        lines = [
            f"HeadRoles({source}{len(self.layers)} layers x {len(self.heads)} heads, {self.n_tokens} tokens)",
            f"{'role':<20}{'mean':>7}  top heads (L.H score)",
        ]
        for role, scores in self.scores.items():
            best = "  ".join(f"L{lay}.H{hd} {s:.3f}" for lay, hd, s in self.top(role, 3))
            lines.append(f"{role:<20}{scores.nanmean().item():>7.3f}  {best}")
        lines.extend(f"skipped {role}: {why}" for role, why in self.skipped.items())
        return "\n".join(lines)


def _top(
    scores: Tensor, layers: tuple[int, ...], heads: tuple[int, ...], n: int, largest: bool
) -> list[tuple[int, int, float]]:
    flat = scores.flatten()
    index = (~flat.isnan()).nonzero().flatten()
    order = torch.sort(flat[index], descending=largest, stable=True).indices[:n]
    width = len(heads)
    return [(layers[i // width], heads[i % width], flat[i].item()) for i in index[order].tolist()]


def head_roles(
    maps_or_tensor: Tensor | AttentionMaps,
    token_ids: Sequence[int] | Tensor | None = None,
    *,
    roles: Iterable[str] | str | None = None,
    key_set: Tensor | Sequence[int] | None = None,
    cross: bool | None = None,
    input_index: int = 0,
) -> HeadRoles:
    """Score every head for every role that applies to this input.

    Self-attention maps get :data:`ROLES`: ``previous_token``, ``duplicate_token``,
    ``induction``, ``first_token`` and ``mean_distance`` are :func:`previous_token_score`,
    :func:`duplicate_token_score`, :func:`induction_score`, :func:`first_token_score` and
    :func:`mean_attention_distance`; ``normalized_entropy`` is :func:`attention_entropy`
    with ``normalized=True``. Cross-attention maps (rows: target tokens, keys: source
    tokens) get :data:`CROSS_ROLES`: ``first_token``, ``normalized_entropy``, ``top_key``
    (:func:`top_key_share`), ``monotonicity`` (:func:`alignment_monotonicity`) and
    ``diagonal`` (:func:`diagonal_score`). With ``key_set``, ``token_set_mass``
    (:func:`token_set_mass`) is added for either kind.

    A map is cross-attention when the maps say so (``key_tokens`` is set), when Lq != Lk,
    or when ``cross=True`` (a square tensor is self-attention otherwise).

    Skipped by default, with the reason in ``.skipped`` and in the printed table:
    ``duplicate_token`` and ``induction`` without token ids; the self-attention-only roles on
    a cross map; any role undefined for every head (one token, no repeats, no keys).
    Asked for by name in ``roles``, a role that does not fit the map's kind, or
    ``token_set_mass`` without a ``key_set``, raises ValueError instead.

    Args:
        maps_or_tensor: probabilities (layers, heads, Lq, Lk), or an ``AttentionMaps``.
        token_ids: (L,) ints; default: the maps' ``token_ids``.
        roles: role names to score (default: all that apply, as above).
        key_set: bool (Lk,) mask (see :func:`token_set`) or key indices, for ``token_set_mass``.
        cross: True or False to say whether a tensor is cross-attention; None (default) decides
            as above.
        input_index: which input of an ``AttentionMaps`` to read (default 0).

    Returns:
        A :class:`HeadRoles`; ``print`` it for a table, ``.top(role)`` for the best heads.

    >>> import torch
    >>> A = torch.ones(2, 2, 5, 5).tril()            # uniform causal heads, except:
    >>> A[0, 1] = torch.eye(5).roll(-1, dims=1).tril()
    >>> A[0, 1, 0, 0] = 1.0                          # L0.H1 looks at the previous token
    >>> A[1, 0] = 0.0
    >>> A[1, 0, :, 0] = 1.0                          # L1.H0 looks at the first token
    >>> roles = head_roles(A / A.sum(-1, keepdim=True))
    >>> roles.top("previous_token", n=1)
    [(0, 1, 1.0)]
    >>> print(roles)
    HeadRoles(2 layers x 2 heads, 5 tokens)
    role                   mean  top heads (L.H score)
    previous_token        0.473  L0.H1 1.000  L0.H0 0.321  L1.H1 0.321
    first_token           0.578  L1.H0 1.000  L0.H0 0.457  L1.H1 0.457
    mean_distance         1.200  L1.H0 2.000  L0.H0 1.000  L1.H1 1.000
    normalized_entropy    0.500  L0.H0 1.000  L1.H1 1.000  L0.H1 0.000
    skipped duplicate_token: no token ids (pass token_ids=)
    skipped induction: no token ids (pass token_ids=)
    >>> diagonal = torch.eye(4)[None, None]           # a cross map that reads the source in order
    >>> head_roles(diagonal, cross=True).scores["monotonicity"]
    tensor([[1.]], dtype=torch.float64)
    """
    view = _resolve("maps_or_tensor", maps_or_tensor, input_index, dims=4, cast=False)
    t = view.attn
    q_len, k_len = t.shape[-2:]
    if cross is not None and not isinstance(cross, bool):
        raise TypeError(f"cross must be None, True or False; got {describe(cross)}")
    if cross is False and (q_len != k_len or view.key_tokens is not None):
        raise ValueError(f"cross=False says self-attention, but the map has Lq = {q_len} queries and Lk = {k_len} "
                         "keys" + (" and key_tokens of its own" if view.key_tokens is not None else ""))
    kind = "cross" if cross or q_len != k_len or view.key_tokens is not None else "self"
    where = (f"this is a cross-attention map (Lq != Lk ({q_len} vs {k_len}), or key_tokens set): queries and keys "
             "are not the same tokens")
    skipped: dict[str, str] = {}
    if roles is None:
        names = list(ROLES if kind == "self" else CROSS_ROLES) + (["token_set_mass"] if key_set is not None else [])
        skipped.update({r: f"self-attention only; {where}" for r in ROLES if kind == "cross" and r not in names})
    else:
        names = [roles] if isinstance(roles, str) else list(roles)
        for name in names:
            if name not in _REGISTRY:
                raise ValueError(f"roles must name roles among {', '.join(map(repr, _REGISTRY))}; got {name!r}")
            if kind not in _REGISTRY[name].kinds:
                raise ValueError(f"role {name!r} is defined for {' and '.join(_REGISTRY[name].kinds)}-attention maps "
                                 f"only, and {where if kind == 'cross' else 'this is a self-attention map'}; "
                                 f"roles for this map: {', '.join(r for r, x in _REGISTRY.items() if kind in x.kinds)}")
            if _REGISTRY[name].needs == "key_set" and key_set is None:
                raise ValueError(f"role {name!r} needs key_set= (a bool (Lk,) mask or key indices); got None")
    ids = None
    if any(_REGISTRY[n].needs == "token_ids" for n in names) and (token_ids is not None or view.token_ids is not None):
        ids = _ids(view, token_ids, k_len, "head_roles")
    wanted = []
    for name in names:
        if _REGISTRY[name].needs == "token_ids" and ids is None:
            skipped[name] = "no token ids (pass token_ids=)"
        else:
            wanted.append(name)
    context = _Context(ids=ids, visible=_visible_all(t),
                       key_set=None if key_set is None else _key_mask(key_set, k_len))
    # One layer at a time in float64: a 2,000-token input's 72 heads would be 2.3 GB at once.
    per_layer: dict[str, list[Tensor]] = {name: [] for name in wanted}
    for n, layer in enumerate(t):
        label = view.layers[n] if view.layers else n
        layer = _probabilities("maps_or_tensor", layer[None], f"layer {label} (of {describe(t)})")
        for name in wanted:
            per_layer[name].append(_REGISTRY[name].score(layer, context))
    scores: dict[str, Tensor] = {}
    for name, parts in per_layer.items():
        value = torch.cat(parts) if parts else torch.zeros(0, t.shape[1], dtype=torch.float64)
        if bool(value.isnan().all()):
            skipped[name] = _REGISTRY[name].undefined
        else:
            scores[name] = value
    return HeadRoles(
        scores=scores,
        skipped={name: skipped[name] for name in _REGISTRY if name in skipped},
        layers=view.layers or tuple(range(t.shape[0])),
        heads=view.heads or tuple(range(t.shape[1])),
        n_tokens=q_len,
        model_name=view.model_name,
    )


def _visible_all(t: Tensor) -> Tensor:
    """:func:`_visible` over every layer, one layer at a time."""
    seen = torch.zeros(t.shape[-2:], dtype=torch.bool, device=t.device)
    for layer in t:
        seen |= _visible(layer)
    return seen
