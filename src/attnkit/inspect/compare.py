"""Compare two models' attention on the same input: which heads changed, and where mass moved.

The typical use is a model before and after fine-tuning, run on the same text: per head,
the Jensen–Shannon divergence between the two models' attention rows, and, for a set of
key tokens (stop words, domain terms), how much of each head's attention moved onto or
off them.

>>> import torch
>>> from attnkit.inspect.compare import compare
>>> before = torch.full((1, 2, 3, 3), 1 / 3, dtype=torch.float64)    # 1 layer, 2 heads, uniform
>>> after = before.clone()
>>> after[0, 1, :, 0], after[0, 1, :, 1:] = 1.0, 0.0                # head 1 now looks at token 0 only
>>> result = compare(before, after, key_set=[0])
>>> result.most_changed(n=1)                                       # (log2(3/2) + 1/3) / 2 bits
[(0, 1, 0.4591...)]
>>> result.mass_shift                                              # 1/3 of head 1's attention was on token 0, now all
tensor([[0.0000, 0.6667]], dtype=torch.float64)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attnkit._checks import describe, require_int, require_tensor
from attnkit.inspect._patterns import set_mass
from attnkit.inspect._views import View, key_mask, resolve, top_heads

if TYPE_CHECKING:
    from attnkit.inspect.maps import AttentionMaps

__all__ = ["Comparison", "compare", "jensen_shannon"]


def jensen_shannon(p: Tensor, q: Tensor) -> Tensor:
    """Jensen–Shannon divergence between matching rows of ``p`` and ``q``, in bits.

    ``JS = KL(p || m) / 2 + KL(q || m) / 2`` with ``m = (p + q) / 2``, base 2, so it lies
    in [0, 1]: 0 for identical rows, 1 for rows with disjoint support. Symmetric. Each
    row is first divided by its sum; ``0 log 0 = 0``, so a key that one row gives weight
    and the other doesn't is fine. Computed in float64, clamped to [0, 1] against rounding.

    Args:
        p, q: non-negative weights (..., L), the same shape.

    Returns:
        float64 (...); NaN for a row that sums to 0 in ``p`` or in ``q`` (a fully masked row).

    >>> import torch
    >>> jensen_shannon(torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([[0.0, 1.0], [0.5, 0.5]]))
    tensor([1., 0.], dtype=torch.float64)
    """
    require_tensor("p", p)
    require_tensor("q", q)
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape; got {describe(p)} and {describe(q)}")
    if p.dim() == 0:
        raise ValueError(f"p and q must be at least 1-D, (..., L); got {describe(p)}")
    p, q = p.detach().to(torch.float64), q.detach().to(torch.float64)
    total_p, total_q = p.sum(-1, keepdim=True), q.sum(-1, keepdim=True)
    p = p / total_p.where(total_p > 0, 1.0)
    q = q / total_q.where(total_q > 0, 1.0)
    m = 0.5 * (p + q)
    safe_m = m.where(m > 0, 1.0)  # m == 0 only where p == q == 0, and xlogy(0, 0) = 0
    js = (torch.xlogy(p, p / safe_m).sum(-1) + torch.xlogy(q, q / safe_m).sum(-1)) / (2 * math.log(2))
    defined = (total_p > 0).squeeze(-1) & (total_q > 0).squeeze(-1)
    return js.clamp(0.0, 1.0).where(defined, math.nan)


@dataclass(frozen=True, eq=False)
class Comparison:
    """How two models' attention to the same input differs, per head, from :func:`compare`.

    Attributes:
        js: float64 (layers, heads), the Jensen–Shannon divergence in bits, in [0, 1],
            averaged over the query rows (rows fully masked in either map left out).
        layers, heads: the model's layer and head indices on the two axes.
        n_rows: query rows (Lq) of the input.
        mass_a, mass_b: float64 (layers, heads) share of attention on ``key_set``
            (:func:`attnkit.inspect.roles.token_set_mass`), or None without a key set.
        names: what the two maps are called (their model names, else "a" and "b").
    """

    js: Tensor
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    n_rows: int
    mass_a: Tensor | None = None
    mass_b: Tensor | None = None
    names: tuple[str, str] = ("a", "b")

    @property
    def mass_shift(self) -> Tensor | None:
        """``mass_b - mass_a`` per head: > 0 where ``b`` looks at the key set more; None without one."""
        if self.mass_a is None or self.mass_b is None:
            return None
        return self.mass_b - self.mass_a

    def most_changed(self, n: int = 5) -> list[tuple[int, int, float]]:
        """The ``n`` heads with the largest divergence: ``(layer, head, js)``, model indices, largest first."""
        n = require_int("n", n, minimum=1)
        return top_heads(self.js, self.layers, self.heads, n, largest=True)

    def __str__(self) -> str:
        masses = None if self.mass_a is None or self.mass_b is None else (self.mass_a, self.mass_b)
        a, b = self.names
        header = f"{'layer':>5}  {'mean js':>7}  {'max js (head)':>13}"
        if masses is not None:
            header += f"  {'mass a':>6}  {'mass b':>6}  {'shift':>6}"
        lines = [
            f"Comparison({a} vs {b}: {len(self.layers)} layers x {len(self.heads)} heads, {self.n_rows} query rows)",
            "Jensen-Shannon divergence in bits (0 = same rows, 1 = disjoint)"
            + ("; key-set mass averaged over heads" if masses is not None else ""),
            header,
        ]
        for row, layer in enumerate(self.layers):
            worst = top_heads(self.js[row], (layer,), self.heads, 1, largest=True)
            line = f"{layer:>5}  {self.js[row].nanmean().item():>7.3f}  "
            line += f"{worst[0][2]:>6.3f} ({worst[0][1]})".rjust(13) if worst else f"{'nan':>13}"
            if masses is not None:
                mass_a, mass_b = masses[0][row], masses[1][row]
                line += f"  {mass_a.nanmean().item():>6.3f}  {mass_b.nanmean().item():>6.3f}"
                line += f"  {(mass_b - mass_a).nanmean().item():>+6.3f}"
            lines.append(line)
        top = "  ".join(f"L{layer}.H{head} {js:.3f}" for layer, head, js in self.most_changed(3))
        lines.append(f"most changed: {top}")
        return "\n".join(lines)


def _check_same(a: View, b: View, input_index: int) -> None:
    for what, have_a, have_b in (("layers", a.layers, b.layers), ("heads", a.heads, b.heads)):
        if have_a is not None and have_b is not None and have_a != have_b:
            raise ValueError(
                f"maps_a and maps_b must hold the same {what}; got {have_a} and {have_b}. Capture or select the same"
            )
    for what, count_a, count_b in (("model_layers", a.model_layers, b.model_layers),
                                   ("model_heads", a.model_heads, b.model_heads)):
        if count_a is not None and count_b is not None and count_a != count_b:
            raise ValueError(f"maps_a and maps_b must come from models of the same shape; {what} is {count_a} and "
                             f"{count_b}")
    if a.attn.shape != b.attn.shape:
        raise ValueError(
            "maps_a and maps_b must have the same shape (layers, heads, Lq, Lk); got "
            f"{tuple(a.attn.shape)} and {tuple(b.attn.shape)}"
        )
    for what, seq_a, seq_b in (("tokens", a.tokens, b.tokens), ("token ids", a.token_ids, b.token_ids),
                               ("key tokens", a.key_tokens, b.key_tokens)):
        if seq_a is None or seq_b is None:
            continue
        seq_a, seq_b = _as_list(seq_a), _as_list(seq_b)
        if seq_a != seq_b:
            at = next((i for i, (x, y) in enumerate(zip(seq_a, seq_b)) if x != y), min(len(seq_a), len(seq_b)))
            shown = (seq_a[at] if at < len(seq_a) else "end", seq_b[at] if at < len(seq_b) else "end")
            raise ValueError(
                f"maps_a and maps_b must hold the same {what} for input {input_index}; they first differ at "
                f"position {at}: {shown[0]!r} vs {shown[1]!r}. Run both models on the same text, with the same "
                "tokenizer"
            )


def _as_list(seq: Sequence | Tensor) -> list:
    return seq.tolist() if isinstance(seq, Tensor) else list(seq)


def compare(
    maps_a: Tensor | AttentionMaps,
    maps_b: Tensor | AttentionMaps,
    *,
    key_set: Tensor | Sequence[int] | None = None,
    input_index: int = 0,
) -> Comparison:
    """Per-head difference between two models' attention on the same input.

    Args:
        maps_a, maps_b: probabilities (layers, heads, Lq, Lk), or ``AttentionMaps``
            (of which input ``input_index`` is read), e.g. before and after fine-tuning.
            Shapes must match; where both carry them, so must tokens, token ids, layers
            and heads.
        key_set: bool (Lk,) mask (see :func:`attnkit.inspect.roles.token_set`) or key
            indices; adds ``mass_a``, ``mass_b`` and ``mass_shift``.
        input_index: which input of ``AttentionMaps`` to read (default 0).

    Returns:
        A :class:`Comparison`. ``js`` is the mean over query rows of
        :func:`jensen_shannon`; a row fully masked in either map is left out, and a head
        with no row left is NaN.

    >>> import torch
    >>> a = torch.eye(3, dtype=torch.float64).expand(2, 1, 3, 3)    # 2 layers, 1 head: each token on itself
    >>> b = a.clone()
    >>> b[1, 0] = torch.eye(3, dtype=torch.float64).roll(1, dims=1)  # layer 1 now looks elsewhere
    >>> print(compare(a, b, key_set=torch.tensor([True, False, False])))
    Comparison(a vs b: 2 layers x 1 heads, 3 query rows)
    Jensen-Shannon divergence in bits (0 = same rows, 1 = disjoint); key-set mass averaged over heads
    layer  mean js  max js (head)  mass a  mass b   shift
        0    0.000      0.000 (0)   0.333   0.333  +0.000
        1    1.000      1.000 (0)   0.333   0.333  +0.000
    most changed: L1.H0 1.000  L0.H0 0.000
    """
    a = resolve("maps_a", maps_a, input_index, dims=4)
    b = resolve("maps_b", maps_b, input_index, dims=4)
    _check_same(a, b, input_index)
    js = jensen_shannon(a.attn, b.attn).nanmean(-1)  # (layers, heads, Lq) -> (layers, heads)
    mass_a = mass_b = None
    if key_set is not None:
        mask = key_mask(key_set, a.attn.shape[-1])
        mass_a, mass_b = set_mass(a.attn, mask), set_mass(b.attn, mask)
    return Comparison(
        js=js,
        layers=a.layers or b.layers or tuple(range(js.shape[0])),
        heads=a.heads or b.heads or tuple(range(js.shape[1])),
        n_rows=a.attn.shape[-2],
        mass_a=mass_a,
        mass_b=mass_b,
        names=(a.model_name or "a", b.model_name or "b"),
    )
