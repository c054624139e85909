"""Tiny random Hugging Face models saved to folders, with an offline word-level tokenizer:
what the encoder-decoder and generation report and CLI tests load (``models.load``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "the", "bank", "of", "river", "la", "rive", "du", "fleuve", "money",
         "banque", "red", "car", "voiture", "rouge"]


def word_tokenizer():
    """A word-level fast tokenizer built offline: </s> after every text, <pad> = 0."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {w: i for i, w in enumerate(WORDS)}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    core.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>", bos_token="<s>")


def bart(folder: Path | None = None):
    """A random BART (2 encoder and 2 decoder layers, 4 heads, d_model 32); saved with the
    tokenizer to ``folder`` when given. Returns (model, tokenizer)."""
    t = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = t.BartConfig(vocab_size=len(WORDS), d_model=32, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                          decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2, decoder_start_token_id=1, forced_eos_token_id=None)
    model = t.BartForConditionalGeneration(config).eval()
    tokenizer = word_tokenizer()
    if folder is not None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    return model, tokenizer


def gpt2(folder: Path | None = None):
    """A random GPT-2 (2 layers, 2 heads, n_embd 32) with the word tokenizer. Returns (model, tokenizer)."""
    t = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = t.GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=1,
                          eos_token_id=2, pad_token_id=0)
    model = t.GPT2LMHeadModel(config).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    tokenizer = word_tokenizer()
    if folder is not None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    return model, tokenizer
