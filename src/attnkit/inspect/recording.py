"""``capture()``: record the attention probabilities of one forward pass.

How it records, without changing what the model computes:

- attnkit modules: a hook on every :class:`~attnkit.nn.MultiHeadAttention`
  (:meth:`~attnkit.nn.MultiHeadAttention.register_attention_hook`) sees q, k, the mask and
  the bias of each call.
- Hugging Face models, whatever attention implementation they were loaded with (eager,
  sdpa, attnkit, ...): for the duration of the call, transformers' attention-function lookup
  returns a recording wrapper around the model's own function. The wrapper calls that
  function unchanged, and its result is what the model gets; then it computes the
  probabilities with :func:`attnkit.attention_probs` from the same q, k, mask, scaling,
  softcap, sliding window and position bias. With sdpa (where ``output_attentions`` gives
  nothing) this is the only way to see them. The lookup is restored afterwards, also on
  error; the model itself (its config, its attention implementation) is never modified.
  A model whose attention bypasses that lookup (BERT before transformers 5, Falcon before 5.25, Bloom,
  MPT) is run a second time with its own ``output_attentions=True``, which holds all layers
  at once; only when it was loaded with ``attn_implementation="eager"``, since other paths
  of such models may compute their maps apart from what they use (Falcon 5.24 under sdpa gave
  non-causal ones).

Layers are numbered in the order the model calls attention in one forward pass, which for
encoders and decoders is the model's layer index. An encoder-decoder model's calls are told
apart by module (:func:`encoder_decoder_parts`) and numbered per part, giving
:class:`~attnkit.inspect.Seq2SeqMaps`. Calls with a KV cache are refused here; see
:func:`attnkit.inspect.capture_generation`.

Memory: only the requested layers and heads are computed and kept. Probabilities are
computed for a few heads at a time (at most about 64 MiB of float32 scores; all heads of a
layer at once when the mask or bias varies by head, as with attnkit's ALiBi), cut to each
input's real tokens and converted to the storage ``dtype`` at once, into one preallocated
(layers, heads, L, L) tensor per input. A 2,000-token capture of all 6 x 12 heads of a
BERT-sized model stores 6 * 12 * 2000**2 * 2 bytes = 576 MB in float16.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeGuard

import torch
from torch import Tensor, nn

from attnkit import _model_facts as facts
from attnkit import biases, masks
from attnkit._checks import describe
from attnkit.functional import attention_probs
from attnkit.inspect.maps import AttentionMaps, Seq2SeqMaps
from attnkit.nn.attention import MultiHeadAttention
from attnkit.nn.encoder_decoder import EncoderDecoder

__all__ = ["capture", "hf_recording", "probabilities", "wrapped_attention_functions"]

_STORAGE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CHUNK_BYTES = 1 << 26  # float32 scores computed at once, at most (when heads can be split)
_PATCH_LOCK = threading.RLock()  # one capture at a time patches transformers' lookup
_PATCHING: list[str] = []  # the kinds the lock's holder patches now (to refuse a nested one of the same kind)
# a recorder of attention calls: (q, k, mask, bias, scale, softcap) -> None
Recording = Callable[[Tensor, Tensor, "masks.Mask | Tensor | None", Any, "float | None", "float | None"], None]


def _index_list(name: str, given: Iterable[int] | int | None) -> tuple[int, ...] | None:
    if given is None:
        return None
    values = [given] if isinstance(given, int) else list(given)
    if not values or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in values):
        raise ValueError(f"{name} must be None, an int >= 0 or a non-empty sequence of them; got {given!r}")
    return tuple(sorted(set(values)))


def _heads_slice(t: Tensor, heads: list[int]) -> Tensor:
    """A (.., H, Lq, Lk)-broadcastable tensor restricted to some heads (unchanged if it has no head dim)."""
    t4 = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    return t4 if t4.shape[1] == 1 else t4[:, heads]


def probabilities(q: Tensor, k: Tensor, mask: masks.Mask | Tensor | None, bias: Any, scale: float | None,
                  softcap: float | None, heads: Sequence[int]) -> Iterator[tuple[int, Tensor]]:
    """The attention probabilities of one call, a few heads at a time.

    q (B, H, Lq, D), k (B, Hkv, Lk, D), ``mask``/``bias`` as :func:`attnkit.attention_probs`
    takes them. Yields ``(start, probs)``: probs (B, c, Lq, Lk) float of ``heads[start:start + c]``,
    at most about 64 MiB of float32 scores at once (all heads at once when the mask or bias
    varies by head in a way that cannot be sliced). Drop each before taking the next.
    """
    batch, num_heads, q_len, _ = q.shape
    groups = num_heads // k.shape[1]
    bias_parts = bias if isinstance(bias, list) else [] if bias is None else [bias]
    splittable = (all(isinstance(b, Tensor) for b in bias_parts)
                  and (not isinstance(mask, masks.Mask) or mask.extent()[1] == 1))
    per_head = batch * q_len * k.shape[2] * 4
    step = max(1, _CHUNK_BYTES // max(1, per_head)) if splittable else len(heads)
    for start in range(0, len(heads), step):
        chosen = list(heads[start:start + step])
        if splittable:
            kv = k[:, [h // groups for h in chosen]]  # (B, c, Lk, D): each chosen head with its K head
            yield start, attention_probs(
                q[:, chosen], kv, kv, scale=scale, softcap=softcap,
                mask=_heads_slice(mask, chosen) if isinstance(mask, Tensor) else mask,
                bias=[biases.from_tensor(_heads_slice(b, chosen)) for b in bias_parts] or None,
            )  # (B, c, Lq, Lk)
        else:
            yield start, attention_probs(q, k, k, mask=mask, bias=bias, scale=scale, softcap=softcap)[:, chosen]


class _Recorder:
    """Receives the attention calls of one kind (all of them, or an encoder-decoder's encoder,
    decoder or cross calls) in one forward pass and keeps the selected probabilities.

    ``real_q``/``real_k``: per input, its real query and key positions (a slice or indices;
    ``slice(0, None)`` = all, whatever the length). ``lengths``: the (Lq, Lk) every call must
    have, None where any length goes.
    """

    def __init__(self, layers: tuple[int, ...] | None, heads: tuple[int, ...] | None, dtype: torch.dtype,
                 real_q: Sequence[slice | Tensor], real_k: Sequence[slice | Tensor],
                 lengths: tuple[int | None, int | None], progress: Callable[[int, int], None] | None):
        self.layers, self.heads, self.dtype, self.progress = layers, heads, dtype, progress
        self.real_q, self.real_k, self.lengths = real_q, real_k, lengths
        self.calls = 0
        self.recorded = 0
        self.num_heads: int | None = None
        self.store: list[Tensor] = []

    def _begin(self, batch: int, num_heads: int, q_len: int, k_len: int) -> int | None:
        """The slot of the next attention call's layer (None if not selected), checked; storage on first use."""
        layer, self.calls = self.calls, self.calls + 1
        self.num_heads = num_heads
        if self.layers is not None and layer not in self.layers:
            return None
        want_q, want_k = self.lengths
        if (want_q not in (None, q_len)) or (want_k not in (None, k_len)) or batch != len(self.real_q):
            raise ValueError(f"capture records attention over the whole input in one pass; attention call {layer} "
                             f"has {q_len} queries and {k_len} keys for a batch of {batch}, where {want_q} queries "
                             f"and {want_k} keys for a batch of {len(self.real_q)} were expected (a cache?)")
        if self.heads is None:
            self.heads = tuple(range(num_heads))
        elif self.heads[-1] >= num_heads:
            raise ValueError(f"heads must be < {num_heads}, the model's heads per layer; got {list(self.heads)}")
        if not self.store:
            count = len(self.layers) if self.layers is not None else None
            self.store = [torch.empty(count or 0, len(self.heads), _length(rq, q_len), _length(rk, k_len),
                                      dtype=self.dtype) for rq, rk in zip(self.real_q, self.real_k)]
        if self.layers is None:  # all layers, however many: grow by one
            self.store = [torch.cat([s, s.new_empty(1, *s.shape[1:])]) for s in self.store]
            return layer
        return self.layers.index(layer)

    def _keep(self, slot: int, start: int, probs: Tensor) -> None:
        """Store (B, c, Lq, Lk) probabilities of the selected heads ``start:start + c``, cut to the real tokens."""
        for b, (rq, rk) in enumerate(zip(self.real_q, self.real_k)):
            self.store[b][slot, start:start + probs.shape[1]] = probs[b][:, rq][:, :, rk]

    def _done(self) -> None:
        self.recorded += 1
        if self.progress is not None and self.layers is not None:
            self.progress(self.recorded, len(self.layers))

    def __call__(self, q: Tensor, k: Tensor, mask: masks.Mask | Tensor | None, bias: Any,
                 scale: float | None, softcap: float | None) -> None:
        """Compute and keep the probabilities of one attention call: q (B, H, Lq, D), k (B, Hkv, Lk, D)."""
        slot = self._begin(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if slot is None:
            return
        for start, probs in probabilities(q, k, mask, bias, scale, softcap, self.heads or ()):
            self._keep(slot, start, probs)
            del probs
        self._done()

    def given(self, probs: Tensor) -> None:
        """Keep one layer's probabilities (B, H, L, L) that the model computed itself."""
        slot = self._begin(probs.shape[0], probs.shape[1], probs.shape[2], probs.shape[3])
        if slot is not None:
            self._keep(slot, 0, probs[:, list(self.heads or ())])
            self._done()


def _length(real: slice | Tensor, length: int) -> int:
    return len(range(length)[real]) if isinstance(real, slice) else int(real.numel())


def _cut(values: list, real: slice | Tensor) -> list:
    """The entries of one input's per-token list at its real positions."""
    return values[real] if isinstance(real, slice) else [values[int(i)] for i in real]


def _real_positions(valid: Tensor | None, batch: int, length: int) -> list[slice | Tensor]:
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


# -- attnkit modules -----------------------------------------------------------------------------


@contextlib.contextmanager
def attnkit_recording(modules: Iterable[MultiHeadAttention],
                      route: Callable[[nn.Module], Recording | None]) -> Iterator[None]:
    """Hook ``modules`` (attnkit :class:`~attnkit.nn.MultiHeadAttention`) for this block only.

    After each attention call of a module, ``route(module)`` says who records it (None: nobody);
    that recorder gets ``(q, k, mask, bias, None, None)`` (attnkit modules use the default scale
    and no softcap): q (B, H, Lq, D), k (B, Hkv, Lk, D) after positions and the cache.
    """
    def hook(module: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: masks.Mask | Tensor | None,
             bias: Any) -> None:
        recorder = route(module)
        if recorder is not None:
            recorder(q, k, mask, bias, None, None)

    handles = [m.register_attention_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def attnkit_parts(model: EncoderDecoder) -> dict[int, str]:
    """For an attnkit :class:`~attnkit.nn.EncoderDecoder`: ``id(module) -> "encoder" | "decoder" | "cross"``
    for its attention modules ``encoder[i].attn``, ``decoder[i].self_attn`` and ``decoder[i].cross_attn``."""
    parts = {id(block.attn): "encoder" for block in model.encoder}
    for block in model.decoder:
        parts[id(block.self_attn)], parts[id(block.cross_attn)] = "decoder", "cross"
    return parts


# -- Hugging Face models -------------------------------------------------------------------------


def _arguments(fn: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[list[Any], dict[str, Any]]:
    """The five leading arguments (module, query, key, value, attention_mask) and every keyword one."""
    sig = inspect.signature(fn)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    named: dict[str, Any] = {}
    leading: list[Any] = []
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            named.update(bound.arguments.get(p.name, {}))
        elif p.kind is p.VAR_POSITIONAL:
            leading.extend(bound.arguments.get(p.name, ()))
        elif len(leading) < 5:
            leading.append(bound.arguments.get(p.name))
        else:
            named[p.name] = bound.arguments.get(p.name)
    return leading[:5], named


@contextlib.contextmanager
def hf_recording(model: nn.Module, route: Callable[[nn.Module], Recording | None]) -> Iterator[None]:
    """Wrap the attention functions transformers hands to ``model``'s modules, for this block only.

    After each attention call of a module, ``route(module)`` says who records it (None: nobody);
    that recorder gets ``(q, k, mask, bias, scaling, softcap)``: q (B, H, Lq, D), k (B, Hkv, Lk, D)
    and the attnkit mask and bias the call means (:func:`~attnkit.integrations.transformers.to_attnkit_mask`).
    """
    from attnkit.integrations.transformers import _UNSUPPORTED, to_attnkit_mask  # needs transformers >= 4.57

    # eager gets None where it wants no mask; sdpa, flash and attnkit read None as "causal if is_causal"
    none_is_causal = "eager" not in str(facts.pretrained(model).config._attn_implementation)

    def wrap(fn: Any) -> Any:
        @functools.wraps(fn)
        def recording(*args: Any, **kwargs: Any) -> Any:
            (module, query, key, _, attention_mask), named = _arguments(fn, args, kwargs)
            for name, what in _UNSUPPORTED.items():
                if name != "cache" and named.get(name) is not None:
                    raise ValueError(f"capture cannot record attention with {what} ({type(module).__name__} passed "
                                     f"{name}=...): the probabilities would differ from what the model computes")
            result = fn(*args, **kwargs)
            recorder = route(module)
            if recorder is not None:
                mask, bias = to_attnkit_mask(attention_mask, query, key, module=module,
                                             is_causal=named.get("is_causal"),
                                             sliding_window=named.get("sliding_window"),
                                             position_bias=named.get("position_bias"), none_is_causal=none_is_causal)
                recorder(query, key, mask, bias, named.get("scaling"), named.get("softcap"))
            return result

        return recording

    with wrapped_attention_functions(model, wrap, kind="capture"):
        yield


@contextlib.contextmanager
def wrapped_attention_functions(model: nn.Module, wrap: Callable[[Callable[..., Any]], Callable[..., Any]], *,
                                kind: str) -> Iterator[None]:
    """For this block, transformers hands ``model``'s attention modules ``wrap(fn)`` in place of
    each attention function ``fn`` (eager, sdpa, attnkit, ...), whatever the model was loaded with.

    Used by :func:`capture` and by :mod:`attnkit.profile` (timing). ``wrap(fn)`` must call
    ``fn`` with the same arguments and return its result; ``fn``'s leading arguments are
    ``(module, query, key, value, attention_mask)``. The lookup is restored on exit, also on
    error. Wrappers of different ``kind`` nest (each wraps the other's); the same ``kind``
    nested in one thread is refused (RuntimeError). One thread at a time patches: another
    thread entering waits until the first leaves.
    """
    from attnkit.integrations.transformers import AttentionInterface  # needs transformers >= 4.57

    marker = f"_attnkit_wrapped_{kind}"

    def wrapped(fn: Any) -> Any:
        if not callable(fn) or getattr(fn, marker, False):
            return fn
        out = wrap(fn)
        setattr(out, marker, True)
        return out

    undo: list[Callable[[], None]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        own = owner.__dict__ if isinstance(owner, type) else vars(owner)
        if name in own:
            old = own[name]
            undo.append(lambda: setattr(owner, name, old))
        else:
            undo.append(lambda: delattr(owner, name))
        setattr(owner, name, value)

    with _PATCH_LOCK:
        if kind in _PATCHING:
            raise RuntimeError(f"a {kind} of a transformers model was started while another {kind} runs in this "
                               "thread (from a hook?); run one at a time")
        _PATCHING.append(kind)
        try:
            getitem = AttentionInterface.__getitem__
            patch(AttentionInterface, "__getitem__", lambda self, key: wrapped(getitem(self, key)))
            if hasattr(AttentionInterface, "get_interface"):  # transformers 5: also hands out eager
                get_interface = AttentionInterface.get_interface
                patch(AttentionInterface, "get_interface",
                      lambda self, name, default: wrapped(get_interface(self, name, default)))
            for module_name in sorted({type(m).__module__ for m in model.modules()}):
                source = sys.modules.get(module_name)
                eager = getattr(source, "eager_attention_forward", None)
                if callable(eager):  # transformers 4 calls the modeling file's eager function directly
                    patch(source, "eager_attention_forward", wrapped(eager))
            yield
        finally:
            for restore in reversed(undo):
                restore()
            _PATCHING.remove(kind)


# -- inputs --------------------------------------------------------------------------------------


def _find_tokenizer(model: nn.Module) -> Any:
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


def _is_text(inputs: object) -> TypeGuard[str | Sequence[str]]:
    return isinstance(inputs, str) or (isinstance(inputs, Sequence) and len(inputs) > 0
                                       and all(isinstance(s, str) for s in inputs))


def _summary(inputs: object) -> str:
    """``inputs`` by kind and shape, never by value (a tensor's or an array's repr prints its values)."""
    if isinstance(inputs, Tensor):
        return describe(inputs)
    if isinstance(inputs, Mapping):
        items = ", ".join(f"{key!r}: {_summary(value)}" for key, value in inputs.items())
        return f"a dict {{{items}}}" if inputs else "an empty dict"
    if isinstance(inputs, str):
        return f"a string of {len(inputs)} characters"
    shape = getattr(inputs, "shape", None)
    if shape is not None:
        return f"a {type(inputs).__name__} of shape {tuple(shape)}"
    if isinstance(inputs, Sequence):
        return f"a {type(inputs).__name__} of {len(inputs)} items"
    return f"a {type(inputs).__name__}"


def _text_batch(tokenizer: Any, texts: str | Sequence[str], *, target: bool = False) -> dict[str, Any]:
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


def _accepted(model: nn.Module, encoding: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer outputs that the model's forward takes: a tokenizer may add ``token_type_ids``,
    which some models (BART in transformers 4.57) refuse."""
    params = inspect.signature(model.forward).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return encoding
    return {name: value for name, value in encoding.items() if name in params}


def _encode(model: nn.Module, inputs: object, tokenizer: Any) -> tuple[tuple, dict, Tensor | None, Tensor | None,
                                                                      list[list[int | None]] | None]:
    """``(args, kwargs)`` for the model, the ids (B, L) or None, the real-token flags (B, L) or
    None, and the word ids of text inputs (one list per input, or None)."""
    hf = facts.is_hf(model)
    word_ids = None
    if _is_text(inputs):
        inputs = _text_batch(tokenizer, inputs)
        word_ids = inputs.pop("word_ids")
        if hf:
            inputs = _accepted(model, inputs)
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
                    f"or a dict of tensors; got {_summary(inputs)}")


def _target(model: nn.Module, target: object, tokenizer: Any) -> dict[str, Any]:
    """``decoder_input_ids`` (B, T), ``decoder_attention_mask`` (B, T) or None, and ``word_ids``
    for an encoder-decoder model's ``target``: what its decoder reads is the decoder start token
    followed by the target (the start token is not added twice)."""
    word_ids = None
    if _is_text(target):
        if tokenizer is None:
            raise ValueError(f"target is text, so capture needs a tokenizer, and none was found for "
                             f"{facts.name(model)!r}; pass tokenizer=")
        batch = _text_batch(tokenizer, target, target=True)
        labels, valid, word_ids = batch["input_ids"], batch.get("attention_mask"), batch["word_ids"]
    elif isinstance(target, Tensor) and not target.dtype.is_floating_point and target.dim() in (1, 2):
        labels, valid = (target[None] if target.dim() == 1 else target), None
    elif (isinstance(target, Sequence) and target and all(isinstance(i, int) and not isinstance(i, bool)
                                                          for i in target)):
        labels, valid = torch.tensor([list(target)]), None
    else:
        raise TypeError(f"target must be text (a string or a list of strings) or token ids (a list of ints or an "
                        f"integer (T,) or (B, T) tensor); got {_summary(target)}")
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


def _special(tokenizer: Any, ids: list[int]) -> list[bool] | None:
    """Per id, whether it is one of ``tokenizer``'s special tokens; None without a tokenizer that says."""
    if tokenizer is None or not hasattr(tokenizer, "get_special_tokens_mask"):
        return None
    try:
        return [bool(f) for f in tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)]
    except (ValueError, NotImplementedError, TypeError):
        return None


def _sides(ids: Tensor | None, real: Sequence[slice | Tensor], length: int, tokenizer: Any,
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
        special.append(_special(tokenizer, row))
    return {"tokens": tokens, "token_ids": None if ids is None else token_ids,
            "special": special if special and all(s is not None for s in special) else None,
            "word_ids": None if word_ids is None else [_cut(w, r) for w, r in zip(word_ids, real)]}


def _progress(progress: bool | Callable[[int, int], None]) -> Callable[[int, int], None] | None:
    if callable(progress):
        return progress
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool or a callable (done, total); got {describe(progress)}")
    if not progress:
        return None

    def show(done: int, total: int) -> None:
        print(f"\rcapture: layer {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    return show


# -- capture -------------------------------------------------------------------------------------

_CROSS_NAME = re.compile(r"cross|encoder|encdec", re.IGNORECASE)


def encoder_decoder_parts(model: nn.Module) -> dict[int, str]:
    """For an encoder-decoder transformers model: ``id(module) -> "encoder" | "decoder" | "cross"``
    for every module of its encoder and decoder.

    A module belongs to the part whose stack (``get_encoder()``, ``get_decoder()``) holds it;
    in the decoder, an attention module named like cross-attention (``encoder_attn`` in BART,
    Marian and Whisper, ``EncDecAttention`` in T5, ``crossattention``) is ``"cross"``.
    """
    lm = facts.pretrained(model)
    encoder, decoder = lm.get_encoder(), lm.get_decoder()
    parts = {id(m): "encoder" for m in encoder.modules()}
    for name, m in decoder.named_modules():
        parts[id(m)] = "cross" if _CROSS_NAME.search(name.rsplit(".", 1)[-1]) else "decoder"
    return parts


def _run(model: nn.Module, recording: contextlib.AbstractContextManager, args: tuple, kwargs: dict) -> Any:
    """One forward pass of ``model`` in eval mode without gradients, recorded; its modes restored after.
    Returns the model's output."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), recording:
            return model(*args, **kwargs)
    finally:
        for m, mode in modes:
            m.training = mode


def capture(model: nn.Module, inputs: object, layers: Iterable[int] | int | None = None,
            heads: Iterable[int] | int | None = None, *, target: object = None, dtype: torch.dtype = torch.float32,
            tokenizer: Any = None, progress: bool | Callable[[int, int], None] = False) -> AttentionMaps | Seq2SeqMaps:
    """Run ``model`` once on ``inputs`` and return the attention probabilities it computed.

    Args:
        model: a Hugging Face transformers model loaded with any attention implementation
            (eager, sdpa, attnkit; flex_attention masks cannot be read back), or an attnkit
            module holding :class:`~attnkit.nn.MultiHeadAttention` layers (e.g.
            :class:`~attnkit.nn.TransformerLM`), or attnkit's
            :class:`~attnkit.nn.EncoderDecoder` (with ``target``; gives Seq2SeqMaps).
        inputs: a string or a list of strings (tokenized with ``tokenizer`` into a padded
            batch), token ids ((L,) or (B, L) integer tensor, or a list of ints), or a dict
            of tensors passed to the model (``input_ids``, ``attention_mask``, ...; for
            attnkit models ``tokens``/``padding_mask``, or ``x`` for embeddings). Whisper-like
            models: a float ``input_features`` tensor or a dict holding it.
        target: for an encoder-decoder model, what its decoder produces, teacher-forced:
            text (tokenized with ``tokenizer(text_target=...)``), or token ids. The decoder
            reads ``config.decoder_start_token_id`` followed by the target (the start token
            is not added if every target begins with it), so row i+1 is the step that
            produces target token i. Or pass ``decoder_input_ids`` (and
            ``decoder_attention_mask``) in ``inputs``; then these are read as given.
            For attnkit's EncoderDecoder, the decoder's input ids as its ``forward``
            takes them (BOS first), read as given; or ``tgt_ids`` (and
            ``tgt_padding_mask``) in an inputs dict beside ``src_ids``.
        layers, heads: model indices to keep (an int or a sequence); None = all. Layers
            are counted in the order the model calls attention (for an encoder-decoder,
            separately in its encoder, decoder and cross-attention; the selection applies
            to each).
        dtype: storage dtype of the maps: float32 (default), float16, bfloat16 or float64.
            Probabilities are computed in float32 (float64 for a float64 model) and
            converted as soon as each head is done.
        tokenizer: turns text into ids and ids into token strings. Default for a
            transformers model: the tokenizer in its local folder (``model.name_or_path``);
            without one, tokens are ``str(id)``.
        progress: True prints ``layer i/n`` to stderr; a callable gets ``(done, total)``.

    Returns:
        :class:`AttentionMaps` with one (layers, heads, L, L) tensor per input, cut to its
        real tokens (padding is removed, for left or right padding alike), and the model's
        layer and head counts, special-token flags and word ids where known.
        For an encoder-decoder model (``config.is_encoder_decoder``):
        :class:`~attnkit.inspect.Seq2SeqMaps`, whose ``encoder`` (S x S), ``decoder``
        (T x T) and ``cross`` (T x S: queries are target tokens, keys source tokens) maps
        are each cut to the real tokens on both sides. Whisper's encoder side has no
        tokens: its keys are named ``"frame i"`` (one per encoder position).

    The model runs in eval mode and without gradients, and gets back its mode after. Its
    outputs are exactly those of a normal call: recording only reads q and k.

    Raises:
        ValueError: an input longer than the model's ``max_position_embeddings`` (or a
            learned-position TransformerLM's ``max_length``); a layer or head the model
            does not have; a model that calls attention a number of times other than its
            layer count, or with a cache; an encoder-decoder model without a target, or
            a target for one that is not.
        TypeError: inputs or model of a kind capture does not take.

    >>> import torch
    >>> from attnkit.nn import TransformerConfig, TransformerLM
    >>> lm = TransformerLM(TransformerConfig(vocab_size=50, dim=32, depth=3, num_heads=4))
    >>> maps = capture(lm, torch.tensor([[5, 6, 7, 8]]), layers=[0, 2], heads=[1, 3])
    >>> maps
    AttentionMaps(model='TransformerLM', 1 input of 4 tokens, layers [0, 2], heads [1, 3], float32, 256 B)
    >>> maps[0].shape, maps.tokens[0]
    (torch.Size([2, 2, 4, 4]), ['5', '6', '7', '8'])
    >>> bool(maps[0][..., 0, 1:].eq(0).all())  # causal: the first token sees only itself
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {describe(model)}")
    if dtype not in _STORAGE:
        raise TypeError(f"dtype must be one of {', '.join(str(d) for d in _STORAGE)}; got {dtype!r}")
    wanted_layers, wanted_heads = _index_list("layers", layers), _index_list("heads", heads)
    report = _progress(progress)
    if isinstance(model, EncoderDecoder):
        return _capture_attnkit_seq2seq(model, inputs, target, wanted_layers, wanted_heads, dtype, tokenizer)
    hf = facts.is_hf(model)
    if tokenizer is None and (_is_text(inputs) or _is_text(target) or hf):
        tokenizer = _find_tokenizer(model)
        if tokenizer is None and _is_text(inputs):
            raise ValueError(f"inputs are text, so capture needs a tokenizer, and none was found for "
                             f"{facts.name(model)!r}; pass tokenizer= (e.g. the one attnkit.models.load returns)")
    if hf and getattr(facts.pretrained(model).config, "is_encoder_decoder", False):
        return _capture_seq2seq(model, inputs, target, wanted_layers, wanted_heads, dtype, tokenizer, report)
    if target is not None:
        raise ValueError(f"target is for encoder-decoder models; {facts.name(model)!r} is not one (its decoder reads "
                         f"inputs alone); got target {_summary(target)}")
    attnkit_modules = [] if hf else [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    if hf:
        count = getattr(facts.text_config(model), "num_hidden_layers", None)
    elif attnkit_modules:
        count = len(attnkit_modules)
    else:
        raise TypeError(f"model must be a transformers model or hold attnkit MultiHeadAttention modules; "
                        f"got {type(model).__name__}, which holds none")
    if count is not None and wanted_layers is not None and wanted_layers[-1] >= count:
        raise ValueError(f"layers must be < {count}, the model's layer count; got {list(wanted_layers)}")
    if wanted_layers is not None:
        selected = wanted_layers
    elif count is not None:
        selected = tuple(range(count))
    else:
        raise ValueError(f"cannot tell how many attention layers {facts.name(model)!r} has; pass layers= explicitly")

    args, kwargs, ids, valid, word_ids = _encode(model, inputs, tokenizer)
    first = args[0] if args else ids
    if not isinstance(first, Tensor):
        raise TypeError(f"inputs must include token ids ('input_ids') or embeddings; got {_summary(inputs)}")
    batch, length = first.shape[:2]
    _check_length(model, length)
    real = _real_positions(valid, batch, length)
    recorder = _Recorder(selected, wanted_heads, dtype, real, real, (length, length), report)

    if hf:
        targets = {id(m) for m in model.modules()}
        recording = hf_recording(model, lambda module: recorder if id(module) in targets else None)
    else:
        recording = attnkit_recording(attnkit_modules, lambda module: recorder)
    _run(model, recording, args, kwargs)
    if hf and recorder.calls == 0:
        # Its attention bypasses transformers' AttentionInterface (BERT before transformers 5): use the
        # model's own output_attentions, which holds every layer's (B, H, L, L) float maps at once. Only
        # the eager path's maps are the ones the model used: other paths of such models compute them
        # separately, and some leave the mask out (Falcon under sdpa gives non-causal maps).
        implementation = getattr(facts.pretrained(model).config, "_attn_implementation", None)
        if implementation != "eager":
            raise ValueError(
                f"{facts.name(model)!r} computes attention in its own code, not through transformers' "
                f"attention interface, so capture can only read its eager path's output_attentions; it "
                f"was loaded with attn_implementation={implementation!r}. Load it with "
                f"attn_implementation='eager' to capture its maps")
        out = _run(model, contextlib.nullcontext(), args, {**kwargs, "output_attentions": True})
        for probs in getattr(out, "attentions", None) or ():
            recorder.given(probs)
    if count is not None and recorder.calls != count:
        raise ValueError(f"{facts.name(model)!r} called attention {recorder.calls} times in one forward pass but has "
                         f"{count} layers; capture supports models that attend once per layer (encoders, decoders) "
                         "and encoder-decoder models")
    if recorder.recorded != len(selected):
        raise ValueError(f"{facts.name(model)!r} called attention only {recorder.calls} times (0 through the attention "
                         f"interface means its attention cannot be recorded); layers {list(selected)} were requested")
    side = _sides(ids, real, length, tokenizer, word_ids)
    return AttentionMaps(attentions=recorder.store, model_name=facts.name(model), layers=selected,
                         heads=recorder.heads or (), model_layers=count, model_heads=recorder.num_heads, **side)


def _check_length(model: nn.Module, length: int) -> None:
    limit = facts.max_positions(model, unstated=None)
    if limit is not None and length > limit:
        raise ValueError(f"the input has {length} tokens, but {facts.name(model)!r} accepts at most {limit} positions "
                         "(max_position_embeddings); shorten the input")


def _capture_seq2seq(model: nn.Module, inputs: object, target: object, wanted_layers: tuple[int, ...] | None,
                     wanted_heads: tuple[int, ...] | None, dtype: torch.dtype, tokenizer: Any,
                     report: Callable[[int, int], None] | None) -> Seq2SeqMaps:
    """:func:`capture` of an encoder-decoder transformers model: its encoder, decoder and cross calls apart."""
    args, kwargs, src_ids, src_valid, src_words = _encode(model, inputs, tokenizer)
    if "decoder_input_ids" in kwargs and target is not None:
        raise ValueError("pass the decoder's tokens once: inputs hold decoder_input_ids and target is given too")
    if "decoder_input_ids" in kwargs:
        tgt_ids, tgt_valid, tgt_words = kwargs["decoder_input_ids"], kwargs.get("decoder_attention_mask"), None
    elif target is None:
        raise ValueError(f"{facts.name(model)!r} is an encoder-decoder model: capture needs the decoder's side too; "
                         f"pass target= (text or ids, teacher-forced) or decoder_input_ids in inputs; got inputs "
                         f"{_summary(inputs)}")
    else:
        decoded = _target(model, target, tokenizer)
        tgt_ids, tgt_valid, tgt_words = decoded["decoder_input_ids"], decoded["decoder_attention_mask"], \
            decoded["word_ids"]
        kwargs["decoder_input_ids"] = tgt_ids
        if tgt_valid is not None:
            kwargs["decoder_attention_mask"] = tgt_valid
    if not isinstance(tgt_ids, Tensor) or tgt_ids.dim() != 2 or tgt_ids.dtype.is_floating_point:
        raise TypeError(f"decoder_input_ids must be a (B, T) integer tensor; got {_summary(tgt_ids)}")
    source = src_ids if src_ids is not None else kwargs.get(getattr(model, "main_input_name", "input_ids"))
    if not isinstance(source, Tensor):
        raise TypeError(f"inputs must include the encoder's input ('input_ids', or "
                        f"{getattr(model, 'main_input_name', 'input_ids')!r}); got {_summary(inputs)}")
    batch, tgt_len = tgt_ids.shape
    if source.shape[0] != batch:
        raise ValueError(f"inputs hold {source.shape[0]} sequences but the target {batch}; expected one target each")
    src_len = source.shape[1] if src_ids is not None else None  # Whisper: encoder positions come from its features
    if src_len is not None:
        _check_length(model, src_len)
    real_src = _real_positions(src_valid, batch, src_len) if src_len is not None else [slice(0, None)] * batch
    real_tgt = _real_positions(tgt_valid, batch, tgt_len)
    recorders = {
        "encoder": _Recorder(wanted_layers, wanted_heads, dtype, real_src, real_src, (src_len, src_len), None),
        "decoder": _Recorder(wanted_layers, wanted_heads, dtype, real_tgt, real_tgt, (tgt_len, tgt_len), None),
        "cross": _Recorder(wanted_layers, wanted_heads, dtype, real_tgt, real_src, (tgt_len, src_len), None),
    }
    parts = encoder_decoder_parts(model)
    config = facts.pretrained(model).config
    encoder_layers = getattr(config, "encoder_layers", None) or getattr(config, "num_layers", None)
    decoder_layers = getattr(config, "decoder_layers", None) or getattr(config, "num_decoder_layers", None) \
        or encoder_layers
    total = encoder_layers + 2 * decoder_layers if encoder_layers and decoder_layers else None
    done = [0]

    def route(module: nn.Module) -> Recording | None:
        part = parts.get(id(module))
        if part is None:
            return None
        done[0] += 1
        if report is not None and total is not None:
            report(min(done[0], total), total)  # called before this call's maps are computed
        return recorders[part]

    _run(model, hf_recording(model, route), args, kwargs)
    counts = {part: r.calls for part, r in recorders.items()}
    if counts["encoder"] == 0 or counts["decoder"] == 0 or counts["cross"] != counts["decoder"]:
        raise ValueError(f"{facts.name(model)!r} made {counts['encoder']} encoder, {counts['decoder']} decoder and "
                         f"{counts['cross']} cross-attention calls through transformers' attention interface; "
                         "capture needs each layer's calls there, one cross call per decoder layer")
    for part, r in recorders.items():
        if wanted_layers is not None and wanted_layers[-1] >= r.calls:
            raise ValueError(f"layers must be < {r.calls}, the {part}'s layer count; got {list(wanted_layers)}")
    src_real_len = source.shape[1] if src_len is not None else recorders["encoder"].store[0].shape[-1]
    src = _sides(src_ids, real_src, src_real_len, tokenizer, src_words, label="frame ")
    tgt = _sides(tgt_ids, real_tgt, tgt_len, tokenizer, tgt_words)
    keyed = {"key_tokens": src["tokens"], "key_token_ids": src["token_ids"], "key_special": src["special"],
             "key_word_ids": src["word_ids"]}

    def maps(part: str, side: dict, **keys: Any) -> AttentionMaps:
        r = recorders[part]
        return AttentionMaps(attentions=r.store, model_name=facts.name(model), layers=r.layers or tuple(range(r.calls)),
                             heads=r.heads or (), model_layers=r.calls, model_heads=r.num_heads, **side, **keys)

    return Seq2SeqMaps(encoder=maps("encoder", src), decoder=maps("decoder", tgt), cross=maps("cross", tgt, **keyed),
                       sequences={"source": src["token_ids"], "target": tgt["token_ids"]})


# -- attnkit's EncoderDecoder ---------------------------------------------------------------------


def _int_ids(name: str, value: object) -> Tensor:
    """(B, L) integer ids from a (L,) or (B, L) integer tensor or a list of ints."""
    if isinstance(value, Sequence) and not isinstance(value, str) and value and all(
            isinstance(i, int) and not isinstance(i, bool) for i in value):
        value = torch.tensor([list(value)])
    if not isinstance(value, Tensor) or value.dtype.is_floating_point or value.dtype == torch.bool \
            or value.dim() not in (1, 2):
        raise TypeError(f"{name} must be token ids for attnkit's EncoderDecoder: a list of ints or an integer (L,) "
                        f"or (B, L) tensor; got {_summary(value)}")
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
        src, valid = _int_ids("inputs['src_ids']", given.pop("src_ids")), given.pop("src_padding_mask", None)
        rest = given
    elif _is_text(inputs):
        raise TypeError("attnkit's EncoderDecoder reads token ids, not text; map your words to ids (its vocabulary "
                        "is yours) and pass them")
    else:
        src, valid = _int_ids("inputs", inputs), None
    if valid is not None:
        valid = valid[None] if isinstance(valid, Tensor) and valid.dim() == 1 else valid
        if not isinstance(valid, Tensor) or valid.shape != src.shape or valid.dtype.is_floating_point:
            raise ValueError(f"src_padding_mask must be a bool (B, S) = {tuple(src.shape)} tensor, True for real "
                             f"tokens; got {_summary(valid)}")
        valid = valid.bool()
    return src, valid, rest


def _capture_attnkit_seq2seq(model: EncoderDecoder, inputs: object, target: object,
                             wanted_layers: tuple[int, ...] | None, wanted_heads: tuple[int, ...] | None,
                             dtype: torch.dtype, tokenizer: Any) -> Seq2SeqMaps:
    """:func:`capture` of attnkit's :class:`~attnkit.nn.EncoderDecoder`, teacher-forced on ``target``:
    the decoder's input ids (B, T) as ``forward`` takes them (BOS, then the target shifted right)."""
    src, src_valid, rest = source_inputs(inputs)
    if "tgt_ids" in rest and target is not None:
        raise ValueError("pass the decoder's tokens once: inputs hold tgt_ids and target is given too")
    if "tgt_ids" not in rest and target is None:
        raise ValueError(f"attnkit's EncoderDecoder needs the decoder's side too: pass target= (the decoder's input "
                         f"ids (B, T), BOS first, teacher-forced) or tgt_ids in inputs; got inputs {_summary(inputs)}")
    tgt = _int_ids("target", rest["tgt_ids"] if target is None else target)
    tgt_valid = rest.get("tgt_padding_mask")
    if tgt.shape[0] != src.shape[0]:
        raise ValueError(f"inputs hold {src.shape[0]} sequences but the target {tgt.shape[0]}; expected one target "
                         "each")
    c = model.config
    for part, depth in (("encoder", c.encoder_depth), ("decoder", c.decoder_depth)):
        if wanted_layers is not None and wanted_layers[-1] >= depth:
            raise ValueError(f"layers must be < {depth}, the {part}'s layer count; got {list(wanted_layers)}")
    if wanted_heads is not None and wanted_heads[-1] >= c.num_heads:
        raise ValueError(f"heads must be < {c.num_heads}, the model's heads per layer; got {list(wanted_heads)}")
    batch, (src_len, tgt_len) = src.shape[0], (src.shape[1], tgt.shape[1])
    real_src = _real_positions(src_valid, batch, src_len)
    real_tgt = _real_positions(tgt_valid, batch, tgt_len)
    recorders = {
        "encoder": _Recorder(wanted_layers, wanted_heads, dtype, real_src, real_src, (src_len, src_len), None),
        "decoder": _Recorder(wanted_layers, wanted_heads, dtype, real_tgt, real_tgt, (tgt_len, tgt_len), None),
        "cross": _Recorder(wanted_layers, wanted_heads, dtype, real_tgt, real_src, (tgt_len, src_len), None),
    }
    parts = attnkit_parts(model)
    modules = [m for m in model.modules() if isinstance(m, MultiHeadAttention) and id(m) in parts]
    recording = attnkit_recording(modules, lambda module: recorders[parts[id(module)]])
    _run(model, recording, (src, tgt), {"src_padding_mask": src_valid, "tgt_padding_mask": tgt_valid})
    src_side = _sides(src, real_src, src_len, tokenizer, None)
    tgt_side = _sides(tgt, real_tgt, tgt_len, tokenizer, None)
    keyed = {"key_tokens": src_side["tokens"], "key_token_ids": src_side["token_ids"],
             "key_special": src_side["special"]}

    def maps(part: str, side: dict, **keys: Any) -> AttentionMaps:
        r = recorders[part]
        return AttentionMaps(attentions=r.store, model_name=facts.name(model), layers=r.layers or tuple(range(r.calls)),
                             heads=r.heads or (), model_layers=r.calls, model_heads=c.num_heads, **side, **keys)

    return Seq2SeqMaps(encoder=maps("encoder", src_side), decoder=maps("decoder", tgt_side),
                       cross=maps("cross", tgt_side, **keyed),
                       sequences={"source": src_side["token_ids"], "target": tgt_side["token_ids"]})
