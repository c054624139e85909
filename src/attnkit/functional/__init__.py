"""The functional core: :func:`attention`, its backends and :func:`attention_probs`."""

from attnkit.functional.core import (
    BackendInfo,
    CallPlan,
    attention,
    attention_probs,
    backends,
    explain_call,
    select_backend,
)
from attnkit.functional.linear import LinearAttentionState, linear_attention, linear_attention_step
from attnkit.functional.stats import CallStats, StatsOptions

__all__ = ["BackendInfo", "CallPlan", "CallStats", "LinearAttentionState", "StatsOptions", "attention",
           "attention_probs", "backends", "explain_call", "linear_attention", "linear_attention_step", "select_backend"]
