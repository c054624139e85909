"""The translation example's figures: `attnkit translate-demo` over several seeds, with the
encoder's self-attention on ("mixing", the default) and off ("none").

    python benchmarks/translate.py            # 5 seeds x 2 encoders: 10 runs of 45 to 90 s on the loaded
                                              # 2-core EPYC (--variants' 20 runs took 876 s on 2026-12-08)
    python benchmarks/translate.py --quick    # 2 seeds at --fast's 120 steps, a smoke test; writes nothing
    python benchmarks/translate.py --variants # also: one decoder layer (one cross-attention layer); one head

Each run trains the demo's EncoderDecoder (the CLI's default steps, one torch thread as the
CLI uses) and measures, as the CLI does: held-out accuracy; the head that puts the most
cross-attention on the context word while producing "rive", against its controls; the
intervention (hide the context word from cross-attention with attnkit's key_padding mask and
count how often the sense the model scores higher flips, against hiding a random other source
word); and a linear probe for the sense on the encoder output at "bank". The markdown gives
each seed and the range over seeds. Writes benchmarks/results/translate.json and translate.md
(or into ``--out``) and the alignment heatmaps of seed 0 into docs/img/translate.png (mixing)
and docs/img/translate-none.png (``--png-dir``); ``--quick`` writes nothing unless ``--out``
or ``--png-dir`` is given. The JSON notes the machine and its load
average before and after (``os.getloadavg()``): the training time depends on it, the figures
do not.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from attnkit.cli.translate_demo import FAST_STEPS, STEPS
from attnkit.demos.translate import ENCODERS, TranslateConfig, TranslateResult, train_translation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, machine_info, machine_line, save

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"default": {}, "one decoder layer": {"decoder_depth": 1}, "one head": {"heads": 1}}


def _run(result: TranslateResult) -> dict:
    """The figures of one run that the table shows."""
    layer, head, mass = result.rive_head()
    return {"seed": result.config.seed, "seconds": result.seconds, "accuracy": result.accuracy["all"],
            "bank": result.accuracy["bank"], "head": [layer, head], "mass": mass, "uniform": result.uniform,
            "controls": result.controls, "intervention": result.intervention, "probe": result.probe,
            "examples": [{k: e[k] for k in ("source", "translation", "correct")} for e in result.examples]}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _span(values: list[float], fmt: str) -> str:
    low, high = min(values), max(values)
    return format(low, fmt) if format(low, fmt) == format(high, fmt) else f"{format(low, fmt)}–{format(high, fmt)}"


def _table(runs: list[dict]) -> list[str]:
    lines = ["| seed | held-out exact | 'bank' right | head | mass on context producing 'rive' (x uniform) | "
             "same head, other steps | same head, on 'bank' | flip: context hidden | flip: random word hidden | "
             "probe at 'bank' |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        c, iv = r["controls"], r["intervention"]["all"]
        lines.append(f"| {r['seed']} | {_pct(r['accuracy'])} | {_pct(r['bank'])} | L{r['head'][0]} H{r['head'][1]} | "
                     f"{r['mass']:.3f} ({r['mass'] / r['uniform']:.1f}x) | {c['context_at_other_steps']:.3f} | "
                     f"{c['ambiguous_at_sense']:.3f} | {_pct(iv['flip_context'])} | {_pct(iv['flip_other'])} | "
                     f"{_pct(r['probe']['test'])} |")
    ratios = [r["mass"] / r["uniform"] for r in runs]
    flips = [r["intervention"]["all"]["flip_context"] or 0.0 for r in runs]
    others = [r["intervention"]["all"]["flip_other"] or 0.0 for r in runs]
    lines.append(f"| range | {_span([100 * r['accuracy'] for r in runs], '.0f')}% | "
                 f"{_span([100 * r['bank'] for r in runs], '.0f')}% | | "
                 f"{_span([r['mass'] for r in runs], '.3f')} ({_span(ratios, '.1f')}x)"
                 f" | {_span([r['controls']['context_at_other_steps'] for r in runs], '.3f')} | "
                 f"{_span([r['controls']['ambiguous_at_sense'] for r in runs], '.3f')} | "
                 f"{_span([100 * f for f in flips], '.0f')}% | {_span([100 * f for f in others], '.0f')}% | "
                 f"{_span([100 * r['probe']['test'] for r in runs], '.0f')}% |")
    return lines


def render(data: dict) -> str:
    """The markdown of a translate.json result."""
    lines = [machine_line(data["machine"]),
             f"`attnkit translate-demo` at {data['steps']} steps, seeds {data['seeds'][0]}–{data['seeds'][-1]}, "
             f"{data['probes']} probe sentences per run (teacher-forced to the step that writes the sense); "
             f"{sum(r['seconds'] for runs in data['runs'].values() for r in runs):.0f} s of training in all on "
             f"{data['machine']['threads']} thread(s). A flip is the sense the model scores higher changing when "
             f"the word is hidden from cross-attention, over the probes it gets right; 50% is a coin flip."]
    for name, runs in data["runs"].items():
        lines += ["", f"**{name}**", "", *_table(runs)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 (default 5)")
    parser.add_argument("--quick", action="store_true", help=f"2 seeds at {FAST_STEPS} steps (a smoke test)")
    parser.add_argument("--variants", action="store_true",
                        help="also train with one decoder layer and with one head (encoder 'none')")
    parser.add_argument("--out", type=Path, help=f"results directory (default {RESULTS}; none with --quick)")
    parser.add_argument("--png-dir", type=Path, help="directory for the PNGs (default docs/img; none with --quick)")
    args = parser.parse_args()
    steps, seeds = (FAST_STEPS, [0, 1]) if args.quick else (STEPS, list(range(args.seeds)))
    png_dir = args.png_dir or (None if args.quick else ROOT / "docs" / "img")
    if png_dir is not None:
        png_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    torch.set_num_threads(1)
    cases = [(encoder, "default") for encoder in ENCODERS]
    cases += [("none", name) for name in VARIANTS if name != "default"] if args.variants else []
    runs: dict[str, list[dict]] = {}
    for encoder, variant in cases:
        label = f"encoder: {encoder}" + ("" if variant == "default" else f", {variant}")
        for seed in seeds:
            config = TranslateConfig(steps=steps, eval_every=steps, seed=seed, encoder=encoder, **VARIANTS[variant])
            result = train_translation(config)
            runs.setdefault(label, []).append(_run(result))
            print(f"{label}, seed {seed}: {result.seconds:.0f} s", file=sys.stderr)
            if png_dir is not None and seed == 0 and variant == "default":
                result.plot(png_dir / ("translate.png" if encoder == "mixing" else "translate-none.png"))
            probes = result.intervention["all"]["probes"]
    load_after = os.getloadavg()
    info = machine_info(f"load average {load_before[0]:.1f} before the run and {load_after[0]:.1f} after, "
                        f"on {os.cpu_count()} cores")
    data = {"machine": info, "loadavg_before": list(load_before), "loadavg_after": list(load_after), "steps": steps,
            "seeds": seeds, "probes": probes, "runs": runs}
    markdown = render(data)
    print(markdown)
    if args.out or not args.quick:
        save("translate", data, markdown, args.out or RESULTS)


if __name__ == "__main__":
    main()
