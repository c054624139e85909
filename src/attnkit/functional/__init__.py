"""The functional core: :func:`attention`, its backends and :func:`attention_probs`."""

from attnkit.functional.core import BackendInfo, attention, attention_probs, backends, select_backend
from attnkit.functional.linear import LinearAttentionState, linear_attention, linear_attention_step

__all__ = ["BackendInfo", "LinearAttentionState", "attention", "attention_probs", "backends", "linear_attention",
           "linear_attention_step", "select_backend"]
