"""``attnkit demo``: variants checked against the float64 reference, the mask pictures,
and a small speed comparison with PyTorch SDPA."""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

import attnkit
from attnkit import biases, masks
from attnkit._timing import median_seconds
from attnkit.cli._common import Column, Console, Parser, Subparsers, positive


def add_parser(sub: Subparsers) -> Parser:
    p = sub.add_parser("demo", help="variants vs the reference, mask pictures, speed vs SDPA", description=__doc__)
    p.add_argument("--length", type=positive, default=2048, help="sequence length of the speed table")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.set_defaults(run=run)
    return p


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def run(args: argparse.Namespace) -> int:
    con = Console()
    torch.manual_seed(args.seed)
    con.rule(f"attnkit {attnkit.__version__} demo  (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    for info in attnkit.backends().values():
        con.print(str(info))

    b, h, hkv, n, d = 1, 8, 2, 257, 64
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    docs = torch.arange(n) * 3 // n
    variants: dict[str, dict[str, Any]] = {
        "dense": {},
        "causal": {"mask": masks.causal()},
        "sliding window 64": {"mask": masks.sliding_window(64)},
        "document (3) & causal": {"mask": masks.document(docs) & masks.causal()},
        "window | global [0]": {"mask": masks.sliding_window(32, 32) | masks.global_tokens([0])},
        "causal + ALiBi": {"mask": masks.causal(), "bias": biases.alibi(h)},
        "softcap 20": {"softcap": 20.0, "mask": masks.causal()},
    }
    rows: list[tuple[str, ...]] = []
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
              ("variant", "backend", Column("max error", right=True), "check"), rows)
    failed = any(r[3] == "FAIL" for r in rows)

    con.rule("masks as pictures")
    con.print(str(masks.causal()))
    con.print()
    con.print(str(masks.sliding_window(3, 1)))
    con.print()
    con.print(str(masks.document(torch.tensor([0] * 6 + [1] * 4 + [2] * 6)) & masks.causal()))
    con.print()
    con.print(str(masks.sliding_window(511).blocks(16384, 16384, 1024)))

    length = args.length
    con.rule(f"speed against PyTorch SDPA (fp32, B=1, H=8, D=64, L={length})")
    q, k, v = (torch.randn(1, 8, length, 64) for _ in range(3))
    window = masks.sliding_window(255)
    cases: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
        "dense": ({}, {}),
        "causal": ({"mask": masks.causal()}, {"is_causal": True}),
        "sliding window 256": ({"mask": window}, {"attn_mask": window.to_dense(length, length)}),
    }
    rows = []
    with con.status("timing..."):
        for name, (ours, theirs) in cases.items():
            t_sdpa = median_seconds(partial(F.scaled_dot_product_attention, q, k, v, **theirs), 3)
            for backend in ("auto", "tiled"):
                t = median_seconds(partial(attnkit.attention, q, k, v, backend=backend, **ours), 3)
                rows.append((name, backend, f"{1e3 * t:.1f}", f"{1e3 * t_sdpa:.1f}", f"{t_sdpa / t:.2f}x"))
    con.table("median ms (SDPA with the dense boolean mask where it has no native option)",
              ("case", "attnkit backend", Column("attnkit ms", right=True), Column("SDPA ms", right=True),
               Column("speed vs SDPA", right=True)), rows)
    return 1 if failed else 0
