"""``attnkit profile``: where a model's forward spends its time as the context grows: attention
(the function itself), the Q/K/V/O projections, the feed-forward layers and the rest; peak
memory and attention's part; the length from which attention costs more than the
feed-forward layers (measured, and predicted from FLOPs); the fitted exponents; and, for a
Hugging Face model, the eager, sdpa and attnkit implementations side by side.

MODEL is 'minilm' (the bundled all-MiniLM-L6-v2), a local Hugging Face model folder
(safetensors only, never downloaded), or a JSON file of attnkit TransformerConfig fields
(e.g. {"vocab_size": 32000, "dim": 256, "depth": 4, "num_heads": 4, "max_length": 8192}),
built with random weights: the cost does not depend on them.

Each figure is the median of --repeats runs after a warm-up, plain and instrumented
forwards alternating; a length whose plain runs spread over 20% is flagged noisy."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from attnkit._format import size
from attnkit.cli._common import Column, Console, Parser, Subparsers, UsageError, csv, positive, quiet_transformers

if TYPE_CHECKING:  # imported where used, so that `attnkit --help` stays fast
    from torch import nn

    from attnkit.profile.core import Profile

IMPLEMENTATIONS = ("eager", "sdpa", "attnkit")


def add_parser(sub: Subparsers) -> Parser:
    p = sub.add_parser("profile", help="a model's forward time per component against context length",
                       description=__doc__)
    p.add_argument("model", metavar="MODEL", help="'minilm', a local Hugging Face folder, or a TransformerConfig JSON")
    p.add_argument("--lengths", type=csv(int), default=None,
                   help="context lengths, e.g. 64,128,256 (default: 64, 128, ... up to the model's maximum)")
    p.add_argument("--implementations", type=csv(str, IMPLEMENTATIONS), default=None,
                   help="attention implementations to compare, Hugging Face models only "
                        "(default: eager,sdpa,attnkit for those; none for a TransformerConfig)")
    p.add_argument("--new-tokens", type=positive, default=16,
                   help="decoders: tokens generated after each prompt length, to time generation with the KV cache")
    p.add_argument("--repeats", type=positive, default=5, help="timed runs per length")
    p.add_argument("--batch", type=positive, default=1, help="sequences per forward")
    p.add_argument("--json", metavar="FILE", help="write the measurements as JSON (schema in docs/profile.md)")
    p.add_argument("--markdown", metavar="FILE", help="write the tables as markdown")
    p.add_argument("--png", metavar="FILE", help="write a stacked plot of time per component against length")
    p.set_defaults(run=run)
    return p


def load(spec: str, implementation: str | None = None) -> nn.Module:
    """The model MODEL names: a TransformerLM from a JSON config (seeded random weights), else
    ``models.load`` with the attention ``implementation`` (a JSON config has only attnkit's)."""
    if spec.endswith(".json") and Path(spec).is_file():
        import torch

        from attnkit.nn import TransformerConfig, TransformerLM

        try:
            fields = json.loads(Path(spec).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"MODEL {spec!r} is not valid JSON: {err}") from None
        if not isinstance(fields, dict):
            raise ValueError(f"MODEL {spec!r} must hold a JSON object of TransformerConfig fields; got "
                             f"{type(fields).__name__}")
        try:
            config = TransformerConfig(**fields)
        except TypeError as err:
            raise ValueError(f"MODEL {spec!r}: {err}") from None
        torch.manual_seed(0)
        return TransformerLM(config).eval()
    from attnkit import models

    return models.load(spec, attn_implementation=implementation)[0]


def run(args: argparse.Namespace) -> int:
    from attnkit.profile import compare, generation, profile
    from attnkit.profile.core import max_length
    from attnkit.profile.generation import is_decoder

    if args.png:
        from attnkit._plot import pyplot

        pyplot()  # fail now, not after the measurements, when matplotlib is missing
    for option in ("json", "markdown", "png"):
        target = getattr(args, option)
        if target and not Path(target).resolve().parent.is_dir():
            raise ValueError(f"--{option} {target!r}: the folder {str(Path(target).resolve().parent)!r} does not exist")
    con = Console()
    quiet_transformers()
    is_config = args.model.endswith(".json") and Path(args.model).is_file()
    if is_config and args.implementations:
        raise UsageError("--implementations compares Hugging Face models' implementations; "
                         f"{args.model} is an attnkit TransformerConfig")
    with con.status(f"loading {args.model}..."):
        model = load(args.model)
    with con.progress() as progress:
        result = profile(model, args.lengths, batch=args.batch, repeats=args.repeats, progress=progress)
        implementations = [] if is_config else (args.implementations or list(IMPLEMENTATIONS))
        if implementations:
            result.implementations = compare(lambda name: load(args.model, name),
                                             [r.length for r in result.lengths], implementations,
                                             batch=args.batch, repeats=args.repeats, progress=progress)
        if is_decoder(model):
            limit = max_length(model) - args.new_tokens
            prompts = [r.length for r in result.lengths if r.length <= limit]
            if prompts:
                progress("generation", 0, 1)
                result.generation = generation(model, prompts, args.new_tokens, batch=args.batch,
                                               repeats=args.repeats)
    _print(con, result)
    if args.json:
        result.to_json(args.json)
        con.print(f"wrote {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(result.to_markdown())
        con.print(f"wrote {args.markdown}")
    if args.png:
        con.print(f"wrote {result.plot(args.png)}")
    return 0


def _print(con: Console, result: Profile) -> None:
    con.rule(f"profile: {result.model}")
    con.print(f"batch {result.batch}, median of {result.repeats} runs; {result.machine}")
    rows = []
    for r in result.lengths:
        share = [f"{getattr(r, f'{c}_s') * 1e3:.2f} ({getattr(r, f'{c}_s') / r.instrumented_s:.0%})"
                 for c in ("attention", "projections", "feed_forward", "rest")]
        rows.append((f"{r.length:,}" + (" noisy" if r.noisy else ""), f"{r.total_s * 1e3:.2f}", *share,
                     f"{r.overhead:+.0%}", "n/a" if r.peak_mib is None else size(r.peak_mib * 2**20),
                     "n/a" if r.attention_peak_mib is None else size(r.attention_peak_mib * 2**20)))
    con.table("time per forward, ms (share of the instrumented forward)",
              ("tokens", Column("total", right=True), Column("attention", right=True),
               Column("Q/K/V/O proj.", right=True), Column("feed-forward", right=True), Column("rest", right=True),
               Column("hooks' overhead", right=True), Column("peak memory", right=True),
               Column("attention memory", right=True)), rows)
    measured, predicted = result.crossover(), result.predicted_crossover()
    con.print("crossover (attention > feed-forward): measured "
              + (f"{measured:,} tokens" if measured is not None else f"not reached by {result.lengths[-1].length:,}")
              + (f"; predicted from FLOPs {predicted:,.0f} tokens" if predicted is not None else ""))
    con.print("exponents (time ~ length^k): " + ", ".join(
        f"{k.replace('_', '-')} {v:.2f}" for k, v in result.exponents().items() if v is not None))
    if result.noisy():
        con.print(f"too noisy to trust at {', '.join(map(str, result.noisy()))} tokens (plain runs spread over 20%): "
                  "rerun on a quieter machine or with more --repeats")
    if result.implementations:
        names = list(result.implementations)
        con.table("implementations (same hidden states checked first), ms per forward",
                  ("tokens", *(Column(n, right=True) for n in names)),
                  [(f"{r.length:,}", *(f"{result.implementations[n][str(r.length)] * 1e3:.2f}" for n in names))
                   for r in result.lengths])
    if result.generation:
        con.table(f"generation: {result.generation['new_tokens']} new tokens after the prompt, with the KV cache",
                  ("prompt", Column("first token ms", right=True), Column("per token ms", right=True),
                   Column("tokens/s", right=True), Column("cache", right=True), Column("kv_cache_bytes", right=True)),
                  [(f"{g['prompt_length']:,}", f"{g['ttft_s'] * 1e3:.2f}",
                    "n/a" if g["per_token_s"] is None else f"{g['per_token_s'] * 1e3:.2f}",
                    "n/a" if g["tokens_per_s"] is None else f"{g['tokens_per_s']:.1f}", size(g["cache_bytes"]),
                    size(g["cache_bytes_formula"])) for g in result.generation["rows"]])
