"""Where a real model's forward spends its time as the context grows: ``attnkit.profile`` on
the bundled MiniLM (32 to 512 tokens, eager/sdpa/attnkit side by side) and, with
``--transformer``, an attnkit TransformerLM up to 8,192 tokens (with generation).

    python benchmarks/profile_models.py                 # MiniLM only (about 3 minutes on 2 loaded cores)
    python benchmarks/profile_models.py --transformer   # also the TransformerLM at 8K (much longer)

It prints the markdown and writes benchmarks/results/profile.json and profile.md; the README's
``<!-- results:profile -->`` block is rendered from the JSON by benchmarks/published.py. (Not named profile.py, which
would shadow the standard library's profile module for the scripts in this folder.)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from _results import RESULTS, machine_info, machine_line, save

from attnkit import models
from attnkit.nn import TransformerConfig, TransformerLM
from attnkit.profile import Profile, compare, generation, profile

MINILM_LENGTHS = [32, 64, 128, 256, 512]
LM_CONFIG = {"vocab_size": 8192, "dim": 256, "depth": 4, "num_heads": 4, "max_length": 8192}
LM_LENGTHS = [512, 1024, 2048, 4096, 8192]


def render(data: dict) -> str:
    """The markdown of a profile.json result: one section per model."""
    parts = [machine_line(data["machine"]), ""]
    for name, doc in data["profiles"].items():
        parts += [f"**{name}**", "", Profile.from_dict(doc).to_markdown()]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transformer", action="store_true", help="also profile a TransformerLM up to 8K tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (one is immune to oversubscription on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    profiles = {}
    model, _ = models.load("minilm")
    p = profile(model, MINILM_LENGTHS, repeats=args.repeats, name="all-MiniLM-L6-v2")
    p.implementations = compare(lambda impl: models.load("minilm", attn_implementation=impl)[0], MINILM_LENGTHS,
                                ("eager", "sdpa", "attnkit"), repeats=args.repeats)
    profiles["MiniLM (all-MiniLM-L6-v2), attention sdpa"] = p.to_dict()
    if args.transformer:
        torch.manual_seed(0)
        lm = TransformerLM(TransformerConfig(**LM_CONFIG)).eval()
        q = profile(lm, LM_LENGTHS, repeats=args.repeats, name="TransformerLM " + ", ".join(
            f"{k}={v}" for k, v in LM_CONFIG.items()))
        q.generation = generation(lm, [n for n in LM_LENGTHS if n < 8192], 16, repeats=args.repeats)
        profiles["TransformerLM at 8K"] = q.to_dict()
    data = {"machine": machine_info(), "profiles": profiles}
    markdown = render(data)
    print(markdown)
    save("profile", data, markdown, args.out)


if __name__ == "__main__":
    main()
