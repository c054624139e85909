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
  A model whose attention bypasses that lookup (BERT before transformers 5, Falcon, Bloom,
  MPT) is run a second time with its own ``output_attentions=True``, which holds all layers
  at once; only when it was loaded with ``attn_implementation="eager"``, since other paths
  of such models may compute their maps apart from what they use (Falcon under sdpa gives
  non-causal ones).

Layers are numbered in the order the model calls attention in one forward pass, which for
encoders and decoders is the model's layer index. Encoder-decoder models (several attention
calls per layer; refused by name, with the inputs' shapes) and calls with a KV cache are not
supported.

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
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from attnkit import masks
from attnkit._checks import describe
from attnkit.functional import attention_probs
from attnkit.inspect.maps import AttentionMaps
from attnkit.nn.attention import MultiHeadAttention
from attnkit.nn.transformer import TransformerLM

__all__ = ["capture"]

_STORAGE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CHUNK_BYTES = 1 << 26  # float32 scores computed at once, at most (when heads can be split)
_PATCH_LOCK = threading.RLock()  # one capture at a time patches transformers' lookup
_PATCHING: list[str] = []  # the kinds the lock's holder patches now (to refuse a nested one of the same kind)


def _index_list(name: str, given: Iterable[int] | int | None) -> tuple[int, ...] | None:
    if given is None:
        return None
    values = [given] if isinstance(given, int) else list(given)  # type: ignore[arg-type]
    if not values or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in values):
        raise ValueError(f"{name} must be None, an int >= 0 or a non-empty sequence of them; got {given!r}")
    return tuple(sorted(set(values)))


def _is_hf(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _heads_slice(t: Tensor, heads: list[int]) -> Tensor:
    """A (.., H, Lq, Lk)-broadcastable tensor restricted to some heads (unchanged if it has no head dim)."""
    t4 = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    return t4 if t4.shape[1] == 1 else t4[:, heads]


class _Recorder:
    """Receives each attention call of one forward pass and keeps the selected probabilities."""

    def __init__(self, layers: tuple[int, ...], heads: tuple[int, ...] | None, dtype: torch.dtype,
                 real: list[slice | Tensor], progress: Callable[[int, int], None] | None):
        self.layers, self.heads, self.dtype, self.real, self.progress = layers, heads, dtype, real, progress
        self.slot = {layer: i for i, layer in enumerate(layers)}
        self.calls = 0
        self.recorded = 0
        self.store: list[Tensor] = []

    def _begin(self, batch: int, num_heads: int, q_len: int, k_len: int) -> int | None:
        """The slot of the next attention call's layer (None if not selected), checked; storage on first use."""
        layer, self.calls = self.calls, self.calls + 1
        if layer not in self.slot:
            return None
        if q_len != k_len or batch != len(self.real):
            raise ValueError(f"capture records self-attention over the whole input; attention call {layer} has "
                             f"{q_len} queries and {k_len} keys for a batch of {batch} (a cache or cross-attention?)")
        if self.heads is None:
            self.heads = tuple(range(num_heads))
        elif self.heads[-1] >= num_heads:
            raise ValueError(f"heads must be < {num_heads}, the model's heads per layer; got {list(self.heads)}")
        if not self.store:
            self.store = [torch.empty(len(self.layers), len(self.heads), *((_length(r, q_len),) * 2), dtype=self.dtype)
                          for r in self.real]
        return self.slot[layer]

    def _keep(self, slot: int, start: int, probs: Tensor) -> None:
        """Store (B, c, L, L) probabilities of the selected heads ``start:start + c``, cut to the real tokens."""
        for b, r in enumerate(self.real):
            self.store[b][slot, start:start + probs.shape[1]] = probs[b][:, r][:, :, r]

    def _done(self) -> None:
        self.recorded += 1
        if self.progress is not None:
            self.progress(self.recorded, len(self.layers))

    def __call__(self, q: Tensor, k: Tensor, mask: masks.Mask | Tensor | None, bias: Any,
                 scale: float | None, softcap: float | None) -> None:
        """Compute and keep the probabilities of one attention call: q (B, H, L, D), k (B, Hkv, L, D)."""
        batch, num_heads, q_len, _ = q.shape
        slot = self._begin(batch, num_heads, q_len, k.shape[2])
        if slot is None:
            return
        heads = self.heads or ()
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
                probs = attention_probs(
                    q[:, chosen], kv, kv, scale=scale, softcap=softcap,
                    mask=_heads_slice(mask, chosen) if isinstance(mask, Tensor) else mask,
                    bias=[_heads_slice(b, chosen) for b in bias_parts] or None,
                )  # (B, c, Lq, Lk)
            else:
                probs = attention_probs(q, k, k, mask=mask, bias=bias, scale=scale, softcap=softcap)[:, chosen]
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
def _attnkit_recording(modules: list[MultiHeadAttention], recorder: _Recorder) -> Iterator[None]:
    def hook(module, q, k, v, mask, bias):
        recorder(q, k, mask, bias, None, None)

    handles = [m.register_attention_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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
def _hf_recording(model: nn.Module, recorder: _Recorder) -> Iterator[None]:
    """Wrap the attention functions transformers hands to ``model``'s modules, for this block only."""
    from attnkit.integrations.transformers import _UNSUPPORTED, to_attnkit_mask  # needs transformers >= 4.57

    targets = {id(m) for m in model.modules()}
    # eager gets None where it wants no mask; sdpa, flash and attnkit read None as "causal if is_causal"
    none_is_causal = "eager" not in str(model.config._attn_implementation)

    def wrap(fn: Any) -> Any:
        @functools.wraps(fn)
        def recording(*args: Any, **kwargs: Any) -> Any:
            (module, query, key, _, attention_mask), named = _arguments(fn, args, kwargs)
            for name, what in _UNSUPPORTED.items():
                if name != "cache" and named.get(name) is not None:
                    raise ValueError(f"capture cannot record attention with {what} ({type(module).__name__} passed "
                                     f"{name}=...): the probabilities would differ from what the model computes")
            result = fn(*args, **kwargs)
            if id(module) in targets:
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
    if not (_is_hf(model) and getattr(model, "name_or_path", "")):
        return None
    from transformers import AutoTokenizer

    from attnkit.models import path

    try:
        return AutoTokenizer.from_pretrained(path(model.name_or_path), local_files_only=True)
    except (OSError, ValueError, ImportError):
        return None


def _is_text(inputs: object) -> bool:
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


def _name(model: nn.Module) -> str:
    return str(getattr(model, "name_or_path", "") or type(model).__name__)


def _max_positions(model: nn.Module) -> int | None:
    if _is_hf(model):
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return getattr(config, "max_position_embeddings", None)
    if isinstance(model, TransformerLM) and model.config.positions == "learned":
        return model.config.max_length
    return None


def _encode(model: nn.Module, inputs: object, tokenizer: Any) -> tuple[tuple, dict, Tensor | None, Tensor | None]:
    """``(args, kwargs)`` for the model, the ids (B, L) or None, and the real-token flags (B, L) or None."""
    hf = _is_hf(model)
    if _is_text(inputs):
        texts = [inputs] if isinstance(inputs, str) else list(inputs)  # type: ignore[arg-type]
        inputs = dict(tokenizer(texts, padding=len(texts) > 1, return_tensors="pt"))
    if isinstance(inputs, Sequence) and inputs and all(isinstance(i, int) for i in inputs):
        inputs = torch.tensor([inputs])
    if isinstance(inputs, Tensor):
        if inputs.dtype.is_floating_point:
            if hf:
                raise TypeError(f"inputs for a transformers model must be text, token ids or a dict of tensors; "
                                f"got {describe(inputs)}")
            if inputs.dim() != 3:
                raise ValueError(f"float inputs must be (B, L, E) embeddings; got {describe(inputs)}")
            return (inputs,), {}, None, None
        ids = inputs[None] if inputs.dim() == 1 else inputs
        if ids.dim() != 2:
            raise ValueError(f"token ids must be (L,) or (B, L); got {describe(inputs)}")
        return ((), {"input_ids": ids}, ids, None) if hf else ((ids,), {}, ids, None)
    if isinstance(inputs, Mapping):
        kwargs = dict(inputs)
        if hf:
            return (), kwargs, kwargs.get("input_ids"), kwargs.get("attention_mask")
        if "input_ids" in kwargs:
            kwargs["tokens"] = kwargs.pop("input_ids")
        if "attention_mask" in kwargs:
            kwargs["padding_mask"] = kwargs.pop("attention_mask")
        kwargs.pop("token_type_ids", None)
        if kwargs.get("padding_mask") is not None:
            kwargs["padding_mask"] = kwargs["padding_mask"].bool()
        ids = kwargs.get("tokens")
        if ids is not None:
            return (kwargs.pop("tokens"),), kwargs, ids, kwargs.get("padding_mask")
        x = kwargs.pop("x", None)
        if x is None:
            raise ValueError(f"a dict of inputs needs 'input_ids' (or 'tokens', or 'x' for embeddings); "
                             f"got keys {sorted(inputs)}")
        return (x,), kwargs, None, kwargs.get("padding_mask")
    raise TypeError(f"inputs must be a string, a list of strings, token ids (a list of ints or an integer tensor) "
                    f"or a dict of tensors; got {_summary(inputs)}")


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


def capture(model: nn.Module, inputs: object, layers: Iterable[int] | int | None = None,
            heads: Iterable[int] | int | None = None, *, dtype: torch.dtype = torch.float32,
            tokenizer: Any = None, progress: bool | Callable[[int, int], None] = False) -> AttentionMaps:
    """Run ``model`` once on ``inputs`` and return the attention probabilities it computed.

    Args:
        model: a Hugging Face transformers model loaded with any attention implementation
            (eager, sdpa, attnkit; flex_attention masks cannot be read back), or an attnkit
            module holding :class:`~attnkit.nn.MultiHeadAttention` layers (e.g.
            :class:`~attnkit.nn.TransformerLM`).
        inputs: a string or a list of strings (tokenized with ``tokenizer`` into a padded
            batch), token ids ((L,) or (B, L) integer tensor, or a list of ints), or a dict
            of tensors passed to the model (``input_ids``, ``attention_mask``, ...; for
            attnkit models ``tokens``/``padding_mask``, or ``x`` for embeddings).
        layers, heads: model indices to keep (an int or a sequence); None = all. Layers
            are counted in the order the model calls attention.
        dtype: storage dtype of the maps: float32 (default), float16, bfloat16 or float64.
            Probabilities are computed in float32 (float64 for a float64 model) and
            converted as soon as each head is done.
        tokenizer: turns text into ids and ids into token strings. Default for a
            transformers model: the tokenizer in its local folder (``model.name_or_path``);
            without one, tokens are ``str(id)``.
        progress: True prints ``layer i/n`` to stderr; a callable gets ``(done, total)``.

    Returns:
        :class:`AttentionMaps` with one (layers, heads, L, L) tensor per input, cut to its
        real tokens (padding is removed, for left or right padding alike).

    The model runs in eval mode and without gradients, and gets back its mode after. Its
    outputs are exactly those of a normal call: recording only reads q and k.

    Raises:
        ValueError: an input longer than the model's ``max_position_embeddings`` (or a
            learned-position TransformerLM's ``max_length``); a layer or head the model
            does not have; an encoder-decoder transformers model (Whisper, T5, BART); a
            model that calls attention a number of times other than its layer count, or
            with a cache or cross-attention.
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
    hf = _is_hf(model)
    attnkit_modules = [] if hf else [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    if hf and getattr(model.config, "is_encoder_decoder", False):
        kind = "" if _name(model) == type(model).__name__ else f" ({type(model).__name__})"
        raise ValueError(f"capture records models that attend once per layer (encoders, decoders); {_name(model)!r}"
                         f"{kind} is an encoder-decoder model, whose encoder, decoder and cross-attention calls it "
                         f"cannot record yet; got inputs {_summary(inputs)}")
    if hf:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        count = getattr(config, "num_hidden_layers", None)
    elif attnkit_modules:
        count = len(attnkit_modules)
    else:
        raise TypeError(f"model must be a transformers model or hold attnkit MultiHeadAttention modules; "
                        f"got {type(model).__name__}, which holds none")
    if count is None and wanted_layers is None:
        raise ValueError(f"cannot tell how many attention layers {_name(model)!r} has; pass layers= explicitly")
    if count is not None and wanted_layers is not None and wanted_layers[-1] >= count:
        raise ValueError(f"layers must be < {count}, the model's layer count; got {list(wanted_layers)}")
    selected = wanted_layers if wanted_layers is not None else tuple(range(count))  # type: ignore[arg-type]

    if tokenizer is None and (_is_text(inputs) or hf):
        tokenizer = _find_tokenizer(model)
        if tokenizer is None and _is_text(inputs):
            raise ValueError(f"inputs are text, so capture needs a tokenizer, and none was found for "
                             f"{_name(model)!r}; pass tokenizer= (e.g. the one attnkit.models.load returns)")
    args, kwargs, ids, valid = _encode(model, inputs, tokenizer)
    first = args[0] if args else ids
    if not isinstance(first, Tensor):
        raise TypeError(f"inputs must include token ids ('input_ids') or embeddings; got {_summary(inputs)}")
    batch, length = first.shape[:2]
    limit = _max_positions(model)
    if limit is not None and length > limit:
        raise ValueError(f"the input has {length} tokens, but {_name(model)!r} accepts at most {limit} positions "
                         "(max_position_embeddings); shorten the input")
    real = _real_positions(valid, batch, length)
    recorder = _Recorder(selected, wanted_heads, dtype, real, report)

    recording = _hf_recording(model, recorder) if hf else _attnkit_recording(attnkit_modules, recorder)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            with recording:
                model(*args, **kwargs)
            if hf and recorder.calls == 0:
                # Its attention bypasses transformers' AttentionInterface (BERT before transformers 5): use the
                # model's own output_attentions, which holds every layer's (B, H, L, L) float maps at once. Only
                # the eager path's maps are the ones the model used: other paths of such models compute them
                # separately, and some leave the mask out (Falcon under sdpa gives non-causal maps).
                implementation = getattr(model.config, "_attn_implementation", None)
                if implementation != "eager":
                    raise ValueError(
                        f"{_name(model)!r} computes attention in its own code, not through transformers' "
                        f"attention interface, so capture can only read its eager path's output_attentions; it "
                        f"was loaded with attn_implementation={implementation!r}. Load it with "
                        f"attn_implementation='eager' to capture its maps")
                for probs in getattr(model(*args, **kwargs, output_attentions=True), "attentions", None) or ():
                    recorder.given(probs)
    finally:
        for m, mode in modes:
            m.training = mode
    if count is not None and recorder.calls != count:
        raise ValueError(f"{_name(model)!r} called attention {recorder.calls} times in one forward pass but has "
                         f"{count} layers; capture supports models that attend once per layer (encoders, decoders)")
    if recorder.recorded != len(selected):
        raise ValueError(f"{_name(model)!r} called attention only {recorder.calls} times (0 through the attention "
                         f"interface means its attention cannot be recorded); layers {list(selected)} were requested")

    tokens: list[list[str]] = []
    token_ids: list[list[int]] | None = None if ids is None else []
    for b, r in enumerate(real):
        if ids is None:
            tokens.append([str(i) for i in range(length)[r]] if isinstance(r, slice) else [str(int(i)) for i in r])
            continue
        row = ids[b].cpu()[r].tolist()
        token_ids.append(row)  # type: ignore[union-attr]
        tokens.append(list(tokenizer.convert_ids_to_tokens(row)) if tokenizer is not None else [str(i) for i in row])
    return AttentionMaps(attentions=recorder.store, tokens=tokens, token_ids=token_ids, model_name=_name(model),
                         layers=selected, heads=recorder.heads or ())
