"""What ``attnkit serve`` does, without HTTP: read a request body, explain a text, cache the answer.

:class:`ExplainService` holds the model, the one lock over it, the token limit and the
cache. It takes bytes and gives Python values or raises :class:`RequestError` with the
HTTP status the web layer (:mod:`attnkit.viz.server`) answers; nothing here opens a
socket, so every rule is testable with plain calls.

Concurrency. Every use of the model and its tokenizer (counting tokens, the forward pass
and capture) holds one lock: capture swaps transformers' attention lookup for the whole
process during one forward pass, and a fast tokenizer is not safe to call from two
threads at once (``RuntimeError: Already borrowed``, huggingface/tokenizers#537).
Building the payload (rollout, head roles, compression) runs outside the lock, at most
``workers`` calls at a time, which bounds memory (a 512-token MiniLM request holds about
100 MB until it is answered). Finished payloads are kept in an LRU cache keyed by text:
at most ``cache_size`` entries and 256 MB of encoded maps.

>>> from attnkit import models
>>> service = ExplainService(*models.load("minilm"))
>>> text, focus = service.parse(b'{"text": "The cat sat.", "focus": "cat"}', "application/json")
>>> payload, hit = service.explain(text, focus)
>>> payload["tokens"], payload["focus"], hit
(['[CLS]', 'the', 'cat', 'sat', '.', '[SEP]'], 2, False)
>>> service.explain(text)[1]  # the second time, from the cache
True
>>> service.parse(b'{"txt": "a"}', "application/json")
Traceback (most recent call last):
...
attnkit.viz.service.RequestError: unknown field(s) 'txt'; expected 'text' and 'focus'
"""

from __future__ import annotations

import collections
import json
import threading
from typing import Any

from attnkit._checks import require_int
from attnkit.viz.explainer import find_tokens

__all__ = ["ExplainService", "RequestError"]

_FALLBACK_MAX_TOKENS = 512  # for a model whose config names no maximum length
_TITLE_LIMIT = 160
_CACHE_BYTES = 256 << 20  # encoded maps the cache holds at most (a 512-token MiniLM payload: about 12 MB)
_FIELDS = ("text", "focus")
_EXAMPLE = '{"text": "The cat sat."}'


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a message for the user.

    ``headers`` are extra response headers (e.g. ``Connection: close`` after a body that
    was not read).
    """

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _max_positions(model: Any) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def _title(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _TITLE_LIMIT else flat[: _TITLE_LIMIT - 1] + "…"


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


class ExplainService:
    """One model behind a lock, a token limit and a cache: the work of ``attnkit serve``.

    Args:
        model: a Hugging Face transformers model (or any model :func:`attnkit.inspect.capture`
            reads text into with ``tokenizer``). One short forward pass runs here, so a
            model capture cannot read fails now, not on the first request.
        tokenizer: its tokenizer: a callable that takes text and gives ``input_ids``.
        max_tokens: the longest text explained, in tokens including special ones (>= 1).
            Default (None): the model's ``max_position_embeddings``, or 512 (capped by the
            tokenizer's ``model_max_length``) for a config that names none. More than the
            model's positions is a ValueError.
        max_body: the largest request body :meth:`parse` accepts, in bytes (>= 1).
        cache_size: finished payloads kept, by text (>= 0; 0: no cache).
        workers: calls building a payload at once (>= 1); the forward passes themselves run
            one at a time.

    Attributes:
        model_name: the model's name or path, as the page shows it.
        max_tokens, max_body: the limits, as resolved.
        layers, heads: the model's attention layers and heads per layer.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_tokens: int | None = None, max_body: int = 65536,
                 cache_size: int = 32, workers: int = 4) -> None:
        from attnkit.inspect import capture

        self.model, self.tokenizer = model, tokenizer
        self.max_body = require_int("max_body", max_body, minimum=1)
        cache_size = require_int("cache_size", cache_size, minimum=0)
        workers = require_int("workers", workers, minimum=1)
        self.model_name = str(getattr(model, "name_or_path", "") or type(model).__name__)
        positions = _max_positions(model)
        if max_tokens is None:
            max_tokens = positions or min(_FALLBACK_MAX_TOKENS, getattr(tokenizer, "model_max_length", 10**9))
        else:
            max_tokens = require_int("max_tokens", max_tokens, minimum=1)
            if positions is not None and max_tokens > positions:
                raise ValueError(f"max_tokens must be at most {positions}, the positions {self.model_name!r} has "
                                 f"(max_position_embeddings); got {max_tokens}. Leave it None for {positions}")
        self.max_tokens = max_tokens
        self._capture = capture
        self._model_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(workers)
        self._cache: collections.OrderedDict[str, tuple[dict[str, Any], int]] = collections.OrderedDict()
        self._cache_size = cache_size
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()
        probe = self._run("attention")
        self.layers, self.heads = len(probe.layers), len(probe.heads)

    def info(self) -> dict[str, Any]:
        """``{"model", "max_tokens", "max_body", "layers", "heads"}``, as ``GET /api/info`` answers."""
        return {"model": self.model_name, "max_tokens": self.max_tokens, "max_body": self.max_body,
                "layers": self.layers, "heads": self.heads}

    # -- reading a request ----------------------------------------------------------------------

    def parse(self, body: bytes, content_type: str) -> tuple[str, str | int | None]:
        """``(text, focus)`` from the body of ``POST /api/explain``.

        Args:
            body: the request body, at most ``max_body`` bytes (the web layer refuses a
                longer one before reading it).
            content_type: the request's ``Content-Type`` header ("" if absent).

        Raises:
            RequestError: 413 a body over ``max_body``; 415 a content type other than
                ``application/json``; 400 a body that is not UTF-8 JSON (malformed, nested
                too deeply, an integer past Python's digit limit), not an object, with an
                unknown field, without a non-empty string ``text``, with a lone surrogate
                in ``text``, or with a ``focus`` that is neither a string nor an integer.
        """
        if len(body) > self.max_body:
            raise RequestError(413, f"the request body has {len(body):,} bytes; this server accepts at most "
                                    f"{self.max_body:,} (max_body)")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise RequestError(415, f"the body must be JSON sent as Content-Type: application/json; "
                                    f"got {content_type or 'no Content-Type'!r}")
        try:
            request = json.loads(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise RequestError(400, "the body must be UTF-8 JSON; it is not valid UTF-8") from None
        except RecursionError:
            raise RequestError(400, f"the body must be JSON such as {_EXAMPLE}; it is nested too deeply") from None
        except ValueError as e:  # JSONDecodeError, or an integer past Python's digit limit
            raise RequestError(400, f"the body must be JSON such as {_EXAMPLE}; {e}") from None
        if not isinstance(request, dict):
            raise RequestError(400, f"the body must be a JSON object such as {_EXAMPLE}; "
                                    f"got a JSON {_json_type(request)}")
        unknown = sorted(set(request) - set(_FIELDS))
        if unknown:
            raise RequestError(400, f"unknown field(s) {', '.join(map(repr, unknown))}; "
                                    f"expected {' and '.join(map(repr, _FIELDS))}")
        if "text" not in request:
            raise RequestError(400, f'the body has no "text"; send {_EXAMPLE}')
        text = request["text"]
        if not isinstance(text, str):
            raise RequestError(400, f'"text" must be a string; got a JSON {_json_type(text)}')
        if not text.strip():
            raise RequestError(400, '"text" is empty; type some words')
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(400, '"text" holds a lone surrogate (\\ud800-\\udfff), which is not text') from None
        focus = request.get("focus")
        if focus is not None and (isinstance(focus, bool) or not isinstance(focus, (str, int))):
            raise RequestError(400, f'"focus" must be a token (a string) or a token index; got a JSON '
                                    f"{_json_type(focus)}")
        return text, focus

    # -- the work -------------------------------------------------------------------------------

    def _run(self, text: str) -> Any:
        with self._model_lock:
            return self._capture(self.model, text, tokenizer=self.tokenizer)

    def count_tokens(self, text: str) -> tuple[int, int]:
        """``(tokens, special tokens)`` of ``text`` as the model would read it."""
        with self._model_lock:
            encoded = self.tokenizer(text, return_special_tokens_mask=True, verbose=False)
        return len(encoded["input_ids"]), sum(encoded.get("special_tokens_mask") or [])

    def explain(self, text: str, focus: str | int | None = None) -> tuple[dict[str, Any], bool]:
        """The explorer payload (:func:`attnkit.viz.report.report_data`) for ``text``, and whether it came
        from the cache.

        ``focus`` (a token's text, ``"#N"``, or an index) sets the payload's ``"focus"``
        on a copy; the cached payload keeps ``None``. Safe to call from many threads.

        Raises:
            RequestError: 413 a text over ``max_tokens`` tokens; 400 a text of special
                tokens only, or a ``focus`` that is not one of its tokens.
        """
        with self._cache_lock:
            cached = self._cache.get(text)
            if cached is not None:
                self._cache.move_to_end(text)
        payload = None if cached is None else cached[0]
        hit = payload is not None
        if payload is None:
            count, special = self.count_tokens(text)
            if count > self.max_tokens:
                raise RequestError(413, f"the text has {count:,} tokens; this server explains at most "
                                        f"{self.max_tokens:,} (max_tokens, special tokens included). Shorten it")
            if count == special:
                raise RequestError(400, "the text has no tokens the model reads, only special ones; type some words")
            from attnkit.viz.report import report_data

            with self._slots:
                maps = self._run(text)
                payload = report_data(maps, title=_title(text))
            self._remember(text, payload)
        if focus is not None:
            payload = {**payload, "focus": self._focus(payload["tokens"], focus)}
        return payload, hit

    def _remember(self, text: str, payload: dict[str, Any]) -> None:
        """Cache ``payload``: at most ``cache_size`` entries and ``_CACHE_BYTES`` of encoded maps."""
        size = len(payload["encoding"]["blob"])
        if not self._cache_size or size > _CACHE_BYTES:
            return
        with self._cache_lock:
            if text in self._cache:
                return
            self._cache[text] = (payload, size)
            self._cache_bytes += size
            while len(self._cache) > self._cache_size or self._cache_bytes > _CACHE_BYTES:
                self._cache_bytes -= self._cache.popitem(last=False)[1][1]

    @staticmethod
    def _focus(tokens: list[str], focus: str | int) -> int:
        if isinstance(focus, int):
            if not 0 <= focus < len(tokens):
                raise RequestError(400, f"focus must be a token index in [0, {len(tokens)}); got {focus}")
            return focus
        try:
            found = find_tokens(tokens, focus.strip())
        except ValueError as e:  # "#N" past the end
            raise RequestError(400, f"focus {focus!r}: {e}") from None
        if found:
            return found[0]
        shown = " ".join(tokens[:40]) + (" …" if len(tokens) > 40 else "")
        raise RequestError(400, f"focus {focus!r} is not one of the text's tokens: {shown}")
