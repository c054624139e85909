"""The translation example's figures: `attnkit translate-demo` at its default setting.

    python benchmarks/translate.py        # about 1 to 2 minutes on 2 cores

Trains the demo's EncoderDecoder (seed 0, the CLI's default steps, one torch thread as
the CLI uses), prints the markdown table and writes benchmarks/results/translate.json and
translate.md (or into ``--out``), and the alignment heatmap docs/img/translate.png
(``--png``). The JSON notes the machine and its load average before and after the run
(``os.getloadavg()``): the training time depends on it, the figures do not.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from attnkit.cli.translate_demo import STEPS, summary
from attnkit.demos.translate import TranslateConfig, train_translation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, machine_info, machine_line, save

ROOT = Path(__file__).resolve().parent.parent


def render(data: dict) -> str:
    """The markdown of a translate.json result."""
    run, acc, counts, head = data["run"], data["accuracy"], data["counts"], data["rive_head"]
    lines = [machine_line(data["machine"]),
             f"`attnkit translate-demo`: seed {run['config']['seed']}, {run['config']['steps']} steps, "
             f"{run['corpus']['train']} training pairs, {run['seconds']:.0f} s on {data['machine']['threads']} "
             f"thread(s); held-out loss {run['held_out_loss'][-1]:.3f} nats.", "",
             "| held-out set | sentences | right |", "|---|---|---|",
             f"| exact translation | {counts['all']} | {100 * acc['all']:.1f}% |"]
    for word, senses in (("bank", ("rive", "banque")), ("bat", ("chauve-souris", "batte"))):
        lines.append(f"| '{word}', right sense | {counts[word]} | {100 * acc[word]:.1f}% |")
        lines += [f"| &nbsp; as '{s}' | {counts[s]} | {100 * acc[s]:.1f}% |" for s in senses]
    lines += ["", f"Producing 'rive', layer {head['layer']} head {head['head']} puts {head['mass']:.3f} of its "
                  f"cross-attention on the context word ({head['mass'] / run['uniform']:.1f}x uniform, "
                  f"{run['uniform']:.3f}); producing 'banque', {head['banque_mass']:.3f} "
                  f"(uniform {run['banque_uniform']:.3f})."]
    lines += [f"'{' '.join(e['source'])}' → '{e['translation']}'" + (" (held out)." if e["held_out"] else ".")
              for e in run["examples"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "img" / "translate.png")
    args = parser.parse_args()
    load_before = os.getloadavg()
    torch.set_num_threads(1)
    result = train_translation(TranslateConfig(steps=STEPS, eval_every=max(1, STEPS // 20)))
    load_after = os.getloadavg()
    info = machine_info(f"load average {load_before[0]:.1f} before the run and {load_after[0]:.1f} after, "
                        f"on {os.cpu_count()} cores")
    run = result.to_dict()
    data = {"machine": info, "loadavg_before": list(load_before), "loadavg_after": list(load_after), "run": run,
            "accuracy": run["accuracy"], "counts": run["counts"], "rive_head": run["rive_head"]}
    markdown = render(data)
    print(markdown)
    print("\n".join(summary(result)), file=sys.stderr)
    save("translate", data, markdown, args.out)
    result.plot(args.png)


if __name__ == "__main__":
    main()
