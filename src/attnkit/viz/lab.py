r"""The attention lab: one self-contained HTML page where attention moves with sliders.

A handful of tokens each carry a small query, key and value vector. The page computes,
live in the browser (float64, like Python floats), for every query ``i`` and key ``j``::

    s_ij = scale * (q_i . k_j) / T          where the mask allows (i, j), else -inf
    p_i  = softmax(s_i)                     stable: the row max is subtracted first
    o_i  = sum_j p_ij v_j                   a row with no allowed key: p_i = 0, o_i = 0

and shows the scores, the probabilities as a heatmap with each row's entropy (bits,
against its maximum ``log2(number of allowed keys)``), the outputs, and the focused
query's attention as curves to the keys. The mask is a causal toggle, a sliding window
``w`` (causal: ``0 <= i - j <= w``; not causal: ``|i - j| <= w``) and per-key padding.
Nothing is fetched: the page works offline and its CSP forbids every request.

The vectors start from a deterministic pseudo-random draw (``seed``), made by the page
itself so that added tokens and a larger head dim get vectors from the same draw.
Token labels are user text: they travel as embedded JSON and reach the screen through
``textContent`` only.

In the page, ``window.attnkitLab`` has ``state()``, ``set(partial_state)`` and
``result()``; ``AttnkitLab.mount(element, initial_state)`` mounts the lab inside another
page (see ``static/lab.js``).

>>> page = lab_html(tokens=["<img src=x onerror=alert(1)>", "b&c", "d"])
>>> "http://" in page or "https://" in page
False
>>> "<img" in page, "\\u003cimg src=x onerror=alert(1)\\u003e" in page
(False, True)
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

from attnkit._checks import describe, require_int
from attnkit.nn import KV_PRESETS, kv_cache_bytes
from attnkit.viz._html import page

__all__ = ["DEFAULT_TOKENS", "LAB_SCRIPTS", "MAX_HEAD_DIM", "MAX_TOKENS", "MIN_HEAD_DIM", "MIN_TOKENS", "lab_html",
           "write_lab"]

DEFAULT_TOKENS = ("The", "cat", "sat", "on", "the", "mat")
MIN_TOKENS, MAX_TOKENS = 2, 12
MIN_HEAD_DIM, MAX_HEAD_DIM = 2, 8
_MAX_SEED = 2**32 - 1  # the page's generator mixes 32-bit words
_MAX_LABEL = 64
# the lab's scripts in load order: the panels below the lab (optional: lab.js alone works) register
# themselves on window before lab.js mounts
LAB_SCRIPTS = ("units.js", "lab_heads.js", "lab_flash.js", "lab_cost.js", "lab.js")
COST_LENGTHS = tuple(2**p for p in range(4, 18))  # the cost panel's length slider: 16 to 128K tokens


def lab_html(*, tokens: Sequence[str] | None = None, head_dim: int = 4, seed: int = 0,
             bench: str | os.PathLike[str] | None = None) -> str:
    """The attention lab as one HTML document (CSS, JS and data inline).

    Args:
        tokens: 2 to 12 token labels, each a str of at most 64 characters; default
            ``"The cat sat on the mat"``. Any text is safe: it is embedded as JSON. They only
            label the page's random vectors, and given tokens make the page say so.
        head_dim: the length ``d`` of each query, key and value vector, 2 to 8; default 4.
            The scale starts at ``1 / sqrt(d)``.
        seed: an int in ``[0, 2**32)`` choosing the starting vectors; the same seed gives
            the same vectors.
        bench: the JSON written by ``attnkit bench --json``, or None. Its timings at the
            cost panel's lengths (16 to 131072, powers of two) are shown beside the
            arithmetic, labelled with the machine they were measured on.

    Returns:
        The page as a str. The user can then edit labels, add or remove tokens (2 to 12),
        change ``d`` and every vector entry (sliders over [-3, 3]).

    >>> page = lab_html(tokens=["a", "b"], head_dim=2)
    >>> page.startswith("<!DOCTYPE html>"), '"head_dim": 2' in page
    (True, True)
    """
    labels = _check_tokens(tokens)
    d = require_int("head_dim", head_dim)
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be between {MIN_HEAD_DIM} and {MAX_HEAD_DIM}; got {d}")
    seed = require_int("seed", seed, minimum=0)
    if seed > _MAX_SEED:
        raise ValueError(f"seed must be < 2**32 = {_MAX_SEED + 1}; got {seed}. Use seed % 2**32")
    return page(
        "attnkit lab: attention with sliders",
        css=["lab.css"],
        js=list(LAB_SCRIPTS),
        body='<div id="attnkit-lab"></div>',
        data={"tokens": labels, "head_dim": d, "seed": seed, "cost": _cost_data(bench),
              "tokens_from": None if tokens is None else "given to attnkit lab"},
    )


def write_lab(path: str | os.PathLike[str], **kwargs: object) -> pathlib.Path:
    """Write :func:`lab_html` (``kwargs`` are its arguments) to ``path`` in UTF-8; return the path.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     out = write_lab(pathlib.Path(tmp) / "lab.html", head_dim=3)
    ...     out.name, out.read_text(encoding="utf-8") == lab_html(head_dim=3)
    ('lab.html', True)
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {describe(path)}")
    out = pathlib.Path(path)
    if out.is_dir():
        raise ValueError(f"path must be a file to write, not a folder; got {str(out)!r}")
    html = lab_html(**kwargs)  # type: ignore[arg-type]
    out.write_text(html, encoding="utf-8")
    return out


def _cost_data(bench: str | os.PathLike[str] | None) -> dict:
    """The cost and heads panels' figures: every preset's KV cache at every length, from
    kv_cache_bytes, with its KV heads and (``kv_bytes_mha``) as if every head kept its own;
    its context window and whether it is an encoder (no KV cache), from KV_PRESETS."""
    presets = [{"name": p.name, "layers": p.layers, "heads": p.heads, "kv_heads": p.kv_heads,
                "head_dim": p.head_dim, "window": p.window, "context": p.context, "encoder": p.encoder,
                "kv_bytes": [p.bytes(n) for n in COST_LENGTHS],
                "kv_bytes_mha": [kv_cache_bytes(p.layers, p.heads, p.head_dim, n, window=p.window)
                                 for n in COST_LENGTHS]}
               for p in KV_PRESETS.values()]
    return {"lengths": list(COST_LENGTHS), "presets": presets, "bench": None if bench is None else _bench_rows(bench)}


def _bench_rows(path: str | os.PathLike[str]) -> dict:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"bench must be a path to `attnkit bench --json` output, or None; got {describe(path)}")
    try:
        result = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
        machine, rows = result["machine"], result["rows"]
        timed = [{"case": str(r["case"]), "length": int(r["length"]), "impl": str(r["impl"]), "ms": float(r["ms"])}
                 for r in rows if r.get("status") == "ok" and r.get("ms") is not None]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"bench must be the JSON written by `attnkit bench --json`; reading {str(path)!r} "
                         f"failed: {error}") from error
    return {"machine": str(machine), "rows": [r for r in timed if r["length"] in COST_LENGTHS]}


def _check_tokens(tokens: Sequence[str] | None) -> list[str]:
    if tokens is None:
        return list(DEFAULT_TOKENS)
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
        raise TypeError(
            f"tokens must be a sequence of str, such as ['The', 'cat', 'sat']; got {describe(tokens)}. "
            "To split a sentence, pass text.split()"
        )
    labels = list(tokens)
    if not MIN_TOKENS <= len(labels) <= MAX_TOKENS:
        raise ValueError(f"tokens must hold {MIN_TOKENS} to {MAX_TOKENS} labels; got {len(labels)}")
    for index, label in enumerate(labels):
        if not isinstance(label, str):
            raise TypeError(f"tokens[{index}] must be a str; got {describe(label)}")
        if len(label) > _MAX_LABEL:
            raise ValueError(
                f"tokens[{index}] must be at most {_MAX_LABEL} characters; got {len(label)} ({label[:20]!r}...)"
            )
    return labels
