"""LoRA adapters (Hu et al. 2021) on ``nn.Linear`` layers: add, train, merge, save, load.

An adapted layer computes ``W x + b + scaling * B (A dropout(x))`` with ``A`` (r, d_in) and
``B`` (d_out, r). ``B`` starts at zero, so the model's output is unchanged until training.
``scaling`` is ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023).

Targets are names or glob patterns, matched against each module's dotted name and its
last part, so they work on attnkit modules (``q_proj``, ``v_proj``) and Hugging Face models
(BERT's ``query``, ``value``; or ``"*.attention.self.query"``). Layers whose weight is
tied to another parameter, and the ``out_proj`` of torch's ``nn.MultiheadAttention``
(which reads its weight directly), are refused: an adapter there would be silently wrong.

>>> import torch
>>> from attnkit.nn import AttentionConfig, MultiHeadAttention
>>> from attnkit.lora import add_lora
>>> mha = MultiHeadAttention(AttentionConfig(64, 4))
>>> report = add_lora(mha, targets=("q_proj", "v_proj"), rank=8)
>>> report.trainable, 2 * 8 * (64 + 64)
(2048, 2048)
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnkit import _tensorfile
from attnkit._checks import describe, require_int, require_real

__all__ = ["LoRALinear", "LoRAReport", "add_lora", "load_lora", "lora_layers", "merge_lora", "remove_lora",
           "save_lora", "unmerge_lora"]

_FORMAT = "attnkit-lora-1"


class LoRALinear(nn.Module):
    """An ``nn.Linear`` with a low-rank adapter beside its frozen weight."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear; got {describe(base)}")
        self.base = base
        self.rank = require_int("rank", rank, minimum=1)
        self.alpha = require_real("alpha", alpha)
        self.rslora = bool(rslora)
        self.scaling = self.alpha / (math.sqrt(rank) if rslora else rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def delta(self) -> Tensor:
        """The adapter as a weight update, ``scaling * B @ A`` (d_out, d_in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.merged:
            return out
        return out + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}"


@dataclass(frozen=True)
class LoRAReport:
    """What :func:`add_lora` adapted and how many parameters now train."""

    adapted: tuple[str, ...]
    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100 * self.trainable / max(self.total, 1)
        return (f"LoRA on {len(self.adapted)} layers: {self.trainable:,} trainable of {self.total:,} "
                f"parameters ({share:.3f}%)")


def _matches(name: str, targets: Sequence[str]) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, t) or fnmatch.fnmatchcase(last, t) for t in targets)


def _targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = (targets,)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise TypeError(f"targets must be module names or glob patterns (str); got {targets!r}")
    return tuple(targets)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """The adapted layers of ``model``, by dotted name."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def add_lora(model: nn.Module, targets: str | Sequence[str] = ("q_proj", "v_proj"), rank: int = 8,
             alpha: float = 16.0, dropout: float = 0.0, rslora: bool = False) -> LoRAReport:
    """Wrap every ``nn.Linear`` whose name matches ``targets`` in a :class:`LoRALinear`, in place.

    Every other parameter of ``model`` is frozen, so only the adapters train. Each adapter
    adds ``rank * (d_in + d_out)`` trainable parameters.

    Raises:
        ValueError: no layer matches, a match is not an ``nn.Linear``, or the model
            already has adapters.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {describe(model)}")
    targets = _targets(targets)
    rank = require_int("rank", rank, minimum=1)
    if not 0.0 <= require_real("dropout", dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout}")
    if any(True for _ in lora_layers(model)):
        raise ValueError("model already has LoRA adapters; remove_lora(model) first")
    found = [(n, m) for n, m in model.named_modules() if n and _matches(n, targets)]
    wrong = [f"{n} ({type(m).__name__})" for n, m in found if not isinstance(m, nn.Linear)]
    linears = [(n, m) for n, m in found if isinstance(m, nn.Linear)]
    if not linears:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no nn.Linear matches targets {targets}; the model's linear layers are named "
                         f"{', '.join(names[:20]) or '(none)'}")
    if wrong and len(wrong) == len(found):
        raise ValueError(f"targets {targets} match only layers that are not nn.Linear: {', '.join(wrong[:5])}")
    _refuse_unsafe(model, linears)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in linears:
        _wrap(model, name, LoRALinear(linear, rank, alpha, dropout, rslora))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return LoRAReport(tuple(n for n, _ in linears), trainable, sum(p.numel() for p in model.parameters()))


def _refuse_unsafe(model: nn.Module, linears: list[tuple[str, nn.Linear]]) -> None:
    """Refuse layers where an adapter would be silently wrong: a weight shared with another
    parameter (merging would change both), or a linear whose parent reads ``.weight``
    directly instead of calling it (torch's ``nn.MultiheadAttention.out_proj``)."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    modules = dict(model.named_modules())
    for name, linear in linears:
        shared = [o for o in owners.get(id(linear.weight), []) if o != f"{name}.weight"]
        if shared:
            raise ValueError(f"{name}.weight is tied to {', '.join(shared)}; an adapter there would change both "
                             "when merged. Leave it out of targets, or untie the weights first")
        parent = modules[name.rpartition(".")[0]]
        if isinstance(parent, nn.MultiheadAttention):
            raise ValueError(f"{name} belongs to torch.nn.MultiheadAttention, which reads its weight directly, "
                             "so an adapter there would be ignored; use attnkit.nn.MultiHeadAttention")


def _wrap(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)


def _require_adapters(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRA adapters; call add_lora(model, ...) first")
    return layers


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (no extra cost at inference). Idempotent."""
    for _, layer in _require_adapters(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo :func:`merge_lora`, restoring the base weights (up to float rounding)."""
    for _, layer in _require_adapters(model):
        layer.unmerge()


def remove_lora(model: nn.Module, merge: bool = True) -> None:
    """Replace each adapted layer by a plain ``nn.Linear``, merged into it or dropped."""
    for name, layer in _require_adapters(model):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        _wrap(model, name, layer.base)


def save_lora(model: nn.Module, path: str | os.PathLike) -> None:
    """Write only the adapters and their settings to a safetensors file.

    The tensors are ``"{layer}.lora_A"`` and ``"{layer}.lora_B"``, in the adapters' dtype.
    The metadata holds ``"format": "attnkit-lora-1"`` and ``"layers"``, a JSON object of
    ``{layer: {"rank": int, "alpha": float, "rslora": bool, "dropout": float}}``.
    """
    layers = _require_adapters(model)
    tensors: dict[str, Tensor] = {}
    config = {}
    for name, layer in layers:
        tensors[f"{name}.lora_A"] = layer.lora_A
        tensors[f"{name}.lora_B"] = layer.lora_B
        config[name] = {"rank": layer.rank, "alpha": layer.alpha, "rslora": layer.rslora,
                        "dropout": float(getattr(layer.dropout, "p", 0.0))}
    _tensorfile.save(path, tensors, metadata={"format": _FORMAT, "layers": json.dumps(config)})


def _is_real(x: object) -> bool:
    return type(x) in (int, float) and math.isfinite(x)  # type: ignore[arg-type]


_SETTINGS = {  # field: (check, what it must be)
    "rank": (lambda x: type(x) is int and x >= 1, "an int >= 1"),
    "alpha": (_is_real, "a finite number"),
    "rslora": (lambda x: type(x) is bool, "true or false"),
    "dropout": (lambda x: _is_real(x) and 0 <= x < 1, "a number in [0, 1)"),
}


def _read_config(path: object, metadata: dict[str, str]) -> dict[str, dict]:
    """The per-layer settings of a LoRA file, every field checked before anything changes."""
    if "layers" not in metadata:
        raise ValueError(f"{path}: its metadata lacks the 'layers' entry")
    config = _tensorfile.parse_json(path, "layers", metadata["layers"])  # type: ignore[arg-type]
    if not isinstance(config, dict) or not config:
        raise ValueError(f"{path}: metadata entry 'layers' must map layer names to settings; got {config!r:.80}")
    for name, cfg in config.items():
        if not isinstance(cfg, dict):
            raise ValueError(f"{path}: layers[{name!r}] must be an object of settings; got {cfg!r:.80}")
        for field, (ok, expected) in _SETTINGS.items():
            if field not in cfg:
                raise ValueError(f"{path}: layers[{name!r}] lacks {field!r}")
            if not ok(cfg[field]):
                raise ValueError(f"{path}: layers[{name!r}][{field!r}] must be {expected}; got {cfg[field]!r:.80}")
    return config


def _check_tensors(path: object, file: _tensorfile.Contents, name: str, module: nn.Module, rank: int) -> None:
    """Check the dtypes and shapes of layer ``name``'s A and B in ``file`` before reading them."""
    a, b = f"{name}.lora_A", f"{name}.lora_B"
    for key in (a, b):
        if key not in file.shapes:
            raise ValueError(f"{path} lists layer {name!r} but lacks its tensor {key!r}")
        if file.dtypes[key] not in _tensorfile.FLOATS:
            raise ValueError(f"{path}: tensor {key!r} has dtype {file.dtypes[key]}; expected one of "
                             f"{', '.join(_tensorfile.FLOATS)}")
    sa, sb = file.shapes[a], file.shapes[b]
    features = (module.in_features, module.out_features) if isinstance(module, (nn.Linear, LoRALinear)) else None
    if (len(sa), len(sb)) != (2, 2) or features != (sa[1], sb[0]) or sa[0] != rank or sb[1] != rank:
        raise ValueError(f"{path}: the adapter for {name!r} has A {sa} and B {sb}, which do not fit "
                         f"rank {rank} and {module}")


def load_lora(model: nn.Module, path: str | os.PathLike) -> LoRAReport:
    """Load adapters saved by :func:`save_lora` into ``model``.

    A model without adapters gets them first, with the saved settings, on the saved layer
    names; a model with adapters takes the file's weights, alpha and rsLoRA setting, and
    must have adapters on exactly the file's layers. Any float dtype in the file is
    converted to the adapters' dtype.

    Raises:
        ValueError: before anything changes, naming the file and the field, for a file that
            is not valid safetensors or not an attnkit LoRA file, missing layers or tensors,
            mismatched shapes, or malformed settings.
    """
    with _tensorfile.open_file(path) as file:
        if file.metadata.get("format") != _FORMAT:
            raise ValueError(f"{path} is not an attnkit LoRA file (metadata 'format' is "
                             f"{file.metadata.get('format')!r}, expected {_FORMAT!r})")
        config = _read_config(path, file.metadata)
        modules = dict(model.named_modules())
        missing = [n for n in config if n not in modules]
        if missing:
            raise ValueError(f"{path} has adapters for layers this model lacks: {', '.join(missing[:5])}")
        adapted = dict(lora_layers(model))
        extra = [n for n in adapted if n not in config]
        if adapted and extra:
            raise ValueError(f"the model has adapters that {path} lacks: {', '.join(extra[:5])}; "
                             "remove_lora(model) first")
        for name, cfg in config.items():
            module = modules[name]
            if adapted and not isinstance(module, LoRALinear):
                raise ValueError(f"{path} has an adapter for {name!r}, which has none in this model")
            _check_tensors(path, file, name, module, cfg["rank"])
            if isinstance(module, LoRALinear) and module.rank != cfg["rank"]:
                raise ValueError(f"{name!r} has a rank-{module.rank} adapter; {path} has rank {cfg['rank']}")
        tensors = {k: file.tensor(k) for n in config for k in (f"{n}.lora_A", f"{n}.lora_B")}
    if not adapted:
        linears = [(n, modules[n]) for n in config]
        _refuse_unsafe(model, linears)
        for p in model.parameters():
            p.requires_grad_(False)
        for name, cfg in config.items():
            _wrap(model, name, LoRALinear(modules[name], cfg["rank"], cfg["alpha"], cfg["dropout"], cfg["rslora"]))
    layers = dict(lora_layers(model))
    for name, cfg in config.items():
        layer = layers[name]
        was_merged = layer.merged
        layer.unmerge()
        layer.alpha, layer.rslora = float(cfg["alpha"]), bool(cfg["rslora"])  # the file's settings win
        layer.scaling = layer.alpha / (math.sqrt(layer.rank) if layer.rslora else layer.rank)
        with torch.no_grad():
            layer.lora_A.copy_(tensors[f"{name}.lora_A"])
            layer.lora_B.copy_(tensors[f"{name}.lora_B"])
        if was_merged:
            layer.merge()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return LoRAReport(tuple(config), trainable, sum(p.numel() for p in model.parameters()))
