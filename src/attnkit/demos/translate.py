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
on it by greedy decoding. The cross-attention of every (layer, head) is read with the
model's ``return_attention`` on teacher-forced probe sentences: the mass on the context
word at the step that produces "rive", against uniform attention (1 / source length)
and against the same head's mass on the context word when producing "banque".

Legend: S source tokens, T target tokens, H heads.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit._checks import require_int, require_real
from attnkit._plot import pyplot
from attnkit.inspect.maps import AttentionMaps, Seq2SeqMaps
from attnkit.nn import EncoderDecoder, EncoderDecoderConfig

__all__ = ["AMBIGUOUS", "Corpus", "Sentence", "TranslateConfig", "TranslateResult", "build_corpus",
           "train_translation"]

# English ambiguous word -> French sense -> the context words that select it
AMBIGUOUS: dict[str, dict[str, tuple[str, ...]]] = {
    "bank": {"rive": ("river", "stream", "shore"), "banque": ("money", "loan", "account")},
    "bat": {"chauve-souris": ("cave", "night", "wing"), "batte": ("ball", "game", "player")},
}
_SENSE_GENDER = {"rive": "f", "banque": "f", "chauve-souris": "f", "batte": "f"}
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
    """The experiment. The defaults are the README's setting (about a minute on 2 cores).

    Args:
        dim, heads, encoder_depth, decoder_depth: the :class:`~attnkit.nn.EncoderDecoder`.
        steps, batch_size, lr: AdamW training with a linear warm-up over the first 5% of steps.
        ambiguous_share: the share of each batch drawn from sentences with an ambiguous noun.
        eval_every: record the held-out loss every this many steps (and at the end).
        probes: teacher-forced sentences per (sense, context word) for the head analysis.
        seed: seeds the held-out split, the weights and the batches.
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

    def __post_init__(self) -> None:
        for name in ("dim", "heads", "encoder_depth", "decoder_depth", "steps", "batch_size", "eval_every",
                     "probes"):
            require_int(name, getattr(self, name), minimum=1)
        require_int("seed", self.seed)
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
        return {"config": asdict(self.config), "corpus": self.corpus_sizes, "held_out_cells": self.held_out_cells,
                "steps": self.steps, "train_loss": self.train_loss, "held_out_loss": self.held_out_loss,
                "accuracy": self.accuracy, "counts": self.counts, "rive_mass": self.rive_mass.tolist(),
                "banque_mass": self.banque_mass.tolist(), "uniform": self.uniform,
                "banque_uniform": self.banque_uniform,
                "rive_head": {"layer": layer, "head": head, "mass": mass,
                              "banque_mass": float(self.banque_mass[layer, head])},
                "examples": [{k: v for k, v in e.items() if k != "cross"} for e in self.examples],
                "seconds": self.seconds}

    def plot(self, path: str | Path) -> Path:
        """Save the alignment heatmaps of the examples as a PNG, in the style of Bahdanau et
        al. 2015, Fig. 3: rows the French words produced, columns the English source,
        grayscale (white = all the attention, black = none), for the "rive" head. Needs
        matplotlib (``attnkit[plot]``)."""
        plt = pyplot()
        path = Path(path)
        layer, head, _ = self.rive_head()
        fig, axes = plt.subplots(1, len(self.examples), figsize=(4.2 * len(self.examples), 4.4))
        for ax, example in zip([axes] if len(self.examples) == 1 else axes, self.examples):
            grid = example["cross"][layer][:, head]  # (T, S)
            ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, aspect="equal")
            ax.set_xticks(range(len(example["source"])), example["source"], rotation=90)
            ax.set_yticks(range(len(example["produced"])), example["produced"])
            ax.xaxis.tick_top()
            ax.tick_params(length=0)
        fig.suptitle(f"cross-attention of layer {layer} head {head} (rows: French produced, columns: English "
                     "source)", fontsize=9, y=0.02)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        fig.savefig(path, dpi=110)
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
    rng = random.Random(config.seed + 3)
    pool = [s for s in corpus.train + corpus.held_out if s.sense == sense]
    by_context: dict[str, list[Sentence]] = {}
    for s in pool:
        by_context.setdefault(s.context, []).append(s)  # type: ignore[arg-type]
    return [s for ctx in sorted(by_context) for s in rng.sample(by_context[ctx], min(config.probes,
                                                                                     len(by_context[ctx])))]


def _context_mass(model: EncoderDecoder, corpus: Corpus, probes: list[Sentence], sense: str) -> tuple[Tensor, float]:
    """(layers, heads) mean cross-attention mass on the context word at the step producing
    ``sense``, teacher-forced on the reference; and the mean 1 / source length."""
    src, valid, tgt_in, _ = corpus.encode(probes)
    with torch.no_grad():
        cross = model(src, tgt_in, src_padding_mask=valid, return_attention=True).cross_attentions
    probs = torch.stack(cross, 1)  # (B, layers, H, T, S)
    rows = torch.tensor([s.french.index(sense) for s in probes])  # the query that produces the sense word
    cols = torch.tensor([s.context_index for s in probes])
    picked = probs[torch.arange(len(probes)), :, :, rows]  # (B, layers, H, S)
    mass = picked[torch.arange(len(probes)), :, :, cols]  # (B, layers, H)
    return mass.mean(0), float((1 / valid.sum(1).float()).mean())


def _example(model: EncoderDecoder, corpus: Corpus, english: str) -> dict:
    words = english.split()
    src_ids = {w: i for i, w in enumerate(corpus.src_vocab)}
    src = torch.tensor([[src_ids[w] for w in words]])
    out = model.generate(src, 14, bos=BOS, eos=EOS)
    with torch.no_grad():
        cross = model(src, out[:, :-1], return_attention=True).cross_attentions
    produced = [corpus.tgt_vocab[i] for i in out[0, 1:].tolist()]
    held = any(s.english == tuple(words) for s in corpus.held_out)
    return {"source": words, "translation": " ".join(corpus.words(out[0].tolist())), "produced": produced,
            "held_out": held, "cross": [c[0].transpose(0, 1).float() for c in cross]}  # per layer (T, H, S)


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
        max_length=16, mlp_ratio=2.0))
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
    result.rive_mass, result.uniform = _context_mass(model, corpus, _probes(corpus, config, "rive"), "rive")
    result.banque_mass, result.banque_uniform = _context_mass(model, corpus, _probes(corpus, config, "banque"),
                                                              "banque")
    result.examples = [_example(model, corpus, "the bank of the river"),
                       _example(model, corpus, "we saw the red car near the river")]
    result.seconds = time.perf_counter() - start
    result.model, result.corpus = model, corpus
    return result


def example_maps(result: TranslateResult, english: str = "the bank of the river") -> Seq2SeqMaps:
    """The attention maps of the trained model translating ``english`` (greedy), for the
    HTML report (:func:`attnkit.viz.write_report`).

    Built from the model's ``return_attention=True`` output (teacher-forced on its own
    greedy translation) with :class:`~attnkit.inspect.AttentionMaps`' constructor: the
    encoder's (layers, H, S, S), the decoder's (layers, H, T, T) and the cross (layers, H,
    T, S) maps; the decoder reads ``<s>`` and the translation without its last token.

    Raises:
        ValueError: ``result`` holds no model (it was not made by :func:`train_translation`),
            or ``english`` has a word outside the corpus's vocabulary.
    """
    if result.model is None or result.corpus is None:
        raise ValueError("result must come from train_translation (it holds the trained model and corpus); "
                         "this one has none")
    model, corpus = result.model, result.corpus
    src_ids = {w: i for i, w in enumerate(corpus.src_vocab)}
    words = english.split()
    unknown = [w for w in words if w not in src_ids]
    if unknown:
        raise ValueError(f"english has words outside the corpus vocabulary: {unknown}; got {english!r}")
    src = torch.tensor([[src_ids[w] for w in words]])
    out = model.generate(src, 14, bos=BOS, eos=EOS)
    with torch.no_grad():
        attn = model(src, out[:, :-1], return_attention=True)
    target = [corpus.tgt_vocab[i] for i in out[0, :-1].tolist()]

    def stack(parts: tuple[Tensor, ...]) -> Tensor:
        return torch.stack([p[0] for p in parts]).float()  # (layers, H, Lq, Lk)

    name, heads = "attnkit translate-demo", tuple(range(model.config.num_heads))
    layers = tuple(range(model.config.decoder_depth))
    encoder = AttentionMaps([stack(attn.encoder_attentions)], [words], [src[0].tolist()],
                            name, tuple(range(model.config.encoder_depth)), heads)
    decoder = AttentionMaps([stack(attn.decoder_attentions)], [target], [out[0, :-1].tolist()], name, layers, heads)
    cross = AttentionMaps([stack(attn.cross_attentions)], [target], [out[0, :-1].tolist()], name, layers, heads,
                          key_tokens=[words], key_token_ids=[src[0].tolist()])
    return Seq2SeqMaps(encoder, decoder, cross, {"source": [src[0].tolist()], "target": [out[0, :-1].tolist()]})
