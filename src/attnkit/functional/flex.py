"""The flex backend: attnkit's masks and biases run by PyTorch's FlexAttention, compiled with ``torch.compile``.

A mask becomes Flex's ``BlockMask`` and ``mask_mod`` (:func:`attnkit.masks.flex.to_flex`); soft-capping and the
biases become one ``score_mod`` (:func:`score_mod_of`: ALiBi, tensor biases, ``biases.score_mod`` functions and
their sums). One ``torch.compile``'d ``flex_attention`` serves every call (``dynamic=False``: dynamo compiles
once per shape, dtype and device); the ``BlockMask`` and ``score_mod`` are cached per (shapes, device, dtype,
mask, bias, scale, softcap, and the version counters of the tensors the mask and bias hold, so a mask changed in
place gets a new one), holding the mask and bias objects, so reuse a mask object across calls to reuse them.

Where it runs: ``backend="flex"`` on CPU and CUDA. ``backend="auto"`` takes it on CUDA after sdpa, for calls
SDPA cannot express (:func:`attnkit.functional.core.select_backend`); on CPU only where ``attnkit backends
--tune`` measured it fastest (:mod:`attnkit.functional.tuning`); and in either case for the first
:data:`AUTO_COMPILES` compiles of a process (:func:`auto_refusal`). :func:`refusals` lists what it cannot do:
dropout, a tensor bias's gradient, a bias with no ``score_mod`` form, and on CPU (where inductor compiles it
to C++) gradients, ``return_lse`` and float64.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from attnkit.biases import ALiBi, Bias, ScoreMod, ScoreModBias, TensorBias
from attnkit.functional._call import AttentionCall
from attnkit.masks.flex import to_flex

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

_CACHE_SIZE = 32  # BlockMasks kept (least recently used dropped first)
# Compiles auto lets Flex make in one process. Dynamo compiles anew for each shape, dtype and device, and for
# each value of the constants the mask, bias, scale and softcap bake in (a window's width: measured, a second
# sliding_window(20) reuses the first's compile, a sliding_window(21) does not; document ids are tensors, and
# new ids reuse it). Each compile takes seconds, and past dynamo's recompile limit (8) the compiled function
# falls back to eager FlexAttention, which materialises the scores.
AUTO_COMPILES = 8
_COMPILED: set[tuple] = set()  # _variant() of every call run so far
_PREPARED: OrderedDict[tuple, tuple[object, object, BlockMask | None, ScoreMod | None]] = OrderedDict()
_LOCK = threading.Lock()  # guards _PREPARED and _COMPILED: attention may be called from several threads


@functools.cache
def _flex_available() -> str | None:
    """Why this torch has no FlexAttention, or None if it has."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError as e:
        return f"this torch ({torch.__version__}) has no torch.nn.attention.flex_attention ({e})"
    return None


@functools.cache
def _compiled() -> Callable[..., Any]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def refusals(call: AttentionCall, device_type: str) -> list[str]:
    """Every reason the flex backend cannot run ``call`` on a device of type ``device_type`` (``"cpu"``,
    ``"cuda"``; a parameter so that the CUDA rules are testable on a CPU), or an empty list."""
    missing = _flex_available()
    if missing is not None:
        return [missing]
    reasons = []
    if device_type not in ("cpu", "cuda"):
        reasons.append(f"compiled FlexAttention runs on CPU and CUDA, not {device_type}")
    if call.dropout_p != 0.0:
        reasons.append("it has no dropout")
    if any(b.tensor.requires_grad for b in _parts(call.bias) if isinstance(b, TensorBias)):
        reasons.append("it gives no gradient to a tensor bias")
    untranslated = [repr(b) for b in _parts(call.bias) if type(b) not in _BIAS_MODS]
    if untranslated:
        reasons.append(f"the bias {', '.join(untranslated)} has no score_mod form")
    if device_type == "cpu":
        if call.q.dtype == torch.float64:
            reasons.append("its CPU kernel takes float32, float16 and bfloat16, not float64")
        if call.return_lse:
            reasons.append("its CPU kernel does not return the log-sum-exp (return_lse=True)")
        if call.requires_grad:
            reasons.append("its CPU kernel has no backward (inputs require grad)")
    return reasons


def _variant(call: AttentionCall) -> tuple:
    """What a compile is specialised on, as far as attnkit can tell: shapes, device, dtype, and the mask's and
    bias's parameters (their repr), scale and softcap. It may count two variants where dynamo compiles once (a
    document mask's repr gives its number of documents); a mask whose repr omits a constant its mask_mod bakes
    in would be counted once where dynamo compiles twice."""
    return (tuple(call.q.shape), tuple(call.k.shape), tuple(call.v.shape), call.q.device, call.q.dtype,
            repr(call.mask), repr(call.bias), call.scale, call.softcap)


def auto_refusal(call: AttentionCall) -> str | None:
    """Why ``backend="auto"`` should not take Flex for ``call`` although it could run it: it would compile a
    variant (:func:`_variant`) beyond the first :data:`AUTO_COMPILES` of this process (``backend="flex"`` still
    runs it)."""
    with _LOCK:
        if _variant(call) in _COMPILED or len(_COMPILED) < AUTO_COMPILES:
            return None
    return (f"it has compiled {len(_COMPILED)} variants (shapes, mask and bias parameters) in this process and "
            "each new one compiles anew; backend='flex' runs it anyway")


def reset_compiles() -> None:
    """Drop every compiled variant: ``torch._dynamo.reset()`` (all of ``torch.compile``'s caches in this process)
    and auto's count of Flex's compiles with it (else, after the tuner's sixteen, auto would decline Flex)."""
    torch._dynamo.reset()
    with _LOCK:
        _COMPILED.clear()


def _parts(bias: Bias | None) -> tuple[Bias, ...]:
    return () if bias is None else bias.parts()


def score_mod_of(call: AttentionCall) -> ScoreMod | None:
    """The call's soft-capping and biases as one Flex ``score_mod(score, b, h, q_idx, kv_idx)``, applied in
    attnkit's order (softcap, then each bias), or None if there are none. Flex passes the score already
    scaled, as attnkit's biases expect it."""
    mods = [_BIAS_MODS[type(b)](b, call.q_len, call.k_len) for b in _parts(call.bias)]
    if call.softcap is not None:
        cap = call.softcap
        mods.insert(0, lambda s, b, h, i, j: torch.tanh(s / cap) * cap)
    if not mods:
        return None

    def mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        for fn in mods:
            score = fn(score, b, h, q_idx, kv_idx)
        return score

    return mod


def _alibi_mod(bias: ALiBi, q_len: int, k_len: int) -> ScoreMod:
    slopes = bias.slopes.to(torch.float32)
    if bias.lengths is None:
        off = 0 if bias.align == "top_left" else k_len - q_len
        return lambda s, b, h, i, j: s - slopes.to(s.device)[h] * (i + off - j).abs()
    offs = bias.lengths.offsets(bias.align, q_len, k_len, torch.device("cpu"))
    many = offs.numel() > 1
    return lambda s, b, h, i, j: s - slopes.to(s.device)[h] * (i + offs.to(s.device)[b if many else 0] - j).abs()


def _tensor_mod(bias: TensorBias, q_len: int, k_len: int) -> ScoreMod:
    t = bias.tensor4
    nb, nh, nq, nk = (n > 1 for n in t.shape)

    def mod(s: Tensor, b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        z = torch.zeros((), dtype=torch.int64, device=t.device)
        return s + t[b if nb else z, h if nh else z, i if nq else z, j if nk else z]

    return mod


def _score_mod_mod(bias: ScoreModBias, q_len: int, k_len: int) -> ScoreMod:
    return bias.fn


# A sum of biases (``Chain``) is translated part by part (``Bias.parts``); a part of any other type is refused.
_BIAS_MODS: dict[type, Callable[[Any, int, int], ScoreMod]] = {
    ALiBi: _alibi_mod, TensorBias: _tensor_mod, ScoreModBias: _score_mod_mod,
}


def _tensor_versions(obj: object, depth: int = 4) -> tuple:
    """The version counter of every tensor ``obj`` holds in its attributes (and in the masks, lengths and other
    objects those hold, ``depth`` levels down), so that a tensor changed in place (a document mask's ids, a
    dense mask's tensor) gives a new cache key. A tensor without a version counter (made in inference mode)
    cannot be told from a changed one, so it gives a new object each time and the key is never reused."""
    if isinstance(obj, Tensor):
        try:
            return (obj._version,)
        except RuntimeError:
            return (object(),)
    if depth == 0 or not hasattr(obj, "__dict__") or isinstance(obj, type):
        return ()
    return tuple(v for a in vars(obj).values() for v in _tensor_versions(a, depth - 1))


def _prepared(call: AttentionCall) -> tuple[BlockMask | None, ScoreMod | None]:
    """The call's ``BlockMask`` and ``score_mod``, from the cache or built (and cached). The key holds the
    mask's and bias's identities (each entry keeps them alive, so an id is not reused while its entry lives)
    and the version counters of the tensors they hold (:func:`_tensor_versions`), never their ``repr``: two
    masks that print alike but differ get their own ``BlockMask``, and so does a mask changed in place."""
    key = (tuple(call.q.shape), tuple(call.k.shape), tuple(call.v.shape), call.q.device, call.q.dtype,
           id(call.mask), id(call.bias), _tensor_versions(call.mask), _tensor_versions(call.bias), call.scale,
           call.softcap)
    with _LOCK:
        if key in _PREPARED:
            _PREPARED.move_to_end(key)
            return _PREPARED[key][2:]
    block_mask = None
    if call.mask is not None:
        block_mask = to_flex(call.mask, None, None, call.q_len, call.k_len, device=call.q.device)[0]
    entry = (call.mask, call.bias, block_mask, score_mod_of(call))  # holding mask and bias keeps their ids unique
    with _LOCK:
        _PREPARED[key] = entry
        if len(_PREPARED) > _CACHE_SIZE:
            _PREPARED.popitem(last=False)
    return entry[2:]


class FlexBackend:
    name = "flex"
    summary = "PyTorch's FlexAttention compiled by torch.compile (compiles once per shape); auto's pick on CUDA"
    features: tuple[str, ...] = ("every mask, block-sparse", "ALiBi, tensor and score_mod biases", "softcap",
                                 "GQA/MQA", "Lq != Lk", "Dv != D", "CPU (forward only) and CUDA")

    def supports(self, call: AttentionCall) -> str | None:
        reasons = refusals(call, call.q.device.type)
        return "; ".join(reasons) if reasons else None

    def run(self, call: AttentionCall) -> tuple[Tensor, Tensor]:
        block_mask, mod = _prepared(call)
        with _LOCK:
            _COMPILED.add(_variant(call))
        kwargs: dict[str, Any] = {}
        if call.return_lse:
            from torch.nn.attention.flex_attention import AuxRequest

            kwargs["return_aux"] = AuxRequest(lse=True)
        result = _compiled()(call.q, call.k, call.v, score_mod=mod, block_mask=block_mask, scale=call.scale,
                             enable_gqa=call.groups > 1, **kwargs)
        if call.return_lse:
            out, aux = result
            return out, aux.lse
        return result, torch.empty(0)
