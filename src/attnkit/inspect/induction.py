"""Induction heads, reproduced: the phase change of Olsson et al. (2022) on a CPU.

A 2-layer attention-only :class:`~attnkit.nn.TransformerLM` learns sequences
``[BOS, r1..rn, r1..rn, f1..]`` of random tokens: a block of random length n (between N/2
and N), the same block again, then fresh random filler up to 2N + 1 tokens. The first
copy cannot be predicted; the second can, once a *previous-token* head in layer 0 and an
*induction* head in layer 1 form together (layers numbered from 0) (the second head looks at the token after the
earlier copy of the current token). The block length varies so that no head can find the
earlier copy by position alone: with a fixed offset, a single layer learns the shortcut.
Training records, at regular steps, the loss on each half and every head's induction and
previous-token scores (:mod:`attnkit.inspect.roles`), from attention
captured with :func:`attnkit.inspect.capture`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit._checks import require_int, require_real
from attnkit._plot import pyplot
from attnkit.inspect._patterns import earlier_same
from attnkit.inspect.maps import AttentionMaps
from attnkit.inspect.recording import capture
from attnkit.inspect.roles import induction_score, previous_token_score
from attnkit.nn import TransformerConfig, TransformerLM

__all__ = ["InductionConfig", "InductionResult", "train_induction"]


@dataclass(frozen=True)
class InductionConfig:
    """The experiment. The defaults are the README's full setting (about 1 min on 2 cores).

    Args:
        vocab_size: token ids; 0 is BOS, the random tokens are drawn from 1..vocab_size-1.
        half_length: N, the longest random block; each sequence's block has a length
            drawn uniformly from N/2..N, and every sequence has 2N + 1 tokens.
        dim, heads: the model's width and heads per layer (2 attention-only layers).
        positions: the model's positions (learned absolute embeddings by default).
        steps, batch_size, lr: AdamW training.
        eval_every: record losses and head scores every this many steps (and at the end).
        eval_sequences: fixed held-out sequences the records are measured on.
        seed: seeds the weights and the data.
    """

    vocab_size: int = 64
    half_length: int = 24
    dim: int = 64
    heads: int = 4
    positions: str = "learned"
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    eval_every: int = 50
    eval_sequences: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        require_int("vocab_size", self.vocab_size, minimum=3)
        require_int("half_length", self.half_length, minimum=2)
        for name in ("dim", "heads", "steps", "batch_size", "eval_every", "eval_sequences"):
            require_int(name, getattr(self, name), minimum=1)
        if require_real("lr", self.lr) <= 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of heads ({self.heads})")


@dataclass
class InductionResult:
    """What training recorded, one entry per evaluation step.

    ``induction`` and ``previous_token`` are (evaluations, 2 layers, heads) head scores,
    averaged over the held-out sequences. ``chance_induction`` is the induction score that
    uniform causal attention gets on the same sequences: what a head that ignores content
    scores (every query whose token occurred earlier counts, filler included).
    ``repeated_tokens`` is the evidence the induction scores rest on: the query rows, over
    all held-out sequences, whose token occurred earlier in its sequence.
    ``first_half_loss`` is the mean loss on the tokens of the first copy;
    ``second_half_loss`` on the second copy from its second token on (its first token
    cannot be predicted: nothing says the block starts again).
    Filler tokens count in neither.
    """

    config: InductionConfig
    steps: list[int] = field(default_factory=list)
    first_half_loss: list[float] = field(default_factory=list)
    second_half_loss: list[float] = field(default_factory=list)
    induction: Tensor = field(default_factory=lambda: torch.empty(0))
    previous_token: Tensor = field(default_factory=lambda: torch.empty(0))
    seconds: float = 0.0
    chance_induction: float = float("nan")
    repeated_tokens: int = 0
    model: TransformerLM | None = None  # the trained model, for further inspection

    def best_head(self, score: str = "induction") -> tuple[int, int, float]:
        """(layer, head, score) of the head with the highest final ``score``
        (``"induction"`` or ``"previous_token"``)."""
        table = {"induction": self.induction, "previous_token": self.previous_token}
        if score not in table:
            raise ValueError(f"score must be 'induction' or 'previous_token'; got {score!r}")
        final = table[score][-1]
        layer, head = divmod(int(final.argmax()), final.shape[1])
        return layer, head, float(final[layer, head])

    def to_dict(self) -> dict:
        return {"config": asdict(self.config), "steps": self.steps, "first_half_loss": self.first_half_loss,
                "second_half_loss": self.second_half_loss, "induction": self.induction.tolist(),
                "previous_token": self.previous_token.tolist(), "seconds": self.seconds,
                "chance_induction": self.chance_induction, "repeated_tokens": self.repeated_tokens}

    def plot(self, path: str | Path) -> Path:
        """Save the phase change as a PNG: the two losses over training, and every head's
        induction and previous-token score. Needs matplotlib (``attnkit[plot]``)."""
        plt = pyplot()
        path = Path(path)
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        axes[0].plot(self.steps, self.first_half_loss, label="first half (random)")
        axes[0].plot(self.steps, self.second_half_loss, label="second half (repeated)")
        axes[0].axhline(math.log(self.config.vocab_size - 1), color="grey", lw=0.8, ls=":",
                        label="ln(vocab) (chance)")
        axes[0].set(xlabel="training step", ylabel="loss (nats)", title="loss on each half")
        for ax, scores, title in ((axes[1], self.induction, "induction score"),
                                  (axes[2], self.previous_token, "previous-token score")):
            for layer in range(scores.shape[1]):
                for head in range(scores.shape[2]):
                    ax.plot(self.steps, scores[:, layer, head].tolist(), ls="-" if layer else "--",
                            label=f"L{layer}H{head}")
            ax.set(xlabel="training step", ylabel="share of attention", title=f"{title} per head", ylim=(0, 1))
        axes[1].axhline(self.chance_induction, color="grey", lw=0.8, ls=":")
        for ax in axes:
            ax.legend(fontsize=7, ncol=2)
            ax.grid(alpha=0.3)
        fig.suptitle(f"Induction heads form: 2-layer attention-only model, N={self.config.half_length}, "
                     f"vocab {self.config.vocab_size}, {self.config.steps} steps ({self.seconds:.0f} s)", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _block_lengths(half_length: int) -> range:
    return range(max(2, half_length // 2), half_length + 1)


def _sequences(config: InductionConfig, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(count, 2N + 1) ids: BOS (0), a random block of n tokens, the same block again, then
    random filler; and the bool (count, 2N) masks of the targets in the first copy and in
    the second copy after its first token (target t is token t + 1)."""
    big_n = config.half_length
    lengths = _block_lengths(big_n)
    n = torch.randint(lengths.start, lengths.stop, (count, 1), generator=generator)  # (B, 1)
    seqs = torch.randint(1, config.vocab_size, (count, 2 * big_n + 1), generator=generator)
    pos = torch.arange(2 * big_n + 1)  # (T,)
    in_copy = (pos >= n + 1) & (pos <= 2 * n)
    source = (pos - n).clamp(min=0)  # the first copy's position of each second-copy token
    seqs = torch.where(in_copy, seqs.gather(1, source.expand_as(seqs)), seqs)
    seqs[:, 0] = 0
    target = pos[1:]  # (2N,)
    first = (target >= 1) & (target <= n)
    second = (target >= n + 2) & (target <= 2 * n)
    return seqs, first, second


def _half_losses(model: TransformerLM, seqs: Tensor, first: Tensor, second: Tensor) -> tuple[float, float]:
    logits = model(seqs[:, :-1])  # (B, 2N, vocab); position t predicts token t + 1
    loss = F.cross_entropy(logits.transpose(1, 2), seqs[:, 1:], reduction="none")  # (B, 2N)
    return float(loss[first].mean()), float(loss[second].mean())


def train_induction(config: InductionConfig | None = None,
                    progress: Callable[[int, int], None] | None = None) -> InductionResult:
    """Train the model and record the phase change. ``progress(step, steps)`` is called
    after every step.

    >>> result = train_induction(InductionConfig(steps=4, eval_every=2, eval_sequences=2, dim=16, heads=2))
    >>> result.steps, tuple(result.induction.shape)
    ([0, 2, 4], (3, 2, 2))
    """
    config = config or InductionConfig()
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    model = TransformerLM(TransformerConfig(vocab_size=config.vocab_size, dim=config.dim, depth=2,
                                            num_heads=config.heads, positions=config.positions,
                                            max_length=2 * config.half_length + 1, attention_only=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    data = torch.Generator().manual_seed(config.seed + 1)
    held_out, first_half, second_half = _sequences(config, config.eval_sequences,
                                                   torch.Generator().manual_seed(config.seed + 2))
    result = InductionResult(config)
    ids = held_out[:, :-1]  # what the model reads
    uniform = torch.ones(ids.shape[1], ids.shape[1]).tril()
    uniform /= uniform.sum(-1, keepdim=True)
    result.chance_induction = float(torch.stack([induction_score(uniform, row) for row in ids]).mean())
    result.repeated_tokens = sum(int(earlier_same(row).any(-1).sum()) for row in ids)
    induction, previous = [], []

    def record(step: int) -> None:
        model.eval()
        with torch.no_grad():
            first, second = _half_losses(model, held_out, first_half, second_half)
            maps = capture(model, held_out[:, :-1])
        assert isinstance(maps, AttentionMaps), "a TransformerLM (decoder-only) gives AttentionMaps"
        model.train()
        result.steps.append(step)
        result.first_half_loss.append(first)
        result.second_half_loss.append(second)
        induction.append(torch.stack([induction_score(maps[i], ids[i]) for i in range(len(maps))]).mean(0))
        previous.append(torch.stack([previous_token_score(maps[i]) for i in range(len(maps))]).mean(0))

    for step in range(config.steps):
        if step % config.eval_every == 0:
            record(step)
        seqs = _sequences(config, config.batch_size, data)[0]
        logits = model(seqs[:, :-1])
        loss = F.cross_entropy(logits.transpose(1, 2), seqs[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress:
            progress(step + 1, config.steps)
    record(config.steps)
    result.induction, result.previous_token = torch.stack(induction).float(), torch.stack(previous).float()
    result.seconds = time.perf_counter() - start
    result.model = model.eval()
    return result
