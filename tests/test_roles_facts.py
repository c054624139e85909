"""Roles and compare read what the maps know (special flags, the model's layer and head counts)
instead of guessing from token spelling or from the indices held."""

from __future__ import annotations

import pytest
import torch

from attnkit.inspect import AttentionMaps, compare, rollout, token_set
from attnkit.inspect.tokens import looks_special, special_mask


def _maps(heads=(0, 1), model_heads=None, layers=(0,), model_layers=None) -> AttentionMaps:
    attn = torch.full((len(layers), len(heads), 3, 3), 1 / 3)
    return AttentionMaps(attentions=[attn], tokens=[["[CLS]", "the", "cat"]], token_ids=[[1, 2, 3]],
                         model_name="toy", layers=layers, heads=heads, model_layers=model_layers,
                         model_heads=model_heads, special=[[True, False, False]])


def test_token_set_takes_the_tokenizers_special_flags_over_the_spelling():
    tokens = ["[CLS]", "<b>", "the", "[SEP]"]
    assert token_set(tokens, {"[cls]", "<b>", "the"}).tolist() == [False, False, True, False]  # spelled special
    # the tokenizer says only [SEP] is special: "[CLS]" and "<b>" are words here
    flags = [False, False, False, True]
    assert token_set(tokens, {"[cls]", "<b>", "the"}, special=flags).tolist() == [True, True, True, False]
    assert token_set(tokens, {"the", "[sep]"}, special=[True, True, True, True]).tolist() == [False] * 4
    with pytest.raises(ValueError, match="one flag per token"):
        token_set(tokens, {"the"}, special=[True])
    with pytest.raises(TypeError, match="must hold bools"):
        special_mask(tokens, [0, 1, 0, 1])
    assert looks_special("<|endoftext|>") and not looks_special("cat")


def test_rollout_refuses_maps_that_hold_part_of_the_models_heads_or_layers():
    with pytest.raises(ValueError, match="holds 2 of its 4 heads"):
        rollout(_maps(heads=(0, 1), model_heads=4))
    with pytest.raises(ValueError, match="holds 1 of its 3 layers"):
        rollout(_maps(layers=(0,), model_layers=3))
    whole = rollout(_maps(heads=(0, 1), model_heads=2, model_layers=1))
    torch.testing.assert_close(whole, 0.5 * torch.full((3, 3), 1 / 3, dtype=torch.float64)
                               + 0.5 * torch.eye(3, dtype=torch.float64))


def test_compare_refuses_maps_of_models_of_different_shapes():
    with pytest.raises(ValueError, match="model_heads is 2 and 4"):
        compare(_maps(model_heads=2), _maps(model_heads=4))
    assert compare(_maps(model_heads=4), _maps()).js.shape == (1, 2)  # one side unknown: not refused
