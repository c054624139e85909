"""A tiny transformers causal LM that computes attention in its own code, as Bloom, MPT and Falcon once did.

It is the negative case of the integration tests on every supported transformers version: its class declares
no ``_supports_attention_backend``, and this module never looks attention functions up in transformers'
registry, so transformers' own check (``_can_set_attn_implementation``, which reads the module's source) says it
cannot switch implementations. Under ``"eager"`` its ``output_attentions`` are the maps it used; under
``"sdpa"`` it calls PyTorch's fused kernel and computes the maps it returns apart from it.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn
from transformers.modeling_outputs import CausalLMOutput


class OwnAttentionConfig(transformers.PretrainedConfig):
    model_type = "attnkit-own-attention"

    def __init__(self, vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                 max_position_embeddings=64, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        super().__init__(**kwargs)


class OwnAttention(nn.Module):
    def __init__(self, config: OwnAttentionConfig):
        super().__init__()
        self.config = config
        self.heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, L, D) each
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        probs = scores.masked_fill(future, float("-inf")).softmax(-1)
        if self.config._attn_implementation == "sdpa":
            out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = probs @ v
        return self.out(out.transpose(1, 2).reshape(batch, length, width)), probs


class OwnAttentionForCausalLM(transformers.PreTrainedModel):
    config_class = OwnAttentionConfig
    _supports_sdpa = True

    def __init__(self, config: OwnAttentionConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(OwnAttention(config) for _ in range(config.num_hidden_layers))
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, output_attentions: bool = False, **_: object) -> CausalLMOutput:
        x = self.embed(input_ids) + self.positions(torch.arange(input_ids.shape[1], device=input_ids.device))
        maps = []
        for layer in self.layers:
            y, probs = layer(x)
            x = x + y
            maps.append(probs)
        return CausalLMOutput(logits=self.head(x), attentions=tuple(maps) if output_attentions else None)
