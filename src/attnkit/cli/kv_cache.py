"""``attnkit kv-cache``: what a KV cache costs per token and in total, and how GQA/MQA
and a sliding window change it."""

from __future__ import annotations

import argparse
import dataclasses

import torch

from attnkit._format import size
from attnkit.cli._common import Column, Console, Parser, Subparsers, UsageError
from attnkit.nn.cache import KV_PRESETS, KVShape, kv_cache_bytes

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float8": torch.float8_e4m3fn, "int8": torch.int8}


def add_parser(sub: Subparsers) -> Parser:
    p = sub.add_parser("kv-cache", help="the memory of a KV cache: per token, in total, with GQA/MQA or a window",
                       description=__doc__ + "\n\nGive --preset NAME, or all of --layers, --kv-heads and --head-dim "
                       "(options given with --preset override the preset's).")
    p.add_argument("--preset", choices=sorted(KV_PRESETS), metavar="NAME",
                   help="a well-known model's shape: " + ", ".join(sorted(KV_PRESETS)))
    p.add_argument("--layers", type=int, help="layers of the model")
    p.add_argument("--kv-heads", type=int, help="key/value heads per layer")
    p.add_argument("--heads", type=int, help="query heads, for the MHA comparison (default: the preset's, "
                   "else --kv-heads)")
    p.add_argument("--head-dim", type=int, help="dimension of each head")
    p.add_argument("--window", type=int, help="sliding window: the cache holds at most this many tokens")
    p.add_argument("--tokens", type=int, default=4096, help="tokens in the cache")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="element type of the cache")
    p.add_argument("--batch", type=int, default=1, help="sequences in the batch")
    p.set_defaults(run=run)
    return p


def shape_from(args: argparse.Namespace) -> KVShape:
    """The preset's shape with the options given on top, or the options' own shape."""
    if args.preset is None and None in (args.layers, args.kv_heads, args.head_dim):
        raise UsageError("kv-cache needs --preset NAME, or all of --layers, --kv-heads and --head-dim")
    base = KV_PRESETS.get(args.preset)
    if base is None:  # no preset: --layers, --kv-heads and --head-dim are all given (checked above)
        base = KVShape("custom", args.layers, args.kv_heads, args.kv_heads, args.head_dim)
    kv_heads = args.kv_heads if args.kv_heads is not None else base.kv_heads
    # query heads: given, else the preset's (unless its KV heads were overridden), else MHA
    heads = args.heads if args.heads is not None else (
        base.heads if args.kv_heads is None else kv_heads)
    return KVShape(args.preset or "custom",
                   args.layers if args.layers is not None else base.layers, heads, kv_heads,
                   args.head_dim if args.head_dim is not None else base.head_dim,
                   args.window if args.window is not None else base.window)


def run(args: argparse.Namespace) -> int:
    shape, dtype, tokens, batch = shape_from(args), DTYPES[args.dtype], args.tokens, args.batch
    rows = []

    def row(label: str, kv_heads: int, window: int | None) -> None:
        variant = dataclasses.replace(shape, heads=kv_heads, kv_heads=kv_heads, window=window)
        per_token = kv_cache_bytes(variant.layers, kv_heads, variant.head_dim, 1, dtype, 1)
        rows.append((label, str(kv_heads), "none" if window is None else f"{window:,}",
                     size(per_token), size(variant.bytes(tokens, dtype, batch))))

    row("this model", shape.kv_heads, shape.window)  # checks tokens and batch before anything prints
    if shape.kv_heads != shape.heads:
        row("same model as MHA", shape.heads, shape.window)
    if shape.kv_heads != 1:
        row("same model as MQA", 1, shape.window)
    if shape.window is not None:
        row("without its window", shape.kv_heads, None)
    con = Console()
    con.rule(f"KV cache: {shape.name}")
    con.print(f"{shape.layers} layers x {shape.kv_heads} KV heads x head dim {shape.head_dim} "
              f"({shape.heads} query heads), {args.dtype}, batch {batch}, {tokens:,} tokens")
    con.table("KV cache size (K and V, every layer)",
              ("variant", Column("KV heads", right=True), Column("window", right=True),
               Column("per token", right=True), Column("total", right=True)), rows)
    return 0
