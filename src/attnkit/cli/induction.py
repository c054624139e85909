"""``attnkit induction``: train a 2-layer attention-only model on repeated random tokens and
watch induction heads form (the phase change); print the losses and head scores, plot them."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from attnkit.cli._common import Column, Console, Parser, Subparsers, positive, write_outputs

STEPS, FAST_STEPS = 3000, 1000


def add_parser(sub: Subparsers) -> Parser:
    p = sub.add_parser("induction", help="reproduce induction heads: train a 2-layer attention-only model",
                       description=__doc__)
    p.add_argument("--steps", type=int, default=None, help=f"training steps (default: {STEPS}; --fast: {FAST_STEPS})")
    p.add_argument("--fast", action="store_true", help=f"the quick setting ({FAST_STEPS} steps), as run in CI")
    p.add_argument("--half-length", type=int, default=24, help="N: blocks of N/2..N random tokens, each then repeated")
    p.add_argument("--vocab-size", type=int, default=64, help="distinct random tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the initial weights")
    p.add_argument("--plot", default="induction.png", help="PNG of the phase change ('' for none)")
    p.add_argument("--json", help="write the recorded losses and scores to this file")
    p.add_argument("--threads", type=_threads, default="auto",
                   help="torch threads while training, or 'auto': every 250 steps, time a few steps on one thread "
                        "and on torch's own thread count and keep the faster (on a busy machine one thread can be 3x "
                        "faster: each of the tiny model's many ops otherwise waits for a descheduled thread)")
    p.set_defaults(run=run)
    return p


def _threads(text: str) -> int | str:
    return "auto" if text == "auto" else positive(text)


class ThreadTuner:
    """Chooses the faster torch thread count for a loop of small steps, while it runs.

    Call :meth:`step` after each step. Every ``every`` steps it runs ``probe`` steps on
    each count in ``choices``, then keeps the one with the smaller median step time (the
    median ignores a step that also evaluated) until the next probe.
    """

    def __init__(self, choices: tuple[int, ...], every: int = 250, probe: int = 9,
                 set_threads: Callable[[int], None] = torch.set_num_threads,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.choices, self.every, self.probe = choices, every, probe
        self.set_threads, self.clock = set_threads, clock
        self.times: list[list[float]] = [[] for _ in choices]
        self.chosen = choices[0]
        self.last = clock()
        set_threads(choices[0])

    def step(self, done: int) -> None:
        """``done`` steps have finished."""
        now = self.clock()
        pos = (done - 1) % self.every  # the step that just finished
        trial = pos // self.probe
        if trial < len(self.choices):
            self.times[trial].append(now - self.last)
        nxt = done % self.every // self.probe  # the trial the next step belongs to
        if nxt < len(self.choices):
            if nxt == 0 and done % self.every == 0:
                self.times = [[] for _ in self.choices]
            self.set_threads(self.choices[nxt])
        elif nxt == len(self.choices) and done % self.every == len(self.choices) * self.probe:
            medians = [statistics.median(t) if t else float("inf") for t in self.times]
            self.chosen = self.choices[medians.index(min(medians))]
            self.set_threads(self.chosen)
        self.last = self.clock()


def run(args: argparse.Namespace) -> int:
    from attnkit._plot import pyplot
    from attnkit.inspect.induction import InductionConfig, train_induction

    steps = args.steps if args.steps is not None else (FAST_STEPS if args.fast else STEPS)
    config = InductionConfig(steps=steps, seed=args.seed, half_length=args.half_length,
                             vocab_size=args.vocab_size, eval_every=max(1, steps // 40))
    if args.plot:
        pyplot()  # fail now, not after training, when matplotlib is missing
    con = Console()
    con.rule("induction heads: 2-layer attention-only model on repeated random tokens")
    threads = torch.get_num_threads()
    tuner = ThreadTuner((1, threads) if threads > 1 else (1,)) if args.threads == "auto" else None
    if tuner is None:
        torch.set_num_threads(args.threads)
    try:
        with con.progress() as progress:
            def report(step: int, total: int) -> None:
                if tuner is not None:
                    tuner.step(step)
                progress("training", step, total)

            result = train_induction(config, progress=report)
    finally:
        torch.set_num_threads(threads)
    rows = [(str(s), f"{a:.3f}", f"{b:.3f}", f"{float(i.max()):.2f}", f"{float(p[0].max()):.2f}")
            for s, a, b, i, p in zip(result.steps, result.first_half_loss, result.second_half_loss,
                                      result.induction, result.previous_token)]
    stride = max(1, len(rows) // 12)
    shown = rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])
    con.table("loss on each half, and the best head scores",
              [Column(name, right=True) for name in ("step", "1st half loss", "2nd half loss", "best induction",
                                                     "best prev-token in layer 0")], shown)
    layer, head, score = result.best_head("induction")
    p_layer, p_head, p_score = result.best_head("previous_token")
    con.print(f"strongest induction head: layer {layer} head {head}, score {score:.2f} "
              f"(uniform attention: {result.chance_induction:.3f}; scored on {result.repeated_tokens} repeated "
              f"tokens in {config.eval_sequences} held-out sequences)")
    con.print(f"strongest previous-token head: layer {p_layer} head {p_head}, score {p_score:.2f}")
    con.print(f"second-half loss {result.second_half_loss[-1]:.3f} vs first-half {result.first_half_loss[-1]:.3f} "
              f"nats, after {config.steps} steps in {result.seconds:.0f} s")
    write_outputs(con, args.json, result.to_dict(), args.plot, result.plot)
    return 0
