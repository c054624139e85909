"""Hugging Face transformers models on :func:`attnkit.attention`: ``attn_implementation="attnkit"``.

Importing this module calls :func:`register`, which adds an attention function *and* a
mask function named ``"attnkit"`` to transformers' registries, so that

    model = AutoModel.from_pretrained(path, attn_implementation="attnkit")
    model.set_attn_implementation("attnkit")  # or switch a loaded model

runs every attention layer on attnkit. Tested with transformers 5.23 (BERT, GPT-2, Llama with
GQA, Mistral with a sliding window, Gemma 2 with softcap: same outputs as ``"eager"`` to 1e-5
in float32, same greedy generations, with dynamic and static caches) and 4.57 (the same
decoders; BERT there has per-implementation attention classes and cannot use it).

How the mask travels. transformers builds each forward's masks with the mask function
registered under the model's implementation name; with none registered it passes
``attention_mask=None`` and a decoder's causal mask is silently lost. attnkit's mask
function builds the mask that ``"sdpa"`` would get: a (B, 1, Lq, Lk) bool tensor, or
None where sdpa relies on ``is_causal`` (no padding, and the mask is plain causal or
bidirectional). Where that bool mask provably equals a structured mask (causal or sliding
window at the cache's offset, and/or key padding; checked element by element), the
structured :mod:`attnkit.masks` mask rides along on the tensor (attribute ``attnkit_mask``)
and the attention function uses it, so that the tiled backend skips whole blocks and the
sdpa backend takes causal and padding calls. transformers and the model see a plain bool
tensor, which they may slice or copy (the copy is then used as a dense mask).

The attention function follows sdpa's conventions: a None mask means causal (top-left) when
the call's ``is_causal`` (default ``module.is_causal``, default True) holds and Lq > 1, and
no mask otherwise; a float mask (a model's own 4-D additive mask) is added to the scores.
It honours ``scaling``, ``softcap``, ``dropout``, ``sliding_window`` and ``position_bias``;
with ``output_attentions=True`` it also returns the probabilities. Options that would change
the result and that attnkit cannot apply (attention sinks ``s_aux``, head masks, paged
caches) raise ValueError rather than being ignored.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import Tensor

from attnkit import masks
from attnkit._checks import describe
from attnkit.functional import attention, attention_probs

try:
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface
except ImportError:  # pragma: no cover - only on old transformers
    raise ImportError(f"attnkit.integrations.transformers needs transformers >= 4.57 (its AttentionInterface and "
                      f"AttentionMaskInterface registries); found {transformers.__version__}: "
                      "pip install -U 'transformers>=4.57'") from None

__all__ = ["NAME", "attention_forward", "mask_forward", "register", "to_attnkit_mask"]

NAME = "attnkit"

# Keyword arguments that change the result and that attnkit does not implement.
_UNSUPPORTED = {
    "s_aux": "attention sinks (s_aux)",
    "sinks": "attention sinks",
    "head_mask": "a head mask",
    "layer_head_mask": "a head mask",
    "cache": "a paged cache (continuous batching)",
}


def to_attnkit_mask(attention_mask: object, query: Tensor, key: Tensor, *, module: object = None,
                    is_causal: bool | None = None, sliding_window: int | None = None,
                    position_bias: Tensor | None = None,
                    none_is_causal: bool = True) -> tuple[masks.Mask | Tensor | None, Any]:
    """The ``(mask, bias)`` for :func:`attnkit.attention` that a transformers attention call means.

    Args:
        attention_mask: what the model passed: None, a bool tensor (True = attend; its
            structured equivalent where :func:`mask_forward` attached one), a float
            (additive) tensor, or an attnkit mask, broadcastable to (B, H, Lq, Lk); a longer
            last dim is cut to Lk, as eager attention does.
        query, key: (B, H, Lq, D) and (B, Hkv, Lk, D).
        module: the attention module; its ``is_causal`` (default True) applies when
            ``is_causal`` is None.
        is_causal, sliding_window: the call's keyword arguments of the same names.
        position_bias: an additive (B or 1, H or 1, Lq, Lk) float tensor (T5-style).
        none_is_causal: whether a None mask means "causal if ``is_causal``" (sdpa, flash,
            attnkit) or "no mask" (eager).

    Returns:
        ``mask`` (None, a bool tensor or an attnkit mask) and ``bias`` (None, a float
        tensor or a list of them).

    >>> import torch
    >>> q = k = torch.randn(1, 2, 3, 4)
    >>> to_attnkit_mask(None, q, k, is_causal=True)
    (causal(align='top_left'), None)
    """
    q_len, k_len = query.shape[2], key.shape[2]
    mask: masks.Mask | Tensor | None = None
    bias: list[Tensor] = []
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if none_is_causal and causal and q_len > 1:
            # a None mask never comes with a window that binds (transformers materialises those)
            mask = masks.causal() if sliding_window is None else masks.sliding_window(left=sliding_window - 1)
    elif isinstance(attention_mask, masks.Mask):
        mask = attention_mask
    elif isinstance(attention_mask, Tensor):
        m = attention_mask[..., :k_len] if attention_mask.shape[-1] > k_len else attention_mask
        if m.dtype == torch.bool:
            structured = getattr(m, "attnkit_mask", None)
            mask = m if structured is None else structured
        elif m.dtype.is_floating_point:
            bias.append(m)
        else:
            raise TypeError(f"attention_mask must be a bool or a float (additive) tensor; got {describe(m)}")
    else:
        raise TypeError(
            f"attention_mask must be None, a tensor or an attnkit mask; got {type(attention_mask).__name__}. "
            "(A flex_attention BlockMask cannot be read back: load the model with attn_implementation="
            "'attnkit', 'sdpa' or 'eager')"
        )
    if position_bias is not None:
        bias.append(position_bias)
    return mask, (None if not bias else bias[0] if len(bias) == 1 else bias)


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: object, dropout: float = 0.0, scaling: float | None = None,
                      softcap: float | None = None, sliding_window: int | None = None,
                      is_causal: bool | None = None, position_bias: Tensor | None = None,
                      **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """transformers' attention-function protocol on :func:`attnkit.attention`.

    Args:
        module: the calling attention module (its ``is_causal`` is read for a None mask).
        query: (B, H, Lq, D); key, value: (B, Hkv, Lk, D), Hkv dividing H (GQA is native,
            K/V are not repeated).
        attention_mask: see :func:`to_attnkit_mask`.
        dropout, scaling, softcap, sliding_window, is_causal, position_bias: as transformers
            passes them; ``scaling`` defaults to 1/sqrt(D).
        kwargs: other keyword arguments are ignored, as by sdpa, except the ones that would
            change the result (``s_aux``, ``sinks``, ``head_mask``, ``cache``): ValueError.

    Returns:
        ``(out, weights)``: out (B, Lq, H, D) in the input dtype; weights (B, H, Lq, Lk) when
        ``output_attentions=True`` was passed, else None. A query with no allowed key (e.g. a
        left-padding position under a causal mask) outputs 0, where eager outputs the mean of
        the values; real tokens never see those positions.

    >>> import torch
    >>> q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    >>> out, _ = attention_forward(torch.nn.Module(), q, k, k, None, is_causal=True)
    >>> out.shape
    torch.Size([1, 5, 4, 8])
    """
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise ValueError(
                f"attn_implementation={NAME!r} does not support {what}, which {type(module).__name__} passed as "
                f"{name}=...; load this model with attn_implementation='eager' instead"
            )
    mask, bias = to_attnkit_mask(attention_mask, query, key, module=module, is_causal=is_causal,
                                 sliding_window=sliding_window, position_bias=position_bias)
    out = attention(query, key, value, mask=mask, bias=bias, scale=scaling, softcap=softcap, dropout_p=dropout)
    weights = None
    if kwargs.get("output_attentions"):
        weights = attention_probs(query, key, value, mask=mask, bias=bias, scale=scaling,
                                  softcap=softcap).to(query.dtype)
    return out.transpose(1, 2).contiguous(), weights  # (B, Lq, H, D)


def _structured(dense: Tensor, kwargs: dict[str, Any]) -> masks.Mask | None:
    """A structured mask equal to ``dense`` (B, 1, Lq, Lk), or None if no candidate matches."""
    batch, _, q_len, k_len = dense.shape
    if "cache_position" in kwargs:  # transformers 4.x: the queries' absolute positions
        positions = kwargs["cache_position"]
        q_start = int(positions[0]) if positions.numel() else 0
    else:
        q_start = int(kwargs.get("q_offset", 0))
    shift = q_start - int(kwargs.get("kv_offset", 0))  # query i sits at key index i + shift
    if shift == 0:
        align = "top_left"
    elif shift == k_len - q_len:
        align = "bottom_right"
    else:
        return None
    parts: list[masks.Mask] = []
    padding = kwargs.get("attention_mask")
    if padding is not None and padding.dim() == 2:
        kv_offset = int(kwargs.get("kv_offset", 0))
        valid = padding[:, kv_offset:kv_offset + k_len].to(device=dense.device, dtype=torch.bool)
        if valid.shape[1] < k_len:  # keys beyond the 2-D mask (a static cache's empty slots) are padding
            valid = torch.nn.functional.pad(valid, (0, k_len - valid.shape[1]), value=False)
        if not bool(valid.all()):
            parts.append(masks.key_padding(valid=valid))
    window = kwargs.get("local_size")
    bases: list[masks.Mask | None] = []
    if window is not None:
        bases += [masks.sliding_window(left=window - 1, align=align),
                  masks.sliding_window(left=window, right=window, align=align)]
    bases += [masks.causal(align=align), None]
    for base in bases:
        kept = ([] if base is None or base.is_full(q_len, k_len) else [base]) + parts
        # allowing everything is said by a padding mask with no padding (None would mean is_causal)
        candidate = kept[0] if kept else masks.key_padding(lengths=[k_len])
        for m in kept[1:]:
            candidate = candidate & m
        if torch.equal(candidate.to_dense(q_len, k_len, batch=batch, device=dense.device).expand(dense.shape), dense):
            return candidate
    return None


def mask_forward(**kwargs: Any) -> Tensor | None:
    """transformers' mask-function protocol (``AttentionMaskInterface``), for attnkit.

    Takes the arguments transformers gives ``sdpa_mask`` (they differ between 4.x and
    5.x, and are passed on unchanged) and returns what sdpa gets: None where sdpa would
    rely on ``is_causal``, else a (B, 1, Lq, Lk) bool tensor, True = attend. A real tensor,
    because transformers and models may handle it (generation with a static cache calls
    ``.contiguous()``). When a structured :mod:`attnkit.masks` mask provably equals it, that
    mask rides along as the tensor's ``attnkit_mask`` attribute, and
    :func:`attention_forward` uses it; a new tensor made from it (a slice, a copy) carries
    none and is used as the bool mask it is.
    """
    dense = sdpa_mask(**kwargs)
    if dense is not None:
        dense.attnkit_mask = _structured(dense, kwargs)
    return dense


def register() -> None:
    """Register ``"attnkit"`` as an attention implementation with transformers (idempotent).

    Called when this module is imported. After it, ``from_pretrained(...,
    attn_implementation="attnkit")`` and ``model.set_attn_implementation("attnkit")`` work.

    >>> from attnkit.integrations.transformers import register, NAME
    >>> from transformers import AttentionInterface
    >>> register()
    >>> NAME in AttentionInterface()
    True
    """
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_forward)


register()
