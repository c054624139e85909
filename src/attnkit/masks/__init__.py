"""Masks: which keys each query may attend to, as values with structure.

A mask answers two questions:

1. Is key ``j`` allowed for query ``i`` (in batch ``b``, head ``h``)? Elementwise, so the
   reference backend can materialise it.
2. For a block of queries and keys: is it empty, full or partial? Every built-in mask
   answers this analytically in O(1) per block (O(L) for per-token masks), so the tiled
   backend skips empty blocks and does no mask work on full ones.

Masks compose with ``&``, ``|`` and ``~``. Causal alignment is explicit when Lq != Lk::

    Lq = 2, Lk = 5, causal(align="top_left")     causal(align="bottom_right")
        1 0 0 0 0                                   1 1 1 1 0
        1 1 0 0 0                                   1 1 1 1 1

``top_left`` is SDPA's convention; ``bottom_right`` is flash-attn's, and what KV-cache
decoding needs (the last query is the newest token and sees every key).

>>> from attnkit import masks
>>> m = masks.causal() & masks.sliding_window(left=2)
>>> m.to_dense(4, 4).int()
tensor([[1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [0, 1, 1, 1]], dtype=torch.int32)
>>> round(m.sparsity(4, 4), 3)
0.438
"""

from attnkit.masks._analytic import (
    Causal,
    Dense,
    Diagonal,
    Document,
    Evaluated,
    Function,
    GlobalTokens,
    KeyPadding,
    PrefixLM,
    SlidingWindow,
    causal,
    document,
    from_function,
    from_tensor,
    global_tokens,
    key_padding,
    prefix_lm,
    sliding_window,
)
from attnkit.masks._core import And, BlockMap, Mask, MaskMod, Not, Or, Shifted, as_mask
from attnkit.masks._lengths import Lengths
from attnkit.masks._literature import (
    BigBird,
    ByDistance,
    Chunked,
    Dilated,
    FromBlocks,
    Strided,
    bigbird,
    chunked,
    dilated,
    from_blocks,
    strided,
)
from attnkit.masks.flex import to_flex

__all__ = [
    "And",
    "BigBird",
    "BlockMap",
    "ByDistance",
    "Causal",
    "Chunked",
    "Dense",
    "Diagonal",
    "Dilated",
    "Document",
    "Evaluated",
    "FromBlocks",
    "Function",
    "GlobalTokens",
    "KeyPadding",
    "Lengths",
    "Mask",
    "MaskMod",
    "Not",
    "Or",
    "PrefixLM",
    "Shifted",
    "SlidingWindow",
    "Strided",
    "as_mask",
    "bigbird",
    "causal",
    "chunked",
    "dilated",
    "document",
    "from_blocks",
    "from_function",
    "from_tensor",
    "global_tokens",
    "key_padding",
    "prefix_lm",
    "sliding_window",
    "strided",
    "to_flex",
]


_MOVED = {"BandForm": ("attnkit.functional.tiled.translate", "BandForm"),
          "SDPAForm": ("attnkit.functional.sdpa", "SDPAForm")}


def __getattr__(name: str) -> object:
    """``masks.BandForm`` and ``masks.SDPAForm`` moved to the kernels that use them (deprecated here)."""
    if name in _MOVED:
        import importlib
        import warnings

        module, attr = _MOVED[name]
        warnings.warn(f"attnkit.masks.{name} is deprecated and will be removed in the next release; use "
                      f"{module}.{attr}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'attnkit.masks' has no attribute {name!r}")
