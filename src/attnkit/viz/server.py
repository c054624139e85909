"""``attnkit serve``: a local web app over the attention explorer and the attention lab.

Type text in the page, press Enter, and the explorer draws that text's attention maps as
the model computes them; a second tab holds the lab. The model is loaded once; each
request runs one forward pass with :func:`attnkit.inspect.capture` and answers the
:func:`attnkit.viz.report.report_data` payload that the explorer renders.

Routes (every answer but the page and ``/healthz`` is JSON; errors are ``{"error": str}``):

======================  ================================================================
``GET /``               the app: one self-contained page (its CSS, JS and settings inline)
``POST /api/explain``   ``{"text": str, "focus"?: str | int}`` -> 200 the explorer payload
``GET /api/info``       ``{"model", "max_tokens", "max_body", "layers", "heads"}``
``GET /healthz``        ``ok`` (text/plain)
======================  ================================================================

Status codes: 400 a body that is not a JSON object with a non-empty string ``text``, or
an unknown field or focus; 403 a ``Host`` header that names another host (DNS rebinding)
or an ``Origin`` that is not this server's; 404 an unknown path; 405 a known path with
the wrong method (with ``Allow``); 411 a POST without ``Content-Length``; 413 a body over
``max_body`` bytes or a text over ``max_tokens`` tokens (the answer names the limit);
415 a POST whose ``Content-Type`` is not ``application/json``; 500 an internal error
(``{"error": ...}``; the traceback goes to the log, never to the client). http.server's
own refusals (400 a malformed request, 414 a request line too long, 501 an unknown
method) are JSON too.

Safety. The server binds 127.0.0.1 unless told otherwise, and warns on stderr when it is
reachable from the network. Every answer carries the page's Content-Security-Policy,
``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer`` and
``X-Frame-Options: DENY``. Text typed by the user reaches the page as JSON and the
screen through ``textContent`` only.

Concurrency. Requests run on daemon threads (``ThreadingHTTPServer``). Every use of the
model and its tokenizer (counting tokens, the forward pass and capture) holds one lock:
capture swaps transformers' attention lookup for the whole process during one forward
pass, and a fast tokenizer is not safe to call from two threads at once. Building the
payload (rollout, head roles, compression) runs outside it, at most ``workers`` requests
at a time, which bounds memory (a 512-token MiniLM request holds about 100 MB until it is
answered). Finished payloads are kept in a small LRU cache keyed by text.

>>> from attnkit import models
>>> model, tokenizer = models.load("minilm")
>>> server = make_server(model, tokenizer, port=0, log=None)
>>> server.url.startswith("http://127.0.0.1:"), server.max_tokens
(True, 512)
>>> server.server_close()
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import json
import signal
import socket
import socketserver
import sys
import threading
import traceback
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import urlsplit

from attnkit._checks import describe, require_int
from attnkit.viz._html import CSP, page
from attnkit.viz.explainer import find_tokens

__all__ = ["DEFAULT_EXAMPLE", "ExplainServer", "make_server", "serve"]

DEFAULT_EXAMPLE = "The cat sat on the mat because it was tired."
_FALLBACK_MAX_TOKENS = 512  # for a model whose config names no maximum length
_TITLE_LIMIT = 160
_CACHE_BYTES = 256 << 20  # encoded maps the cache holds at most (a 512-token MiniLM payload: about 12 MB)
_DRAIN_LIMIT = 1 << 20  # an oversized body up to this many bytes past max_body is read and dropped before the 413
_FIELDS = ("text", "focus")
# Control characters as \xNN in the log (http.server has its own table only since 3.10.9 / 3.11.1).
_CONTROL_CHARS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}

_BODY = """\
<link rel="icon" href="data:,">
<div class="aks-app" id="aks-app" data-status="idle">
  <header class="aks-top">
    <h1 class="aks-brand"><span class="aks-logo">attnkit</span> <span class="aks-what">attention explorer</span></h1>
    <p class="aks-meta" id="aks-meta"></p>
  </header>
  <form class="aks-ask" id="aks-form" autocomplete="off">
    <label class="aks-label" for="aks-text">Text to explain</label>
    <div class="aks-row">
      <textarea id="aks-text" rows="2" spellcheck="false" placeholder="Type a sentence, then press Enter"></textarea>
      <div class="aks-actions">
        <button type="submit" id="aks-submit" class="aks-submit">Explain</button>
        <span class="aks-busy" id="aks-busy" role="status" aria-live="polite"></span>
      </div>
    </div>
    <p class="aks-hint" id="aks-hint"></p>
    <p class="aks-error" id="aks-error" role="alert" hidden></p>
  </form>
  <nav class="aks-tabs" role="tablist">
    <button type="button" class="aks-tab" role="tab" data-app-tab="explorer">Explorer</button>
    <button type="button" class="aks-tab" role="tab" data-app-tab="lab">Lab</button>
  </nav>
  <section class="aks-pane" data-app-pane="explorer" role="tabpanel">
    <p class="aks-empty" id="aks-empty">Type a text above and press Enter to see where each token attends.</p>
    <div id="akx-app-explorer"></div>
  </section>
  <section class="aks-pane" data-app-pane="lab" role="tabpanel" hidden>
    <div id="akl-app-lab"></div>
  </section>
</div>"""

SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_JSON = "application/json; charset=utf-8"


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a message for the user."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _check_host(host: object) -> str:
    if not isinstance(host, str):
        raise TypeError(f"host must be a str such as '127.0.0.1' or 'localhost'; got {describe(host)}")
    if not host or host != host.strip() or any(c in host for c in "/@ "):
        raise ValueError(f"host must be an address or host name such as '127.0.0.1'; got {host!r}")
    return host.strip("[]")  # "[::1]" -> "::1"


def _check_port(port: object) -> int:
    port = require_int("port", port)
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in [0, 65535] (0 picks a free port); got {port}")
    return port


def _check_options(host: object, port: object, max_tokens: object, max_body: object, cache_size: object,
                   workers: object, log: object) -> tuple[str, int, int | None, int, int, int]:
    """The arguments shared by :func:`make_server` and :func:`serve`, checked before any model is loaded."""
    host = _check_host(host)
    port = _check_port(port)
    if max_tokens is not None:
        max_tokens = require_int("max_tokens", max_tokens, minimum=1)
    max_body = require_int("max_body", max_body, minimum=1)
    cache_size = require_int("cache_size", cache_size, minimum=0)
    workers = require_int("workers", workers, minimum=1)
    if log is not None and not callable(log):
        raise TypeError(f"log must be a callable taking one line of text, or None for silence; got {describe(log)}")
    return host, port, max_tokens, max_body, cache_size, workers


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _host_name(header: str) -> str:
    """The host part of a ``Host`` header or an origin's authority: ``[::1]:80`` -> ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _max_positions(model: Any) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def _title(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _TITLE_LIMIT else flat[: _TITLE_LIMIT - 1] + "…"


class ExplainServer(ThreadingHTTPServer):
    """An HTTP server that explains texts with one model; see the module docstring for its routes.

    Make one with :func:`make_server`; run it with ``serve_forever()`` (in a thread, or
    until Ctrl-C), stop it with ``shutdown()`` (from another thread) and ``server_close()``.

    Attributes:
        url: ``http://host:port/`` as a browser on this machine should open it.
        model_name: the model's name or path, as the page shows it.
        max_tokens: the longest text accepted, in tokens, special tokens included.
        max_body: the largest request body accepted, in bytes.
        layers, heads: the model's attention layers and heads per layer.
        warnings: what the server printed to stderr when it started (e.g. reachable from
            the network).
    """

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, model: Any, tokenizer: Any, *, host: str, port: int, max_tokens: int | None,
                 max_body: int, cache_size: int, workers: int, log: Callable[[str], None] | None,
                 example: str | None) -> None:
        from attnkit.inspect import capture

        self.model, self.tokenizer, self.log = model, tokenizer, log
        self.max_body, self.example = max_body, example
        self.model_name = str(getattr(model, "name_or_path", "") or type(model).__name__)
        positions = _max_positions(model)
        if max_tokens is None:
            max_tokens = positions or min(_FALLBACK_MAX_TOKENS, getattr(tokenizer, "model_max_length", 10**9))
        elif positions is not None and max_tokens > positions:
            raise ValueError(f"max_tokens must be at most {positions}, the positions {self.model_name!r} has "
                             f"(max_position_embeddings); got {max_tokens}. Leave it None for {positions}")
        self.max_tokens = max_tokens
        self._capture = capture
        # Held for every use of the model and of its tokenizer: capture patches transformers'
        # attention lookup process-wide, and a fast tokenizer called from two threads at once
        # can fail ("RuntimeError: Already borrowed", huggingface/tokenizers#537).
        self._model_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(workers)
        self._cache: collections.OrderedDict[str, tuple[dict[str, Any], int]] = collections.OrderedDict()
        self._cache_size = cache_size
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()
        # One short forward pass: fails now, not on the first request, for a model capture cannot read.
        probe = self._run("attention")
        self.layers, self.heads = len(probe.layers), len(probe.heads)
        self.warnings: list[str] = []

        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise OSError(e.errno, f"port {port} on {host} is in use; pick another port "
                                       "(port=0, or --port 0, picks a free one)") from None
            raise
        self.host, self.port = host, int(self.server_address[1])
        shown = f"[{host}]" if ":" in host else host
        wildcard = host in ("0.0.0.0", "::")
        self.url = f"http://{'127.0.0.1' if wildcard else shown}:{self.port}/"
        self._hosts = {"localhost", "127.0.0.1", "::1", host.lower()} if _is_loopback(host) else {host.lower()}
        self._any_ip = wildcard  # bound to every interface: any address of this machine may be in Host
        if not _is_loopback(host):
            self.warnings.append(
                f"attnkit serve: listening on {host}:{self.port}, which is reachable from the network: anyone who "
                "can reach this machine can run the model on their text. Bind 127.0.0.1 (the default) to keep "
                "the explorer on this machine")
            for line in self.warnings:
                print(line, file=sys.stderr, flush=True)
        self.page = page(f"attnkit · {self.model_name}", css=["explorer.css", "lab.css", "app.css"],
                         js=["explorer.js", "lab.js", "app.js"], body=_BODY, connect=True,
                         data={"model": self.model_name, "max_tokens": self.max_tokens, "max_body": self.max_body,
                               "layers": self.layers, "heads": self.heads, "example": self.example})
        self.page_bytes = self.page.encode("utf-8")

    def server_bind(self) -> None:
        # HTTPServer.server_bind also looks up the host's fully qualified name, which can
        # wait on DNS; nothing here uses it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

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
        """The explorer payload for ``text`` and whether it came from the cache.

        Raises :class:`RequestError` (413) for a text over ``max_tokens`` tokens, (400) for
        a text of special tokens only or a ``focus`` that is not one of its tokens.
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

    def info(self) -> dict[str, Any]:
        return {"model": self.model_name, "max_tokens": self.max_tokens, "max_body": self.max_body,
                "layers": self.layers, "heads": self.heads}

    def host_allowed(self, header: str | None) -> bool:
        """Whether a ``Host`` header names this server (the DNS-rebinding guard)."""
        if not header:
            return False
        name = _host_name(header)
        return name in self._hosts or (self._any_ip and (_is_ip(name) or name == "localhost"))

    def say(self, line: str) -> None:
        if self.log is not None:
            self.log(line)


class _Handler(BaseHTTPRequestHandler):
    server: ExplainServer
    timeout = 60  # seconds a client may take to send its request

    # path -> the methods it takes
    _ROUTES: ClassVar[dict[str, tuple[str, ...]]] = {
        "/": ("GET", "HEAD"), "/api/info": ("GET", "HEAD"), "/healthz": ("GET", "HEAD"), "/api/explain": ("POST",),
    }

    def version_string(self) -> str:
        return "attnkit"

    # -- answers --------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
        self._send(status, body, _JSON, headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line, headers too long) as JSON too."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._json(code, {"error": message or phrase})

    def log_message(self, format: str, *args: Any) -> None:
        # Escape control characters as http.server does, so a request cannot write to the terminal.
        message = (format % args).translate(_CONTROL_CHARS)
        self.server.say(f"{self.address_string()} - {message}")

    # -- dispatch -------------------------------------------------------------------------------

    def _handle(self) -> None:
        try:
            path = urlsplit(self.path).path
            self._guard()
            allowed = self._ROUTES.get(path)
            if allowed is None:
                raise RequestError(404, f"no such page: {path}. This server answers GET /, POST /api/explain, "
                                        "GET /api/info and GET /healthz")
            if self.command not in allowed:
                raise RequestError(405, f"{path} takes {' or '.join(m for m in allowed if m != 'HEAD')}, "
                                        f"not {self.command}", {"Allow": ", ".join(allowed)})
            if path == "/":
                self._send(200, self.server.page_bytes, "text/html; charset=utf-8")
            elif path == "/healthz":
                self._send(200, b"ok", "text/plain; charset=utf-8")
            elif path == "/api/info":
                self._json(200, self.server.info())
            else:
                self._explain()
        except RequestError as e:
            if e.status == 413:
                self.close_connection = True
            self._json(e.status, {"error": e.message}, e.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # an internal error: logged in full, answered in one line
            self.server.say(f"attnkit serve: internal error on {self.command} {self.path}:\n"
                            + "".join(traceback.format_exception(e)).rstrip())
            self.close_connection = True
            self._json(500, {"error": f"internal error ({type(e).__name__}); the server's log has the details"})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _handle

    def _guard(self) -> None:
        """403 for a Host that is not this server (DNS rebinding) or an Origin that is not its own."""
        host = self.headers.get("Host")
        if not self.server.host_allowed(host):
            raise RequestError(403, f"Host {host!r} is not this server; open {self.server.url}")
        origin = self.headers.get("Origin")
        if origin is not None and origin.lower().rstrip("/") != f"http://{host.lower()}":
            raise RequestError(403, f"requests from the origin {origin!r} are not allowed; "
                                    f"only pages served from {self.server.url} may call this server")

    def _body(self) -> bytes:
        limit = self.server.max_body
        if self.headers.get("Transfer-Encoding"):
            raise RequestError(411, "send the body with a Content-Length (chunked bodies are not accepted)")
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise RequestError(411, "POST /api/explain needs a Content-Length header")
        if not raw.strip().isdigit():
            raise RequestError(400, f"Content-Length must be a number of bytes; got {raw!r}")
        length = int(raw)
        if length > limit:
            # Read (and drop) a moderately oversized body, so that the client, still sending
            # it, gets the 413 rather than a reset connection.
            if length <= limit + _DRAIN_LIMIT:
                self.rfile.read(length)
            raise RequestError(413, f"the request body has {length:,} bytes; this server accepts at most "
                                    f"{limit:,} (max_body)")
        return self.rfile.read(length)

    def _explain(self) -> None:
        content_type = self.headers.get("Content-Type", "")
        body = self._body()
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise RequestError(415, f"the body must be JSON sent as Content-Type: application/json; "
                                    f"got {content_type or 'no Content-Type'!r}")
        try:
            request = json.loads(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise RequestError(400, "the body must be UTF-8 JSON; it is not valid UTF-8") from None
        except json.JSONDecodeError as e:
            raise RequestError(400, f'the body must be JSON such as {{"text": "The cat sat."}}; {e}') from None
        except RecursionError:
            raise RequestError(400, "the body must be JSON such as {\"text\": \"The cat sat.\"}; "
                                    "it is nested too deeply") from None
        except ValueError as e:  # e.g. an integer past Python's digit limit
            raise RequestError(400, f'the body must be JSON such as {{"text": "The cat sat."}}; {e}') from None
        if not isinstance(request, dict):
            raise RequestError(400, f'the body must be a JSON object such as {{"text": "The cat sat."}}; '
                                    f"got a JSON {type(request).__name__}")
        unknown = sorted(set(request) - set(_FIELDS))
        if unknown:
            raise RequestError(400, f"unknown field(s) {', '.join(map(repr, unknown))}; "
                                    f"expected {' and '.join(map(repr, _FIELDS))}")
        if "text" not in request:
            raise RequestError(400, 'the body has no "text"; send {"text": "The cat sat."}')
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
        payload, hit = self.server.explain(text, focus)
        self._json(200, payload, {"X-Attnkit-Cache": "hit" if hit else "miss"})


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def make_server(model: Any, tokenizer: Any, *, host: str = "127.0.0.1", port: int = 8000,
                max_tokens: int | None = None, max_body: int = 65536, cache_size: int = 32, workers: int = 4,
                log: Callable[[str], None] | None = _stderr, example: str | None = DEFAULT_EXAMPLE) -> ExplainServer:
    """An :class:`ExplainServer` for ``model``, bound and ready; it serves once you call ``serve_forever()``.

    Args:
        model: a Hugging Face transformers model (or any model :func:`attnkit.inspect.capture`
            reads text into with ``tokenizer``), e.g. from :func:`attnkit.models.load`. One
            short forward pass is run here, so a model capture cannot read fails now.
        tokenizer: its tokenizer: a callable that takes text and gives ``input_ids``.
        host: the address to bind (default ``"127.0.0.1"``: this machine only). Any other
            than a loopback address prints a warning that the app is reachable from the
            network. ``"0.0.0.0"`` binds every interface.
        port: 0 to 65535; 0 picks a free port (read it from ``server.port`` or ``server.url``).
        max_tokens: the longest text explained, in tokens including special ones (>= 1).
            Default: the model's ``max_position_embeddings`` (512 for MiniLM; 512 if the
            config names none); more than that is an error.
        max_body: the largest request body accepted, in bytes (default 64 KiB).
        cache_size: finished payloads kept, by text (default 32; 0: no cache), and at most
            256 MB of them.
        workers: requests building a payload at once (default 4); the forward passes
            themselves run one at a time.
        log: called with each access line and each internal error's traceback; default
            stderr; None: silent. The network warning always goes to stderr.
        example: the text the page shows and explains when it opens; None: an empty box.

    Raises:
        TypeError, ValueError: an argument of the wrong type or out of range.
        OSError: the port is in use, or the host cannot be bound.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (e.g. from attnkit.models.load); got {describe(model)}")
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be a tokenizer (callable on text, e.g. from attnkit.models.load); "
                        f"got {describe(tokenizer)}")
    host, port, max_tokens, max_body, cache_size, workers = _check_options(
        host, port, max_tokens, max_body, cache_size, workers, log)
    if example is not None and not isinstance(example, str):
        raise TypeError(f"example must be a str or None; got {describe(example)}")
    return ExplainServer(model, tokenizer, host=host, port=port, max_tokens=max_tokens, max_body=max_body,
                         cache_size=cache_size, workers=workers, log=log, example=example)


def serve(model: str = "minilm", *, host: str = "127.0.0.1", port: int = 8000, max_tokens: int | None = None,
          max_body: int = 65536, log: Callable[[str], None] | None = _stderr) -> None:
    """Load ``model`` once, print the app's URL and serve it until Ctrl-C; then close cleanly.

    Args:
        model: a bundled model's name (``"minilm"``) or a local Hugging Face model folder,
            as for :func:`attnkit.models.load`.
        host, port, max_tokens, max_body, log: as for :func:`make_server`; the arguments
            are checked before the model is loaded.
    """
    import os

    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be 'minilm' or a local model folder (str or path); got {describe(model)}")
    _check_options(host, port, max_tokens, max_body, 0, 1, log)
    from attnkit import models

    loaded, tokenizer = models.load(model)
    server = make_server(loaded, tokenizer, host=host, port=port, max_tokens=max_tokens, max_body=max_body, log=log)
    print(f"attnkit serve: {server.model_name} ({server.layers} layers x {server.heads} heads, up to "
          f"{server.max_tokens} tokens) at {server.url}  (Ctrl-C stops)", flush=True)
    installed, previous = False, None
    if threading.current_thread() is threading.main_thread():  # stop on SIGTERM (kill, systemd) as on Ctrl-C
        previous, installed = signal.signal(signal.SIGTERM, _interrupt), True
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("attnkit serve: stopped", flush=True)
    finally:
        server.server_close()
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
