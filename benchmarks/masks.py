"""Building a block map from a mask function: attnkit's ``masks.from_function`` against
FlexAttention's ``create_block_mask``, on the same function in the same run.

    python benchmarks/masks.py --json benchmarks/results/masks.json
    python benchmarks/masks.py --quick      # small lengths, a smoke test of this script

For each length it reports: the build time of each (128 x 128 blocks, B = H = 1, a
fresh mask every time so that attnkit's cache is not used), their ratio, attnkit's time
with its cache warm, and the cold build time as a share of one attnkit attention call
(tiled, forward, B = 1, H = 8, D = 64) that builds it. Two functions: plain causal, and a
causal window with landmark keys.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import attnkit
from attnkit import masks
from attnkit._timing import machine, median_seconds

H, D = 8, 64


def causal(b, h, q_idx, kv_idx):
    """Causal attention (the mask_mod of attnkit bench's causal case)."""
    return q_idx >= kv_idx


def causal_window(b, h, q_idx, kv_idx):
    """Causal attention to the last 1024 keys and every 256th key before them."""
    return (kv_idx <= q_idx) & ((q_idx - kv_idx < 1024) | (kv_idx % 256 == 0))


def build_attnkit(fn, length: int) -> float:
    start = time.perf_counter()
    masks.from_function(fn).block_states(length, length, 128, 128)
    return time.perf_counter() - start


def build_flex(fn, length: int) -> float:
    from torch.nn.attention.flex_attention import create_block_mask

    start = time.perf_counter()
    create_block_mask(fn, None, None, length, length, device="cpu", _compile=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--attention-lengths", type=int, nargs="+", default=[4096],
                        help="lengths at which to time one attention call as well")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.attention_lengths, args.repeats = [512, 1024], [512], 1
    rows = []
    for fn, length in [(fn, n) for fn in (causal, causal_window) for n in args.lengths]:
        build_attnkit(fn, length), build_flex(fn, length)  # warm-up
        ours, flex = [], []
        for _ in range(args.repeats):  # alternate, so that drifts in load fall on both
            ours.append(build_attnkit(fn, length))
            flex.append(build_flex(fn, length))
        ours_s, flex_s = sorted(ours)[len(ours) // 2], sorted(flex)[len(flex) // 2]
        cached = masks.from_function(fn)
        cached.block_states(length, length, 128, 128)
        cached_s = median_seconds(lambda c=cached, n=length: c.block_states(n, n, 128, 128), repeats=5)
        row = {"function": fn.__name__, "length": length, "attnkit_build_s": ours_s, "flex_create_block_mask_s": flex_s,
               "speedup": flex_s / ours_s, "attnkit_cached_s": cached_s}
        if length in args.attention_lengths:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, H, length, D, generator=g) for _ in range(3))
            fresh = []
            for _ in range(args.repeats):
                m = masks.from_function(fn)
                start = time.perf_counter()
                attnkit.attention(q, k, v, mask=m, backend="tiled")
                fresh.append(time.perf_counter() - start)
            call_s = sorted(fresh)[len(fresh) // 2]
            row.update(attention_call_s=call_s, build_share_of_call=ours_s / call_s)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"machine": machine(), "torch": torch.__version__,
              "functions": {f.__name__: f.__doc__ for f in (causal, causal_window)},
              "block": [128, 128], "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
