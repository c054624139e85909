"""The model facts that capture, profile, the explorer and the CLI all read: asked in one module."""

from __future__ import annotations

import pytest

from attnkit import _model_facts as facts
from attnkit.nn import TransformerConfig, TransformerLM

transformers = pytest.importorskip("transformers")


def _bert(**extra):
    return transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=32, **extra))


class _NoLimit(transformers.PreTrainedModel):
    config_class = transformers.PretrainedConfig


def test_facts_of_transformers_models():
    bert = _bert(max_position_embeddings=77)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2,
                                                                n_positions=40))
    bart = transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=33))
    assert [facts.is_hf(m) for m in (bert, gpt2, bart)] == [True] * 3
    assert [facts.kind(m) for m in (bert, gpt2, bart)] == ["encoder", "decoder", "encoder-decoder"]
    assert [facts.max_positions(m, unstated=None) for m in (bert, gpt2, bart)] == [77, 40, 33]
    assert facts.name(bert) == "BertModel"
    bert.name_or_path = "my/folder"
    assert facts.name(bert) == "my/folder"
    silent = _NoLimit(transformers.PretrainedConfig())  # a config that states no max_position_embeddings
    assert facts.max_positions(silent, unstated=None) is None
    assert facts.max_positions(silent, unstated=512) == 512


def test_facts_of_attnkit_models():
    learned = TransformerLM(TransformerConfig(vocab_size=30, dim=16, depth=1, num_heads=2, positions="learned",
                                              max_length=64))
    rotary = TransformerLM(TransformerConfig(vocab_size=30, dim=16, depth=1, num_heads=2, positions="rope"))
    assert not facts.is_hf(learned) and facts.kind(learned) == "encoder"
    assert facts.max_positions(learned, unstated=None) == 64  # its position table
    assert facts.max_positions(rotary, unstated=None) is None  # rotary positions state no limit
    assert facts.max_positions(rotary, unstated=2048) == 2048
    assert facts.name(learned) == "TransformerLM" and facts.text_config(learned) is learned.config
