"""KV-cache decoding: one step with the cache against recomputing the whole sequence, and
the caches' memory against kv_cache_bytes. The figures in the README's decoding table.

    python benchmarks/decode.py                 # context 8192 (~1 min on an idle 2-core machine)
    python benchmarks/decode.py --context 4096  # shorter
    python benchmarks/decode.py --quick         # context 512, a smoke test of this script

It prints the markdown table and writes benchmarks/results/decode.json and decode.md (or
the directory given by ``--out``; ``--quick`` writes nothing unless ``--out`` is given).

Model: attnkit.nn.TransformerLM, dim 512, 8 heads (2 KV heads, GQA), 4 layers, RoPE,
fp32, batch 1. A step feeds one new token; "recompute" runs the full forward over the
context plus that token, which is what generation without a cache does.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from attnkit import kv_cache_bytes
from attnkit._timing import median_seconds
from attnkit.nn import SlidingWindowKVCache, TransformerConfig, TransformerLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, machine_info, machine_line, save


def render(data: dict) -> str:
    """The markdown table of a decode.json result."""
    context, steps = data["context"], data["steps"]
    flat = data["sliding_bytes_by_position"]
    sizes = sorted({b for _, b in flat})
    return "\n".join([
        machine_line(data["machine"]),
        "TransformerLM dim 512, 8 heads / 2 KV heads, 4 layers, RoPE, fp32, batch 1; the full forward is the "
        f"median of 3 runs, the cached step the median of {steps} steps.", "",
        "| measure | value |", "|---|---|",
        f"| full forward over {context + 1} tokens (no cache) | {data['full_forward_ms']:.1f} ms |",
        f"| one decoding step at context {context + 1} with the cache | {data['cached_step_ms']:.2f} ms |",
        f"| speed-up | {data['speedup']:.0f}x |",
        f"| static cache memory, {context + 1 + steps} tokens | {data['static_cache_bytes'] / 2**20:.2f} MiB "
        f"(`kv_cache_bytes`: {data['kv_cache_bytes'] / 2**20:.2f} MiB) |",
        f"| sliding-window cache ({data['sliding_window']}) memory, positions {flat[0][0]} to {flat[-1][0]} | "
        f"{', '.join(f'{b / 2**20:.2f}' for b in sizes)} MiB "
        f"(`kv_cache_bytes`: {data['sliding_formula_bytes'] / 2**20:.2f} MiB) |"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, help=f"results directory (default {RESULTS}; none with --quick)")
    args = parser.parse_args(argv)
    context = 512 if args.quick else args.context
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=1000, dim=512, depth=4, num_heads=8, num_kv_heads=2)
    lm = TransformerLM(config).eval()
    tokens = torch.randint(0, 1000, (1, context + 1))
    steps = 8 if args.quick else 32

    with torch.no_grad():
        full_s = median_seconds(lambda: lm(tokens), repeats=3)
        caches = lm.new_caches("static", context + 1 + steps)
        lm(tokens[:, :context], caches=caches)
        step_times = []

        def step():
            lm(tokens[:, -1:], caches=caches)

        for _ in range(steps):
            step_times.append(median_seconds(step, repeats=1, warmup=0))
        step_s = sorted(step_times)[len(step_times) // 2]

        held = sum(c.nbytes for c in caches)
        formula = kv_cache_bytes(config.depth, 2, config.dim // config.num_heads, context + 1 + steps, torch.float32)

        window = 256 if args.quick else 1024
        windowed = TransformerLM(dataclasses.replace(config, window=window)).eval()
        windowed.load_state_dict(lm.state_dict())
        sliding = windowed.new_caches()  # SlidingWindowKVCache(window) per layer
        assert isinstance(sliding[0], SlidingWindowKVCache)
        flat = []
        windowed(tokens[:, :window // 2], caches=sliding)
        for n in range(window // 2, 3 * window):
            if n % (window // 4) == 0:
                flat.append((sliding[0].position, sum(c.nbytes for c in sliding)))
            windowed(tokens[:, n % context:n % context + 1], caches=sliding)
        window_formula = kv_cache_bytes(config.depth, 2, config.dim // config.num_heads, window, torch.float32)

    result = {
        "machine": machine_info(),
        "context": context,
        "steps": steps,
        "full_forward_ms": 1e3 * full_s,
        "cached_step_ms": 1e3 * step_s,
        "speedup": full_s / step_s,
        "static_cache_bytes": held,
        "kv_cache_bytes": formula,
        "sliding_window": window,
        "sliding_bytes_by_position": flat,
        "sliding_formula_bytes": window_formula,
    }
    table = render(result)
    print(table)
    if args.out or not args.quick:
        save("decode", result, table, args.out or RESULTS)
    return result


if __name__ == "__main__":
    main()
