"""See what a model attends to: record attention maps, then study them.

- :func:`capture` runs a model once and returns the attention probabilities of the
  layers and heads you ask for, as :class:`AttentionMaps`, from attnkit modules and from
  Hugging Face models with any attention implementation (sdpa included).
  An encoder-decoder model (T5, BART, Marian, Whisper) with a ``target`` gives
  :class:`Seq2SeqMaps`: encoder, decoder and cross-attention maps.
- :func:`capture_generation` runs ``generate`` (KV cache and all) and records the row of
  every token of the result, as :class:`GenerationMaps`.
- Both take attnkit's own :class:`~attnkit.nn.EncoderDecoder` too.
- :class:`AttentionMaps` holds them per input with the tokens; it selects layers and
  heads, and saves to and loads from safetensors.
- :mod:`attnkit.inspect.roles`: per-head scores (previous-token, induction, duplicate,
  first-token, distance, entropy; for cross-attention maps top key, alignment
  monotonicity and diagonal share), attention mass on a token set, top attended tokens,
  and attention rollout; :func:`head_roles` gathers the scores.
- :mod:`attnkit.inspect.tokens`: the one rule for which tokens are special.
- :func:`stats`: exact per-layer, per-head statistics at long context (received mass,
  entropy, sinks, distance, top-k keys, max logit) without the (L x L) maps, as
  :class:`AttentionStats`; :class:`CallStats` for one call (``attnkit.attention(..., stats=)``).
- :func:`compare`: two models or checkpoints on the same input, per head.
- :mod:`attnkit.inspect.induction`: the induction-head phase change, reproduced.
"""

from attnkit.inspect.compare import Comparison, compare
from attnkit.inspect.generation import GenerationMaps, capture_generation
from attnkit.inspect.maps import AttentionMaps, Seq2SeqMaps
from attnkit.inspect.recording import capture
from attnkit.inspect.roles import (
    STOP_WORDS,
    HeadRoles,
    head_roles,
    rollout,
    token_set,
    token_set_mass,
    top_attended,
)
from attnkit.inspect.stats import AttentionStats, CallStats, StatsOptions, stats

__all__ = [
    "STOP_WORDS",
    "AttentionMaps",
    "AttentionStats",
    "CallStats",
    "Comparison",
    "GenerationMaps",
    "HeadRoles",
    "Seq2SeqMaps",
    "StatsOptions",
    "capture",
    "capture_generation",
    "compare",
    "head_roles",
    "rollout",
    "stats",
    "token_set",
    "token_set_mass",
    "top_attended",
]
