"""The ``attnkit`` command: a thin shell over the library."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

import attnkit
from attnkit import biases, masks
from attnkit._timing import median_seconds
from attnkit.nn.cache import KV_PRESETS, KVShape, kv_cache_bytes


class _Console:
    """rich when installed (the ``cli`` extra), plain text otherwise."""

    def __init__(self, stderr: bool = False) -> None:
        self._file = sys.stderr if stderr else sys.stdout
        try:
            from rich.console import Console
        except ImportError:
            self._rich = None
        else:
            self._rich = Console(highlight=False, stderr=stderr)

    def rule(self, title: str) -> None:
        if self._rich:
            from rich.markup import escape

            self._rich.rule(f"[bold]{escape(title)}")
        else:
            print(f"\n== {title} ==", file=self._file)

    def print(self, text: str = "") -> None:
        if self._rich:
            self._rich.print(text, markup=False)
        else:
            print(text, file=self._file)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        if self._rich:
            from rich.table import Table
            from rich.text import Text

            # Text objects, not markup: cells hold model tokens such as "[/" or "[red]".
            table = Table(title=Text(title, style="italic"))
            for c in columns:
                table.add_column(Text(c), justify="right" if c != columns[0] else "left")
            for r in rows:
                table.add_row(*(Text(cell) for cell in r))
            self._rich.print(table)
            return
        widths = [max(len(c), *(len(r[n]) for r in rows)) for n, c in enumerate(columns)]
        print(title, file=self._file)
        for line in (columns, *rows):
            print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)), file=self._file)

    def status(self, text: str):
        if self._rich:
            from rich.text import Text

            return self._rich.status(Text(text))
        print(text, file=self._file)
        from contextlib import nullcontext

        return nullcontext()


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def demo(length: int = 2048, seed: int = 0) -> int:
    """Variants on random data checked against the float64 reference, the mask pictures,
    and a small speed comparison with PyTorch SDPA."""
    con = _Console()
    torch.manual_seed(seed)
    con.rule(f"attnkit {attnkit.__version__} demo  (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    for info in attnkit.backends().values():
        con.print(str(info))

    b, h, hkv, n, d = 1, 8, 2, 257, 64
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    docs = torch.arange(n) * 3 // n
    variants = {
        "dense": {},
        "causal": {"mask": masks.causal()},
        "sliding window 64": {"mask": masks.sliding_window(64)},
        "document (3) & causal": {"mask": masks.document(docs) & masks.causal()},
        "window | global [0]": {"mask": masks.sliding_window(32, 32) | masks.global_tokens([0])},
        "causal + ALiBi": {"mask": masks.causal(), "bias": biases.alibi(h)},
        "softcap 20": {"softcap": 20.0, "mask": masks.causal()},
    }
    rows = []
    with con.status("checking variants against the float64 reference..."):
        for name, kw in variants.items():
            ref = attnkit.attention(q.double(), k.double(), v.double(), backend="reference", **kw)
            for backend in ("tiled", "sdpa", "auto"):
                try:
                    out = attnkit.attention(q, k, v, backend=backend, **kw)
                except ValueError:
                    rows.append((name, backend, "n/a (unsupported)", ""))
                    continue
                err = _max_err(out, ref)
                rows.append((name, backend, f"{err:.1e}", "ok" if err < 1e-4 else "FAIL"))
    con.table(f"fp32, B={b}, H={h} (GQA, {hkv} kv heads), L={n}, D={d}: max |out - reference_float64|",
              ("variant", "backend", "max error", ""), rows)
    failed = any(r[3] == "FAIL" for r in rows)

    con.rule("masks as pictures")
    con.print(str(masks.causal()))
    con.print()
    con.print(str(masks.sliding_window(3, 1)))
    con.print()
    con.print(str(masks.document(torch.tensor([0] * 6 + [1] * 4 + [2] * 6)) & masks.causal()))
    con.print()
    con.print(str(masks.sliding_window(511).blocks(16384, 16384, 1024)))

    con.rule(f"speed against PyTorch SDPA (fp32, B=1, H=8, D=64, L={length})")
    q, k, v = (torch.randn(1, 8, length, 64) for _ in range(3))
    window = masks.sliding_window(255)
    cases = {
        "dense": ({}, {}),
        "causal": ({"mask": masks.causal()}, {"is_causal": True}),
        "sliding window 256": ({"mask": window}, {"attn_mask": window.to_dense(length, length)}),
    }
    rows = []
    with con.status("timing..."):
        for name, (ours, theirs) in cases.items():
            t_sdpa = median_seconds(lambda theirs=theirs: F.scaled_dot_product_attention(q, k, v, **theirs), 3)
            for backend in ("auto", "tiled"):
                t = median_seconds(lambda ours=ours, backend=backend: attnkit.attention(
                    q, k, v, backend=backend, **ours), 3)
                rows.append((name, backend, f"{1e3 * t:.1f}", f"{1e3 * t_sdpa:.1f}", f"{t_sdpa / t:.2f}x"))
    con.table("median ms (SDPA with the dense boolean mask where it has no native option)",
              ("case", "attnkit backend", "attnkit ms", "SDPA ms", "speed vs SDPA"), rows)
    return 1 if failed else 0


_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "float8": torch.float8_e4m3fn, "int8": torch.int8}


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    raise AssertionError("unreachable")


def kv_cache(shape: KVShape, tokens: int, dtype_name: str, batch: int) -> int:
    """Print what a KV cache of ``shape`` costs, and how GQA/MQA and a window change it."""
    dtype = _DTYPES[dtype_name]
    con = _Console()
    con.rule(f"KV cache: {shape.name}")
    con.print(f"{shape.layers} layers x {shape.kv_heads} KV heads x head dim {shape.head_dim} "
              f"({shape.heads} query heads), {dtype_name}, batch {batch}, {tokens:,} tokens")
    rows = []

    def row(label: str, kv_heads: int, window: int | None) -> None:
        per_token = kv_cache_bytes(shape.layers, kv_heads, shape.head_dim, 1, dtype, 1)
        total = kv_cache_bytes(shape.layers, kv_heads, shape.head_dim, tokens, dtype, batch, window)
        rows.append((label, str(kv_heads), "none" if window is None else f"{window:,}",
                     _size(per_token), _size(total)))

    row("this model", shape.kv_heads, shape.window)
    if shape.kv_heads != shape.heads:
        row("same model as MHA", shape.heads, shape.window)
    if shape.kv_heads != 1:
        row("same model as MQA", 1, shape.window)
    if shape.window is not None:
        row("without its window", shape.kv_heads, None)
    con.table("KV cache size (K and V, every layer)", ("variant", "KV heads", "window", "per token", "total"), rows)
    return 0


def _csv(kind: type, choices: Sequence[str] | None = None):
    """An argparse type: a comma-separated list of ``kind``, each one of ``choices``."""

    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list; got {text!r}")
        try:
            values = [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}s separated by commas; got {text!r}") from None
        bad = [v for v in values if choices is not None and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(str, bad))}; choose from {', '.join(choices)}")
        return values

    return parse


def _write(con: _Console, args: argparse.Namespace, data: dict, plot: Callable[[str], object]) -> int:
    """Write ``data`` to ``--json`` and the plot to ``--plot``, where given."""
    import json

    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2)
        con.print(f"wrote {args.json}")
    if args.plot:
        con.print(f"wrote {plot(args.plot)}")
    return 0


def bench(args: argparse.Namespace) -> int:
    """Run ``attnkit.bench`` with a progress bar, then print and write the results."""

    from attnkit import bench as bench_lib

    con = _Console(stderr=args.markdown)  # with --markdown, stdout holds the table alone
    con.rule("attnkit bench")
    kwargs = {"backends": args.backends, "peers": args.peers, "backward": args.backward,
              "dtype": getattr(torch, args.dtype), "device": args.device, "batch": args.batch, "heads": args.heads,
              "kv_heads": args.kv_heads, "head_dim": args.head_dim, "window": args.window,
              "repeats": args.repeats, "memory": not args.no_memory, "max_dense_gib": args.max_dense_gib,
              "load": args.load}
    with _progress(con) as progress:
        result = bench_lib.run(args.cases, args.lengths, progress=progress, **kwargs)
    table = bench_lib.markdown(result)
    if args.markdown:
        print(table)
    else:
        rows = []
        for r in result.rows:
            ups = result.speedups(r.case, r.length, r.impl) if r.impl.startswith("attnkit:") else {}
            rows.append((r.case, str(r.length), r.impl.removeprefix("attnkit:"),
                         ("" if r.ms is None else f"{r.ms:.2f}")
                         + ("" if r.slowdown is None else f" (x{r.slowdown:.1f} loaded)"),
                         "" if r.peak_mib is None else f"{r.peak_mib:.0f}",
                         "" if r.gflops is None else f"{r.gflops:.1f} ({r.pct_of_matmul:.0f}%)",
                         *(f"{ups[p]:.2f}x" if p in ups else "" for p in args.peers),
                         r.status + (f": {r.note}" if r.note and r.status != "ok" else "")
                         + (f", max error {r.max_err:.2g}" if r.status == "wrong" else "")))
        con.print(f"{result.machine}; fp32 matmul {result.matmul_gflops:.0f} GFLOP/s. Rows without 'sdpa', 'flex' "
                  "or 'naive' in the implementation column are attnkit backends.")
        con.table("attention, " + ("forward+backward" if args.backward else "forward"),
                  ("case", "L", "impl", "ms", "peak MiB", "GFLOP/s (%mm)", *(f"vs {p}" for p in args.peers),
                   "status"), rows)
    return _write(con, args, result.to_dict(), lambda path: bench_lib.plot(result, path))


def induction(args: argparse.Namespace) -> int:
    """Train the induction-head model with a progress bar; print and plot the phase change."""

    from attnkit._plot import pyplot
    from attnkit.inspect.induction import InductionConfig, train_induction

    if args.plot:
        pyplot()  # fail now, not after training, when matplotlib is missing
    config = InductionConfig(steps=args.steps, seed=args.seed, half_length=args.half_length,
                             vocab_size=args.vocab_size, eval_every=max(1, args.steps // 40))
    con = _Console()
    con.rule("induction heads: 2-layer attention-only model on repeated random tokens")
    with _progress(con) as progress:
        result = train_induction(config, progress=lambda step, total: progress("training", step, total))
    rows = [(str(s), f"{a:.3f}", f"{b:.3f}", f"{float(i.max()):.2f}", f"{float(p[0].max()):.2f}")
            for s, a, b, i, p in zip(result.steps, result.first_half_loss, result.second_half_loss,
                                      result.induction, result.previous_token)]
    stride = max(1, len(rows) // 12)
    shown = rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])
    con.table("loss on each half, and the best head scores", ("step", "1st half loss", "2nd half loss",
              "best induction", "best layer-0 prev-token"), shown)
    layer, head, score = result.best_head("induction")
    p_layer, p_head, p_score = result.best_head("previous_token")
    con.print(f"strongest induction head: layer {layer} head {head}, score {score:.2f} "
              f"(uniform attention: {result.chance_induction:.3f})")
    con.print(f"strongest previous-token head: layer {p_layer} head {p_head}, score {p_score:.2f}")
    con.print(f"second-half loss {result.second_half_loss[-1]:.3f} vs first-half {result.first_half_loss[-1]:.3f} "
              f"nats, after {config.steps} steps in {result.seconds:.0f} s")
    return _write(con, args, result.to_dict(), result.plot)


def _quiet_transformers() -> None:
    """Hide transformers' own weight-loading bar (a fraction of a second for these models)."""
    try:
        from transformers.utils import logging
    except ImportError:
        return
    logging.disable_progress_bar()


def explain(args: argparse.Namespace) -> int:
    """Run a model on a text; print tokens, top attended tokens and head roles; write the report."""
    from attnkit import models
    from attnkit.viz import explainer as ex
    from attnkit.viz import report

    if args.png:
        from attnkit._plot import pyplot

        pyplot()  # fail now, not after the model ran, when matplotlib is missing
    if args.png and Path(args.png).exists() and not Path(args.png).is_dir():
        raise ValueError(f"--png must be a folder; {args.png!r} is a file")
    if args.out:  # fail now, not after the model ran, when the report cannot be written there
        out = Path(args.out)
        if out.is_dir():
            raise ValueError(f"--out must be a file to write, not a folder; got {args.out!r}")
        if not out.resolve().parent.is_dir():
            raise ValueError(f"--out {args.out!r}: the folder {str(out.resolve().parent)!r} does not exist")
    con = _Console()
    _quiet_transformers()
    with con.status(f"loading {args.model}..."):
        model, tokenizer = models.load(args.model)
    with _progress(con) as progress:
        maps = ex.explain(args.text, (model, tokenizer), layers=args.layers, heads=args.heads,
                          progress=lambda done, total: progress("capturing attention", done, total))
    # Heads 0..k-1 of a model look like a whole model in the maps: roll out only every head.
    model_heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    whole = args.heads is None or (model_heads is not None and sorted(set(args.heads)) == list(range(model_heads)))
    tokens = maps.tokens[0]
    wanted: list[int] | None = None
    if args.token:
        wanted = []
        for query in args.token:
            found = ex.find_tokens(tokens, query)
            if not found:
                raise SystemExit(f"attnkit explain: error: --token {query!r} matches no token; the tokens are "
                                 + " ".join(tokens[:80]) + (" ..." if len(tokens) > 80 else ""))
            wanted.extend(i for i in found if i not in wanted)
    summary = ex.summarize(maps, tokens=wanted, k=args.top, max_rows=args.max_rows, skip_special=not args.keep_special)

    con.rule(f"{maps.model_name}: {len(tokens)} tokens, {len(maps.layers)} layers x {len(maps.heads)} heads")
    con.print("  ".join(f"{i}:{t}" for i, t in enumerate(tokens)))
    layer_cols = [f"layer {layer}" for layer in maps.layers]
    def cell(tops: list[tuple[int, str, float]]) -> str:
        return "\n".join(f"{key} {w:.2f}".replace(" 0.", " .") for _, key, w in tops)

    rows = [(f"{i} {tok}", *(cell(tops) for tops in per_layer)) for i, tok, per_layer in summary.rows]
    more = "" if summary.shown == summary.total else f" (first {summary.shown} of {summary.total}; pick with --token)"
    heads_note = "all heads" if args.heads is None else "heads " + ",".join(map(str, maps.heads))
    con.table(f"top {args.top} attended tokens per layer, mean of {heads_note}{more}", ("token", *layer_cols), rows)
    if summary.skipped_keys:
        con.print("special tokens left out of the lists (heads park weight there): "
                  + " ".join(sorted({tokens[j] for j in summary.skipped_keys})) + "; --keep-special lists them")
    if summary.heads:
        con.table("single heads that look hardest from the chosen tokens",
                  ("token", "layer.head", "looks at", "weight"),
                  [(f"{i} {tokens[i]}", f"L{lay}.H{hd}", f"{j} {tokens[j]}", f"{w:.3f}")
                   for i, lay, hd, j, w in summary.heads])
    roles = summary.roles
    lowest = {"mean_distance", "normalized_entropy"}  # for these, the telling heads are the lowest
    role_rows = [(role + (" (lowest)" if role in lowest else ""), f"{float(scores.nanmean()):.3f}",
                  "  ".join(f"L{lay}.H{hd} {sc:.3f}" for lay, hd, sc in roles.top(role, 3, largest=role not in lowest)))
                 for role, scores in roles.scores.items()]
    con.table("heads that score highest in each role", ("role", "mean", "top heads (layer.head score)"), role_rows)
    for role, why in roles.skipped.items():
        con.print(f"skipped {role}: {why}")
    if args.out:
        with _progress(con) as progress:
            path = report.write_report(maps, args.out, focus=wanted[0] if wanted else None, rollout=whole,
                                       roles=summary.roles, progress=progress)
        con.print(f"wrote {path} ({_size(path.stat().st_size)}): open it in a browser; it needs no network")
    if args.png:
        from attnkit.viz.png import save_pngs

        with _progress(con) as progress:
            paths = save_pngs(maps, args.png, rollout=whole, progress=progress)
        con.print(f"wrote {len(paths)} heatmaps to {args.png}: " + ", ".join(p.name for p in paths))
    return 0


def serve(args: argparse.Namespace) -> int:
    """Serve the explorer and the lab on a local web page until interrupted."""
    from attnkit.viz import server

    _quiet_transformers()
    server.serve(args.model, host=args.host, port=args.port, max_tokens=args.max_tokens)
    return 0


def lab(args: argparse.Namespace) -> int:
    """Write the attention lab page."""
    from attnkit.viz.lab import write_lab

    path = write_lab(args.out, tokens=args.tokens.split() if args.tokens else None, head_dim=args.head_dim,
                     seed=args.seed)
    _Console().print(f"wrote {path} ({_size(path.stat().st_size)}): open it in a browser; it needs no network")
    return 0


class _progress:
    """A rich progress bar over the run's (case, length) steps; plain lines without rich."""

    def __init__(self, con: _Console) -> None:
        self._con, self._bar, self._task = con, None, None

    def __enter__(self):
        if self._con._rich is None:
            from attnkit.bench.runner import print_progress

            return print_progress
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=self._con._rich, transient=True)
        self._bar.__enter__()
        self._task = self._bar.add_task("starting", total=None)
        return self._update

    def _update(self, description: str, done: int, total: int) -> None:
        self._bar.update(self._task, description=description, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="variants vs the reference, mask pictures, speed vs SDPA")
    p_demo.add_argument("--length", type=int, default=2048, help="sequence length of the speed table")
    p_demo.add_argument("--seed", type=int, default=0)
    sub.add_parser("backends", help="list the backends and what each supports")
    p_kv = sub.add_parser("kv-cache", help="the memory of a KV cache: per token, in total, with GQA/MQA or a window")
    p_kv.add_argument("--preset", choices=sorted(KV_PRESETS), help="a well-known model's shape")
    p_kv.add_argument("--layers", type=int)
    p_kv.add_argument("--kv-heads", type=int)
    p_kv.add_argument("--heads", type=int, help="query heads (default: --kv-heads), for the MHA comparison")
    p_kv.add_argument("--head-dim", type=int)
    p_kv.add_argument("--window", type=int, help="sliding window: the cache holds at most this many tokens")
    p_kv.add_argument("--tokens", type=int, default=4096)
    p_kv.add_argument("--dtype", choices=sorted(_DTYPES), default="float16")
    p_kv.add_argument("--batch", type=int, default=1)
    from attnkit.bench import BACKENDS, CASES, PEERS

    p_bench = sub.add_parser("bench", help="attnkit's backends vs SDPA, FlexAttention and eager attention")
    p_bench.add_argument("--cases", type=_csv(str, list(CASES)), default=list(CASES),
                         help=f"comma-separated, from {','.join(CASES)}")
    p_bench.add_argument("--lengths", type=_csv(int), default=[1024, 2048, 4096], help="comma-separated L")
    p_bench.add_argument("--backends", type=_csv(str, BACKENDS), default=list(BACKENDS))
    p_bench.add_argument("--peers", type=_csv(str, list(PEERS)), default=list(PEERS))
    p_bench.add_argument("--backward", action="store_true", help="time forward + backward")
    p_bench.add_argument("--dtype", choices=["bfloat16", "float16", "float32", "float64"], default="float32")
    p_bench.add_argument("--device", default="cpu")
    p_bench.add_argument("--batch", type=int, default=1)
    p_bench.add_argument("--heads", type=int, default=8)
    p_bench.add_argument("--kv-heads", type=int, default=2, help="for the gqa case")
    p_bench.add_argument("--head-dim", type=int, default=64)
    p_bench.add_argument("--window", type=int, default=512, help="keys per query in the window case")
    p_bench.add_argument("--repeats", type=int, default=5)
    p_bench.add_argument("--max-dense-gib", type=float, default=4.0,
                         help="skip implementations that would hold dense scores larger than this")
    p_bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p_bench.add_argument("--load", type=int, default=0, metavar="N",
                         help="time again with N background loads (spin / 2-thread matmul) and report slowdowns")
    p_bench.add_argument("--json", help="write every figure to this file")
    p_bench.add_argument("--plot", help="write a PNG of time and memory against L (needs matplotlib)")
    p_bench.add_argument("--markdown", action="store_true", help="print a markdown table")
    p_exp = sub.add_parser("explain", help="what a model attends to in a text: terminal summary, HTML report, PNGs")
    p_exp.add_argument("text", help="the input text")
    p_exp.add_argument("--model", default="minilm",
                       help="'minilm' (bundled all-MiniLM-L6-v2, the hf extra) or a local Hugging Face model folder")
    p_exp.add_argument("--out", default="report.html",
                       help="the HTML report to write (default report.html); '' for none")
    p_exp.add_argument("--png", default=None, metavar="DIR", help="also write static heatmaps into DIR")
    p_exp.add_argument("--layers", type=_csv(int), default=None, help="layers to capture, e.g. 0,5 (default all)")
    p_exp.add_argument("--heads", type=_csv(int), default=None, help="heads to capture, e.g. 0,3 (default all)")
    p_exp.add_argument("--token", action="append", default=None,
                       help="a token of interest: its text (every occurrence) or #N for position N; repeatable "
                            "(default: all tokens)")
    p_exp.add_argument("--top", type=int, default=3, help="attended tokens listed per layer (default 3)")
    p_exp.add_argument("--keep-special", action="store_true",
                       help="list special tokens ([CLS], [SEP], ...) among the attended tokens too")
    p_exp.add_argument("--max-rows", type=int, default=64, help="tokens listed at most (default 64)")
    p_srv = sub.add_parser("serve", help="a local web app: type text, see the explorer; the lab in a tab")
    p_srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p_srv.add_argument("--port", type=int, default=8000)
    p_srv.add_argument("--model", default="minilm", help="'minilm' or a local Hugging Face model folder")
    p_srv.add_argument("--max-tokens", type=int, default=None,
                       help="longest input accepted, in tokens (default: the model's maximum positions)")
    p_lab = sub.add_parser("lab", help="write the attention lab: sliders for q, k, v, scale, masks; live softmax")
    p_lab.add_argument("--out", default="lab.html", help="the page to write (default lab.html)")
    p_lab.add_argument("--tokens", default=None, help='2 to 12 starting tokens, e.g. "the bank of the river"')
    p_lab.add_argument("--head-dim", type=int, default=4, help="length of each q, k, v vector, 2 to 8 (default 4)")
    p_lab.add_argument("--seed", type=int, default=0, help="chooses the starting vectors")
    p_ind = sub.add_parser("induction", help="reproduce induction heads: train a 2-layer attention-only model")
    p_ind.add_argument("--steps", type=int, default=3000, help="training steps (--fast: 1000)")
    p_ind.add_argument("--fast", action="store_true", help="the quick setting (1000 steps), as run in CI")
    p_ind.add_argument("--half-length", type=int, default=24,
                       help="N: blocks of N/2..N random tokens, each then repeated")
    p_ind.add_argument("--vocab-size", type=int, default=64)
    p_ind.add_argument("--seed", type=int, default=0)
    p_ind.add_argument("--plot", default="induction.png", help="PNG of the phase change ('' for none)")
    p_ind.add_argument("--json", help="write the recorded losses and scores to this file")
    args = parser.parse_args(argv)
    if args.command == "induction":
        if args.fast:
            args.steps = 1000
        for name, low in (("steps", 1), ("half_length", 2), ("vocab_size", 3)):
            if getattr(args, name) < low:
                parser.error(f"--{name.replace('_', '-')} must be >= {low}; got {getattr(args, name)}")
        return induction(args)
    if args.command == "bench":
        for name in ("batch", "heads", "kv_heads", "head_dim", "window", "repeats"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
        if min(args.lengths) < 1:
            parser.error(f"--lengths must all be >= 1; got {args.lengths}")
        if args.heads % args.kv_heads:
            parser.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
        if args.max_dense_gib < 0:
            parser.error(f"--max-dense-gib must be >= 0; got {args.max_dense_gib}")
        return bench(args)
    if args.command == "explain":
        for name in ("top", "max_rows"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
        for name in ("layers", "heads"):
            if getattr(args, name) is not None and min(getattr(args, name)) < 0:
                parser.error(f"--{name} must be >= 0; got {getattr(args, name)}")
        if not args.text.strip():
            parser.error("text must not be empty")
        try:
            return explain(args)
        except (ValueError, TypeError, ImportError, OSError) as err:  # bad input, a missing extra, a bad path
            parser.exit(2, f"attnkit explain: error: {err}\n")
    if args.command == "serve":
        if not 0 <= args.port <= 65535:
            parser.error(f"--port must be in [0, 65535]; got {args.port}")
        if args.max_tokens is not None and args.max_tokens < 1:
            parser.error(f"--max-tokens must be >= 1; got {args.max_tokens}")
        try:
            return serve(args)
        except (ValueError, TypeError, ImportError, OSError) as err:  # bad host, limit, model, or a busy port
            parser.exit(2, f"attnkit serve: error: {err}\n")
    if args.command == "lab":
        try:
            return lab(args)
        except (ValueError, TypeError, OSError) as err:
            parser.exit(2, f"attnkit lab: error: {err}\n")
    if args.command == "demo":
        if args.length < 1:
            parser.error(f"--length must be >= 1; got {args.length}")
        return demo(args.length, args.seed)
    if args.command == "kv-cache":
        dims = (args.layers, args.kv_heads, args.head_dim)
        if args.preset is None and None in dims:
            parser.error("kv-cache needs --preset NAME, or all of --layers, --kv-heads and --head-dim")
        base = KV_PRESETS[args.preset] if args.preset else KVShape("custom", 1, 1, 1, 1)
        kv_heads = base.kv_heads if args.kv_heads is None else args.kv_heads
        # query heads: given, else the preset's (unless its KV heads were overridden), else MHA
        heads = args.heads or (base.heads if args.preset and args.kv_heads is None else kv_heads)
        shape = dataclasses.replace(
            base, name=args.preset or "custom", kv_heads=kv_heads, heads=heads,
            layers=base.layers if args.layers is None else args.layers,
            head_dim=base.head_dim if args.head_dim is None else args.head_dim,
            window=base.window if args.window is None else args.window)
        for name in ("layers", "kv_heads", "head_dim", "heads", "window"):
            value = getattr(shape, name)
            if value is not None and value < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1; got {value}")
        if shape.heads % shape.kv_heads:
            parser.error(f"--heads ({shape.heads}) must be a multiple of --kv-heads ({shape.kv_heads})")
        if args.tokens < 0 or args.batch < 1:
            parser.error(f"--tokens must be >= 0 and --batch >= 1; got {args.tokens} and {args.batch}")
        return kv_cache(shape, args.tokens, args.dtype, args.batch)
    for info in attnkit.backends().values():
        print(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
