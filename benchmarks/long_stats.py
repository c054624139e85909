"""Exact attention statistics at long context: the figures in docs/long-context.md.

    python benchmarks/long_stats.py           # 32,768 tokens (Llama-style) and 131,072 (TransformerLM)
    python benchmarks/long_stats.py --quick   # 4,096 and 8,192 tokens, a smoke test (~1 min when idle)
    python benchmarks/long_stats.py --threads 1 --skip-lm   # on a busy machine: one thread, only the 32K model
    python benchmarks/long_stats.py --threads 1 --lm-only --lm-shape 1 2   # only 131K tokens, 1 layer x 2 heads

It prints the markdown table and writes benchmarks/results/long_stats.json and long_stats.md
(long_stats_quick.* with ``--quick``; or into the directory given by ``--out``).

1. A random 2-layer, 8-head, D=64 Llama-style model (hidden 512, sdpa): the time of
   :func:`attnkit.inspect.stats` for every head against the plain forward, and the peak
   memory growth of each (attnkit._timing.peak_memory_mib). Targets (issue 27): at most 2x
   the forward's time and 1 GiB of peak memory above the model at 32,768 tokens, where full
   float16 maps would need layers * heads * L * L * 2 bytes.
2. attnkit's own TransformerLM (2 layers, 4 heads, D=64 by default, ``--lm-shape``) on the tiled
   backend: the same at 131,072 tokens, peak memory reported.

Times are medians of interleaved runs (``--repeats``); on a machine shared with other work,
``--threads 1`` avoids the thread barriers that a busy core stalls, for both sides alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

from attnkit._format import size
from attnkit._timing import interleaved_median_seconds, peak_memory_mib
from attnkit.inspect import stats
from attnkit.nn import MultiHeadAttention, TransformerConfig, TransformerLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, machine_info, machine_line, save


def llama(length: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=length)
    model = LlamaModel(config).eval()
    model.set_attn_implementation("sdpa")
    return model


def transformer_lm(depth: int, heads: int) -> torch.nn.Module:
    torch.manual_seed(0)
    lm = TransformerLM(TransformerConfig(vocab_size=1000, dim=64 * heads, depth=depth, num_heads=heads)).eval()
    for module in lm.modules():
        if isinstance(module, MultiHeadAttention):
            module.config = dataclasses.replace(module.config, backend="tiled")
    return lm


def measure(name: str, model: torch.nn.Module, length: int, layers: int, heads: int, repeats: int) -> dict:
    """Forward alone and stats: the peak memory growth of one run each, and the median time over ``repeats``
    interleaved runs after those (with ``repeats=1``, the time of the peak-memory runs)."""
    ids = torch.randint(0, 1000, (1, length), generator=torch.Generator().manual_seed(0))
    held = {}

    def forward() -> None:
        with torch.no_grad():
            model(ids)

    def run_stats() -> None:
        held["result"] = stats(model, ids, top_k=8, sinks=4)[0]

    row = {"model": name, "length": length, "layers": layers, "heads": heads}
    times = {}
    for key, fn in (("forward", forward), ("stats", run_stats)):
        start = time.perf_counter()
        row[f"{key}_peak_mib"] = peak_memory_mib(fn)
        times[key] = time.perf_counter() - start  # the time, when there is one run only
        print(f"{name} L={length}: {key} {times[key]:.1f} s, peak {row[f'{key}_peak_mib']:.0f} MiB", file=sys.stderr,
              flush=True)
    if repeats > 1:
        times = interleaved_median_seconds({"forward": forward, "stats": run_stats}, repeats=repeats, warmup=0)
    row.update(forward_s=times["forward"], stats_s=times["stats"], ratio=times["stats"] / times["forward"])
    row["maps_fp16_bytes"] = layers * heads * length * length * 2
    result = held.pop("result")
    row["stats_bytes"] = sum(t.numel() * t.element_size() for t in (
        result.received, result.entropy, result.sink_mass, result.distance, result.distance_hist, result.top_index,
        result.top_weight, result.row_max, result.max_logit, result.lse))
    row["received_sum_per_head"] = float(result.received[0, 0].sum())  # = L: every query's weights sum to 1
    return row


def render(data: dict) -> str:
    """The markdown table of a long_stats.json result."""
    lines = [machine_line(data["machine"]), "",
             "| model | tokens | forward s | stats s | stats / forward | forward peak | stats peak | "
             "stats kept | full fp16 maps |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        peak = {k: "n/a" if r[k] is None else size(r[k] * 2**20) for k in ("forward_peak_mib", "stats_peak_mib")}
        lines.append(f"| {r['model']} | {r['length']:,} | {r['forward_s']:.1f} | {r['stats_s']:.1f} | "
                     f"{r['ratio']:.1f}x | {peak['forward_peak_mib']} | {peak['stats_peak_mib']} | "
                     f"{size(r['stats_bytes'])} | {size(r['maps_fp16_bytes'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="4,096 and 8,192 tokens: a smoke test")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of each (default: 3 quick, 1 full)")
    parser.add_argument("--skip-lm", action="store_true", help="only the Llama-style model")
    parser.add_argument("--lm-only", action="store_true", help="only the TransformerLM (results: long_stats_lm)")
    parser.add_argument("--lm-shape", type=int, nargs=2, default=(2, 4), metavar=("LAYERS", "HEADS"),
                        help="the TransformerLM's layers and heads (D=64; default 2 4)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    llama_length, lm_length = (4096, 8192) if args.quick else (32768, 131072)
    repeats = args.repeats or (3 if args.quick else 1)
    data = {"machine": machine_info(), "quick": args.quick, "rows": []}
    if not args.lm_only:
        data["rows"].append(measure("Llama-style 2 x 8, D=64 (sdpa)", llama(llama_length), llama_length, 2, 8,
                                    repeats))
    if not args.skip_lm:
        depth, heads = args.lm_shape
        data["rows"].append(measure(f"TransformerLM {depth} x {heads}, D=64 (tiled)", transformer_lm(depth, heads),
                                    lm_length, depth, heads, repeats))
    table = render(data)
    print(table)
    save("long_stats" + ("_quick" if args.quick else "") + ("_lm" if args.lm_only else ""), data, table, args.out)


if __name__ == "__main__":
    main()
