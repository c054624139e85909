"""KV caches for decoding, and the memory they take.

A cache holds the keys and values of the tokens seen so far, (B, Hkv, length, D), so a
decoding step projects only the new token. ``update(k, v)`` appends the new keys and
values and returns every key and value the new queries may read, oldest first, ending at
the newest token. Attention over them uses bottom-right alignment (the last query is the
newest token)::

    cache holds 3 tokens, 2 arrive:   k_all = [t0 t1 t2 | t3 t4]
                                       q t3:  1  1  1    1  0
                                       q t4:  1  1  1    1  1

Three kinds:

- :class:`DynamicKVCache` grows as tokens come (capacity doubles, so appends are
  amortised O(1) and no step copies the whole cache).
- :class:`StaticKVCache` is preallocated to ``max_length`` and written in place, so its
  memory is fixed and known up front.
- :class:`SlidingWindowKVCache` is a ring buffer of ``window`` tokens: memory stays flat
  however long generation runs. Keys are cached after RoPE, so each keeps its own
  absolute position.
- :class:`SinkKVCache` is StreamingLLM's cache (Xiao et al. 2023): the first ``sinks``
  tokens, kept for ever, and a ring of the last ``window`` tokens after them.

Each also tracks which keys are padding, when ``update`` is given ``valid`` flags, and
exposes them as :attr:`KVCache.valid` for the keys returned by the last update.

>>> import torch
>>> from attnkit.nn import DynamicKVCache
>>> cache = DynamicKVCache()
>>> k_all, v_all = cache.update(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
>>> k_all, v_all = cache.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
>>> k_all.shape, len(cache), cache.position
(torch.Size([1, 2, 6, 8]), 6, 6)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit._checks import describe, require_int, require_tensor

__all__ = [
    "KV_PRESETS",
    "DynamicKVCache",
    "KVCache",
    "KVShape",
    "SinkKVCache",
    "SlidingWindowKVCache",
    "StaticKVCache",
    "kv_cache_bytes",
]


class KVCache:
    """The common part of the caches: checks, length, position and padding flags."""

    def __init__(self) -> None:
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        self._valid: Tensor | None = None  # (B, capacity) bool, allocated on the first padded update
        self.position = 0  # tokens seen in all, i.e. the absolute position of the next token
        self.real: Tensor | None = None  # (B,) real (non-padding) tokens seen per row
        self.role: str | None = None  # "self" or "cross", set by the first module that uses it
        self.valid: Tensor | None = None  # (B, k_len) for the keys the last update returned; None = all valid

    @property
    def length(self) -> int:
        """How many tokens' keys and values the cache holds now."""
        return self.position

    def __len__(self) -> int:
        return self.length

    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value buffers."""
        return sum(t.numel() * t.element_size() for t in (self._k, self._v) if t is not None)

    def reset(self) -> None:
        """Forget every token and free the buffers."""
        self.__init__()  # type: ignore[misc]

    def keys_values(self) -> tuple[Tensor, Tensor]:
        """The cached keys and values, oldest first, without adding anything."""
        if self._k is None or self._v is None:
            raise ValueError("the cache is empty: call update(k, v) first")
        return self._ordered(self._k), self._ordered(self._v)

    def _ordered(self, buf: Tensor) -> Tensor:
        return buf[:, :, : self.length]

    def _check(self, k: Tensor, v: Tensor, valid: Tensor | None) -> Tensor | None:
        require_tensor("k", k)
        require_tensor("v", v)
        if k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"k and v must be (B, Hkv, L, D); got {describe(k)} and {describe(v)}")
        if k.shape[:3] != v.shape[:3]:
            raise ValueError(f"k and v must agree on (B, Hkv, L); got {tuple(k.shape)} and {tuple(v.shape)}")
        if self._k is not None:
            want = (self._k.shape[0], self._k.shape[1], self._k.shape[3])
            got = (k.shape[0], k.shape[1], k.shape[3])
            if got != want or v.shape[3] != self._v.shape[3]:  # type: ignore[union-attr]
                raise ValueError(f"k of shape {tuple(k.shape)} does not match the cache's (B, Hkv, D) = {want}")
            if k.dtype != self._k.dtype or k.device != self._k.device:
                raise ValueError(f"k must be {self._k.dtype} on {self._k.device} like the cache; got {describe(k)}")
        if valid is None:
            return None
        require_tensor("valid", valid)
        if valid.dtype != torch.bool or valid.shape != (k.shape[0], k.shape[2]):
            raise ValueError(f"valid must be a bool tensor of shape (B, L) = {(k.shape[0], k.shape[2])}; "
                             f"got {describe(valid)}")
        return valid.to(k.device)

    def _store_valid(self, valid: Tensor | None, batch: int, capacity: int, device: torch.device,
                     new: int) -> None:
        seen = torch.full((batch,), new, device=device) if valid is None else valid.sum(1)
        self.real = seen if self.real is None else self.real + seen
        if valid is None and self._valid is None:
            return
        if self._valid is None:  # padding appears now: every earlier token was valid
            self._valid = torch.ones(batch, capacity, dtype=torch.bool, device=device)
        elif self._valid.shape[1] < capacity:
            grown = torch.ones(batch, capacity, dtype=torch.bool, device=device)
            grown[:, : self._valid.shape[1]] = self._valid
            self._valid = grown

    def _append(self, k: Tensor, v: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
        """Write the new tokens after the held ones in the (large enough) buffers; return views."""
        end = self.position + k.shape[2]
        self._store_valid(valid, k.shape[0], self._k.shape[2], k.device, k.shape[2])  # type: ignore[union-attr]
        self._k[:, :, self.position:end] = k  # type: ignore[index]
        self._v[:, :, self.position:end] = v  # type: ignore[index]
        if self._valid is not None:
            self._valid[:, self.position:end] = True if valid is None else valid
        self.position = end
        self.valid = None if self._valid is None else self._valid[:, :end]
        return self._k[:, :, :end], self._v[:, :, :end]  # type: ignore[index]

    def update(self, k: Tensor, v: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Append keys and values (B, Hkv, L, D), return all keys and values to attend to.

        ``valid`` (B, L) bool marks which new tokens are real (False = padding); the flags
        for every returned key are then in :attr:`valid`.
        """
        raise NotImplementedError


class DynamicKVCache(KVCache):
    """A cache that grows as tokens come; returned keys are views, not copies."""

    def update(self, k: Tensor, v: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        valid = self._check(k, v, valid)
        end = self.position + k.shape[2]
        if self._k is None or end > self._k.shape[2]:
            capacity = max(end, 2 * (0 if self._k is None else self._k.shape[2]), 16)
            self._k, self._v = self._grow(self._k, k, capacity), self._grow(self._v, v, capacity)
        return self._append(k, v, valid)

    def _grow(self, old: Tensor | None, new: Tensor, capacity: int) -> Tensor:
        buf = new.new_empty(new.shape[0], new.shape[1], capacity, new.shape[3])
        if old is not None:
            buf[:, :, : self.position] = old[:, :, : self.position]
        return buf


class StaticKVCache(KVCache):
    """A cache preallocated to ``max_length`` tokens on the first update, written in place.

    Args:
        max_length: the most tokens it will ever hold; one more raises ValueError.
    """

    def __init__(self, max_length: int):
        super().__init__()
        self.max_length = require_int("max_length", max_length, minimum=1)

    def reset(self) -> None:
        self.__init__(self.max_length)  # type: ignore[misc]

    def update(self, k: Tensor, v: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        valid = self._check(k, v, valid)
        batch, heads, n, _ = k.shape
        end = self.position + n
        if end > self.max_length:
            raise ValueError(
                f"StaticKVCache(max_length={self.max_length}) holds {self.position} tokens and cannot take "
                f"{n} more; make max_length at least {end}, or use DynamicKVCache"
            )
        if self._k is None:
            self._k = k.new_empty(batch, heads, self.max_length, k.shape[3])
            self._v = v.new_empty(batch, heads, self.max_length, v.shape[3])
        return self._append(k, v, valid)


class SlidingWindowKVCache(KVCache):
    """A ring buffer of the last ``window`` tokens: fixed memory, any generation length.

    ``update`` returns the cached tokens followed by the new ones (so a prompt longer than
    the window still sees, for each query, its own window), then keeps the last ``window``.
    Pair it with a sliding-window mask no wider than ``window`` keys, as
    :class:`~attnkit.nn.MultiHeadAttention` does.

    >>> import torch
    >>> cache = SlidingWindowKVCache(4)
    >>> for _ in range(10):
    ...     k_all, _ = cache.update(torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2))
    >>> k_all.shape[2], len(cache), cache.position  # the 4 held, then the new one
    (5, 4, 10)
    """

    def __init__(self, window: int):
        super().__init__()
        self.window = require_int("window", window, minimum=1)

    def reset(self) -> None:
        self.__init__(self.window)  # type: ignore[misc]

    @property
    def length(self) -> int:
        return min(self.position, self.window)

    def _ordered(self, buf: Tensor) -> Tensor:
        if self.position <= self.window:
            return buf[..., : self.position, :] if buf.dim() == 4 else buf[:, : self.position]
        start = self.position % self.window  # the oldest slot
        dim = 2 if buf.dim() == 4 else 1
        return torch.cat((buf.narrow(dim, start, self.window - start), buf.narrow(dim, 0, start)), dim=dim)

    def update(self, k: Tensor, v: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        valid = self._check(k, v, valid)
        batch, heads, n, _ = k.shape
        if self._k is None:
            self._k = k.new_zeros(batch, heads, self.window, k.shape[3])
            self._v = v.new_zeros(batch, heads, self.window, v.shape[3])
        self._store_valid(valid, batch, self.window, k.device, n)
        old_k, old_v = self._ordered(self._k), self._ordered(self._v)  # type: ignore[arg-type]
        old_valid = None if self._valid is None else self._ordered(self._valid)
        if old_k.shape[2] == 0:
            k_all, v_all = k, v
        else:
            k_all, v_all = torch.cat((old_k, k), dim=2), torch.cat((old_v, v), dim=2)
        new_valid = None
        if self._valid is not None:
            new = torch.ones(batch, n, dtype=torch.bool, device=k.device) if valid is None else valid
            new_valid = torch.cat((old_valid, new), dim=1)  # type: ignore[arg-type]
        # write the last min(n, window) new tokens into their ring slots
        keep = min(n, self.window)
        slots = (torch.arange(self.position + n - keep, self.position + n, device=k.device)) % self.window
        self._k[:, :, slots] = k[:, :, n - keep:]
        self._v[:, :, slots] = v[:, :, n - keep:]  # type: ignore[index]
        if self._valid is not None:
            self._valid[:, slots] = new_valid[:, -keep:]  # type: ignore[index]
        self.position += n
        self.valid = new_valid
        return k_all, v_all


class SinkKVCache(KVCache):
    """StreamingLLM's cache (Xiao et al. 2023, "Efficient Streaming Language Models with
    Attention Sinks"): the first ``sinks`` tokens, never evicted, then a ring buffer of the
    last ``window`` tokens after them. Memory is fixed at ``sinks + window`` tokens.

    ``update`` returns the kept sink tokens, the ring's tokens and the new ones, oldest
    first; eviction happens between updates, so within one update the new queries see every
    key it returns (feed a long prompt in pieces to bound it). Use it with a causal model
    that has no sliding-window mask (:class:`~attnkit.nn.MultiHeadAttention` refuses it with
    one: the mask would hide the sinks). Padding flags are not supported (``valid`` must
    be None).

    Positions, and where this differs from the paper: StreamingLLM gives every cached token
    its position *within the cache* (its section 3.2: it caches keys before RoPE and rotates
    them again at each step), so the sinks always sit just before the window. This cache
    does not re-index. Keys are cached after RoPE, as every attnkit cache holds them, so a
    sink keeps its original position 0..sinks-1 and its distance to the newest query grows
    without bound, past any distance a model saw in training. With ALiBi the paper's
    behaviour holds: ``MultiHeadAttention`` aligns the bias ``bottom_right`` over the keys
    ``update`` returns, so distance is counted by index there and the sinks sit just before
    the ring (the paper's "contiguous" bias).

    Args:
        window: recent tokens kept after the sinks (>= 1).
        sinks: leading tokens kept for ever (>= 0; 0 is a plain sliding window). Default 4,
            the paper's choice.

    >>> import torch
    >>> cache = SinkKVCache(window=3, sinks=2)
    >>> for t in range(8):
    ...     k_all, _ = cache.update(torch.full((1, 1, 1, 1), float(t)), torch.zeros(1, 1, 1, 1))
    >>> k_all.flatten().tolist(), len(cache), cache.position  # sinks 0, 1; ring 4, 5, 6; new 7
    ([0.0, 1.0, 4.0, 5.0, 6.0, 7.0], 5, 8)
    """

    def __init__(self, window: int, sinks: int = 4):
        super().__init__()
        self.window = require_int("window", window, minimum=1)
        self.sinks = require_int("sinks", sinks, minimum=0)
        self._recent = SlidingWindowKVCache(window)

    def reset(self) -> None:
        self.__init__(self.window, self.sinks)  # type: ignore[misc]

    @property
    def length(self) -> int:
        return (0 if self._k is None else self._k.shape[2]) + self._recent.length

    @property
    def nbytes(self) -> int:
        return super().nbytes + self._recent.nbytes

    def keys_values(self) -> tuple[Tensor, Tensor]:
        if self._k is None or self._v is None:
            raise ValueError("the cache is empty: call update(k, v) first")
        if self._recent.length == 0:
            return self._k, self._v
        k, v = self._recent.keys_values()
        return torch.cat((self._k, k), dim=2), torch.cat((self._v, v), dim=2)

    def update(self, k: Tensor, v: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if valid is not None:
            raise ValueError("SinkKVCache does not track padding: valid must be None (feed unpadded sequences, "
                             "or use DynamicKVCache or SlidingWindowKVCache for padded batches)")
        self._check(k, v, None)
        held = 0 if self._k is None else self._k.shape[2]
        take = min(k.shape[2], self.sinks - held)  # the first tokens ever seen become sinks
        if self._k is None or take > 0:
            self._k = k[:, :, :take] if self._k is None else torch.cat((self._k, k[:, :, :take]), dim=2)
            self._v = v[:, :, :take] if self._v is None else torch.cat((self._v, v[:, :, :take]), dim=2)
        self._store_valid(None, k.shape[0], 0, k.device, k.shape[2])
        self.position += k.shape[2]
        if take == k.shape[2]:
            return self._k, self._v  # type: ignore[return-value]
        recent_k, recent_v = self._recent.update(k[:, :, take:], v[:, :, take:])  # the ring's tokens, then the new
        return torch.cat((self._k, recent_k), dim=2), torch.cat((self._v, recent_v), dim=2)  # type: ignore[arg-type]


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, dtype: torch.dtype = torch.float16,
                   batch: int = 1, window: int | None = None) -> int:
    """Bytes of a KV cache: ``2 (K and V) * layers * kv_heads * head_dim * tokens * batch * bytes``.

    ``window`` caps the tokens held (a sliding-window cache). GQA and MQA shrink the cache
    through ``kv_heads``. Presets for well-known models are in :data:`KV_PRESETS`.

    >>> kv_cache_bytes(32, 32, 128, 4096, torch.float16) / 2**30  # Llama-2-7B
    2.0
    >>> KV_PRESETS["mistral-7b"].bytes(32768) / 2**30  # its 4096 window caps the cache
    0.5
    """
    layers = require_int("layers", layers, minimum=1)
    kv_heads = require_int("kv_heads", kv_heads, minimum=1)
    head_dim = require_int("head_dim", head_dim, minimum=1)
    tokens = require_int("tokens", tokens, minimum=0)
    batch = require_int("batch", batch, minimum=1)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float16; got {describe(dtype)}")
    if window is not None:
        tokens = min(tokens, require_int("window", window, minimum=1))
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * layers * kv_heads * head_dim * tokens * batch * itemsize


@dataclass(frozen=True)
class KVShape:
    """The cache-relevant shape of a model: layers, KV heads, head dim, and its window.

    ``context`` is the model's context window as its published config states it
    (``max_position_embeddings``; GPT-2's ``n_positions``), None where unstated.
    ``encoder`` marks a model that reads its whole text at once and keeps no KV cache
    (BERT-style); :meth:`bytes` still gives what a cache of its shape would hold.
    """

    name: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    window: int | None = None
    context: int | None = None
    encoder: bool = False

    def __post_init__(self) -> None:
        optional = tuple(name for name in ("window", "context") if getattr(self, name) is not None)
        for name in ("layers", "heads", "kv_heads", "head_dim", *optional):
            require_int(name, getattr(self, name), minimum=1)
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    def bytes(self, tokens: int, dtype: torch.dtype = torch.float16, batch: int = 1) -> int:
        return kv_cache_bytes(self.layers, self.kv_heads, self.head_dim, tokens, dtype, batch, self.window)


# ``context``: max_position_embeddings (GPT-2: n_positions) in each model's config.json on the
# Hugging Face hub (openai-community/gpt2 and gpt2-xl, meta-llama/Llama-2-*-hf,
# meta-llama/Meta-Llama-3-*, mistralai/Mistral-7B-v0.1, tiiuae/falcon-7b), as quoted in the
# hub's own discussions and model cards; GPT-2's and Falcon's equal transformers' GPT2Config
# and FalconConfig defaults, which mirror those models. Mistral's config says 32768, while
# its paper (Jiang et al. 2023, Table 1) gives context_len 8192 with its 4096-token window.
# MiniLM's is its bundled config.json (tests/test_lab.py checks it).
KV_PRESETS: dict[str, KVShape] = {p.name: p for p in (
    KVShape("gpt-2", 12, 12, 12, 64, context=1024),
    KVShape("gpt-2-xl", 48, 25, 25, 64, context=1024),
    KVShape("llama-2-7b", 32, 32, 32, 128, context=4096),
    KVShape("llama-2-13b", 40, 40, 40, 128, context=4096),
    KVShape("llama-2-70b", 80, 64, 8, 128, context=4096),
    KVShape("llama-3-8b", 32, 32, 8, 128, context=8192),
    KVShape("llama-3-70b", 80, 64, 8, 128, context=8192),
    KVShape("mistral-7b", 32, 32, 8, 128, window=4096, context=32768),
    KVShape("falcon-7b", 32, 71, 1, 64, context=2048),
    KVShape("minilm-l6", 6, 12, 12, 32, context=512, encoder=True),
)}
"""Published shapes of well-known models (from their configs), by name."""
