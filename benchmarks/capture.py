"""Capture cost on a long input: the figures in docs/inspect.md.

    python benchmarks/capture.py               # 2,000 tokens, sdpa/eager, float16/float32 (~1 min)
    python benchmarks/capture.py --length 256  # a quick run

It prints the markdown table and writes benchmarks/results/capture.json and capture.md
(or into the directory given by ``--out``).

A random-weight BERT of MiniLM's shape (6 layers x 12 heads, 384 wide) with 2,048
positions (MiniLM itself stops at 512) reads one input of ``--length`` tokens. For each
attention implementation and storage dtype: the stored size, the peak memory growth of
the capture (attnkit._timing.peak_memory_mib), its time, and the time of the forward alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from attnkit._timing import peak_memory_mib
from attnkit.inspect import capture

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, machine_info, machine_line, save


def render(data: dict) -> str:
    """The markdown table of a capture.json result."""
    lines = [machine_line(data["machine"]),
             f"Random BERT 6 x 12, 384 wide, one input of {data['length']} tokens.", "",
             "| model loaded with | stored as | stored MiB | peak growth MiB | capture s | forward alone s |",
             "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {r['impl']} | {r['dtype']} | {r['stored_mib']:.0f} | {peak} | {r['capture_s']:.1f} "
                     f"| {r['forward_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=max(2048, args.length))
    ids = torch.randint(1000, 30000, (1, args.length), generator=torch.Generator().manual_seed(0))
    data = {"machine": machine_info(), "length": args.length, "rows": []}
    for impl in ("sdpa", "eager"):
        torch.manual_seed(0)
        model = BertModel(config, add_pooling_layer=False).eval()
        model.set_attn_implementation(impl)
        with torch.no_grad():
            model(input_ids=ids)  # warm-up
            start = time.perf_counter()
            model(input_ids=ids)
            forward_s = time.perf_counter() - start
        for dtype in (torch.float16, torch.float32):
            held = {}

            def run(dtype=dtype, held=held, model=model):
                held["maps"] = capture(model, {"input_ids": ids}, dtype=dtype)

            start = time.perf_counter()
            peak = peak_memory_mib(run)
            seconds = time.perf_counter() - start
            stored = held.pop("maps")[0]
            data["rows"].append({"impl": impl, "dtype": str(dtype).replace("torch.", ""),
                                 "stored_mib": stored.numel() * stored.element_size() / 2**20, "peak_mib": peak,
                                 "capture_s": seconds, "forward_s": forward_s})
            print(data["rows"][-1], file=sys.stderr, flush=True)
            del stored
    table = render(data)
    print(table)
    save("capture", data, table, args.out)


if __name__ == "__main__":
    main()
