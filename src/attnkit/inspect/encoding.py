"""What capture runs a model on: texts, ids or dicts of tensors as the model's inputs, a seq2seq model's target,
the real (unpadded) positions of a batch, and each side's tokens and special-token flags.

:func:`encode` turns ``capture``'s ``inputs`` into the model's arguments; :func:`target_inputs` its ``target``;
:func:`sides` the tokens, ids and flags that :class:`~attnkit.inspect.AttentionMaps` carries.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

import torch
from torch import Tensor, nn

from attnkit import _model_facts as facts
from attnkit._checks import describe


def real_length(real: slice | Tensor, length: int) -> int:
    return len(range(length)[real]) if isinstance(real, slice) else int(real.numel())


def _cut(values: list, real: slice | Tensor) -> list:
    """The entries of one input's per-token list at its real positions."""
    return values[real] if isinstance(real, slice) else [values[int(i)] for i in real]


def real_positions(valid: Tensor | None, batch: int, length: int) -> list[slice | Tensor]:
    """Per input, its real tokens: a slice when they are contiguous, else their indices."""
    if valid is None:
        return [slice(0, length)] * batch
    out: list[slice | Tensor] = []
    for row in valid.bool().cpu():
        idx = row.nonzero().flatten()
        if idx.numel() == 0:
            out.append(slice(0, 0))
        elif int(idx[-1] - idx[0]) + 1 == idx.numel():  # left or right padding
            out.append(slice(int(idx[0]), int(idx[-1]) + 1))
        else:
            out.append(idx)
    return out




def find_tokenizer(model: nn.Module) -> Any:
    """The tokenizer in a transformers model's local folder (or bundled model), or None."""
    name = getattr(model, "name_or_path", "") if facts.is_hf(model) else ""
    if not name:
        return None
    from transformers import AutoTokenizer

    from attnkit.models import path

    try:
        return AutoTokenizer.from_pretrained(path(name), local_files_only=True)
    except (OSError, ValueError, ImportError):
        return None


def is_text(inputs: object) -> TypeGuard[str | Sequence[str]]:
    return isinstance(inputs, str) or (isinstance(inputs, Sequence) and len(inputs) > 0
                                       and all(isinstance(s, str) for s in inputs))


def summary(inputs: object) -> str:
    """``inputs`` by kind and shape, never by value (a tensor's or an array's repr prints its values)."""
    if isinstance(inputs, Tensor):
        return describe(inputs)
    if isinstance(inputs, Mapping):
        items = ", ".join(f"{key!r}: {summary(value)}" for key, value in inputs.items())
        return f"a dict {{{items}}}" if inputs else "an empty dict"
    if isinstance(inputs, str):
        return f"a string of {len(inputs)} characters"
    shape = getattr(inputs, "shape", None)
    if shape is not None:
        return f"a {type(inputs).__name__} of shape {tuple(shape)}"
    if isinstance(inputs, Sequence):
        return f"a {type(inputs).__name__} of {len(inputs)} items"
    return f"a {type(inputs).__name__}"


def text_batch(tokenizer: Any, texts: str | Sequence[str], *, target: bool = False) -> dict[str, Any]:
    """A padded batch of ``texts`` (tokenized as targets when ``target``), with ``"word_ids"``:
    one list per text from a fast tokenizer, else None."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    encoding = (tokenizer(text_target=texts, padding=len(texts) > 1, return_tensors="pt") if target
                else tokenizer(texts, padding=len(texts) > 1, return_tensors="pt"))
    try:
        word_ids = [list(encoding.word_ids(b)) for b in range(len(texts))]
    except (AttributeError, ValueError):  # a slow tokenizer keeps no word ids
        word_ids = None
    return {**dict(encoding), "word_ids": word_ids}


def accepted_inputs(model: nn.Module, encoding: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer outputs that the model's forward takes: a tokenizer may add ``token_type_ids``,
    which some models (BART in transformers 4.57) refuse."""
    params = inspect.signature(model.forward).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return encoding
    return {name: value for name, value in encoding.items() if name in params}


def encode(model: nn.Module, inputs: object, tokenizer: Any) -> tuple[tuple, dict, Tensor | None, Tensor | None,
                                                                      list[list[int | None]] | None]:
    """``(args, kwargs)`` for the model, the ids (B, L) or None, the real-token flags (B, L) or
    None, and the word ids of text inputs (one list per input, or None)."""
    hf = facts.is_hf(model)
    word_ids = None
    if is_text(inputs):
        inputs = text_batch(tokenizer, inputs)
        word_ids = inputs.pop("word_ids")
        if hf:
            inputs = accepted_inputs(model, inputs)
    if isinstance(inputs, Sequence) and inputs and all(isinstance(i, int) for i in inputs):
        inputs = torch.tensor([inputs])
    if isinstance(inputs, Tensor):
        if inputs.dtype.is_floating_point:
            if hf and getattr(model, "main_input_name", "input_ids") != "input_ids":  # Whisper's input_features
                return (), {model.main_input_name: inputs}, None, None, None
            if hf:
                raise TypeError(f"inputs for a transformers model must be text, token ids or a dict of tensors; "
                                f"got {describe(inputs)}")
            if inputs.dim() != 3:
                raise ValueError(f"float inputs must be (B, L, E) embeddings; got {describe(inputs)}")
            return (inputs,), {}, None, None, None
        ids = inputs[None] if inputs.dim() == 1 else inputs
        if ids.dim() != 2:
            raise ValueError(f"token ids must be (L,) or (B, L); got {describe(inputs)}")
        return ((), {"input_ids": ids}, ids, None, None) if hf else ((ids,), {}, ids, None, None)
    if isinstance(inputs, Mapping):
        kwargs = dict(inputs)
        if hf:
            return (), kwargs, kwargs.get("input_ids"), kwargs.get("attention_mask"), word_ids
        if "input_ids" in kwargs:
            kwargs["tokens"] = kwargs.pop("input_ids")
        if "attention_mask" in kwargs:
            kwargs["padding_mask"] = kwargs.pop("attention_mask")
        kwargs.pop("token_type_ids", None)
        if kwargs.get("padding_mask") is not None:
            kwargs["padding_mask"] = kwargs["padding_mask"].bool()
        tokens = kwargs.get("tokens")
        if tokens is not None:
            return (kwargs.pop("tokens"),), kwargs, tokens, kwargs.get("padding_mask"), word_ids
        x = kwargs.pop("x", None)
        if x is None:
            raise ValueError(f"a dict of inputs needs 'input_ids' (or 'tokens', or 'x' for embeddings); "
                             f"got keys {sorted(inputs)}")
        return (x,), kwargs, None, kwargs.get("padding_mask"), None
    raise TypeError(f"inputs must be a string, a list of strings, token ids (a list of ints or an integer tensor) "
                    f"or a dict of tensors; got {summary(inputs)}")


def target_inputs(model: nn.Module, target: object, tokenizer: Any) -> dict[str, Any]:
    """``decoder_input_ids`` (B, T), ``decoder_attention_mask`` (B, T) or None, and ``word_ids``
    for an encoder-decoder model's ``target``: what its decoder reads is the decoder start token
    followed by the target (the start token is not added twice)."""
    word_ids = None
    if is_text(target):
        if tokenizer is None:
            raise ValueError(f"target is text, so capture needs a tokenizer, and none was found for "
                             f"{facts.name(model)!r}; pass tokenizer=")
        batch = text_batch(tokenizer, target, target=True)
        labels, valid, word_ids = batch["input_ids"], batch.get("attention_mask"), batch["word_ids"]
    elif isinstance(target, Tensor) and not target.dtype.is_floating_point and target.dim() in (1, 2):
        labels, valid = (target[None] if target.dim() == 1 else target), None
    elif (isinstance(target, Sequence) and target and all(isinstance(i, int) and not isinstance(i, bool)
                                                          for i in target)):
        labels, valid = torch.tensor([list(target)]), None
    else:
        raise TypeError(f"target must be text (a string or a list of strings) or token ids (a list of ints or an "
                        f"integer (T,) or (B, T) tensor); got {summary(target)}")
    start = getattr(facts.pretrained(model).config, "decoder_start_token_id", None)
    if start is None:
        raise ValueError(f"{facts.name(model)!r} has no config.decoder_start_token_id, so capture cannot tell what its "
                         "decoder reads first; pass decoder_input_ids in inputs instead of target=")
    if labels.shape[1] and bool((labels[:, 0] == start).all()):
        return {"decoder_input_ids": labels, "decoder_attention_mask": valid, "word_ids": word_ids}
    ids = torch.cat([torch.full_like(labels[:, :1], start), labels], 1)
    if valid is not None:
        valid = torch.cat([torch.ones_like(valid[:, :1]), valid], 1)
    word_ids = None if word_ids is None else [[None, *w] for w in word_ids]
    return {"decoder_input_ids": ids, "decoder_attention_mask": valid, "word_ids": word_ids}


def special_flags(tokenizer: Any, ids: list[int]) -> list[bool] | None:
    """Per id, whether it is one of ``tokenizer``'s special tokens; None without a tokenizer that says."""
    if tokenizer is None or not hasattr(tokenizer, "get_special_tokens_mask"):
        return None
    try:
        return [bool(f) for f in tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)]
    except (ValueError, NotImplementedError, TypeError):
        return None


def sides(ids: Tensor | None, real: Sequence[slice | Tensor], length: int, tokenizer: Any,
           word_ids: list[list[int | None]] | None, label: str = "") -> dict[str, Any]:
    """One side's facts per input, cut to its real tokens: ``tokens``, ``token_ids``, ``special``,
    ``word_ids``. Without ids, tokens are the positions (``label`` + index: ``"frame 3"``)."""
    tokens: list[list[str]] = []
    token_ids: list[list[int]] = []
    special: list[list[bool] | None] = []
    for b, r in enumerate(real):
        if ids is None:
            tokens.append([f"{label}{i}" for i in _cut(list(range(length)), r)])
            continue
        row = ids[b].cpu()[r].tolist()
        token_ids.append(row)
        tokens.append(list(tokenizer.convert_ids_to_tokens(row)) if tokenizer is not None else [str(i) for i in row])
        special.append(special_flags(tokenizer, row))
    return {"tokens": tokens, "token_ids": None if ids is None else token_ids,
            "special": special if special and all(s is not None for s in special) else None,
            "word_ids": None if word_ids is None else [_cut(w, r) for w, r in zip(word_ids, real)]}




def int_ids(name: str, value: object) -> Tensor:
    """(B, L) integer ids from a (L,) or (B, L) integer tensor or a list of ints."""
    if isinstance(value, Sequence) and not isinstance(value, str) and value and all(
            isinstance(i, int) and not isinstance(i, bool) for i in value):
        value = torch.tensor([list(value)])
    if not isinstance(value, Tensor) or value.dtype.is_floating_point or value.dtype == torch.bool \
            or value.dim() not in (1, 2):
        raise TypeError(f"{name} must be token ids for attnkit's EncoderDecoder: a list of ints or an integer (L,) "
                        f"or (B, L) tensor; got {summary(value)}")
    return value[None] if value.dim() == 1 else value


def source_inputs(inputs: object) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """An :class:`~attnkit.nn.EncoderDecoder`'s source from ``inputs``: ids (B, S), the padding mask
    (B, S) bool or None, and what else the dict held (``tgt_ids``, ``tgt_padding_mask``).

    ``inputs`` is ids, or a dict with ``src_ids`` (or ``input_ids``) and optionally
    ``src_padding_mask`` (or ``attention_mask``), ``tgt_ids``, ``tgt_padding_mask``.
    """
    rest: dict[str, Any] = {}
    if isinstance(inputs, Mapping):
        given = dict(inputs)
        aliases = {"input_ids": "src_ids", "attention_mask": "src_padding_mask"}
        for old, new in aliases.items():
            if old in given:
                if new in given:
                    raise ValueError(f"inputs hold both {old!r} and {new!r}; pass one")
                given[new] = given.pop(old)
        unknown = sorted(set(given) - {"src_ids", "src_padding_mask", "tgt_ids", "tgt_padding_mask"})
        if unknown or "src_ids" not in given:
            raise ValueError(f"a dict of inputs for attnkit's EncoderDecoder takes 'src_ids' (or 'input_ids'), "
                             f"'src_padding_mask' (or 'attention_mask'), 'tgt_ids' and 'tgt_padding_mask'; got keys "
                             f"{sorted(inputs)}")
        src, valid = int_ids("inputs['src_ids']", given.pop("src_ids")), given.pop("src_padding_mask", None)
        rest = given
    elif is_text(inputs):
        raise TypeError("attnkit's EncoderDecoder reads token ids, not text; map your words to ids (its vocabulary "
                        "is yours) and pass them")
    else:
        src, valid = int_ids("inputs", inputs), None
    if valid is not None:
        valid = valid[None] if isinstance(valid, Tensor) and valid.dim() == 1 else valid
        if not isinstance(valid, Tensor) or valid.shape != src.shape or valid.dtype.is_floating_point:
            raise ValueError(f"src_padding_mask must be a bool (B, S) = {tuple(src.shape)} tensor, True for real "
                             f"tokens; got {summary(valid)}")
        valid = valid.bool()
    return src, valid, rest
