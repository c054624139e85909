"""attnkit: attention, exact and fast, with every common variant, on any PyTorch device.

>>> import torch, attnkit
>>> q = k = v = torch.randn(2, 4, 16, 32)
>>> out = attnkit.attention(q, k, v, mask=attnkit.masks.sliding_window(left=4))
>>> out.shape
torch.Size([2, 4, 16, 32])
"""

from attnkit import biases, masks, positions
from attnkit.functional import (
    BackendInfo,
    CallPlan,
    attention,
    attention_probs,
    backends,
    explain_call,
    linear_attention,
    linear_attention_step,
)
from attnkit.nn.cache import KV_PRESETS, kv_cache_bytes
from attnkit.profile.monitor import monitor

__version__ = "0.1.0.dev0"

__all__ = [
    "KV_PRESETS",
    "BackendInfo",
    "CallPlan",
    "__version__",
    "attention",
    "attention_probs",
    "backends",
    "biases",
    "explain_call",
    "kv_cache_bytes",
    "linear_attention",
    "linear_attention_step",
    "masks",
    "monitor",
    "positions",
]
