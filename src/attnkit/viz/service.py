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
100 MB until it is answered). Finished payloads are kept in an LRU cache keyed by the
request (text, target, tokens to generate): at most ``cache_size`` entries and 256 MB of
encoded maps.

Kinds of model (:func:`model_kind`). A self-attention model (BERT, or GPT-2 without
``generate``) answers the explorer payload. An encoder-decoder (BART, T5, Marian) answers
the encoder-decoder payload (:func:`attnkit.viz.seq2seq.seq2seq_data`) of the text as source
and ``target`` teacher-forced; without a target the model writes one first (greedy, at most
``max_generate`` tokens). A model that generates (GPT-2) answers, when asked for
``generate`` tokens, the generation payload (:func:`attnkit.viz.seq2seq.generation_data`).

>>> from attnkit import models
>>> service = ExplainService(*models.load("minilm"))
>>> request = service.parse(b'{"text": "The cat sat.", "focus": "cat"}', "application/json")
>>> payload, hit = service.explain(request.text, request.focus)
>>> payload["tokens"], payload["focus"], hit
(['[CLS]', 'the', 'cat', 'sat', '.', '[SEP]'], 2, False)
>>> service.explain(request.text)[1]  # the second time, from the cache
True
>>> service.parse(b'{"txt": "a"}', "application/json")
Traceback (most recent call last):
...
attnkit.viz.service.RequestError: unknown field(s) 'txt'; expected 'text', 'focus', 'target' and 'generate'
>>> service.parse(b'{"text": "a", "generate": 5}', "application/json")
Traceback (most recent call last):
...
attnkit.viz.service.RequestError: "generate" needs a model that generates alone (GPT-2, Llama...); ...
"""

from __future__ import annotations

import collections
import json
import threading
from dataclasses import dataclass
from typing import Any

from attnkit._checks import require_int
from attnkit._model_facts import kind as model_kind
from attnkit._model_facts import max_positions
from attnkit.viz.explainer import find_tokens

__all__ = ["MAX_GENERATE", "ExplainRequest", "ExplainService", "RequestError", "model_kind"]

_FALLBACK_MAX_TOKENS = 512  # for a model whose config names no maximum length
_TITLE_LIMIT = 160
_CACHE_BYTES = 256 << 20  # encoded maps the cache holds at most (a 512-token MiniLM payload: about 12 MB)
_FIELDS = ("text", "focus", "target", "generate")
_EXAMPLE = '{"text": "The cat sat."}'
MAX_GENERATE = 64  # tokens one request may have generated (also within max_tokens)


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a message for the user.

    ``headers`` are extra response headers (e.g. ``Connection: close`` after a body that
    was not read).
    """

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass(frozen=True)
class ExplainRequest:
    """A checked ``POST /api/explain`` body (:meth:`ExplainService.parse`).

    Attributes:
        text: the text (the source, for an encoder-decoder); non-empty.
        focus: a token (str) or token index to focus; self-attention answers only.
        target: an encoder-decoder's target, teacher-forced; None: the model writes one.
        generate: tokens a decoder-only model generates after ``text`` (1 to
            ``max_generate``); None: the text's own self-attention.
    """

    text: str
    focus: str | int | None = None
    target: str | None = None
    generate: int | None = None


def _encoded_bytes(payload: dict[str, Any]) -> int:
    """The bytes of encoded maps a payload (explorer, encoder-decoder or generation) holds."""
    kind = payload.get("kind")
    if kind == "seq2seq":
        return sum(len(part["encoding"]["blob"]) for part in payload["parts"].values())
    if kind == "generation":
        return sum(len(payload[name]["blob"]) for name in ("decoder", "cross") if payload[name] is not None)
    return len(payload["encoding"]["blob"])


def _check_text(field: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(400, f'"{field}" holds a lone surrogate (\\ud800-\\udfff), which is not text') from None


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
        max_tokens: the longest text explained, in tokens including special ones (>= 1);
            for an encoder-decoder, the longest source and the longest decoder input (its
            start token and the target); for generation, the prompt and the generated
            tokens together. Default (None): the model's ``max_position_embeddings``, or 512
            (capped by the tokenizer's ``model_max_length``) for a config that names none.
            More than the model's positions is a ValueError.
        max_body: the largest request body :meth:`parse` accepts, in bytes (>= 1).
        cache_size: finished payloads kept, by request (>= 0; 0: no cache).
        workers: calls building a payload at once (>= 1); the forward passes themselves run
            one at a time.

    Attributes:
        model_name: the model's name or path, as the page shows it.
        kind: :func:`model_kind` of the model: what requests may ask for.
        max_tokens, max_body: the limits, as resolved.
        max_generate: the most tokens one request has generated: ``min(MAX_GENERATE,
            max_tokens - 1)`` for a model that generates, else 0.
        layers, heads: the model's attention layers and heads per layer (an
            encoder-decoder's encoder).
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_tokens: int | None = None, max_body: int = 65536,
                 cache_size: int = 32, workers: int = 4) -> None:
        from attnkit.inspect import capture, capture_generation

        self.model, self.tokenizer = model, tokenizer
        self.max_body = require_int("max_body", max_body, minimum=1)
        cache_size = require_int("cache_size", cache_size, minimum=0)
        workers = require_int("workers", workers, minimum=1)
        self.model_name = str(getattr(model, "name_or_path", "") or type(model).__name__)
        self.kind = model_kind(model)
        positions = max_positions(model, unstated=None)
        if max_tokens is None:
            max_tokens = positions or min(_FALLBACK_MAX_TOKENS, getattr(tokenizer, "model_max_length", 10**9))
        else:
            max_tokens = require_int("max_tokens", max_tokens, minimum=1)
            if positions is not None and max_tokens > positions:
                raise ValueError(f"max_tokens must be at most {positions}, the positions {self.model_name!r} has "
                                 f"(max_position_embeddings); got {max_tokens}. Leave it None for {positions}")
        if self.kind != "encoder" and max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2 for {self.model_name!r}, a model that generates (a "
                             f"start or prompt token and one more); got {max_tokens}")
        self.max_tokens = max_tokens
        self.max_generate = 0 if self.kind == "encoder" else min(MAX_GENERATE, max_tokens - 1)
        self._capture, self._capture_generation = capture, capture_generation
        self._model_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(workers)
        self._cache: collections.OrderedDict[tuple[str, str | None, int | None], tuple[dict[str, Any], int]] = (
            collections.OrderedDict())
        self._cache_size = cache_size
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()
        probe = self._run("attention", "attention" if self.kind == "encoder-decoder" else None)
        probe = getattr(probe, "encoder", probe)  # Seq2SeqMaps: the encoder's layers and heads
        self.layers, self.heads = len(probe.layers), len(probe.heads)

    def info(self) -> dict[str, Any]:
        """``{"model", "kind", "max_tokens", "max_generate", "max_body", "layers", "heads"}``, as
        ``GET /api/info`` answers."""
        return {"model": self.model_name, "kind": self.kind, "max_tokens": self.max_tokens,
                "max_generate": self.max_generate, "max_body": self.max_body, "layers": self.layers,
                "heads": self.heads}

    # -- reading a request ----------------------------------------------------------------------

    def parse(self, body: bytes, content_type: str) -> ExplainRequest:
        """The :class:`ExplainRequest` in the body of ``POST /api/explain``.

        The body is a JSON object: ``"text"`` (a non-empty string), and optionally
        ``"focus"`` (a token or token index; self-attention models, without ``generate``),
        ``"target"`` (a string; encoder-decoder models; empty or null: the model writes the
        target) or ``"generate"`` (an integer in [1, ``max_generate``] or null; decoder-only
        models).

        Args:
            body: the request body, at most ``max_body`` bytes (the web layer refuses a
                longer one before reading it).
            content_type: the request's ``Content-Type`` header ("" if absent).

        Raises:
            RequestError: 413 a body over ``max_body``; 415 a content type other than
                ``application/json``; 400 a body that is not UTF-8 JSON (malformed, nested
                too deeply, an integer past Python's digit limit), not an object, with an
                unknown field, without a non-empty string ``text``, with a lone surrogate
                in ``text`` or ``target``, a ``focus`` that is neither a string nor an
                integer, a ``target`` or ``generate`` the model does not take or of the
                wrong type or range, or a ``focus`` beside them. Each message names the field.
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
                                    f"expected {', '.join(map(repr, _FIELDS[:-1]))} and {_FIELDS[-1]!r}")
        if "text" not in request:
            raise RequestError(400, f'the body has no "text"; send {_EXAMPLE}')
        text = request["text"]
        if not isinstance(text, str):
            raise RequestError(400, f'"text" must be a string; got a JSON {_json_type(text)}')
        if not text.strip():
            raise RequestError(400, '"text" is empty; type some words')
        _check_text("text", text)
        focus = request.get("focus")
        if focus is not None and (isinstance(focus, bool) or not isinstance(focus, (str, int))):
            raise RequestError(400, f'"focus" must be a token (a string) or a token index; got a JSON '
                                    f"{_json_type(focus)}")
        target, generate = self._target(request.get("target")), self._generate(request.get("generate"))
        if focus is not None and (self.kind == "encoder-decoder" or generate is not None):
            raise RequestError(400, '"focus" goes with the self-attention explorer only; leave it out with '
                                    + ('an encoder-decoder model' if generate is None else '"generate"'))
        return ExplainRequest(text, focus, target, generate)

    def _target(self, target: object) -> str | None:
        if target is None:
            return None
        if self.kind != "encoder-decoder":
            raise RequestError(400, f'"target" needs an encoder-decoder model (BART, T5, Marian...); '
                                    f"{self.model_name} is {'a' if self.kind == 'decoder' else 'an'} {self.kind}-only "
                                    f"model" + ('; send "generate": N instead' if self.kind == "decoder" else ""))
        if not isinstance(target, str):
            raise RequestError(400, f'"target" must be a string (empty: the model writes one); got a JSON '
                                    f"{_json_type(target)}")
        _check_text("target", target)
        return target if target.strip() else None

    def _generate(self, generate: object) -> int | None:
        if generate is None:
            return None
        if self.kind != "decoder":
            raise RequestError(400, f'"generate" needs a model that generates alone (GPT-2, Llama...); '
                                    f"{self.model_name} is "
                                    + ('an encoder-decoder model: send "target" (empty: the model writes one)'
                                       if self.kind == "encoder-decoder" else "an encoder-only model"))
        if isinstance(generate, bool) or not isinstance(generate, int):
            raise RequestError(400, f'"generate" must be a whole number of tokens in [1, {self.max_generate}]; '
                                    f"got a JSON {_json_type(generate)}")
        if not 1 <= generate <= self.max_generate:
            raise RequestError(400, f'"generate" must be in [1, {self.max_generate}] tokens; got {generate}')
        return generate

    # -- the work -------------------------------------------------------------------------------

    def _run(self, text: str, target: Any = None) -> Any:
        with self._model_lock:
            if target is None:
                return self._capture(self.model, text, tokenizer=self.tokenizer)
            return self._capture(self.model, text, target=target, tokenizer=self.tokenizer)

    def count_tokens(self, text: str, *, target: bool = False) -> tuple[int, int]:
        """``(tokens, special tokens)`` of ``text`` as the model would read it (``target``: as
        an encoder-decoder's target, ``tokenizer(text_target=...)``)."""
        with self._model_lock:
            if target:
                encoded = self.tokenizer(text_target=text, return_special_tokens_mask=True, verbose=False)
            else:
                encoded = self.tokenizer(text, return_special_tokens_mask=True, verbose=False)
        return len(encoded["input_ids"]), sum(encoded.get("special_tokens_mask") or [])

    def explain(self, text: str, focus: str | int | None = None, *, target: str | None = None,
                generate: int | None = None) -> tuple[dict[str, Any], bool]:
        """The payload for a request, and whether it came from the cache.

        - A self-attention request (no ``target``, no ``generate``, not an encoder-decoder):
          the explorer payload (:func:`attnkit.viz.report.report_data`); ``focus`` (a
          token's text, ``"#N"``, or an index) sets its ``"focus"`` on a copy (and, when it is not
          the query the page opens on, drops the opening view chosen for that query). Without
          one the page opens on :func:`attnkit.viz.explainer.opening`'s query and head.
        - An encoder-decoder: :func:`~attnkit.viz.seq2seq.seq2seq_data` of ``text`` (the
          source) and ``target``, teacher-forced. Without a target the model writes one
          first, greedily, up to ``max_generate`` tokens (or its end-of-sequence token).
        - ``generate`` N (decoder-only): :func:`~attnkit.viz.seq2seq.generation_data` of N
          greedy tokens after ``text`` (fewer if the model ends the sequence).

        Arguments are those :meth:`parse` returns; checked there. Safe to call from many threads.

        Raises:
            RequestError: 413 a text (or target, or text and generated tokens) over
                ``max_tokens`` tokens, naming the field; 400 a text of special tokens
                only, or a ``focus`` that is not one of its tokens.
        """
        key = (text, target, generate)
        with self._cache_lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
        payload = None if cached is None else cached[0]
        hit = payload is not None
        if payload is None:
            payload = self._build(text, target, generate)
            self._remember(key, payload)
        if focus is not None:
            chosen = self._focus(payload["tokens"], focus)
            if chosen != payload.get("focus"):  # the opening view was chosen for another query
                payload = {**payload, "view": None, "view_reason": None}
            payload = {**payload, "focus": chosen}
        return payload, hit

    def _build(self, text: str, target: str | None, generate: int | None) -> dict[str, Any]:
        count, special = self.count_tokens(text)
        if count > self.max_tokens:
            raise RequestError(413, f"the text has {count:,} tokens; this server explains at most "
                                    f"{self.max_tokens:,} (max_tokens, special tokens included). Shorten it")
        if count == special:
            raise RequestError(400, "the text has no tokens the model reads, only special ones; type some words")
        if generate is not None and count + generate > self.max_tokens:
            raise RequestError(413, f'"generate": {generate} tokens after a text of {count:,} go past the '
                                    f"{self.max_tokens:,} tokens this server reads (max_tokens): ask for at most "
                                    f"{max(self.max_tokens - count, 0)}, or shorten the text")
        if target is not None:
            length = self.count_tokens(target, target=True)[0]
            if length + 1 > self.max_tokens:
                raise RequestError(413, f'"target" has {length:,} tokens; this server reads at most '
                                        f"{self.max_tokens - 1:,} (max_tokens, less the decoder's start token). "
                                        "Shorten it")
        with self._slots:
            if self.kind == "encoder-decoder":
                return self._seq2seq(text, target)
            if generate is not None:
                return self._generation(text, generate)
            from attnkit.viz.explainer import opening
            from attnkit.viz.report import report_data

            maps = self._run(text)
            best = opening(maps)  # one query and its most specific head, as explain --token opens
            if best is None:
                return report_data(maps, title=_title(text))
            return report_data(maps, title=_title(text), focus=best.query, view=(best.layer, [best.head]),
                               view_reason=best.why(maps.tokens[0]))

    def _seq2seq(self, text: str, target: str | None) -> dict[str, Any]:
        import torch

        from attnkit.viz.seq2seq import seq2seq_data

        if target is None:  # the model writes the target: greedy, then read teacher-forced like a given one
            with self._model_lock, torch.no_grad():
                source = self.tokenizer(text, return_tensors="pt")  # may hold token_type_ids, which generate refuses
                ids = self.model.generate(input_ids=source["input_ids"], attention_mask=source.get("attention_mask"),
                                          max_new_tokens=self.max_generate, do_sample=False, num_beams=1)[0]
                written = self.tokenizer.decode(ids, skip_special_tokens=True)
            maps = self._run(text, ids)
            title = _title(f"{text} → {written}")
        else:
            maps = self._run(text, target)
            title = _title(f"{text} → {target}")
        return seq2seq_data(maps, title=title)

    def _generation(self, text: str, generate: int) -> dict[str, Any]:
        from attnkit.viz.seq2seq import generation_data

        with self._model_lock:
            prompt = self.tokenizer(text, return_tensors="pt")
            maps = self._capture_generation(self.model, dict(prompt), self.tokenizer, max_new_tokens=generate,
                                            do_sample=False, num_beams=1)
        new = int(maps.sequences.shape[1]) - int(prompt["input_ids"].shape[1])
        # No tokenizer: the maps name every token (capture_generation gives each one its row), and
        # the tokenizer is not safe to call outside the model lock.
        return generation_data(maps, new_tokens=new, title=_title(text))

    def _remember(self, key: tuple[str, str | None, int | None], payload: dict[str, Any]) -> None:
        """Cache ``payload``: at most ``cache_size`` entries and ``_CACHE_BYTES`` of encoded maps."""
        size = _encoded_bytes(payload)
        if not self._cache_size or size > _CACHE_BYTES:
            return
        with self._cache_lock:
            if key in self._cache:
                return
            self._cache[key] = (payload, size)
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
