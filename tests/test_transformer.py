"""TransformerLM: generation with a KV cache gives the same tokens as without it."""

from __future__ import annotations

import pytest
import torch

from attnkit.nn import TransformerBlock, TransformerConfig, TransformerLM
from attnkit.positions import RopeScaling

_CONFIGS = {
    "rope-gqa": TransformerConfig(vocab_size=97, dim=48, depth=2, num_heads=6, num_kv_heads=2),
    "alibi-mqa-rms": TransformerConfig(vocab_size=97, dim=48, depth=2, num_heads=4, num_kv_heads=1,
                                       positions="alibi", norm="rms"),
    "learned-attention-only": TransformerConfig(vocab_size=97, dim=32, depth=2, num_heads=4, positions="learned",
                                                max_length=64, attention_only=True),
    "sinusoidal": TransformerConfig(vocab_size=97, dim=32, depth=1, num_heads=2, positions="sinusoidal"),
    "rope-window-yarn": TransformerConfig(vocab_size=97, dim=32, depth=2, num_heads=4, window=6,
                                          rope_scaling=RopeScaling("yarn", 2.0, original_max_position=16)),
}


def _lm(name: str) -> TransformerLM:
    torch.manual_seed(0)
    lm = TransformerLM(_CONFIGS[name]).eval()
    with torch.no_grad():  # larger logits than the 0.02 init, so greedy choices are not near-ties
        lm.embed.weight.mul_(20)
    return lm


@pytest.mark.parametrize("name", list(_CONFIGS))
@pytest.mark.parametrize("cache", ["auto", "static"])
def test_generate_with_cache_equals_without(name, cache):
    lm = _lm(name)
    prompt = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    with_cache = lm.generate(prompt, 20, temperature=0, cache=cache)
    without = lm.generate(prompt, 20, temperature=0, cache="none")
    assert with_cache.shape == (2, 27)
    assert torch.equal(with_cache, without)
    # sampling with the same seed draws the same tokens too
    a = lm.generate(prompt, 10, temperature=0.8, top_k=5, cache=cache, generator=torch.Generator().manual_seed(3))
    b = lm.generate(prompt, 10, temperature=0.8, top_k=5, cache="none", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_generate_left_padded_batch_equals_each_prompt_alone():
    lm = _lm("rope-gqa")
    prompts = [torch.tensor([5, 6, 7, 8, 9]), torch.tensor([11, 12])]
    batch = torch.zeros(2, 5, dtype=torch.long)
    valid = torch.zeros(2, 5, dtype=torch.bool)
    for b, p in enumerate(prompts):
        batch[b, 5 - len(p):], valid[b, 5 - len(p):] = p, True
    out = lm.generate(batch, 8, temperature=0, padding_mask=valid)
    for b, p in enumerate(prompts):
        alone = lm.generate(p, 8, temperature=0)
        assert torch.equal(out[b, 5 - len(p):], alone)


def test_learned_positions_padded_logits_equal_unpadded():
    lm = _lm("learned-attention-only")
    p = torch.tensor([[3, 4, 5]])
    padded = torch.tensor([[0, 0, 3, 4, 5]])
    valid = torch.tensor([[False, False, True, True, True]])
    assert torch.allclose(lm(padded, padding_mask=valid)[:, 2:], lm(p), atol=1e-5)


@pytest.mark.parametrize("name", ["learned-attention-only", "sinusoidal"])
def test_forward_with_padding_and_caches_equals_uncached(name):
    lm = _lm(name)
    tokens = torch.tensor([[0, 0, 3, 4, 5, 6], [9, 8, 7, 6, 5, 4]])
    valid = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    full = lm(tokens, padding_mask=valid)
    caches = lm.new_caches()
    stepped = torch.cat([lm(tokens[:, :3], padding_mask=valid[:, :3], caches=caches),
                         lm(tokens[:, 3:5], caches=caches), lm(tokens[:, 5:], caches=caches)], dim=1)
    assert (stepped - full)[valid].abs().max() <= 1e-4


def test_generate_in_train_mode_uses_eval_and_restores():
    torch.manual_seed(0)
    lm = TransformerLM(TransformerConfig(vocab_size=97, dim=32, depth=1, num_heads=4, dropout=0.5)).train()
    prompt = torch.tensor([[1, 2, 3]])
    assert torch.equal(lm.generate(prompt, 8, temperature=0), lm.generate(prompt, 8, temperature=0, cache="none"))
    assert lm.training


def test_top_k_one_is_greedy_and_stop_token():
    lm = _lm("rope-gqa")
    prompt = torch.tensor([[1, 2, 3]])
    greedy = lm.generate(prompt, 6, temperature=0)
    assert torch.equal(lm.generate(prompt, 6, temperature=1.0, top_k=1), greedy)
    assert torch.equal(lm.generate(prompt, 6, temperature=1e-4), greedy)  # a cold temperature is greedy
    new = greedy[0, 3:].tolist()
    stop = new[1]
    out = lm.generate(prompt, 6, temperature=0, stop_token=stop)
    assert out[0].tolist() == greedy[0, : 3 + new.index(stop) + 1].tolist()
    # in a batch, a finished row repeats the stop token while the other goes on
    both = lm.generate(torch.tensor([[1, 2, 3], [7, 8, 9]]), 6, temperature=0, stop_token=stop)
    other = lm.generate(torch.tensor([[7, 8, 9]]), 6, temperature=0, stop_token=stop)[0].tolist()
    first = greedy[0, : 3 + new.index(stop) + 1].tolist()
    assert both[0].tolist()[: len(first)] == first and set(both[0].tolist()[len(first):]) <= {stop}
    assert both[1].tolist()[: len(other)] == other


def test_attention_only_has_no_mlp_and_encoder_block_is_bidirectional():
    lm = TransformerLM(TransformerConfig(vocab_size=10, dim=16, depth=2, num_heads=2, attention_only=True))
    assert all(b.mlp is None for b in lm.blocks)
    torch.manual_seed(0)
    from attnkit.nn import AttentionConfig
    block = TransformerBlock(AttentionConfig(16, 2))
    x = torch.randn(1, 6, 16)
    y = x.clone()
    y[0, -1] = torch.randn(16)  # changing the last token changes the first token's output: not causal
    assert not torch.allclose(block(x)[0, 0], block(y)[0, 0])


def test_generate_errors():
    lm = TransformerLM(TransformerConfig(vocab_size=10, dim=16, depth=1, num_heads=2))
    with pytest.raises(ValueError, match="pad on the left"):
        lm.generate(torch.tensor([[1, 2, 0]]), 2, padding_mask=torch.tensor([[True, True, False]]))
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, vocab_size=10\)"):
        lm(torch.tensor([[1, 12]]))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        lm.generate(torch.tensor([1]), 2, temperature=-1)
    with pytest.raises(ValueError, match="cache must be one of"):
        lm.generate(torch.tensor([1]), 2, cache="paged")
    with pytest.raises(ValueError, match=r"stop_token must be a token id in \[0, 10\)"):
        lm.generate(torch.tensor([1]), 2, stop_token=10)
    with pytest.raises(TypeError, match="padding_mask must be bool"):
        lm.generate(torch.tensor([[1]]), 2, padding_mask=torch.ones(1, 1))
    assert torch.equal(lm.generate(torch.tensor([1, 2]), 0), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="positions must be one of"):
        TransformerConfig(vocab_size=10, positions="absolute")
