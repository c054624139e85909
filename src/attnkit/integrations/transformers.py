"""Hugging Face transformers models on :func:`attnkit.attention`: ``attn_implementation="attnkit"``.

Importing this module calls :func:`register`, which adds an attention function *and* a
mask function named ``"attnkit"`` to transformers' registries, so that

    model = AutoModel.from_pretrained(path, attn_implementation="attnkit")
    model.set_attn_implementation("attnkit")  # or switch a loaded model

runs every attention layer on attnkit. Needs transformers >= 4.57.1. Tested with transformers
5.25 and 4.57.1 (BERT, GPT-2, Llama with GQA, Mistral with a sliding window, Gemma 2 with
softcap: same outputs as ``"eager"`` to 1e-5 in float32, same greedy generations, with
dynamic and static caches; in 4.57 BERT has per-implementation attention classes and is
refused, see below).

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
with ``output_attentions=True`` it also returns the probabilities (where the model passes
that flag down to it: GPT-2, OPT and StableLM in transformers 5.24 do not, and return
``attentions=()``; :func:`attnkit.inspect.capture` records them). Options that would change
the result and that attnkit cannot apply (attention sinks ``s_aux``, head masks, paged
caches) raise ValueError rather than being ignored.

Models attnkit cannot serve are refused, never run half on attnkit. Some models (Bloom and
MPT in transformers 5.25, Falcon before it, BERT and T5 in 4.57) compute attention in their own code: they would take
attnkit's mask function and not its attention function (Bloom's mask then is never
causal, MPT's is inverted), or fail with ``KeyError: 'attnkit'`` (Falcon). Two checks
raise :class:`UnsupportedModelError` (a ValueError) for them:

- at set-up, when transformers checks ``attn_implementation="attnkit"`` for a model
  class (``from_pretrained``, the constructor, ``set_attn_implementation``,
  :func:`attnkit.models.load`): the class must declare that its attention goes through
  ``AttentionInterface`` (see :func:`supports`);
- on the model's first forward with ``"attnkit"``: every attention module that ran (a
  module whose class name contains ``Attention`` and holds no other such module, using
  ``"attnkit"``) must have called attnkit's attention function, and a forward that used
  attnkit's mask function must have called it at least once. The forward's result is not
  returned otherwise. A forward that passes this check is not checked again until the
  implementation is set to ``"attnkit"`` anew. Attention layers attnkit does not run
  (linear attention, ``torch.nn.MultiheadAttention`` inside a model) are refused alike.

For these checks :func:`register` wraps two methods of transformers' ``PreTrainedModel``
(``get_correct_attn_implementation`` and ``set_attn_implementation``); the wrappers act
only when the implementation asked for is ``"attnkit"``.
"""

from __future__ import annotations

import contextvars
import functools
from typing import Any

import torch
import transformers
from torch import Tensor

from attnkit import masks
from attnkit._checks import describe
from attnkit.functional import attention, attention_probs

# AttentionInterface, AttentionMaskInterface, and decoders that use them (4.57.1 declared: 4.57.0 was yanked)
_MIN_VERSION = (4, 57)
if tuple(int(part) for part in transformers.__version__.split(".")[:2]) < _MIN_VERSION:
    raise ImportError(f"attnkit.integrations.transformers needs transformers >= 4.57; found "
                      f"{transformers.__version__}: pip install -U 'transformers>=4.57.1'")

from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402
from transformers.modeling_utils import AttentionInterface, PreTrainedModel  # noqa: E402

__all__ = ["NAME", "UNSUPPORTED", "UnsupportedModelError", "attention_forward", "mask_forward", "register", "supports",
           "to_attnkit_mask"]

NAME = "attnkit"

UNSUPPORTED = {
    # keyword arguments that change the result and that attnkit does not implement: name -> what it is
    "s_aux": "attention sinks (s_aux)",
    "sinks": "attention sinks",
    "head_mask": "a head mask",
    "layer_head_mask": "a head mask",
    "cache": "a paged cache (continuous batching)",
}

_ADVICE = ("load it with attn_implementation='eager' (or 'sdpa', where the model has it); attnkit.inspect.capture "
           "records its attention maps under 'eager'")


class UnsupportedModelError(ValueError):
    """A transformers model that ``attn_implementation="attnkit"`` cannot serve.

    Raised when a model's attention does not run through transformers' ``AttentionInterface``
    (it computes attention in its own code), at set-up or on its first forward; see this
    module's docstring. The message names the model class and what to use instead.
    """


def supports(model: Any) -> bool:
    """Whether a transformers model (or model class) declares that its attention can run on attnkit.

    True when the class declares ``_supports_attention_backend`` (transformers' flag for
    models whose attention and masks go through its registries) or when transformers' own
    check for ``set_attn_implementation`` (``_can_set_attn_implementation``: its modeling
    file calls ``AttentionInterface``) says so. Declared support is checked again at run
    time: see this module's docstring.

    >>> import transformers
    >>> supports(transformers.LlamaForCausalLM), supports(transformers.BloomForCausalLM)
    (True, False)
    """
    cls = model if isinstance(model, type) else type(model)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise TypeError(f"model must be a transformers PreTrainedModel or its class; got {describe(model)}")
    checked: type[PreTrainedModel] = cls  # issubclass does not narrow to a class mypy does not follow
    return bool(checked._supports_attention_backend) or bool(checked._can_set_attn_implementation())


def _refuse_undeclared(model: Any) -> None:
    if not supports(model):
        name = type(model).__name__
        raise UnsupportedModelError(
            f"{name} cannot use attn_implementation={NAME!r}: in transformers {transformers.__version__} its attention "
            "does not go through AttentionInterface (the model computes attention in its own code, so attnkit could "
            f"only supply its mask, and the result would be wrong); {_ADVICE}"
        )


# -- the first-forward check --------------------------------------------------------------------


class _Watch:
    """What one forward of a model on ``"attnkit"`` ran: its attention modules, attnkit's calls."""

    def __init__(self, model: torch.nn.Module, modules: list[torch.nn.Module]):
        self.model = model
        self.attention_calls = 0
        self.mask_calls = 0
        self.before: dict[int, int] = {}  # attention module -> attention_calls when it started
        self.ran: dict[int, str] = {}  # attention modules that ran -> class name
        self.served: set[int] = set()  # ...and called attnkit's attention function meanwhile
        self.handles = [h for m in modules for h in (m.register_forward_pre_hook(self._enter),
                                                      m.register_forward_hook(self._leave))]

    def _enter(self, module: torch.nn.Module, args: Any) -> None:
        self.before[id(module)] = self.attention_calls

    def _leave(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.ran[id(module)] = type(module).__name__
        if self.attention_calls > self.before.pop(id(module), self.attention_calls):
            self.served.add(id(module))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        _WATCHES.set(tuple(w for w in _WATCHES.get() if w is not self))

    def problem(self) -> str | None:
        """What went wrong in the forward watched, or None."""
        missed = sorted({name for key, name in self.ran.items() if key not in self.served})
        if missed:
            return (f"{len(self.ran) - len(self.served)} of its {len(self.ran)} attention modules that ran "
                    f"({', '.join(missed)}) did not call attnkit's attention function")
        if self.mask_calls and not self.attention_calls:
            return f"it used attnkit's mask function {self.mask_calls} time(s) but never attnkit's attention function"
        return None


_WATCHES: contextvars.ContextVar[tuple[_Watch, ...]] = contextvars.ContextVar("attnkit_watches", default=())


def _attention_modules(module: torch.nn.Module, implementation: str, found: list[torch.nn.Module]) -> bool:
    """Append to ``found`` the attention modules under ``module`` that use ``"attnkit"``.

    An attention module is one whose class name contains ``Attention`` and that holds no
    other such module (BERT's ``BertSelfAttention``, not its wrapper ``BertAttention``). Its
    implementation is its own config's, else that of the nearest model above it (a vision
    tower may use another). Returns whether ``module`` or a module below it is so named.
    """
    if isinstance(module, PreTrainedModel):
        implementation = module.config._attn_implementation
    below = False
    for child in module.children():
        below = _attention_modules(child, implementation, found) or below
    named = "Attention" in type(module).__name__
    if named and not below:
        own = getattr(getattr(module, "config", None), "_attn_implementation", implementation)
        if own == NAME:
            found.append(module)
    return named or below


def _start_check(model: PreTrainedModel, args: Any) -> None:
    """Forward pre-hook: until a forward on ``"attnkit"`` passed, watch what this one runs."""
    stale = model.__dict__.pop("_attnkit_watch", None)  # left by an interrupted forward (KeyboardInterrupt)
    if stale is not None:
        stale.close()
    if model.__dict__.get("_attnkit_checked", True) or model.config._attn_implementation != NAME:
        return
    modules: list[torch.nn.Module] = []
    _attention_modules(model, NAME, modules)
    watch = _Watch(model, modules)
    _WATCHES.set((*_WATCHES.get(), watch))
    model.__dict__["_attnkit_watch"] = watch


def _finish_check(model: torch.nn.Module, args: Any, output: Any) -> None:
    """Forward hook (also called when the forward raised, with ``output`` None): refuse the result of a
    forward in which attention did not all run on attnkit."""
    watch = model.__dict__.pop("_attnkit_watch", None)
    if watch is None:
        return
    watch.close()
    if output is None:  # the forward raised
        return
    problem = watch.problem()
    if problem is None:
        if watch.ran or watch.attention_calls:  # else nothing attended: check the next forward
            model.__dict__["_attnkit_checked"] = True
        return
    if any(m is model for outer in _WATCHES.get() for m in outer.model.modules()):
        return  # the model around this one (a ForCausalLM around its Model) saw the same and reports it
    raise UnsupportedModelError(
        f"{type(model).__name__} cannot use attn_implementation={NAME!r}: in a forward, {problem}, so it "
        f"computes attention in its own code and its output would be wrong; {_ADVICE}"
    )


def _watch_first_forward(model: torch.nn.Module) -> None:
    """Have ``model``'s next forward checked (hooks added once per model; cheap once it passed)."""
    if not model.__dict__.get("_attnkit_hooked", False):
        model.register_forward_pre_hook(_start_check)
        model.register_forward_hook(_finish_check, always_call=True)
        model.__dict__["_attnkit_hooked"] = True
    model.__dict__["_attnkit_checked"] = False


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
    for name, what in UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise ValueError(
                f"attn_implementation={NAME!r} does not support {what}, which {type(module).__name__} passed as "
                f"{name}=...; load this model with attn_implementation='eager' instead"
            )
    for watch in _WATCHES.get():
        watch.attention_calls += 1
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
    for watch in _WATCHES.get():
        watch.mask_calls += 1
    dense = sdpa_mask(**kwargs)
    if dense is not None:
        dense.attnkit_mask = _structured(dense, kwargs)
    return dense


def _checked_get_correct(method: Any) -> Any:
    """``PreTrainedModel.get_correct_attn_implementation`` that refuses and watches models set to attnkit."""
    @functools.wraps(method)
    def get_correct_attn_implementation(self: Any, requested_attention: Any, *args: Any, **kwargs: Any) -> Any:
        if requested_attention == NAME:
            _refuse_undeclared(self)
            _watch_first_forward(self)
        return method(self, requested_attention, *args, **kwargs)

    get_correct_attn_implementation._attnkit_checks = True  # type: ignore[attr-defined]
    return get_correct_attn_implementation


def _checked_set(method: Any) -> Any:
    """``PreTrainedModel.set_attn_implementation`` that refuses attnkit for a model that cannot use it.

    (transformers only warns there for a model class it cannot switch, and keeps the old implementation.)
    """
    @functools.wraps(method)
    def set_attn_implementation(self: Any, attn_implementation: Any, *args: Any, **kwargs: Any) -> Any:
        top = attn_implementation.get("") if isinstance(attn_implementation, dict) else attn_implementation
        if top == NAME:
            _refuse_undeclared(self)
        return method(self, attn_implementation, *args, **kwargs)

    set_attn_implementation._attnkit_checks = True  # type: ignore[attr-defined]
    return set_attn_implementation


def register() -> None:
    """Register ``"attnkit"`` as an attention implementation with transformers (idempotent).

    Called when this module is imported. After it, ``from_pretrained(...,
    attn_implementation="attnkit")`` and ``model.set_attn_implementation("attnkit")`` work,
    for models that can use it; others raise :class:`UnsupportedModelError` (see this
    module's docstring for the checks, and for the two ``PreTrainedModel`` methods it wraps).

    >>> from attnkit.integrations.transformers import register, NAME
    >>> from transformers import AttentionInterface
    >>> register()
    >>> NAME in AttentionInterface()
    True
    """
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_forward)
    for name, wrap in (("get_correct_attn_implementation", _checked_get_correct),
                       ("set_attn_implementation", _checked_set)):
        method = getattr(PreTrainedModel, name)
        if not getattr(method, "_attnkit_checks", False):
            setattr(PreTrainedModel, name, wrap(method))


register()
