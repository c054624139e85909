"""The flex backend on a CUDA GPU: exactness against the float64 reference, auto's choice, and speed against SDPA.

    python benchmarks/flex_cuda.py            # checks, then timings; writes benchmarks/results/flex_cuda.{json,md}
    python benchmarks/flex_cuda.py --quick    # checks and one short timing; writes nothing

Needs a CUDA GPU (exits saying so otherwise). First, on a grid of masks and biases (window, causal documents,
ALiBi, soft-capping, prefix-LM, GQA, a batch element with no key), the flex backend's output, log-sum-exp and
gradients in float32 and bfloat16 must be within 2x (gradients 3x) the error of the reference backend run in
the same precision, both against the float64 reference (flash-attn's rule); and ``backend="auto"`` must pick
flex for the calls SDPA cannot express (sdpa, then flex, then tiled). Then ``attnkit.bench.run`` times auto,
tiled, SDPA (dense mask where it has no native form) and compiled Flex, forward and forward+backward, interleaved
(median of 5), and the table names the GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import attnkit
from attnkit import bench, biases, masks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine_info, machine_line, save

GRID = {
    "window": dict(mask=masks.sliding_window(100)),
    "document+causal": dict(mask=masks.document(torch.arange(600) // 150) & masks.causal()),
    "alibi+causal": dict(mask=masks.causal(), bias=biases.alibi(8)),
    "softcap+window": dict(mask=masks.sliding_window(64, 8), softcap=20.0),
    "prefix": dict(mask=masks.prefix_lm(torch.tensor([0, 400]))),
    "padding, one batch element with no key": dict(mask=masks.key_padding([300, 0])),
}


def _run(q, k, v, backend: str, kw: dict):
    out, lse = attnkit.attention(q, k, v, backend=backend, return_lse=True, **kw)
    do = torch.randn(out.shape, generator=torch.Generator(device=q.device).manual_seed(1), device=q.device,
                     dtype=out.dtype)
    return (out, lse, *torch.autograd.grad(out, (q, k, v), do))


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    return float(torch.where(both_inf, 0.0, (a - b).abs()).max())


def check(device: torch.device) -> list[str]:
    """Every exactness and dispatch failure, as lines (empty when all hold)."""
    failures = []
    g = torch.Generator(device=device).manual_seed(0)
    for name, kw in GRID.items():
        kv_heads = 2 if name == "alibi+causal" else 8  # GQA on one case
        shapes = [(2, 8, 600, 64), (2, kv_heads, 600, 64), (2, kv_heads, 600, 64)]
        q64, k64, v64 = (torch.randn(s, generator=g, device=device, dtype=torch.float64) for s in shapes)
        ref = _run(*(t.clone().requires_grad_() for t in (q64, k64, v64)), "reference", kw)
        for dtype in (torch.float32, torch.bfloat16):
            inputs = [t.to(dtype).requires_grad_() for t in (q64, k64, v64)]
            plain = _run(*inputs, "reference", kw)
            got = _run(*inputs, "flex", kw)
            for what, factor, g_, p_, r_ in zip(("out", "lse", "dq", "dk", "dv"), (2, 2, 3, 3, 3), got, plain, ref):
                bound = factor * _err(p_, r_) + 1e-5
                if not _err(g_, r_) <= bound:
                    failures.append(f"{name} {dtype}: {what} error {_err(g_, r_):.3g} > {bound:.3g}")
        plan = attnkit.explain_call(q64.float(), k64.float(), v64.float(), **kw)
        if plan.backend != "flex":
            failures.append(f"{name}: auto chose {plan.backend}, not flex ({'; '.join(plan.reasons)})")
    q = torch.randn(1, 8, 600, 64, device=device)
    if attnkit.explain_call(q, q, q, mask=masks.causal()).backend != "sdpa":
        failures.append("causal: auto did not choose sdpa")
    if attnkit.explain_call(q, q, q, mask=masks.sliding_window(100), dropout_p=0.1).backend != "tiled":
        failures.append("window with dropout: auto did not fall back to tiled")
    return failures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the checks and one short timing; writes nothing")
    ap.add_argument("--lengths", default="4096,16384")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU: this script checks and times the flex backend on CUDA")
    device = torch.device("cuda")
    failures = check(device)
    print("\n".join(failures) or "checks: the flex backend matches the float64 reference on every case; auto "
                                  "chooses sdpa, then flex, then tiled")
    lengths = [1024] if args.quick else [int(x) for x in args.lengths.split(",")]
    gpu = torch.cuda.get_device_name(device)
    results = {}
    for backward in (False, True):
        for dtype in (torch.bfloat16, torch.float32):
            res = bench.run(["window", "document", "alibi", "causal"], lengths, backends=["auto", "tiled"],
                            peers=["sdpa", "flex"], device=device, dtype=dtype, heads=8, kv_heads=8,
                            repeats=1 if args.quick else 5, backward=backward, memory=not args.quick)
            results[f"{'fwd+bwd' if backward else 'fwd'} {str(dtype).removeprefix('torch.')}"] = res
            if args.quick:
                break
    text = "\n\n".join([f"GPU: {gpu}.", *(f"### {name}\n\n{bench.markdown(r)}" for name, r in results.items())])
    print(text)
    if not args.quick:
        info = machine_info(f"GPU: {gpu}")
        data = {"machine": info, "gpu": gpu, "failures": failures,
                "results": {name: r.to_dict() for name, r in results.items()}}
        save("flex_cuda", data, machine_line(info) + "\n\n" + text)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
