"""Translation with cross-attention, reproduced on a CPU: "the bank of the river" → "la rive de la rivière".

A small :class:`~attnkit.nn.EncoderDecoder` learns English→French from sentences built
from templates. Two English words are ambiguous: "bank" is "rive" near river, stream or
shore and "banque" near money, loan or account; "bat" is "chauve-souris" near cave, night
or wing and "batte" near ball, game or player. The only clue is the context word, which
sits elsewhere in the sentence, so producing the right word needs a look at it. Adjectives
follow the noun in French ("the red car" → "la voiture rouge"), so the alignment is not
a diagonal.

Each (sense, context word) pair is held out of training in one of the four templates:
the held-out set is those unseen combinations, and the translation accuracy is measured
on it by greedy decoding. The claim "the decoder reads 'river' to write 'rive'" is then
tested on teacher-forced probe sentences three ways: the cross-attention mass of every
(layer, head) on the context word at the step that produces "rive", against uniform
attention (1 / source length) and against controls; an intervention that hides the
context word from cross-attention (does the sense flip, against hiding a random word?);
and a linear probe for the sense on the encoder output at "bank". ``encoder="none"``
removes the encoder's self-attention, so that only cross-attention can find the context.

Legend: S source tokens, T target tokens, H heads.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit import masks
from attnkit._checks import require_choice, require_int, require_real
from attnkit._plot import pyplot
from attnkit.inspect.maps import AttentionMaps, Seq2SeqMaps
from attnkit.nn import EncoderDecoder, EncoderDecoderConfig

__all__ = ["AMBIGUOUS", "ENCODERS", "SENSES", "Corpus", "Sentence", "TranslateConfig", "TranslateResult",
           "build_corpus", "example_maps", "shown_example", "train_translation", "write_example_report"]

# English ambiguous word -> French sense -> the context words that select it
AMBIGUOUS: dict[str, dict[str, tuple[str, ...]]] = {
    "bank": {"rive": ("river", "stream", "shore"), "banque": ("money", "loan", "account")},
    "bat": {"chauve-souris": ("cave", "night", "wing"), "batte": ("ball", "game", "player")},
}
_SENSE_GENDER = {"rive": "f", "banque": "f", "chauve-souris": "f", "batte": "f"}
SENSES = tuple(sense for senses in AMBIGUOUS.values() for sense in senses)
# English noun -> (French noun, gender)
_CONTEXT = {"river": ("rivière", "f"), "stream": ("ruisseau", "m"), "shore": ("rivage", "m"),
            "money": ("argent", "m"), "loan": ("prêt", "m"), "account": ("compte", "m"),
            "cave": ("grotte", "f"), "night": ("nuit", "f"), "wing": ("aile", "f"),
            "ball": ("balle", "f"), "game": ("match", "m"), "player": ("joueur", "m")}
_PLAIN = {"car": ("voiture", "f"), "house": ("maison", "f"), "door": ("porte", "f"), "book": ("livre", "m"),
          "dog": ("chien", "m"), "boat": ("bateau", "m")}
_ADJECTIVES = {"red": "rouge", "dark": "sombre", "quiet": "calme", "yellow": "jaune", "strange": "étrange",
               "wide": "large"}  # the same in both genders, and after the noun
_PREPOSITIONS = {"of": "de", "near": "près de", "with": "avec", "behind": "derrière"}
_SUBJECTS = {"i": "j' ai vu", "we": "nous avons vu", "they": "ils ont vu"}
TEMPLATES = ("the N P the C", "the A N P the C", "S saw the A N P the C", "the C and the A N")
PAD, BOS, EOS = 0, 1, 2
ENCODERS = ("mixing", "none")  # TranslateConfig.encoder
# the lesson's thresholds (TranslateResult.findings): half the right choices flip when the model is left to guess
# between two senses, and none should flip when the decoder does not need the word, so FLIPS sits between the two;
# a probe at READS is well above the coin flip (50%) that an encoder output without the context gives
FLIPS, READS = 0.25, 0.8


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _the(noun: str, gender: str, preposition: str | None = None) -> list[str]:
    """French article (with the preposition, contracted) and noun: 'de la rivière', 'du prêt', "de l' argent"."""
    vowel = noun[0] in "aeiouéè"
    article = "l'" if vowel else ("la" if gender == "f" else "le")
    if preposition is None:
        return [article, noun]
    words = preposition.split()
    if words[-1] == "de" and article == "le":
        return [*words[:-1], "du", noun]
    return [*words, article, noun]


@dataclass(frozen=True)
class Sentence:
    """One pair. ``sense`` is the French word of the ambiguous noun (None for a plain
    noun); ``context_index`` the source position of the context word; ``template`` an
    index into :data:`TEMPLATES`."""

    english: tuple[str, ...]
    french: tuple[str, ...]
    template: int
    sense: str | None = None
    ambiguous: str | None = None
    context: str | None = None
    context_index: int | None = None


def _sentence(template: int, noun: str, fr_noun: str, gender: str, ctx: str, adj: str, prep: str, subj: str,
              sense: str | None = None, ambiguous: str | None = None) -> Sentence:
    c_fr, c_gender = _CONTEXT.get(ctx) or _PLAIN[ctx]
    adj_fr = [_ADJECTIVES[adj]]
    if template == 0:
        en, fr = ["the", noun, prep, "the", ctx], [*_the(fr_noun, gender), *_the(c_fr, c_gender, _PREPOSITIONS[prep])]
    elif template == 1:
        en = ["the", adj, noun, prep, "the", ctx]
        fr = [*_the(fr_noun, gender), *adj_fr, *_the(c_fr, c_gender, _PREPOSITIONS[prep])]
    elif template == 2:
        en = [subj, "saw", "the", adj, noun, prep, "the", ctx]
        fr = [*_SUBJECTS[subj].split(), *_the(fr_noun, gender), *adj_fr, *_the(c_fr, c_gender, _PREPOSITIONS[prep])]
    else:
        en, fr = ["the", ctx, "and", "the", adj, noun], [*_the(c_fr, c_gender), "et", *_the(fr_noun, gender), *adj_fr]
    return Sentence(tuple(en), tuple(fr), template, sense, ambiguous, ctx if sense else None,
                    en.index(ctx) if sense else None)


@dataclass
class Corpus:
    """The sentences and the two vocabularies (ids 0, 1, 2 are padding, BOS and EOS)."""

    train: list[Sentence]
    held_out: list[Sentence]
    held_out_cells: list[tuple[str, str, int]]  # (sense, context word, template) never seen in training
    src_vocab: list[str]
    tgt_vocab: list[str]

    def encode(self, sentences: list[Sentence]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(src (B, S), src_valid (B, S), tgt_in (B, T), tgt_out (B, T)), right-padded with 0;
        tgt_in is BOS + French, tgt_out French + EOS."""
        src_ids = {w: i for i, w in enumerate(self.src_vocab)}
        tgt_ids = {w: i for i, w in enumerate(self.tgt_vocab)}
        s_len = max(len(s.english) for s in sentences)
        t_len = max(len(s.french) for s in sentences) + 1
        src = torch.zeros(len(sentences), s_len, dtype=torch.long)
        tgt_in = torch.zeros(len(sentences), t_len, dtype=torch.long)
        tgt_out = torch.zeros(len(sentences), t_len, dtype=torch.long)
        for i, s in enumerate(sentences):
            src[i, :len(s.english)] = torch.tensor([src_ids[w] for w in s.english])
            fr = [tgt_ids[w] for w in s.french]
            tgt_in[i, :len(fr) + 1] = torch.tensor([BOS, *fr])
            tgt_out[i, :len(fr) + 1] = torch.tensor([*fr, EOS])
        return src, src != PAD, tgt_in, tgt_out

    def words(self, ids: list[int]) -> list[str]:
        """French words of generated ids, up to EOS (BOS dropped)."""
        out = []
        for i in ids:
            if i == EOS:
                break
            if i not in (PAD, BOS):
                out.append(self.tgt_vocab[i])
        return out


def build_corpus(seed: int = 0) -> Corpus:
    """Every sentence the templates make, split into training sentences and the held-out
    unseen combinations: for each (sense, context word), one template chosen by ``seed``
    (each template held out for three of the twelve pairs).

    >>> corpus = build_corpus(0)
    >>> s = next(s for s in corpus.held_out if s.english == ("the", "bank", "of", "the", "river"))
    >>> " ".join(s.french), s.context, s.context_index
    ('la rive de la rivière', 'river', 4)
    >>> any(x.sense == "rive" and x.context == "river" and x.template == 0 for x in corpus.train)
    False
    """
    rng = random.Random(seed)
    pairs = [(amb, sense, ctx) for amb, senses in AMBIGUOUS.items() for sense, ctxs in senses.items() for ctx in ctxs]
    templates = [t for t in range(len(TEMPLATES)) for _ in range(len(pairs) // len(TEMPLATES))]
    rng.shuffle(templates)
    cells = [(sense, ctx, t) for (_, sense, ctx), t in zip(pairs, templates)]
    held = set(cells)
    fill = dict(adj=sorted(_ADJECTIVES), prep=sorted(_PREPOSITIONS), subj=sorted(_SUBJECTS))
    train: list[Sentence] = []
    held_out: list[Sentence] = []
    nouns: list[tuple[str, str | None, tuple[str, ...]]] = [
        (amb, sense, ctxs) for amb, senses in AMBIGUOUS.items() for sense, ctxs in senses.items()]
    nouns += [(n, None, tuple(c for c in [*_CONTEXT, *_PLAIN] if c != n)) for n in _PLAIN]
    for template in range(len(TEMPLATES)):
        for noun, sense, ctxs in nouns:
            fr_noun, gender = (sense, _SENSE_GENDER[sense]) if sense else _PLAIN[noun]
            for ctx in ctxs:
                for adj in fill["adj"] if template else ["red"]:
                    for prep in fill["prep"] if template != 3 else ["of"]:
                        for subj in fill["subj"] if template == 2 else ["i"]:
                            s = _sentence(template, noun, fr_noun, gender, ctx, adj, prep, subj, sense,
                                          noun if sense else None)
                            (held_out if (sense, ctx, template) in held else train).append(s)
    src_words = sorted({w for s in train + held_out for w in s.english})
    tgt_words = sorted({w for s in train + held_out for w in s.french})
    return Corpus(train, held_out, sorted(cells), ["<pad>", *src_words], ["<pad>", "<s>", "</s>", *tgt_words])


@dataclass(frozen=True)
class TranslateConfig:
    """The experiment. The defaults are the README's model; ``attnkit translate-demo`` trains it
    for fewer steps (400, ``--fast`` 120) than the default here.

    Args:
        dim, heads, encoder_depth, decoder_depth: the :class:`~attnkit.nn.EncoderDecoder`.
        steps, batch_size, lr: AdamW training with a linear warm-up over the first 5% of steps.
        ambiguous_share: the share of each batch drawn from sentences with an ambiguous noun.
        eval_every: record the held-out loss every this many steps (and at the end).
        probes: teacher-forced probe sentences per (sense, context word), for the head
            analysis and the intervention; spread evenly over the templates, so rounded up
            to a multiple of their number (4).
        seed: seeds the held-out split, the weights and the batches.
        encoder: ``"mixing"`` (default), the encoder's usual self-attention, where
            "bank" can read "river" before the decoder does; or ``"none"``: each source
            position attends only to itself (``encoder_window=1``, attnkit's
            ``sliding_window(0, 0)`` mask), so the encoder output at "bank" holds only the
            token "bank" and its position, and the sense must come from cross-attention.
    """

    dim: int = 64
    heads: int = 4
    encoder_depth: int = 2
    decoder_depth: int = 2
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    ambiguous_share: float = 0.5
    eval_every: int = 100
    probes: int = 8
    seed: int = 0
    encoder: str = "mixing"

    def __post_init__(self) -> None:
        for name in ("dim", "heads", "encoder_depth", "decoder_depth", "steps", "batch_size", "eval_every",
                     "probes"):
            require_int(name, getattr(self, name), minimum=1)
        require_int("seed", self.seed)
        require_choice("encoder", self.encoder, ENCODERS)
        if require_real("lr", self.lr) <= 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if not 0 <= require_real("ambiguous_share", self.ambiguous_share) <= 1:
            raise ValueError(f"ambiguous_share must be in [0, 1]; got {self.ambiguous_share}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of heads ({self.heads})")


@dataclass
class TranslateResult:
    """What training and the analysis found.

    ``accuracy`` maps ``"all"`` (exact-match held-out translations), each ambiguous word
    and each sense to the held-out share where the noun was translated with the right
    sense. ``rive_mass`` and ``banque_mass`` are (layers, heads): the mean cross-attention
    mass on the context word at the step that produces the word, over the probes;
    ``uniform`` the mean 1 / source length of the "rive" probes. ``example`` is the greedy
    translation of "the bank of the river" and its cross-attention (T, H, S) per layer.

    The evidence beside the heatmap (see :func:`train_translation`): ``controls``, the
    reported head's mass on the context word at the other steps and on the ambiguous word
    itself; ``intervention``, how often blocking the context word's cross-attention flips
    the sense, against blocking a random other source word; ``probe``, how well a linear
    probe reads the sense from the encoder output at the ambiguous word.
    """

    config: TranslateConfig
    corpus_sizes: dict[str, int] = field(default_factory=dict)
    held_out_cells: list[tuple[str, str, str]] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    held_out_loss: list[float] = field(default_factory=list)
    accuracy: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    rive_mass: Tensor = field(default_factory=lambda: torch.empty(0))
    banque_mass: Tensor = field(default_factory=lambda: torch.empty(0))
    uniform: float = float("nan")
    banque_uniform: float = float("nan")
    controls: dict[str, float] = field(default_factory=dict)
    intervention: dict[str, dict[str, float]] = field(default_factory=dict)
    probe: dict[str, float] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    model: EncoderDecoder | None = None
    corpus: Corpus | None = None

    def rive_head(self) -> tuple[int, int, float]:
        """(layer, head, mass) of the head whose cross-attention puts the most mass on the
        context word while producing "rive"."""
        layer, head = divmod(int(self.rive_mass.argmax()), self.rive_mass.shape[1])
        return layer, head, float(self.rive_mass[layer, head])

    def to_dict(self) -> dict:
        layer, head, mass = self.rive_head()
        # train_loss[0] is NaN (no step taken yet): JSON has no NaN, so it is written as null
        train_loss = [None if math.isnan(x) else x for x in self.train_loss]
        return {"config": asdict(self.config), "corpus": self.corpus_sizes, "held_out_cells": self.held_out_cells,
                "steps": self.steps, "train_loss": train_loss, "held_out_loss": self.held_out_loss,
                "accuracy": self.accuracy, "counts": self.counts, "rive_mass": self.rive_mass.tolist(),
                "banque_mass": self.banque_mass.tolist(), "uniform": self.uniform,
                "banque_uniform": self.banque_uniform,
                "rive_head": {"layer": layer, "head": head, "mass": mass,
                              "banque_mass": float(self.banque_mass[layer, head])},
                "controls": self.controls, "intervention": self.intervention, "probe": self.probe,
                "examples": [{k: v for k, v in e.items() if k != "cross"} for e in self.examples],
                "seconds": self.seconds}

    def findings(self) -> list[str]:
        """The findings in words, one paragraph per line: accuracy, the reported head against
        its controls and on the page's example, the intervention, the encoder probe, what
        they say together (each claim only as far as this run's figures support it), and
        the examples. The terminal prints them and the HTML page shows them above the
        heatmap."""
        acc, counts, c, probe = self.accuracy, self.counts, self.controls, self.probe
        layer, head, mass = self.rive_head()
        lines = [f"Held-out translations (sense, context word and template never seen together in training): "
                 f"{_percent(acc['all'])} exact of {counts['all']} sentences."]
        for word, senses in AMBIGUOUS.items():
            parts = ", ".join(f"{s} {_percent(acc[s])} of {counts[s]}" for s in senses if s in acc)
            lines.append(f"'{word}' translated with the right sense in {_percent(acc[word])} of {counts[word]} "
                         f"({parts}).")
        other = c["context_at_other_steps"]
        specific = ("more than" if mass > other else "no more than") + " at the other steps"
        lines.append(
            f"Producing 'rive', layer {layer} head {head} (the cross-attention head that looks hardest) puts "
            f"{mass:.3f} of its attention on the context word (river, stream or shore): "
            f"{mass / self.uniform:.1f}x uniform ({self.uniform:.3f} = 1/source length), {specific}. Controls, "
            f"same head: {other:.3f} on the context word while producing the other words, "
            f"{c['ambiguous_at_sense']:.3f} on 'bank' itself while producing 'rive', and "
            f"{float(self.banque_mass[layer, head]):.3f} on the context word while producing 'banque'.")
        lines += self._example_line()
        lines.append(self._intervention_line())
        lines.append(f"Encoder probe: a linear probe reads the sense of 'bank' from the encoder output at 'bank' in "
                     f"{_percent(probe['test'])} of {probe['test_sentences']} sentences it was not fitted on "
                     f"(50% is a coin flip).")
        lines.append(self._lesson())
        for example in self.examples:
            verdict = "right" if example["correct"] else f"wrong: the reference is '{example['reference']}'"
            where = "held out of training" if example["held_out"] else "in the training set"
            lines.append(f"'{' '.join(example['source'])}' -> '{example['translation']}' ({verdict}; {where}).")
        return lines

    def _example_line(self) -> list[str]:
        """The reported head on the page's example, which a reader checks the averages
        against: its weight on the context word at the sense step (none when the example
        has no sense step or no context word)."""
        example = shown_example(self)
        step, context = _sense_step(example["produced"]), example["context_index"]
        if step is None or context is None:
            return []
        layer, head, _ = self.rive_head()
        weight = float(example["cross"][layer][step, head, context])
        source = example["source"]
        return [f"On the page's example, that head puts {weight:.3f} on '{source[context]}' while producing "
                f"'{example['produced'][step]}' ({weight * len(source):.1f}x uniform, 1/{len(source)}): one "
                f"sentence, where the figures above are means over {self.intervention['rive']['probes']} probes."]

    def _intervention_line(self) -> str:
        every, after, before = (self.intervention[k] for k in ("all", "context_after", "context_before"))
        senses = ", ".join(f"{s} {_percent(self.intervention[s]['flip_context'])}" for s in SENSES)
        return (f"Intervention: hiding the context word from every cross-attention layer (attnkit's key_padding "
                f"mask; the encoder output unchanged) flips the sense the model scores higher in "
                f"{_percent(every['flip_context'])} of the {every['right']} probe sentences it gets right (of "
                f"{every['probes']}; teacher-forced to the step that writes the sense; "
                f"{_percent(after['flip_context'])} with the context word after the "
                f"ambiguous one, {_percent(before['flip_context'])} before it; by sense: {senses}). Hiding a random "
                f"other source word flips {_percent(every['flip_other'])}. A flip rate near 50% means the choice "
                f"falls to a guess.")

    def _lesson(self) -> str:
        """What the intervention and the probe say together, for this run's encoder setting;
        a flip rate of :data:`FLIPS` or more (overall, or for one sense) counts as the
        decoder depending on the context word, a probe of :data:`READS` or more as the
        encoder output carrying the sense."""
        flips = {s: self.intervention[s]["flip_context"] for s in ("all", *SENSES)}
        if flips["all"] is None:
            return "The intervention has no probe sentence that the model gets right, so it says nothing here."
        worst = max((s for s in SENSES if flips[s] is not None), key=lambda s: flips[s])
        flip, reads = flips["all"], self.probe["test"] >= READS
        if self.config.encoder == "none":
            text = ("Without encoder self-attention (--encoder none) the encoder output at 'bank' holds only that "
                    "token and its position, so the decoder's cross-attention must fetch the context word")
            text += (f": hiding it flips {_percent(flip)} of the choices, so the model falls back to a guess."
                     if flip >= FLIPS else f", yet hiding it flips only {_percent(flip)} of the choices in this run.")
            if flip >= FLIPS and self.rive_head()[2] < 2 * self.uniform:
                text += (" Attention mass undersells it here: no head puts twice uniform on the context word "
                         "while producing 'rive', yet the decoder depends on what it reads there.")
            return text
        text = ("With a mixing encoder (the default) 'bank' can read the context word in the encoder's own "
                "self-attention, so the sense can be settled before the decoder looks")
        if flips[worst] < FLIPS:
            text += ": in this run hiding the context word from cross-attention rarely changes the choice"
        else:
            text += (f"; in this run the decoder still leans on its own look for some choices (hiding the context "
                     f"word flips {_percent(flips[worst])} of the '{worst}' choices)")
        text += (", and the probe reads the sense from the encoder output at 'bank'." if reads else
                 f", yet the probe reads the sense from the encoder output at 'bank' in only "
                 f"{_percent(self.probe['test'])}.")
        return text + " Rerun with --encoder none to make cross-attention do the work."

    def plot(self, path: str | Path) -> Path:
        """Save the alignment heatmaps of the examples as a PNG, in the style of Bahdanau et
        al. 2015, Fig. 3: rows the French words produced (the row labelled "rive" is the
        step that writes "rive", as on the HTML page), columns the English source, grayscale
        (white = all the attention, black = none) with a colour bar, for the reported head;
        the sense word's row label is bold, and the caption says why that head (its mean
        mass on the context word). Needs matplotlib (``attnkit[plot]``)."""
        plt = pyplot()
        path = Path(path)
        layer, head, mass = self.rive_head()
        fig, axes = plt.subplots(1, len(self.examples), figsize=(4.2 * len(self.examples) + 1, 4.6), squeeze=False,
                                 layout="constrained")
        for ax, example in zip(axes[0], self.examples):
            grid = example["cross"][layer][:, head]  # (T, S)
            image = ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, aspect="equal")
            ax.set_xticks(range(len(example["source"])), example["source"], rotation=90)
            ax.set_yticks(range(len(example["produced"])), example["produced"])
            for label in ax.get_yticklabels():
                if label.get_text() in SENSES:
                    label.set_fontweight("bold")
            ax.xaxis.tick_top()
            ax.tick_params(length=0)
            verdict = "right" if example["correct"] else "WRONG" if example["reference"] else "not in the corpus"
            ax.set_xlabel(f"{example['translation']}\n({verdict})", fontsize=8)
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="attention weight")
        fig.suptitle(f"cross-attention of layer {layer} head {head}, encoder: {self.config.encoder} (rows: the French "
                     f"word produced at that step; columns: the English source)\nthe head with the most attention on "
                     f"the context word while producing 'rive': {mass:.3f} over the probes, "
                     f"{mass / self.uniform:.1f}x uniform", fontsize=9)
        fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": the caption and labels are never cut
        plt.close(fig)
        return path


def _loss(model: EncoderDecoder, src: Tensor, valid: Tensor, tgt_in: Tensor, tgt_out: Tensor) -> Tensor:
    # targets are right-padded: under the causal mask no real token sees a padded one, so the
    # target needs no padding mask (and plain causal attention takes the fused kernel)
    logits = model(src, tgt_in, src_padding_mask=valid)  # (B, T, V)
    return F.cross_entropy(logits.transpose(1, 2), tgt_out, ignore_index=PAD)


def _batch(ambiguous: list[Sentence], plain: list[Sentence], config: TranslateConfig,
           rng: random.Random) -> list[Sentence]:
    n_amb = round(config.batch_size * config.ambiguous_share)
    return rng.choices(ambiguous, k=n_amb) + rng.choices(plain, k=config.batch_size - n_amb)


def _accuracy(model: EncoderDecoder, corpus: Corpus, result: TranslateResult) -> None:
    src, valid, tgt_in, _ = corpus.encode(corpus.held_out)
    out = model.generate(src, tgt_in.shape[1] + 2, bos=BOS, eos=EOS, src_padding_mask=valid)
    hits: dict[str, list[bool]] = {"all": []}
    for s, ids in zip(corpus.held_out, out.tolist()):
        assert s.ambiguous is not None and s.sense is not None  # every held-out sentence has an ambiguous noun
        words = corpus.words(ids)
        hits["all"].append(tuple(words) == s.french)
        others = {w for w in AMBIGUOUS[s.ambiguous] if w != s.sense}
        right = s.sense in words and not others & set(words)
        hits.setdefault(s.ambiguous, []).append(right)
        hits.setdefault(s.sense, []).append(right)
    result.accuracy = {k: sum(v) / len(v) for k, v in hits.items()}
    result.counts = {k: len(v) for k, v in hits.items()}


def _probes(corpus: Corpus, config: TranslateConfig, sense: str) -> list[Sentence]:
    """``config.probes`` sentences per context word of ``sense``, spread evenly over the
    templates (seen and held-out sentences alike)."""
    rng = random.Random(config.seed + 3)
    groups: dict[tuple[str, int], list[Sentence]] = {}
    for s in corpus.train + corpus.held_out:
        if s.sense == sense:
            groups.setdefault((s.context, s.template), []).append(s)  # type: ignore[arg-type]
    each = -(-config.probes // len(TEMPLATES))
    return [s for key in sorted(groups) for s in rng.sample(groups[key], min(each, len(groups[key])))]


def _cross(model: EncoderDecoder, corpus: Corpus, probes: list[Sentence]) -> tuple[Tensor, Tensor]:
    """The cross-attention (B, layers, H, T, S), teacher-forced on the reference, and the
    rows (B,) that produce each probe's sense word."""
    src, valid, tgt_in, _ = corpus.encode(probes)
    with torch.no_grad():
        cross = model(src, tgt_in, src_padding_mask=valid, return_attention=True).cross_attentions
    rows = torch.tensor([s.french.index(s.sense) for s in probes])
    return torch.stack(cross, 1), rows


def _context_mass(model: EncoderDecoder, corpus: Corpus, probes: list[Sentence]) -> tuple[Tensor, float]:
    """(layers, heads) mean cross-attention mass on the context word at the step producing
    the probes' sense; and the mean 1 / source length."""
    probs, rows = _cross(model, corpus, probes)
    batch = torch.arange(len(probes))
    cols = torch.tensor([s.context_index for s in probes])
    mass = probs[batch, :, :, rows][batch, :, :, cols]  # (B, layers, H)
    lengths = torch.tensor([len(s.english) for s in probes], dtype=torch.float)
    return mass.mean(0), float((1 / lengths).mean())


def _controls(model: EncoderDecoder, corpus: Corpus, probes: list[Sentence], layer: int, head: int) -> dict[str, float]:
    """One head's mass on the context word producing the sense word, against the same
    head's mass on it at every other target step (the other words and the end), and its
    mass on the ambiguous word itself at the sense step."""
    probs, rows = _cross(model, corpus, probes)
    sense, others, itself = [], [], []
    for b, s in enumerate(probes):
        grid = probs[b, layer, head, :len(s.french) + 1, :len(s.english)]  # (T, S): produced words and the end
        row = int(rows[b])
        sense.append(float(grid[row, s.context_index]))
        others.append(float(torch.cat((grid[:row], grid[row + 1:]))[:, s.context_index].mean()))
        itself.append(float(grid[row, s.english.index(s.ambiguous)]))
    return {"context_at_sense": sum(sense) / len(sense), "context_at_other_steps": sum(others) / len(others),
            "ambiguous_at_sense": sum(itself) / len(itself)}


def _other_sense(s: Sentence) -> str:
    return next(w for w in AMBIGUOUS[s.ambiguous] if w != s.sense)  # type: ignore[index]


def _right_sense(model: EncoderDecoder, corpus: Corpus, probes: list[Sentence], keep: Tensor | None) -> Tensor:
    """(B,) True where, teacher-forced up to the sense word, the model scores the right
    sense above the other one. ``keep`` (B, S) False hides those source tokens from every
    cross-attention layer (attnkit's ``key_padding`` mask); the encoder output is unchanged."""
    src, valid, tgt_in, _ = corpus.encode(probes)
    ids = {w: i for i, w in enumerate(corpus.tgt_vocab)}
    cross_mask = None if keep is None else masks.key_padding(valid=keep)
    with torch.no_grad():
        logits = model.decode(tgt_in, model.encode(src, valid), src_padding_mask=valid, cross_mask=cross_mask)
    batch = torch.arange(len(probes))
    at = logits[batch, torch.tensor([s.french.index(s.sense) for s in probes])]
    right = at[batch, torch.tensor([ids[s.sense] for s in probes])]  # type: ignore[index]
    return right > at[batch, torch.tensor([ids[_other_sense(s)] for s in probes])]


def _blocked(probes: list[Sentence], width: int, positions: list[int]) -> Tensor:
    """(B, width) True everywhere but at each probe's position."""
    keep = torch.ones(len(probes), width, dtype=torch.bool)
    keep[torch.arange(len(probes)), torch.tensor(positions)] = False
    return keep


def _intervention(model: EncoderDecoder, corpus: Corpus, probes: list[Sentence], seed: int) -> dict[str, dict]:
    """How often the sense choice flips when cross-attention cannot see the context word,
    against a random other source word (neither the context nor the ambiguous word), over
    the probes the intact model gets right: for all probes, split by where the context
    word sits (after the ambiguous word, or before it, where the decoder has already
    written its translation and could read it there), and per sense."""
    rng = random.Random(seed + 5)
    width = max(len(s.english) for s in probes)
    context = [s.context_index for s in probes]
    amb = [s.english.index(s.ambiguous) for s in probes]
    other = [rng.choice([i for i in range(len(s.english)) if i not in (c, a)]) for s, c, a in zip(probes, context, amb)]
    intact = _right_sense(model, corpus, probes, None)
    no_context = _right_sense(model, corpus, probes, _blocked(probes, width, context))  # type: ignore[arg-type]
    no_other = _right_sense(model, corpus, probes, _blocked(probes, width, other))
    after = torch.tensor([c > a for c, a in zip(context, amb)])  # type: ignore[operator]
    out = {}
    groups = [("all", torch.ones_like(after)), ("context_after", after), ("context_before", ~after)]
    groups += [(sense, torch.tensor([s.sense == sense for s in probes])) for sense in SENSES]
    for name, rows in groups:
        base = intact & rows
        n = int(base.sum())
        out[name] = {"probes": int(rows.sum()), "right": n,
                     "flip_context": float((base & ~no_context).sum()) / n if n else None,
                     "flip_other": float((base & ~no_other).sum()) / n if n else None}
    return out


def _probe(model: EncoderDecoder, corpus: Corpus, word: str, seed: int) -> dict[str, float]:
    """A logistic-regression probe for the sense of ``word`` on the encoder output at
    ``word``: fitted on a random three quarters of the sentences with ``word`` (seen and
    held-out alike; both senses occur in every template), scored on the other quarter. The
    senses are balanced, so 50% is a coin flip: an encoder output that holds only the
    token and its position (``encoder="none"``) cannot beat it."""
    sentences = [s for s in corpus.train + corpus.held_out if s.ambiguous == word]
    random.Random(seed + 7).shuffle(sentences)
    src, valid, _, _ = corpus.encode(sentences)
    with torch.no_grad():
        memory = model.encode(src, valid)  # (B, S, E)
    at = torch.tensor([s.english.index(word) for s in sentences])
    x = memory[torch.arange(len(sentences)), at].double()  # (B, E)
    y = torch.tensor([float(s.sense == sorted(AMBIGUOUS[word])[0]) for s in sentences], dtype=torch.float64)
    fit = 3 * len(sentences) // 4
    mean, std = x[:fit].mean(0), x[:fit].std(0) + 1e-6
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = x[:fit] @ weight[:-1] + weight[-1]
        loss = F.binary_cross_entropy_with_logits(logits, y[:fit]) + 1e-3 * weight[:-1].square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        right = ((x @ weight[:-1] + weight[-1] > 0).double() == y).double()
    return {"fit": float(right[:fit].mean()), "test": float(right[fit:].mean()), "test_sentences": len(y) - fit}


def _example(model: EncoderDecoder, corpus: Corpus, english: str) -> dict:
    words = english.split()
    src_ids = {w: i for i, w in enumerate(corpus.src_vocab)}
    src = torch.tensor([[src_ids[w] for w in words]])
    out = model.generate(src, 14, bos=BOS, eos=EOS)
    with torch.no_grad():
        cross = model(src, out[:, :-1], return_attention=True).cross_attentions
    produced = [corpus.tgt_vocab[i] for i in out[0, 1:].tolist()]
    sentence = next((s for s in corpus.train + corpus.held_out if s.english == tuple(words)), None)
    reference = None if sentence is None else " ".join(sentence.french)
    translation = " ".join(corpus.words(out[0].tolist()))
    return {"source": words, "translation": translation, "produced": produced, "reference": reference,
            "correct": translation == reference, "held_out": sentence in corpus.held_out if sentence else False,
            "context_index": None if sentence is None else sentence.context_index,
            "cross": [c[0].transpose(0, 1).float() for c in cross]}  # per layer (T, H, S)


def _sense_step(produced: list[str]) -> int | None:
    """The first target step that produces a sense word (:data:`SENSES`), or None."""
    return next((i for i, t in enumerate(produced) if t in SENSES), None)


SHOWCASE = "the bank of the river"


def _showcase(model: EncoderDecoder, corpus: Corpus) -> str:
    """:data:`SHOWCASE` when the model translates it right, else the shortest "rive"
    sentence it translates right (a short run may get the showcase wrong), else the showcase."""
    candidates = sorted((s for s in corpus.held_out + corpus.train if s.sense == "rive"),
                        key=lambda s: (len(s.english), s not in corpus.held_out))[:64]  # the shortest suffice
    src, valid, tgt_in, _ = corpus.encode(candidates)
    out = model.generate(src, tgt_in.shape[1] + 2, bos=BOS, eos=EOS, src_padding_mask=valid)
    right = [" ".join(s.english) for s, ids in zip(candidates, out.tolist()) if tuple(corpus.words(ids)) == s.french]
    return SHOWCASE if SHOWCASE in right or not right else right[0]


def _analyse(model: EncoderDecoder, corpus: Corpus, config: TranslateConfig, result: TranslateResult) -> None:
    """The head table, the reported head's controls, the intervention and the encoder probe."""
    rive = _probes(corpus, config, "rive")
    result.rive_mass, result.uniform = _context_mass(model, corpus, rive)
    result.banque_mass, result.banque_uniform = _context_mass(model, corpus, _probes(corpus, config, "banque"))
    layer, head, _ = result.rive_head()
    result.controls = {**_controls(model, corpus, rive, layer, head), "uniform": result.uniform}
    every = [s for sense in SENSES for s in _probes(corpus, config, sense)]
    result.intervention = _intervention(model, corpus, every, config.seed)
    result.probe = _probe(model, corpus, "bank", config.seed)


def train_translation(config: TranslateConfig | None = None,
                      progress: Callable[[int, int], None] | None = None) -> TranslateResult:
    """Build the corpus, train the model, measure held-out accuracy and the cross-attention
    of every head. ``progress(step, steps)`` is called after every step. The held-out
    evaluation decodes every held-out sentence, a few seconds even for a tiny model.
    """
    config = config or TranslateConfig()
    start = time.perf_counter()
    corpus = build_corpus(config.seed)
    torch.manual_seed(config.seed)
    model = EncoderDecoder(EncoderDecoderConfig(
        src_vocab_size=len(corpus.src_vocab), tgt_vocab_size=len(corpus.tgt_vocab), dim=config.dim,
        encoder_depth=config.encoder_depth, decoder_depth=config.decoder_depth, num_heads=config.heads,
        max_length=16, mlp_ratio=2.0, encoder_window=1 if config.encoder == "none" else None))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    warmup = max(1, config.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    rng = random.Random(config.seed + 1)
    ambiguous = [s for s in corpus.train if s.sense]
    plain = [s for s in corpus.train if not s.sense]
    held = corpus.encode(corpus.held_out)
    result = TranslateResult(config, corpus_sizes={"train": len(corpus.train), "held_out": len(corpus.held_out)},
                             held_out_cells=[(s, c, TEMPLATES[t]) for s, c, t in corpus.held_out_cells])
    last = float("nan")
    for step in range(config.steps + 1):
        if step % config.eval_every == 0 or step == config.steps:
            model.eval()
            with torch.no_grad():
                result.held_out_loss.append(float(_loss(model, *held)))
            model.train()
            result.steps.append(step)
            result.train_loss.append(last)
        if step == config.steps:
            break
        loss = _loss(model, *corpus.encode(_batch(ambiguous, plain, config, rng)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        last = loss.item()
        if progress:
            progress(step + 1, config.steps)
    model.eval()
    _accuracy(model, corpus, result)
    _analyse(model, corpus, config, result)
    shown = _showcase(model, corpus)
    sentences = [SHOWCASE, *([shown] if shown != SHOWCASE else []), "we saw the red car near the river"]
    result.examples = [_example(model, corpus, english) for english in sentences]
    result.seconds = time.perf_counter() - start
    result.model, result.corpus = model, corpus
    return result


def example_maps(result: TranslateResult, english: str | None = None) -> Seq2SeqMaps:
    """The attention maps of the trained model translating ``english`` (greedy), for the
    HTML report (:func:`attnkit.viz.write_report`). Default: the sentence the run shows
    (``result.examples``: "the bank of the river", or, when the run translates it wrong,
    the shortest "rive" sentence it translates right).

    Built from the model's ``return_attention=True`` output (teacher-forced on its own
    greedy translation) with :class:`~attnkit.inspect.AttentionMaps`' constructor: the
    encoder's (layers, H, S, S), the decoder's (layers, H, T, T) and the cross (layers, H,
    T, S) maps. The decoder reads ``<s>`` and the translation without its last token; each
    row is labelled by the token that step produces (the translation and ``</s>``), as in
    :meth:`TranslateResult.plot`, and the decoder's key columns by the tokens it read.

    Raises:
        ValueError: ``result`` holds no model (it was not made by :func:`train_translation`),
            or ``english`` has a word outside the corpus's vocabulary.
    """
    if result.model is None or result.corpus is None:
        raise ValueError("result must come from train_translation (it holds the trained model and corpus); "
                         "this one has none")
    model, corpus = result.model, result.corpus
    src_ids = {w: i for i, w in enumerate(corpus.src_vocab)}
    words = list(shown_example(result)["source"]) if english is None else english.split()
    unknown = [w for w in words if w not in src_ids]
    if unknown:
        raise ValueError(f"english has words outside the corpus vocabulary: {unknown}; got {english!r}")
    src = torch.tensor([[src_ids[w] for w in words]])
    out = model.generate(src, 14, bos=BOS, eos=EOS)
    with torch.no_grad():
        attn = model(src, out[:, :-1], return_attention=True)
    read = [corpus.tgt_vocab[i] for i in out[0, :-1].tolist()]
    produced = [corpus.tgt_vocab[i] for i in out[0, 1:].tolist()]

    def stack(parts: tuple[Tensor, ...]) -> Tensor:
        return torch.stack([p[0] for p in parts]).float()  # (layers, H, Lq, Lk)

    name, heads = "attnkit translate-demo", tuple(range(model.config.num_heads))
    layers, ids = tuple(range(model.config.decoder_depth)), [out[0, :-1].tolist()]
    encoder = AttentionMaps([stack(attn.encoder_attentions)], [words], [src[0].tolist()],
                            name, tuple(range(model.config.encoder_depth)), heads)
    decoder = AttentionMaps([stack(attn.decoder_attentions)], [produced], None, name, layers, heads,
                            key_tokens=[read], key_token_ids=ids)
    cross = AttentionMaps([stack(attn.cross_attentions)], [produced], None, name, layers, heads,
                          key_tokens=[words], key_token_ids=[src[0].tolist()])
    return Seq2SeqMaps(encoder, decoder, cross, {"source": [src[0].tolist()], "target": ids})


def shown_example(result: TranslateResult) -> dict:
    """The example the page shows: "the bank of the river" when the run translates it right,
    else the "rive" sentence :func:`train_translation` found that it translates right (or,
    when there is none, the showcase itself, marked wrong). Never the sentence without an
    ambiguous word that :attr:`TranslateResult.examples` also holds.

    >>> shown_example(TranslateResult(TranslateConfig(), examples=[
    ...     {"source": ["the", "bank", "of", "the", "river"], "produced": ["la", "rive", "de", "la", "rive"],
    ...      "correct": False},
    ...     {"source": ["we", "saw", "the", "car"], "produced": ["nous", "avons", "vu", "la", "voiture"],
    ...      "correct": True}]))["source"]
    ['the', 'bank', 'of', 'the', 'river']

    Raises:
        ValueError: ``result`` holds no examples (it was not made by :func:`train_translation`).
    """
    if not result.examples:
        raise ValueError("result must come from train_translation (it holds the examples); this one has none")
    return next((e for e in result.examples if e["correct"] and "rive" in e["produced"]), result.examples[0])


def write_example_report(result: TranslateResult, path: str | Path) -> Path:
    """The HTML page of :func:`example_maps`: it opens on the cross-attention of the
    reported head (:meth:`TranslateResult.rive_head`) at the step that writes the sense
    word, with :meth:`TranslateResult.findings` above the picture. Returns the path."""
    from attnkit.viz import write_report

    maps = example_maps(result)
    focus = _sense_step(maps.cross.tokens[0])
    layer, head, _ = result.rive_head()
    example = shown_example(result)
    title = f"{' '.join(example['source'])} → {example['translation']}"
    if not example["correct"]:
        title += f" (wrong: the reference is {example['reference']})"
    return write_report(maps, path, tolerance=0.0, title=title, focus=focus, view=(layer, [head]),
                        figures=result.findings())
