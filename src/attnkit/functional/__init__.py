"""The functional core: :func:`attention`, its backends and :func:`attention_probs`."""

from attnkit.functional.core import BackendInfo, attention, attention_probs, backends, select_backend

__all__ = ["BackendInfo", "attention", "attention_probs", "backends", "select_backend"]
