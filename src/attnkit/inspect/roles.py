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

Where things live: this module holds the public scores and :func:`head_roles`, whose
``_REGISTRY`` keeps each role's score, the maps it applies to, what it needs and why it can be
undefined together. Reading the input is :mod:`attnkit.inspect._views`, the pattern kernels
:mod:`attnkit.inspect._patterns`, token sets :mod:`attnkit.inspect._token_sets` and rollout
:mod:`attnkit.inspect._rollout`; their public functions are re-exported here.

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

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attnkit._checks import describe, require_int, require_real, require_tensor
from attnkit.inspect._patterns import (
    diagonal_pattern,
    distance,
    earlier_same,
    entropy,
    first_pattern,
    induction_pattern,
    monotonicity,
    previous_pattern,
    set_mass,
    share,
    top_key,
    visible,
    visible_all,
)
from attnkit.inspect._rollout import rollout
from attnkit.inspect._token_sets import STOP_WORDS, token_set, token_set_mass
from attnkit.inspect._views import (
    key_mask,
    position,
    probabilities,
    require_square,
    resolve,
    token_ids_of,
    top_heads,
)

if TYPE_CHECKING:
    from attnkit.inspect.maps import AttentionMaps

__all__ = [
    "CROSS_ROLES",
    "MIN_EVIDENCE",
    "ROLES",
    "STOP_WORDS",
    "ColumnHeads",
    "HeadRoles",
    "Specificity",
    "alignment_monotonicity",
    "attention_entropy",
    "column_heads",
    "column_mean",
    "diagonal_score",
    "duplicate_token_score",
    "first_token_score",
    "head_roles",
    "induction_score",
    "mean_attention_distance",
    "pattern_score",
    "previous_token_score",
    "rollout",
    "specificity",
    "token_set",
    "token_set_mass",
    "top_attended",
    "top_key_share",
]


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
    view = resolve("attn", attn, input_index)
    require_tensor("pattern", pattern)
    if pattern.dtype != torch.bool:
        raise TypeError(f"pattern must be a bool tensor (True = key in the pattern); got {describe(pattern)}")
    if tuple(pattern.shape) != tuple(view.attn.shape[-2:]):
        raise ValueError(
            f"pattern must be (Lq, Lk) = {tuple(view.attn.shape[-2:])} to match attn; got {describe(pattern)}"
        )
    return share(view.attn, pattern)


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
    view = resolve("attn", attn, input_index)
    length = require_square("attn", view.attn, "previous_token_score")
    return share(view.attn, previous_pattern(length))


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
    view = resolve("attn", attn, input_index)
    length = require_square("attn", view.attn, "duplicate_token_score")
    ids = token_ids_of(view, token_ids, length, "duplicate_token_score")
    return share(view.attn, earlier_same(ids))


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
    view = resolve("attn", attn, input_index)
    length = require_square("attn", view.attn, "induction_score")
    ids = token_ids_of(view, token_ids, length, "induction_score")
    return share(view.attn, induction_pattern(ids))


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
    view = resolve("attn", attn, input_index)
    return share(view.attn, first_pattern(*view.attn.shape[-2:]))


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
    view = resolve("attn", attn, input_index)
    require_square("attn", view.attn, "mean_attention_distance")
    return distance(view.attn)


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
    view = resolve("attn", attn, input_index)
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
        allowed = visible(view.attn)
    return entropy(view.attn, allowed)


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
    view = resolve("attn", attn, input_index)
    return share(view.attn, diagonal_pattern(*view.attn.shape[-2:]))


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
    view = resolve("attn", attn, input_index)
    return monotonicity(view.attn, visible(view.attn).any(-1))


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
    view = resolve("attn", attn, input_index)
    return top_key(view.attn)


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
    view = resolve("attn", attn, input_index, cast=False)  # cast only the layer read
    t = view.attn
    k = require_int("k", k, minimum=1)
    if t.dim() == 2:
        if layer is not None or head != "mean":
            raise ValueError(
                f"layer and head apply to (layers, heads, Lq, Lk) maps; attn is {describe(t)}, one map. "
                f"Leave them out; got layer={layer!r}, head={head!r}"
            )
        grid = probabilities("attn", t)
    elif t.dim() == 4:
        if layer is None:
            raise ValueError(f"layer is required for (layers, heads, Lq, Lk) maps; attn is {describe(t)}")
        layers = view.layers or tuple(range(t.shape[0]))
        heads = view.heads or tuple(range(t.shape[1]))
        if isinstance(head, str) and head != "mean":
            raise ValueError(f'head must be a head index or "mean"; got {head!r}')
        at = position("layer", layer, layers, "layers")
        per_head = probabilities("attn", t[at], f"layer {layer} (of {describe(t)})")  # (heads, Lq, Lk)
        grid = per_head.mean(0) if head == "mean" else per_head[position("head", head, heads, "heads")]
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


@dataclass(frozen=True)
class Specificity:
    """How much more one query attends to each key than the average query does, from :func:`specificity`.

    Attributes:
        query: the query row read.
        weight: float64 (..., Lk), ``A[..., query, j]``.
        column_mean: float64 (..., Lk), the mean of column ``j`` over the query rows that have
            any mass (a fully masked row drops out): the weight the average query gives key ``j``.
    """

    query: int
    weight: Tensor
    column_mean: Tensor

    @property
    def difference(self) -> Tensor:
        """``weight - column_mean``: the mass this query gives a key beyond the average query."""
        return self.weight - self.column_mean

    @property
    def ratio(self) -> Tensor:
        """``weight / column_mean``; NaN where the column mean is 0 (no query looks at the key)."""
        return self.weight / self.column_mean.where(self.column_mean > 0, torch.nan)


def column_mean(attn: Tensor | AttentionMaps, *, input_index: int = 0) -> Tensor:
    """The weight the average query gives each key: ``mean_i A[..., i, j]`` over the query rows
    that have any mass (a fully masked row drops out; all rows masked gives 0).

    Args:
        attn: probabilities (..., Lq, Lk), or an ``AttentionMaps``.
        input_index: which input of an ``AttentionMaps`` to read (default 0).

    Returns:
        float64 (..., Lk). Works for Lq != Lk.

    >>> import torch
    >>> column_mean(torch.tensor([[0.1, 0.9], [0.1, 0.9], [0.0, 0.0]]))  # the masked row drops out
    tensor([0.1000, 0.9000], dtype=torch.float64)
    """
    t = resolve("attn", attn, input_index).attn
    has_mass = t.sum(-1, keepdim=True) > 0  # (..., Lq, 1)
    return t.sum(-2) / has_mass.sum(-2).clamp(min=1)


def specificity(attn: Tensor | AttentionMaps, query: int, *, input_index: int = 0) -> Specificity:
    """Query ``query``'s weight on every key against that key's column mean over the queries.

    A head where every query looks at "cat" puts a large weight from "it" on "cat" too; that
    says nothing about "it". Specificity separates the two: the weight ``A[query, j]`` beside
    ``mean_i A[i, j]``, the weight the average query gives key ``j`` (:func:`column_mean`:
    ``query`` included, rows with no mass left out). Their difference is the mass ``query`` adds, their ratio how
    many times the average it gives. Works for Lq != Lk.

    Args:
        attn: probabilities (..., Lq, Lk), or an ``AttentionMaps``.
        query: the query row, in [0, Lq).
        input_index: which input of an ``AttentionMaps`` to read (default 0).

    Returns:
        A :class:`Specificity` with ``weight`` and ``column_mean`` (..., Lk), and their
        ``difference`` and ``ratio``.

    >>> import torch
    >>> A = torch.tensor([[0.1, 0.9], [0.1, 0.9], [0.7, 0.3]])  # every row but the last looks at key 1
    >>> s = specificity(A, 2)
    >>> s.weight, s.column_mean
    (tensor([0.7000, 0.3000], dtype=torch.float64), tensor([0.3000, 0.7000], dtype=torch.float64))
    >>> s.ratio
    tensor([2.3333, 0.4286], dtype=torch.float64)
    """
    view = resolve("attn", attn, input_index)
    q_len = view.attn.shape[-2]
    query = require_int("query", query, minimum=0)
    if query >= q_len:
        raise ValueError(f"query must be a query row in [0, {q_len}); got {query}")
    return Specificity(query, view.attn[..., query, :], column_mean(view.attn))


@dataclass(frozen=True)
class ColumnHeads:
    """Heads where most queries put most of their weight on one key, from :func:`column_heads`.

    Attributes:
        key: long (...), per head the key that the most query rows give at least ``share``
            of their weight (the first such key on ties; the row's top key otherwise).
        fraction: float64 (...), the fraction of the query rows with mass that do so.
        share: the weight a row must give the key to count (default 0.5, "most of it").
    """

    key: Tensor
    fraction: Tensor
    share: float

    @property
    def flagged(self) -> Tensor:
        """bool (...): more than half the rows put ``share`` or more on the one key: a column head."""
        return self.fraction > 0.5


def column_heads(attn: Tensor | AttentionMaps, *, share: float = 0.5, input_index: int = 0) -> ColumnHeads:
    """Find column heads: heads whose queries mostly look at one and the same key, whatever they are.

    Per row, the top key counts when it holds at least ``share`` of the row's weight; per head,
    the key counted by the most rows and the fraction of rows (with any mass) that counted it.
    A head is flagged when that fraction is over 0.5. An attention sink ([CLS], [SEP]) is a
    column head, and so is a head that sends every token to "cat": its weight from "it" to
    "cat" says nothing about "it" (see :func:`specificity`). Works for Lq != Lk.

    Args:
        attn: probabilities (..., Lq, Lk), or an ``AttentionMaps``.
        share: the part of a row's weight its top key must hold, in (0, 1] (default 0.5).
        input_index: which input of an ``AttentionMaps`` to read (default 0).

    Returns:
        A :class:`ColumnHeads`; ``.flagged`` marks the column heads.

    >>> import torch
    >>> A = torch.tensor([[0.8, 0.2, 0.0], [0.6, 0.1, 0.3], [0.2, 0.2, 0.6]])
    >>> found = column_heads(A)                 # rows 0 and 1 put most of their weight on key 0
    >>> found.key, found.fraction, found.flagged
    (tensor(0), tensor(0.6667, dtype=torch.float64), tensor(True))
    """
    view = resolve("attn", attn, input_index)
    share = require_real("share", share)
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], the part of a row's weight on its top key; got {share}")
    t = view.attn
    total = t.sum(-1)  # (..., Lq)
    top_weight, top = t.max(-1)
    counted = (top_weight >= share * total) & (total > 0)
    votes = torch.zeros(*t.shape[:-2], t.shape[-1], dtype=torch.float64)
    votes.scatter_add_(-1, top, counted.to(torch.float64))
    most, key = votes.max(-1)
    rows = (total > 0).sum(-1).clamp(min=1)
    return ColumnHeads(key, most / rows, float(share))


@dataclass(frozen=True)
class _Context:
    """What a role's score may read besides one layer's probabilities."""

    ids: Tensor | None  # (L,) token ids, for the token-built patterns
    visible: Tensor  # (Lq, Lk) bool: keys some head of some layer gives weight to
    key_set: Tensor | None  # (Lk,) bool, for token_set_mass

    def token_ids(self) -> Tensor:
        """``ids``, for a role that needs ``"token_ids"``: head_roles skips those roles when it has none."""
        assert self.ids is not None, "a role that needs token ids was scored without them"
        return self.ids

    def keys_in_set(self) -> Tensor:
        """``key_set``, for a role that needs ``"key_set"``: head_roles refuses those roles without one."""
        assert self.key_set is not None, "a role that needs a key set was scored without one"
        return self.key_set


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
    "previous_token": _Role(lambda t, c: share(t, previous_pattern(t.shape[-1])), _SELF, None,
                            "a single token has no previous token"),
    "duplicate_token": _Role(lambda t, c: share(t, earlier_same(c.token_ids())), _SELF, "token_ids",
                             "no token repeats an earlier one"),
    "induction": _Role(lambda t, c: share(t, induction_pattern(c.token_ids())), _SELF, "token_ids",
                       "no token repeats an earlier one (feed a repeated sequence)"),
    "first_token": _Role(lambda t, c: share(t, first_pattern(*t.shape[-2:])), _BOTH, None, "no keys"),
    "mean_distance": _Role(lambda t, c: distance(t), _SELF, None, "no row has any mass"),
    "normalized_entropy": _Role(lambda t, c: entropy(t, c.visible), _BOTH, None,
                                "no row may see two or more keys"),
    "top_key": _Role(lambda t, c: top_key(t), _CROSS, None, "no row has any mass"),
    "monotonicity": _Role(lambda t, c: monotonicity(t, c.visible.any(-1)), _CROSS, None,
                          "fewer than two query rows"),
    "diagonal": _Role(lambda t, c: share(t, diagonal_pattern(*t.shape[-2:])), _CROSS, None,
                      "no row has any mass"),
    "token_set_mass": _Role(lambda t, c: set_mass(t, c.keys_in_set()), _BOTH, "key_set", "no row has any mass"),
}

# The repeated tokens below which head_roles calls duplicate_token and induction "not enough evidence".
MIN_EVIDENCE = 5

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
        evidence: role name -> how many query rows its score rests on: for ``duplicate_token``
            and ``induction`` the repeated tokens (rows whose token occurred earlier), for the
            rest the rows that see a key (``previous_token``: less the first). Scored and
            skipped roles alike, where it could be counted.
        min_evidence: the repeated tokens below which ``duplicate_token`` and ``induction``
            were skipped ("not enough evidence").
    """

    scores: dict[str, Tensor]
    skipped: dict[str, str]
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    n_tokens: int
    model_name: str | None = None
    evidence: dict[str, int] = field(default_factory=dict)
    min_evidence: int = 1

    def evidence_text(self, role: str) -> str:
        """``role``'s evidence in words, e.g. ``"1 repeated token"`` or ``"13 query rows"``; "" if not counted."""
        if role not in self.evidence:
            return ""
        n = self.evidence[role]
        unit = "repeated token" if _REGISTRY[role].needs == "token_ids" else "query row"
        return f"{n} {unit}{'' if n == 1 else 's'}"

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
        return top_heads(self[role], self.layers, self.heads, n, largest)

    def __str__(self) -> str:
        source = f"{self.model_name}: " if self.model_name else ""
        lines = [
            f"HeadRoles({source}{len(self.layers)} layers x {len(self.heads)} heads, {self.n_tokens} tokens)",
            f"{'role':<20}{'mean':>7}{'rows':>6}  top heads (L.H score)",
        ]
        for role, scores in self.scores.items():
            best = "  ".join(f"L{lay}.H{hd} {s:.3f}" for lay, hd, s in self.top(role, 3))
            lines.append(f"{role:<20}{scores.nanmean().item():>7.3f}{self.evidence.get(role, ''):>6}  {best}")
        lines.extend(f"skipped {role}: {why}" for role, why in self.skipped.items())
        return "\n".join(lines)


def _cross_note(q_len: int, k_len: int) -> str:
    return (f"this is a cross-attention map (Lq != Lk ({q_len} vs {k_len}), or key_tokens set): queries and keys "
            "are not the same tokens")


def _map_kind(cross: object, q_len: int, k_len: int, own_keys: bool) -> str:
    """``"self"`` or ``"cross"``: what ``cross`` says, else Lq != Lk or keys of their own make a cross map."""
    if cross is not None and not isinstance(cross, bool):
        raise TypeError(f"cross must be None, True or False; got {describe(cross)}")
    if cross is False and (q_len != k_len or own_keys):
        raise ValueError(f"cross=False says self-attention, but the map has Lq = {q_len} queries and Lk = {k_len} "
                         "keys" + (" and key_tokens of its own" if own_keys else ""))
    return "cross" if cross or q_len != k_len or own_keys else "self"


def _role_names(roles: Iterable[str] | str | None, kind: str, has_key_set: bool, q_len: int,
                k_len: int) -> tuple[list[str], dict[str, str]]:
    """The roles to score (all that apply by default, else those named, checked) and those skipped, with why."""
    where = _cross_note(q_len, k_len)
    skipped: dict[str, str] = {}
    if roles is None:
        names = list(ROLES if kind == "self" else CROSS_ROLES) + (["token_set_mass"] if has_key_set else [])
        skipped.update({r: f"self-attention only; {where}" for r in ROLES if kind == "cross" and r not in names})
        return names, skipped
    names = [roles] if isinstance(roles, str) else list(roles)
    for name in names:
        if name not in _REGISTRY:
            raise ValueError(f"roles must name roles among {', '.join(map(repr, _REGISTRY))}; got {name!r}")
        if kind not in _REGISTRY[name].kinds:
            raise ValueError(f"role {name!r} is defined for {' and '.join(_REGISTRY[name].kinds)}-attention maps "
                             f"only, and {where if kind == 'cross' else 'this is a self-attention map'}; "
                             f"roles for this map: {', '.join(r for r, x in _REGISTRY.items() if kind in x.kinds)}")
        if _REGISTRY[name].needs == "key_set" and not has_key_set:
            raise ValueError(f"role {name!r} needs key_set= (a bool (Lk,) mask or key indices); got None")
    return names, skipped


def _score_layers(t: Tensor, layers: Sequence[int] | None, wanted: list[str], context: _Context,
                  skipped: dict[str, str]) -> dict[str, Tensor]:
    """Each wanted role's (layers, heads) float64 scores, one layer at a time (a 2,000-token input's 72 heads
    would be 2.3 GB at once); a role undefined for every head goes to ``skipped`` instead."""
    per_layer: dict[str, list[Tensor]] = {name: [] for name in wanted}
    for n, layer in enumerate(t):
        label = layers[n] if layers else n
        layer = probabilities("maps_or_tensor", layer[None], f"layer {label} (of {describe(t)})")
        for name in wanted:
            per_layer[name].append(_REGISTRY[name].score(layer, context))
    scores: dict[str, Tensor] = {}
    for name, parts in per_layer.items():
        value = torch.cat(parts) if parts else torch.zeros(0, t.shape[1], dtype=torch.float64)
        if bool(value.isnan().all()):
            skipped[name] = _REGISTRY[name].undefined
        else:
            scores[name] = value
    return scores


def head_roles(
    maps_or_tensor: Tensor | AttentionMaps,
    token_ids: Sequence[int] | Tensor | None = None,
    *,
    roles: Iterable[str] | str | None = None,
    key_set: Tensor | Sequence[int] | None = None,
    cross: bool | None = None,
    min_evidence: int = MIN_EVIDENCE,
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
    ``duplicate_token`` and ``induction`` rest on the query rows whose token occurred earlier:
    with fewer than ``min_evidence`` such repeated tokens they are skipped as "not enough
    evidence" (a sentence whose one repeated word is "the" scores induction on one row). The
    standard probe is a sequence of random tokens repeated (Olsson et al. 2022;
    ``attnkit explain --probe induction``). ``.evidence`` holds every role's count.
    Asked for by name in ``roles``, a role that does not fit the map's kind, or
    ``token_set_mass`` without a ``key_set``, raises ValueError instead.

    Args:
        maps_or_tensor: probabilities (layers, heads, Lq, Lk), or an ``AttentionMaps``.
        token_ids: (L,) ints; default: the maps' ``token_ids``.
        roles: role names to score (default: all that apply, as above).
        key_set: bool (Lk,) mask (see :func:`token_set`) or key indices, for ``token_set_mass``.
        cross: True or False to say whether a tensor is cross-attention; None (default) decides
            as above.
        min_evidence: repeated tokens ``duplicate_token`` and ``induction`` need (default
            :data:`MIN_EVIDENCE`, 5), >= 1.
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
    role                   mean  rows  top heads (L.H score)
    previous_token        0.473     4  L0.H1 1.000  L0.H0 0.321  L1.H1 0.321
    first_token           0.578     5  L1.H0 1.000  L0.H0 0.457  L1.H1 0.457
    mean_distance         1.200     5  L1.H0 2.000  L0.H0 1.000  L1.H1 1.000
    normalized_entropy    0.500     4  L0.H0 1.000  L1.H1 1.000  L0.H1 0.000
    skipped duplicate_token: no token ids (pass token_ids=)
    skipped induction: no token ids (pass token_ids=)
    >>> diagonal = torch.eye(4)[None, None]           # a cross map that reads the source in order
    >>> head_roles(diagonal, cross=True).scores["monotonicity"]
    tensor([[1.]], dtype=torch.float64)
    """
    view = resolve("maps_or_tensor", maps_or_tensor, input_index, dims=4, cast=False)
    min_evidence = require_int("min_evidence", min_evidence, minimum=1)
    t = view.attn
    q_len, k_len = t.shape[-2:]
    kind = _map_kind(cross, q_len, k_len, view.key_tokens is not None)
    names, skipped = _role_names(roles, kind, key_set is not None, q_len, k_len)
    ids = None
    if any(_REGISTRY[n].needs == "token_ids" for n in names) and (token_ids is not None or view.token_ids is not None):
        ids = token_ids_of(view, token_ids, k_len, "head_roles")
    wanted = []
    for name in names:
        if _REGISTRY[name].needs == "token_ids" and ids is None:
            skipped[name] = "no token ids (pass token_ids=)"
        else:
            wanted.append(name)
    context = _Context(ids=ids, visible=visible_all(t),
                       key_set=None if key_set is None else key_mask(key_set, k_len))
    evidence = {name: _evidence(name, context) for name in names
                if _REGISTRY[name].needs != "token_ids" or ids is not None}
    for name in list(wanted):
        if _REGISTRY[name].needs == "token_ids" and 0 < evidence[name] < min_evidence:
            wanted.remove(name)
            skipped[name] = (f"not enough evidence: {evidence[name]} repeated token"
                             f"{'' if evidence[name] == 1 else 's'}, at least {min_evidence} needed (the standard "
                             "probe is a sequence of random tokens repeated: attnkit explain --probe " + name + ")")
    scores = _score_layers(t, view.layers, wanted, context, skipped)
    return HeadRoles(
        scores=scores,
        skipped={name: skipped[name] for name in _REGISTRY if name in skipped},
        layers=view.layers or tuple(range(t.shape[0])),
        heads=view.heads or tuple(range(t.shape[1])),
        n_tokens=q_len,
        model_name=view.model_name,
        evidence=evidence,
        min_evidence=min_evidence,
    )


def _evidence(name: str, context: _Context) -> int:
    """The query rows role ``name``'s score rests on (see :attr:`HeadRoles.evidence`)."""
    if _REGISTRY[name].needs == "token_ids":
        return int(earlier_same(context.token_ids()).any(-1).sum())
    if name == "normalized_entropy":  # a row with one key has no choice to make
        return int((context.visible.sum(-1) >= 2).sum())
    rows = int(context.visible.any(-1).sum())
    return rows - 1 if name == "previous_token" else rows
