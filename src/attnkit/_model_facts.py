"""Facts about a model that several parts of attnkit read (capture, profile, the explorer, the CLI): one place each.

They take a Hugging Face transformers model or an attnkit module (e.g. :class:`attnkit.nn.TransformerLM`).
Where a model does not state a fact, the caller says what to assume (``max_positions``'s ``unstated``).
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

from torch import nn


def is_hf(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (without importing transformers)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def pretrained(model: nn.Module) -> Any:
    """``model`` as the transformers ``PreTrainedModel`` it is, for what nn.Module does not declare
    (``config``, ``name_or_path``, ``get_encoder()``, ``generate()``...); mypy skips transformers."""
    return model


def text_config(model: nn.Module) -> Any:
    """The model's config; a multimodal transformers model's language side (``get_text_config()``)."""
    config: Any = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def name(model: nn.Module) -> str:
    """What reports call the model: its ``name_or_path`` (a hub id or folder), else its class name."""
    return str(getattr(model, "name_or_path", "") or type(model).__name__)


def max_positions(model: nn.Module, *, unstated: int | None) -> int | None:
    """The most positions the model takes, or ``unstated`` where it states none.

    A transformers model states ``max_position_embeddings`` (of its text config); an attnkit
    ``TransformerLM`` with learned positions its table's ``max_length``. Rotary or ALiBi positions
    state no limit.
    """
    from attnkit.nn import TransformerLM

    if is_hf(model):
        value = getattr(text_config(model), "max_position_embeddings", None)
        return value if isinstance(value, int) and value > 0 else unstated
    if isinstance(model, TransformerLM) and model.config.positions == "learned":
        return model.config.max_length
    return unstated


def headless(model: nn.Module, kwargs: dict[str, Any]) -> nn.Module:
    """What runs ``model``'s attention without its task head: a transformers model's ``base_model`` where that
    is another module whose ``forward`` names every keyword in ``kwargs``, else ``model`` itself.

    The same attention calls, without (for a language model) the head's (L x vocab) logits: 4 GB in float32 at
    32K tokens and a 30K vocabulary, which nothing that reads attention needs. An attnkit module is itself.
    """
    base = getattr(model, "base_model", None) if is_hf(model) else None
    if not isinstance(base, nn.Module) or base is model:
        return model
    named = inspect.signature(base.forward).parameters
    return base if all(key in named for key in kwargs) else model


def kind(model: nn.Module) -> str:
    """``"encoder-decoder"`` (``config.is_encoder_decoder``), ``"decoder"`` (a model that generates alone:
    ``can_generate()``) or ``"encoder"`` (self-attention only, generates nothing)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "encoder-decoder"
    can = getattr(model, "can_generate", None)
    return "decoder" if callable(can) and can() else "encoder"
