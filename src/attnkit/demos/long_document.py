"""A model that reads 32K tokens, and a document that long, for the long-document explorer's demo.

MiniLM, the bundled model, stops at 512 positions. :func:`tiny_long_model` saves a random Llama-style model
(rotary positions, grouped-query attention; 2 layers x 4 heads by default) whose context window is 32,768
positions, with MiniLM's WordPiece tokenizer, as a model folder that :func:`attnkit.models.load` and
``attnkit explain --model FOLDER`` read. Its weights are random: it shows the machinery (every statistic
exact, the page responsive at 32K), not what a trained model attends to. Point ``--model`` at your own
checkpoint's folder for that (see docs/long-explorer.md).

:func:`demo_text` writes a document of a given number of words with passages that come back, so that heads
that copy earlier text have something to find.

>>> import tempfile
>>> folder = tiny_long_model(tempfile.mkdtemp(), max_positions=1024)
>>> from attnkit import models
>>> model, tokenizer = models.load(folder)
>>> model.config.max_position_embeddings, len(tokenizer(demo_text(200))["input_ids"]) > 200
(1024, True)
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from attnkit._checks import describe, require_int

__all__ = ["demo_text", "tiny_long_model"]

_WORDS = ["the", "river", "bank", "flooded", "after", "a", "week", "of", "rain", "while", "people", "in", "town",
          "moved", "their", "cars", "to", "higher", "ground", "and", "old", "bridge", "held", "against", "water",
          "as", "engineers", "watched", "level", "rise", "fall", "through", "night", "until", "morning", "came",
          "with", "clear", "sky", "news", "that", "road", "was", "open", "again"]


def tiny_long_model(folder: str | os.PathLike, *, max_positions: int = 32768, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, head_dim: int = 16, seed: int = 0) -> Path:
    """Save a random Llama-style model that reads ``max_positions`` tokens, with MiniLM's tokenizer, to ``folder``.

    Args:
        folder: where to write ``config.json``, ``model.safetensors`` and the tokenizer (created if missing).
        max_positions: the context window (default 32,768).
        layers, heads, kv_heads, head_dim: its shape (default 2 layers, 4 query heads sharing 2 key/value
            heads, 16 dimensions per head).
        seed: the seed of its random weights.

    Returns:
        The folder. Needs transformers and the bundled MiniLM package (the ``hf`` extra).
    """
    import torch
    import transformers

    from attnkit import models

    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a str or a path; got {describe(folder)}")
    for name, value in (("max_positions", max_positions), ("layers", layers), ("heads", heads),
                        ("kv_heads", kv_heads), ("head_dim", head_dim)):
        require_int(name, value, minimum=1)
    if heads % kv_heads:
        raise ValueError(f"heads must be a multiple of kv_heads (grouped-query attention); got heads={heads}, "
                         f"kv_heads={kv_heads}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(models.path("minilm"), local_files_only=True)
    tokenizer.model_max_length = max_positions
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, tie_word_embeddings=True,
        initializer_range=0.25)  # larger than a trained init (0.02): heads that are not all near-uniform
    transformers.LlamaForCausalLM(config).eval().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def demo_text(words: int, *, seed: int = 0) -> str:
    """A document of ``words`` words in sentences of 6 to 20, a third of them passages repeated from earlier.

    >>> demo_text(12, seed=1).count(" ") + 1
    12
    """
    words = require_int("words", words, minimum=1)
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < words:
        if len(out) > 200 and rng.random() < 1 / 3:
            start = rng.randrange(len(out) - 40)
            out.extend(out[start:start + rng.randrange(6, 21)])
        else:
            sentence = [rng.choice(_WORDS) for _ in range(rng.randrange(6, 21))]
            out.extend([*sentence[:-1], sentence[-1] + "."])
    return " ".join(out[:words])
