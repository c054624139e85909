"""The sdpa backend: PyTorch's fused ``scaled_dot_product_attention``.

Used only where a call maps onto it without materialising an (Lq x Lk) mask: no mask,
causal (top-left, or bottom-right when Lq == Lk), key padding (a (B, 1, 1, Lk) mask),
grouped-query attention. On CPU, float16/bfloat16 inputs are computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.functional._call import AttentionCall
from attnkit.masks import Causal, KeyPadding, Mask

_HAS_GQA = torch.torch_version.TorchVersion(torch.__version__) >= "2.5"  # enable_gqa arrived in 2.5


@dataclass(frozen=True)
class SDPAForm:
    """A mask in the terms of PyTorch's ``scaled_dot_product_attention``.

    ``is_causal``: pass ``is_causal=True`` (top-left causal). ``key_valid``: a (B|1, Lk)
    bool tensor of real keys, to pass as a (B|1, 1, 1, Lk) ``attn_mask``; None if there
    is none. At most one of the two is set (SDPA takes one or the other).
    """

    is_causal: bool = False
    key_valid: Tensor | None = None


def sdpa_form(mask: Mask, q_len: int, k_len: int) -> SDPAForm | None:
    """``mask`` as SDPA's native arguments at these lengths, or None if SDPA would need it dense:
    causal (top-left, or bottom-right when Lq == Lk; not shifted, not per sequence) and key padding."""
    if isinstance(mask, Causal):
        plain = mask.shift is None and mask.lengths is None
        return SDPAForm(is_causal=True) if plain and (mask.align == "top_left" or q_len == k_len) else None
    if isinstance(mask, KeyPadding):
        return SDPAForm(key_valid=mask.valid_rows(k_len, torch.device("cpu")))
    return None


class SDPABackend:
    name = "sdpa"
    summary = "PyTorch's fused kernel; no mask, causal, key padding, GQA"
    features: tuple[str, ...] = ("no mask", "causal (top-left)", "key padding", "GQA/MQA" if _HAS_GQA else "",
                "dropout (torch RNG)", "any device")

    def supports(self, call: AttentionCall) -> str | None:
        if call.return_lse:
            return "it does not return the log-sum-exp (return_lse=True)"
        if call.softcap is not None:
            return "it has no soft-capping"
        if call.bias is not None:
            return "it takes a bias only as a dense (Lq x Lk) tensor"
        if call.v.shape[-1] != call.q.shape[-1]:
            return "its fused kernels need the value head dim to equal the query head dim"
        if call.groups > 1 and not _HAS_GQA:
            return "this torch version's SDPA has no enable_gqa"
        mask = call.mask
        if mask is None:
            return None
        form = sdpa_form(mask, call.q_len, call.k_len)
        if form is None:
            return (f"it takes the {mask!r} mask at Lq={call.q_len}, Lk={call.k_len} only as a dense (Lq x Lk) "
                    "tensor (it has top-left causal and key padding natively)")
        run_dtype = call.compute_dtype if call.q.device.type == "cpu" else call.q.dtype
        if form.is_causal and not call.scale_positive_in(run_dtype):
            # PyTorch's kernels mask before scaling: -inf * 0 is NaN, -inf * -s is +inf.
            return (f"its causal kernels give NaN when the scale is <= 0 in {run_dtype} "
                    f"(scale={call.scale:g})")
        if form.key_valid is not None and not form.key_valid.any(1).all():
            return "a batch element has no valid key, and SDPA returns NaN for such rows"
        return None

    def run(self, call: AttentionCall) -> tuple[Tensor, Tensor]:
        cd = call.compute_dtype if call.q.device.type == "cpu" else call.q.dtype
        q, k, v = call.q.to(cd), call.k.to(cd), call.v.to(cd)
        form = sdpa_form(call.mask, call.q_len, call.k_len) if call.mask is not None else None
        attn_mask, is_causal = None, False
        if form is not None:
            is_causal = form.is_causal
            if form.key_valid is not None:
                attn_mask = form.key_valid.to(q.device)[:, None, None, :]  # (B|1, 1, 1, Lk)
        kwargs = {"enable_gqa": True} if call.groups > 1 else {}
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=call.dropout_p,
            is_causal=is_causal, scale=call.scale, **kwargs,
        )
        return out.to(call.q.dtype), torch.empty(0)
