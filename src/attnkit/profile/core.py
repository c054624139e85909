"""``profile``: where a model's forward spends its time and memory as the context grows.

Per length, the plain forward (no hooks) and the instrumented forward (timed per component,
see :mod:`attnkit.profile._hooks`) run in alternation, ``repeats`` times each after
``warmup`` runs; each figure is the median. ``rest`` is the instrumented total less the
three timed components (embeddings, norms, residuals, the hooks' own cost; slightly negative
when it is tiny, as medians do not add up exactly); ``overhead``
is how much slower the instrumented forward was than the plain one, the bound within which
the components sum to the plain total. ``spread`` is (max - min) / median of the plain
totals; over 20% the length is flagged ``noisy``.

Memory (``peak_mib``) is :func:`attnkit._timing.peak_memory_mib` of one plain forward: on
CPU the growth of the process's peak resident set (to within a few MiB of allocator noise),
on CUDA the allocator's peak. ``attention_peak_mib`` is the same of one layer's attention
call re-run alone on its own inputs: attention's part of the peak (layers run one after
another, so one call is what attention adds at a time).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnkit import _model_facts as facts
from attnkit._checks import describe
from attnkit._model_facts import is_hf, text_config
from attnkit._timing import machine, peak_memory_mib
from attnkit.profile._hooks import COMPONENTS, Clock, linear_macs, parts, synchronizer, timed

NOISY = 0.20  # relative spread of the plain totals above which a length is flagged
IMPLEMENTATIONS = ("eager", "sdpa", "attnkit")


_NUMBER = {"type": "number"}
_MAYBE_NUMBER = {"type": ["number", "null"]}
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "attnkit profile",
    "type": "object",
    "required": ["schema", "model", "machine", "batch", "repeats", "noisy_threshold", "lengths", "crossover",
                 "exponents", "implementations", "generation"],
    "properties": {
        "schema": {"const": "attnkit.profile/1"},
        "model": {"type": "string"}, "machine": {"type": "string"},
        "batch": {"type": "integer", "minimum": 1}, "repeats": {"type": "integer", "minimum": 1},
        "noisy_threshold": _NUMBER,
        "lengths": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False,
            "required": ["length", "total_s", "instrumented_s", "attention_s", "projections_s", "feed_forward_s",
                         "rest_s", "overhead", "spread", "noisy", "peak_mib", "attention_peak_mib",
                         "attention_calls", "attention_flops", "feed_forward_flops"],
            "properties": {
                "length": {"type": "integer", "minimum": 1},
                **{k: {"type": "number", "minimum": 0} for k in ("total_s", "instrumented_s", "attention_s",
                                                                  "projections_s", "feed_forward_s", "spread")},
                "rest_s": _NUMBER, "overhead": _NUMBER, "noisy": {"type": "boolean"},
                "peak_mib": _MAYBE_NUMBER, "attention_peak_mib": _MAYBE_NUMBER,
                **{k: {"type": "integer", "minimum": 0} for k in ("attention_calls", "attention_flops",
                                                                   "feed_forward_flops")}}}},
        "crossover": {"type": "object", "required": ["measured", "predicted"],
                      "properties": {"measured": {"type": ["integer", "null"]}, "predicted": _MAYBE_NUMBER}},
        "exponents": {"type": "object", "additionalProperties": _MAYBE_NUMBER},
        "implementations": {"type": "object", "additionalProperties": {
            "type": "object", "additionalProperties": {"type": "number", "minimum": 0}}},
        "generation": {"oneOf": [{"type": "null"}, {
            "type": "object", "required": ["new_tokens", "rows"],
            "properties": {"new_tokens": {"type": "integer", "minimum": 1}, "rows": {"type": "array", "items": {
                "type": "object",
                "required": ["prompt_length", "ttft_s", "per_token_s", "tokens_per_s", "step_s", "cache_bytes",
                             "cache_bytes_formula"],
                "properties": {"prompt_length": {"type": "integer", "minimum": 1}, "ttft_s": _NUMBER,
                               "per_token_s": _MAYBE_NUMBER, "tokens_per_s": _MAYBE_NUMBER,
                               "step_s": {"type": "array", "items": _NUMBER},
                               "cache_bytes": {"type": "integer"}, "cache_bytes_formula": {"type": "integer"}}}}}}]},
    },
}
"""The JSON Schema of :meth:`Profile.to_dict` (``attnkit profile --json``); see docs/profile.md."""


@dataclass
class Length:
    """The measurements at one context length (seconds, MiB, FLOPs per forward)."""

    length: int
    total_s: float
    instrumented_s: float
    attention_s: float
    projections_s: float
    feed_forward_s: float
    rest_s: float
    overhead: float
    spread: float
    noisy: bool
    peak_mib: float | None
    attention_peak_mib: float | None
    attention_calls: int
    attention_flops: int
    feed_forward_flops: int


@dataclass
class Profile:
    """What :func:`profile` measured; ``to_dict()`` is the JSON document (see docs/profile.md)."""

    model: str
    machine: str
    batch: int
    repeats: int
    lengths: list[Length]
    implementations: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> {length: seconds}
    generation: dict[str, Any] | None = None

    def crossover(self) -> int | None:
        """The shortest measured length from which attention takes longer than the feed-forward
        layers at it and at every longer length; None if it never does."""
        found = None
        for row in reversed(self.lengths):
            if row.attention_s <= row.feed_forward_s:
                break
            found = row.length
        return found

    def predicted_crossover(self) -> float | None:
        """The length at which attention's FLOPs (4 B H Lq Lk D per call, growing as L^2) equal
        the feed-forward layers' (2 B L per weight, growing as L), from the longest length's counts."""
        row = self.lengths[-1]
        if not row.attention_flops or not row.feed_forward_flops:
            return None
        return row.length * row.feed_forward_flops / row.attention_flops

    def exponents(self) -> dict[str, float | None]:
        """Per component, the slope of log(time) against log(length), by least squares."""
        xs = [math.log(r.length) for r in self.lengths]
        out: dict[str, float | None] = {}
        for name in ("total", *COMPONENTS, "rest"):
            ys = [getattr(r, f"{name}_s") for r in self.lengths]
            out[name] = _slope(xs, [math.log(y) for y in ys]) if len(xs) > 1 and min(ys) > 0 else None
        return out

    def noisy(self) -> list[int]:
        return [r.length for r in self.lengths if r.noisy]

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "attnkit.profile/1", "model": self.model, "machine": self.machine, "batch": self.batch,
                "repeats": self.repeats, "noisy_threshold": NOISY, "lengths": [asdict(r) for r in self.lengths],
                "crossover": {"measured": self.crossover(), "predicted": self.predicted_crossover()},
                "exponents": self.exponents(), "implementations": self.implementations,
                "generation": self.generation}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        """The :class:`Profile` that :meth:`to_dict` wrote (derived fields are recomputed)."""
        return cls(model=data["model"], machine=data["machine"], batch=data["batch"], repeats=data["repeats"],
                   lengths=[Length(**row) for row in data["lengths"]], implementations=data["implementations"],
                   generation=data["generation"])

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def to_markdown(self) -> str:
        """A markdown table of the split per length, then the crossover and the exponents."""
        lines = [f"Model: {self.model}; batch {self.batch}; median of {self.repeats}; {self.machine}", "",
                 "| tokens | total ms | attention | projections | feed-forward | rest | peak MiB | attention MiB |",
                 "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in self.lengths:
            parts_ = [f"{getattr(r, f'{c}_s') * 1e3:.2f} ({getattr(r, f'{c}_s') / r.instrumented_s:.0%})"
                      for c in (*COMPONENTS, "rest")]
            lines.append(f"| {r.length}{' (noisy)' if r.noisy else ''} | {r.total_s * 1e3:.2f} | "
                         + " | ".join(parts_) + f" | {_mib(r.peak_mib)} | {_mib(r.attention_peak_mib)} |")
        measured, predicted = self.crossover(), self.predicted_crossover()
        reached = measured if measured is not None else f"not reached by {self.lengths[-1].length}"
        flops = f"{predicted:.0f}" if predicted is not None else "n/a"
        lines += ["", f"Crossover (attention > feed-forward): measured {reached}, predicted from FLOPs {flops}", ""]
        exps = self.exponents()
        lines.append("Exponents (time ~ length^k): " + ", ".join(
            f"{k} {v:.2f}" for k, v in exps.items() if v is not None))
        if self.implementations:
            lines += ["", "| tokens | " + " | ".join(f"{n} ms" for n in self.implementations) + " |",
                      "|---:|" + "---:|" * len(self.implementations)]
            for r in self.lengths:
                lines.append(f"| {r.length} | " + " | ".join(f"{t[str(r.length)] * 1e3:.2f}"
                                                             for t in self.implementations.values()) + " |")
        if self.generation:
            lines += ["", f"Generation, {self.generation['new_tokens']} new tokens with the KV cache:", "",
                      "| prompt | first token ms | per token ms | tokens/s | cache bytes | kv_cache_bytes |",
                      "|---:|---:|---:|---:|---:|---:|"]
            for g in self.generation["rows"]:
                per_token = "n/a" if g["per_token_s"] is None else f"{g['per_token_s'] * 1e3:.2f}"
                rate = "n/a" if g["tokens_per_s"] is None else f"{g['tokens_per_s']:.1f}"
                lines.append(f"| {g['prompt_length']} | {g['ttft_s'] * 1e3:.2f} | {per_token} | {rate} | "
                             f"{g['cache_bytes']:,} | {g['cache_bytes_formula']:,} |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> str:
        """A PNG of stacked time per component against length, the crossover marked."""
        from attnkit._plot import pyplot

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 4.2))
        xs = [r.length for r in self.lengths]
        ax.stackplot(xs, *[[getattr(r, f"{c}_s") * 1e3 for r in self.lengths] for c in (*COMPONENTS, "rest")],
                     labels=["attention", "Q/K/V/O projections", "feed-forward", "rest"], alpha=0.85)
        for x, label, style in ((self.crossover(), "crossover (measured)", "-"),
                                (self.predicted_crossover(), "crossover (FLOPs)", "--")):
            if x is not None and x <= xs[-1] * 1.5:
                ax.axvline(x, color="black", linestyle=style, label=f"{label}: {x:.0f}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("forward time (ms)")
        ax.set_title(f"{self.model}: where the forward's time goes")
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return str(path)


def _mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


UNSTATED_LIMIT = 2048
"""The most positions profiled for a Hugging Face model that states no ``max_position_embeddings``."""


def max_length(model: nn.Module) -> int:
    """The most positions profiled: a Hugging Face model's ``max_position_embeddings`` (else
    :data:`UNSTATED_LIMIT`), an attnkit ``TransformerLM``'s configured ``max_length``."""
    if facts.is_hf(model):
        return int(facts.max_positions(model, unstated=UNSTATED_LIMIT) or UNSTATED_LIMIT)
    return int(text_config(model).max_length)


def vocab_size(model: nn.Module) -> int:
    return int(text_config(model).vocab_size)


def check_lengths(lengths: Sequence[int] | None, limit: int) -> list[int]:
    """``lengths`` sorted and checked against the model's ``limit``; default 64, 128, ... up to it."""
    if lengths is None:
        out = [n for n in (2 ** k for k in range(6, 30)) if n < limit] + [limit]
        return [n for n in out if n >= min(64, limit)]
    values = list(lengths)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if not values or bad:
        raise ValueError(f"lengths must be a non-empty list of ints >= 1; got {values!r}"
                         + (f" ({', '.join(map(repr, bad))}: not an int >= 1)" if bad else ""))
    over = [v for v in values if v > limit]
    if over:
        raise ValueError(f"lengths {over} exceed the model's maximum of {limit} positions "
                         f"(max_position_embeddings / max_length); give lengths <= {limit}")
    return sorted(set(values))


def inputs(model: nn.Module, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random token ids (batch, length) on the model's device (the cost does not depend on them)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size(model), (batch, length), generator=g)
    return ids.to(next(model.parameters()).device)


def forward(model: nn.Module, ids: torch.Tensor) -> Any:
    return model(input_ids=ids) if is_hf(model) else model(ids)


def profile(model: nn.Module, lengths: Sequence[int] | None = None, *, batch: int = 1, repeats: int = 5,
            warmup: int = 1, name: str | None = None,
            progress: Callable[[str, int, int], None] | None = None) -> Profile:
    """Time ``model``'s forward per component at each context length.

    Args:
        model: a Hugging Face model (any attention implementation that goes through
            transformers' attention interface) or an attnkit module with
            :class:`~attnkit.nn.MultiHeadAttention` layers (e.g. :class:`~attnkit.nn.TransformerLM`).
        lengths: context lengths in tokens, each ``<=`` the model's maximum; default 64,
            128, 256, ... up to its maximum.
        batch: sequences per forward. repeats, warmup: timed and untimed runs per length.
        progress: called as ``progress(description, done, total)`` after each length.

    Returns:
        :class:`Profile`. Raises ValueError for bad lengths, and for a model whose attention
        cannot be timed (none of its attention calls went through a timed path).

    >>> from attnkit.nn import TransformerConfig, TransformerLM
    >>> lm = TransformerLM(TransformerConfig(vocab_size=50, dim=32, depth=2, num_heads=4, max_length=64))
    >>> p = profile(lm, [16, 32], repeats=2)
    >>> [r.length for r in p.lengths], all(r.attention_s > 0 for r in p.lengths)
    ([16, 32], True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {describe(model)}")
    from attnkit._checks import require_int

    batch, repeats = require_int("batch", batch, minimum=1), require_int("repeats", repeats, minimum=1)
    warmup = require_int("warmup", warmup, minimum=0)
    wanted = check_lengths(lengths, max_length(model))
    parts(model)  # fails early when the model's parts cannot be found
    clock = Clock(synchronizer(model))
    was_training = model.training
    model.eval()
    rows = []
    try:
        with torch.inference_mode():
            for i, length in enumerate(wanted):
                rows.append(_measure(model, clock, inputs(model, batch, length), repeats, warmup))
                if progress is not None:
                    progress(f"L={length}", i + 1, len(wanted))
    finally:
        model.train(was_training)
    return Profile(model=name or facts.name(model), machine=machine(), batch=batch, repeats=repeats, lengths=rows)


def _measure(model: nn.Module, clock: Clock, ids: torch.Tensor, repeats: int, warmup: int) -> Length:
    def plain() -> float:
        start = clock.now()
        forward(model, ids)
        return clock.now() - start

    def instrumented() -> tuple[float, dict[str, float]]:
        clock.reset()
        with timed(model, clock):
            start = clock.now()
            forward(model, ids)
            elapsed = clock.now() - start
        return elapsed, dict(clock.seconds)

    for _ in range(warmup):
        plain()
        instrumented()
    totals, instr, split = [], [], []
    for round_ in range(repeats):  # alternate, each round starting with the other
        for kind in (("plain", "instrumented") if round_ % 2 == 0 else ("instrumented", "plain")):
            if kind == "plain":
                totals.append(plain())
            else:
                t, s = instrumented()
                instr.append(t)
                split.append(s)
    if not clock.attention_calls:
        raise ValueError(f"{facts.name(model)!r} made no attention call that could be timed: its attention bypasses "
                         "transformers' attention interface (Bloom, MPT; Falcon before transformers 5.25; BERT "
                         "before 5)")
    med = {c: statistics.median(s[c] for s in split) for c in COMPONENTS}
    total, instrumented_total = statistics.median(totals), statistics.median(instr)
    length = ids.shape[1]
    calls = list(clock.attention_calls)
    clock.keep_call, clock.kept = True, None
    with timed(model, clock):
        forward(model, ids)
    kept, clock.keep_call, clock.kept = clock.kept, False, None
    ffn_macs = linear_macs(parts(model)["feed_forward"])
    return Length(
        length=length, total_s=total, instrumented_s=instrumented_total, **{f"{c}_s": med[c] for c in COMPONENTS},
        rest_s=instrumented_total - sum(med.values()), overhead=instrumented_total / total - 1,
        spread=(max(totals) - min(totals)) / total, noisy=(max(totals) - min(totals)) / total > NOISY,
        peak_mib=peak_memory_mib(lambda: forward(model, ids), ids.device),
        attention_peak_mib=None if kept is None else peak_memory_mib(kept, ids.device),
        attention_calls=len(calls), attention_flops=sum(4 * b * h * lq * lk * d for b, h, lq, lk, d in calls),
        feed_forward_flops=2 * ids.shape[0] * length * ffn_macs)


def compare(load: Callable[[str], nn.Module], lengths: Sequence[int], implementations: Sequence[str], *,
            batch: int = 1, repeats: int = 5, warmup: int = 1, atol: float = 1e-4,
            progress: Callable[[str, int, int], None] | None = None) -> dict[str, dict[str, float]]:
    """Median forward seconds per implementation and length, timed in alternation, after checking
    that every implementation gives the first one's last hidden states (within ``atol``) at the
    shortest length. ``load(name)`` returns the model loaded with that attention implementation.

    Raises ValueError naming the implementation that disagrees, and by how much.
    """
    models = {name: load(name) for name in implementations}
    first = next(iter(models.values()))
    with torch.inference_mode():
        ids = inputs(first, batch, min(lengths))
        reference = _hidden(first, ids)
        for name, m in models.items():
            diff = (_hidden(m, ids) - reference).abs().max().item()
            if diff > atol:
                raise ValueError(f"implementation {name!r} gives hidden states that differ from "
                                 f"{implementations[0]!r}'s by {diff:.3g} (> {atol}); its times would not compare")
        out: dict[str, dict[str, float]] = {name: {} for name in models}
        for i, length in enumerate(sorted(lengths)):
            ids = inputs(first, batch, length)
            sync = synchronizer(first)
            for m in models.values():
                for _ in range(warmup):
                    forward(m, ids)
            times: dict[str, list[float]] = {name: [] for name in models}
            names = list(models)
            for round_ in range(repeats):
                shift = round_ % len(names)
                for name in names[shift:] + names[:shift]:
                    sync()
                    start = time.perf_counter()
                    forward(models[name], ids)
                    sync()
                    times[name].append(time.perf_counter() - start)
            for name, t in times.items():
                out[name][str(length)] = statistics.median(t)
            if progress is not None:
                progress(f"implementations L={length}", i + 1, len(lengths))
    return out


def _hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if is_hf(model):
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1].float()
    return model(ids).float()
