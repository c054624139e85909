"""The log-sum-exp merge of partial attention results, shared by the tiled backend and ring attention."""

from __future__ import annotations

import torch
from torch import Tensor

_NEG_INF = float("-inf")


def lse_merge(out: Tensor | None, lse: Tensor | None, o: Tensor, lse_o: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two normalised partial results (out (..., Dv), lse (...)) by their log-sum-exp.

    ``out`` (or ``lse``) None starts an accumulation. Rows with ``lse = -inf`` on both sides stay zero.
    """
    if out is None or lse is None:
        return o, lse_o
    new = torch.logaddexp(lse, lse_o)
    safe = torch.where(new == _NEG_INF, 0.0, new)
    return out * torch.exp(lse - safe).unsqueeze(-1) + o.to(out.dtype) * torch.exp(lse_o - safe).unsqueeze(-1), new
