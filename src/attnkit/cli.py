"""The ``attnkit`` command: a thin shell over the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import attnkit
from attnkit import biases, masks
from attnkit._timing import median_seconds


class _Console:
    """rich when installed (the ``cli`` extra), plain text otherwise."""

    def __init__(self) -> None:
        try:
            from rich.console import Console
        except ImportError:
            self._rich = None
        else:
            self._rich = Console(highlight=False)

    def rule(self, title: str) -> None:
        if self._rich:
            self._rich.rule(f"[bold]{title}")
        else:
            print(f"\n== {title} ==")

    def print(self, text: str = "") -> None:
        if self._rich:
            self._rich.print(text, markup=False)
        else:
            print(text)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        if self._rich:
            from rich.table import Table

            table = Table(title=title)
            for c in columns:
                table.add_column(c, justify="right" if c != columns[0] else "left")
            for r in rows:
                table.add_row(*r)
            self._rich.print(table)
            return
        widths = [max(len(c), *(len(r[n]) for r in rows)) for n, c in enumerate(columns)]
        print(title)
        for line in (columns, *rows):
            print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))

    def status(self, text: str):
        if self._rich:
            return self._rich.status(text)
        print(text)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="variants vs the reference, mask pictures, speed vs SDPA")
    p_demo.add_argument("--length", type=int, default=2048, help="sequence length of the speed table")
    p_demo.add_argument("--seed", type=int, default=0)
    sub.add_parser("backends", help="list the backends and what each supports")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.length < 1:
            parser.error(f"--length must be >= 1; got {args.length}")
        return demo(args.length, args.seed)
    for info in attnkit.backends().values():
        print(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
