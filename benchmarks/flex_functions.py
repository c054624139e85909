"""What a Flex-style function costs when it has to be called per position (``torch.vmap``, as Flex calls it)
instead of once per block on broadcast index tensors.

    python benchmarks/flex_functions.py            # writes benchmarks/results/flex_functions.json and .md

The same document mask, ``doc[q_idx] == doc[kv_idx]``, evaluated both ways by ``masks.from_function``: the
mask's exact block states (every pair evaluated once) and one tiled attention call with it (B=1, H=4, D=64,
float32), at two lengths, medians of interleaved runs, idle and then under ``attnkit.bench.load`` (2 loads).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

import attnkit
from attnkit import masks
from attnkit._timing import interleaved_median_seconds, machine
from attnkit.bench.load import background_load

RESULTS = Path(__file__).resolve().parent / "results"


def _mask(length: int, per_position: bool) -> masks.Mask:
    doc = torch.arange(length) // 256
    m = masks.from_function(lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx], name="documents")
    m.evaluator.per_position = per_position  # decided here instead of by the first block
    return m


def _calls(length: int) -> dict[str, object]:
    q = k = v = torch.randn(1, 4, length, 64, generator=torch.Generator().manual_seed(0))
    calls = {}
    for style, per_position in (("broadcast", False), ("per position", True)):
        calls[f"{style}: block states"] = lambda p=per_position: _mask(length, p).block_states(length, length,
                                                                                                 128, 128)
        calls[f"{style}: attention"] = lambda p=per_position: attnkit.attention(q, k, v, mask=_mask(length, p),
                                                                                 backend="tiled")
    return calls


def measure(lengths: list[int], repeats: int) -> list[dict]:
    rows = []
    for load in (0, 2):
        with background_load(load, 600) if load else contextlib.nullcontext():
            for length in lengths:
                times = interleaved_median_seconds(_calls(length), repeats, warmup=1)
                for what in ("block states", "attention"):
                    fast, slow = times[f"broadcast: {what}"], times[f"per position: {what}"]
                    rows.append({"length": length, "what": what, "load": load, "broadcast_ms": 1e3 * fast,
                                 "per_position_ms": 1e3 * slow, "ratio": slow / fast})
    return rows


def render(data: dict) -> str:
    lines = [f"Machine: {data['machine']}. The mask doc[q_idx] == doc[kv_idx] (documents of 256 tokens), B=1, H=4, "
             f"D=64, float32, median of {data['repeats']} interleaved runs; load = background processes.", "",
             "| L | what | load | broadcast (ms) | per position (ms) | per position / broadcast |",
             "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['length']} | {r['what']} | {r['load']} | {r['broadcast_ms']:.1f} | "
                     f"{r['per_position_ms']:.1f} | {r['ratio']:.1f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    data = {"machine": machine(), "repeats": args.repeats,
            "rows": measure([int(n) for n in args.lengths.split(",")], args.repeats)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "flex_functions.json").write_text(json.dumps(data, indent=1))
    (RESULTS / "flex_functions.md").write_text(render(data))
    print(render(data))


if __name__ == "__main__":
    main()
