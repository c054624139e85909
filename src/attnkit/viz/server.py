"""``attnkit serve``: a local web app over the attention explorer and the attention lab.

Type text in the page, press Enter, and the explorer draws that text's attention maps as
the model computes them; a second tab holds the lab. An encoder-decoder model's page has a
target field too (empty: the model writes the target, greedily) and shows the
cross-attention alignment and the encoder's and decoder's self-attention; a model that
generates alone has a "generate N tokens" field that shows the text growing token by token.
The work (the model behind one lock, the token limit, the cache, reading a request body)
is :class:`attnkit.viz.service.ExplainService`; this module is the HTTP layer over it: a
Starlette app run by uvicorn (the ``serve`` extra).

Routes (every answer but the page and ``/healthz`` is JSON; errors are ``{"error": str}``):

======================  ================================================================
``GET /``               the app: one self-contained page (its CSS, JS and settings inline)
``POST /api/explain``   ``{"text": str, "focus"?: str | int, "target"?: str, "generate"?: int}``
                        -> 200 the explorer, encoder-decoder or generation payload
                        (:meth:`attnkit.viz.service.ExplainService.explain`)
``GET /api/info``       ``{"model", "kind", "max_tokens", "max_generate", "max_body", "layers",
                        "heads"}``
``GET /healthz``        ``ok`` (text/plain)
``GET /long``           with a long document (``serve --long FILE``): the long explorer
                        (:mod:`attnkit.viz.long`)
``POST /api/long/zoom`` ``{"layer", "head", "q0", "q1", "k0"?, "k1"?, "columns"?}`` -> 200 the
                        exact weights of those queries (:meth:`attnkit.viz.long.LongDocument.zoom`)
======================  ================================================================

Status codes: 400 a body that is not a JSON object with a non-empty string ``text``, an
unknown field or focus, a ``target`` or ``generate`` the model does not take (or of the
wrong type, or ``generate`` outside [1, ``max_generate``]), a ``Host`` header that does
not name this server (DNS rebinding; starlette's ``TrustedHostMiddleware``), or a
malformed request (uvicorn's refusal, e.g. a ``Content-Length`` that is not digits); 403
an ``Origin`` that is not this server's; 404 an unknown path; 405 a known path with the
wrong method (with ``Allow``); 408 a body not received within ``body_timeout`` seconds;
411 a POST without ``Content-Length`` (chunked bodies are refused); 413 a body over
``max_body`` bytes, or a text, a target, or a text and its generated tokens over
``max_tokens`` tokens (the answer names the field and the limit); 415 a POST whose
``Content-Type`` is not ``application/json``; 500 an internal error (``{"error": ...}``;
the traceback goes to the log, never to the client); 503 more than ``max_connections``
connections open (uvicorn's ``limit_concurrency``; plain text). Every other error is JSON.

Limits. At most ``max_connections`` connections at once; a client has ``header_timeout``
seconds (from connecting, or from the end of its previous answer) to send a request's
line and headers (at most 16 KiB, h11's limit), and ``body_timeout`` seconds for its
body, else its connection is closed (headers) or answered 408 (body); an idle keep-alive
connection is closed after 5 s. The model runs in a worker thread, so the event loop
keeps answering while it runs. Ctrl-C or SIGTERM stops the server gracefully: it stops
accepting, lets running requests finish (up to 5 s), then returns.

Safety. The server binds 127.0.0.1 unless told otherwise, and warns on stderr when it is
reachable from the network. Every answer, uvicorn's own refusals included, carries the
page's Content-Security-Policy, ``X-Content-Type-Options: nosniff``,
``Referrer-Policy: no-referrer`` and ``X-Frame-Options: DENY``. Text typed by the user
reaches the page as JSON and the screen through ``textContent`` only.

>>> from attnkit import models
>>> model, tokenizer = models.load("minilm")
>>> server = make_server(model, tokenizer, port=0, log=None)
>>> server.url.startswith("http://127.0.0.1:"), server.max_tokens
(True, 512)
>>> server.server_close()
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from attnkit._checks import describe, require_int, require_real
from attnkit._model_facts import max_positions
from attnkit.viz._html import CSP, page
from attnkit.viz.lab import LAB_SCRIPTS
from attnkit.viz.service import ExplainService, RequestError

if TYPE_CHECKING:
    from attnkit.viz.long import LongDocument

try:
    import anyio
    import h11
    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import Response
    from starlette.routing import Route
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as _missing:  # the `serve` extra
    raise ImportError(f"attnkit serve needs starlette and uvicorn ({_missing}): pip install 'attnkit[serve]'") from None

__all__ = ["DEFAULT_EXAMPLE", "SECURITY_HEADERS", "ExplainServer", "build_app", "make_server", "serve"]

DEFAULT_EXAMPLE = "The cat sat on the mat because it was tired."
_DRAIN_LIMIT = 1 << 20  # an oversized body up to this many bytes past max_body is read and dropped before the 413
_KEEP_ALIVE = 5  # seconds an idle keep-alive connection stays open
_GRACE = 5  # seconds running requests get to finish once the server is told to stop
_LONG_SHORT_LIMIT = 2048  # tokens the full-map explorer at / reads when a long document is served beside it
# Control characters as \xNN in the log, so a request cannot write to the terminal.
_CONTROL_CHARS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_JSON = "application/json; charset=utf-8"

_BODY = """\
<link rel="icon" href="data:,">
<div class="aks-app" id="aks-app" data-status="idle">
  <header class="aks-top">
    <h1 class="aks-brand"><span class="aks-logo">attnkit</span> <span class="aks-what">attention explorer</span></h1>
    <p class="aks-meta" id="aks-meta"></p>
  </header>
  <form class="aks-ask" id="aks-form" autocomplete="off">
    <label class="aks-label" for="aks-text" id="aks-text-label">Text to explain</label>
    <div class="aks-row">
      <textarea id="aks-text" rows="2" spellcheck="false" placeholder="Type a sentence, then press Enter"></textarea>
      <div class="aks-actions">
        <button type="submit" id="aks-submit" class="aks-submit">Explain</button>
        <span class="aks-busy" id="aks-busy" role="status" aria-live="polite"></span>
      </div>
    </div>
    <div class="aks-more" id="aks-target-row" hidden>
      <label class="aks-label" for="aks-target">Target</label>
      <input id="aks-target" type="text" spellcheck="false" maxlength="4000"
             placeholder="What the decoder reads; empty: the model writes it (greedy)">
    </div>
    <div class="aks-more" id="aks-generate-row" hidden>
      <label class="aks-label" for="aks-generate">Generate tokens</label>
      <input id="aks-generate" type="number" min="0" step="1" value="0" inputmode="numeric">
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


def _check_timeout(name: str, value: object) -> float:
    value = require_real(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0 seconds; got {value}")
    return value


def _check_options(host: object, port: object, max_tokens: object, max_body: object, log: object) -> tuple[str, int]:
    """The arguments shared by :func:`make_server` and :func:`serve`, checked before any model is loaded."""
    host, port = _check_host(host), _check_port(port)
    if max_tokens is not None:
        require_int("max_tokens", max_tokens, minimum=1)
    require_int("max_body", max_body, minimum=1)
    if log is not None and not callable(log):
        raise TypeError(f"log must be a callable taking one line of text, or None for silence; got {describe(log)}")
    return host, port


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _as_host(name: str) -> str:
    """A name as it appears in a ``Host`` header, without the port: IPv6 addresses in brackets."""
    return f"[{name}]" if ":" in name else name.lower()


def _allowed_hosts(host: str) -> list[str]:
    """The ``Host`` values (without port) that name a server bound to ``host``: the DNS-rebinding guard.

    Loopback: ``localhost``, ``127.0.0.1``, ``[::1]`` and ``host``. Every interface
    (``0.0.0.0``, ``::``): those, the machine's name and the addresses it resolves to.
    Any other: ``host`` itself.
    """
    loopback = {"localhost", "127.0.0.1", "[::1]"}
    if _is_loopback(host):
        return sorted(loopback | {_as_host(host)})
    if host not in ("0.0.0.0", "::"):
        return [_as_host(host)]
    names = loopback | {socket.gethostname().lower()}
    with contextlib.suppress(OSError):  # a name that does not resolve: the machine's addresses are not known
        names |= {_as_host(str(info[4][0])) for info in socket.getaddrinfo(socket.gethostname(), None)}
    return sorted(names)


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def _json(status: int, value: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(_json_bytes(value), status_code=status, headers=headers, media_type=_JSON)


# -- the HTTP protocol: uvicorn's h11 one, with a deadline for the request's headers -----------------
#
# uvicorn (0.55) has no public option for how long a client may take to send a request's headers: its
# timeout_keep_alive bounds only the idle wait between requests. So this subclasses its h11 protocol, which is
# not a public interface. _protocol() checks that the members it relies on are there and otherwise serves with
# uvicorn's own protocol and says so in the log (no header deadline); the tests check the behaviour (slow
# clients cut off, malformed requests refused in JSON), not these members.

_RELIED_ON = ("connection_made", "on_response_complete", "connection_lost", "send_400_response")


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and JSON refusals.

    A connection must send a complete request line and headers within ``header_timeout``
    seconds of being opened, or of the end of its previous answer (and the rest of an
    answered request's body, if the app did not read it); else it is closed
    (uvicorn bounds only the idle wait between requests, so a client trickling a byte at
    a time would otherwise hold its connection open forever). uvicorn's 400 for a
    malformed request is JSON and carries the security headers.
    """

    header_timeout = 10.0  # set per server by make_server
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        # Their IDLE: the client has not finished a request's headers (it may have sent part of them).
        # Our DONE: it is still sending the body of a request already answered (one the app did not read).
        late = self.conn.their_state is h11.IDLE or self.conn.our_state is h11.DONE
        if late and not self.transport.is_closing():
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        body = _json_bytes({"error": "malformed HTTP request (request line, headers or Content-Length); "
                                     "this server speaks HTTP/1.1"})
        headers = [(b"content-type", _JSON.encode()), (b"content-length", str(len(body)).encode()),
                   (b"cache-control", b"no-store"), (b"connection", b"close"),
                   *((name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items())]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def _protocol(header_timeout: float, log: Callable[[str], None] | None) -> Any:
    """The h11 protocol class for one server: :class:`_Protocol` with its header deadline, or uvicorn's own
    (``"h11"``) where this uvicorn's protocol lacks a member :class:`_Protocol` relies on."""
    missing = [name for name in _RELIED_ON if not callable(getattr(H11Protocol, name, None))]
    if missing:
        if log is not None:
            log(f"attnkit serve: uvicorn {uvicorn.__version__}'s h11 protocol has no {', '.join(missing)}: serving "
                "without a header deadline (a client may trickle its headers)")
        return "h11"
    return type("_ServerProtocol", (_Protocol,), {"header_timeout": header_timeout})


# -- the app --------------------------------------------------------------------------------------


class _Answers:
    """The outermost layer of the app (pure ASGI): every error is JSON, nothing is cached, a line per request.

    - An error answer (status >= 400) that is not JSON (starlette's own refusals, such as
      ``TrustedHostMiddleware``'s 400) becomes ``{"error": its text}``.
    - An exception is logged with its traceback and answered with a JSON 500 if no answer
      was started; the client never sees the traceback.
    - ``Cache-Control: no-store`` on every answer; the security headers come from uvicorn
      (its ``headers`` setting), which also writes them on its own 500 and 503 answers.
    """

    def __init__(self, app: Any, log: Callable[[str], None] | None) -> None:
        self.app, self.log = app, log

    def say(self, line: str) -> None:
        if self.log is not None:
            self.log(line)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | None = None
        held: dict[str, Any] | None = None  # an error answer's start, held until its text is read
        text = bytearray()

        async def answer(message: dict[str, Any]) -> None:
            nonlocal status, held
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"cache-control"]
                message = {**message, "headers": [*headers, (b"cache-control", b"no-store")]}
                content_type = dict(headers).get(b"content-type", b"")
                if status >= 400 and not content_type.startswith(b"application/json"):
                    held = message
                    return
            elif message["type"] == "http.response.body" and held is not None:
                text.extend(message.get("body", b""))
                if message.get("more_body", False):
                    return
                try:
                    phrase = HTTPStatus(held["status"]).phrase
                except ValueError:
                    phrase = "error"
                body = _json_bytes({"error": text.decode("utf-8", "replace").strip() or phrase})
                kept = [(k, v) for k, v in held["headers"] if k.lower() not in (b"content-type", b"content-length")]
                await send({**held, "headers": [*kept, (b"content-type", _JSON.encode()),
                                                (b"content-length", str(len(body)).encode())]})
                message = {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
            await send(message)

        try:
            await self.app(scope, receive, answer)
        except Exception as e:  # an internal error: logged in full, answered in one line
            self.say(f"attnkit serve: internal error on {scope['method']} {scope['path']}:\n"
                     + "".join(traceback.format_exception(e)).rstrip())
            if status is None:
                status = 500
                await _internal_error(None, e)(scope, receive, send)
        client = scope.get("client") or ("-", 0)
        self.say(f'{client[0]} - "{scope["method"]} {scope["path"]}" {status}'.translate(_CONTROL_CHARS))


class _SameOrigin:
    """403 for a request whose ``Origin`` is not this server (a cross-site POST); pure ASGI."""

    def __init__(self, app: Any, url: str) -> None:
        self.app, self.url = app, url

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            origin, host = headers.get(b"origin"), headers.get(b"host", b"")
            if origin is not None and origin.lower().rstrip(b"/") != b"http://" + host.lower():
                shown = origin.decode("latin-1")
                await _json(403, {"error": f"requests from the origin {shown!r} are not allowed; only pages "
                                           f"served from {self.url} may call this server"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _internal_error(request: Request | None, exc: Exception) -> Response:
    return _json(500, {"error": f"internal error ({type(exc).__name__}); the server's log has the details"})


def _routes_help(app: Any) -> str:
    """"This server answers GET /, ...": every route ``app`` has (the long explorer's too, when it serves one)."""
    found = [f"{method} {route.path}" for route in app.routes if isinstance(route, Route)
             for method in sorted(set(route.methods or ()) - {"HEAD"})]
    return f"This server answers {', '.join(found[:-1])} and {found[-1]}"


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's 404 and 405, as JSON that says what the server answers."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return _json(404, {"error": f"no such page: {request.url.path}. {_routes_help(request.app)}"})
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        methods = " or ".join(m.strip() for m in allowed.split(",") if m.strip() != "HEAD")
        return _json(405, {"error": f"{request.url.path} takes {methods}, not {request.method}"}, exc.headers)
    return _json(exc.status_code, {"error": exc.detail}, exc.headers)


async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    return _json(exc.status, {"error": exc.message}, exc.headers)


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request's body: at most ``limit`` bytes, all of it within ``timeout`` seconds.

    Raises:
        RequestError: 411 no ``Content-Length`` (or a chunked body); 413 a longer body
            (read and dropped first if it is at most 1 MiB longer, so that the client,
            still sending, gets the answer; then the connection is closed); 408 a body
            not received in time (the connection is closed); 400 the client went away.
    """
    if "transfer-encoding" in request.headers:
        raise RequestError(411, "send the body with a Content-Length (chunked bodies are not accepted)")
    raw = request.headers.get("content-length")
    if raw is None:
        raise RequestError(411, "POST /api/explain needs a Content-Length header")
    length = int(raw)  # h11 has checked that it is digits
    close = {"Connection": "close"}
    body = bytearray()
    try:
        with anyio.fail_after(timeout):
            if length > limit:
                if length <= limit + _DRAIN_LIMIT:
                    async for _ in request.stream():
                        pass
                raise RequestError(413, f"the request body has {length:,} bytes; this server accepts at most "
                                        f"{limit:,} (max_body)", close)
            async for chunk in request.stream():
                body.extend(chunk)
    except TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {timeout:g} s", close) from None
    except ClientDisconnect:
        raise RequestError(400, "the client went away before sending its whole body", close) from None
    return bytes(body)


def build_app(service: ExplainService, *, page_html: str, url: str, allowed_hosts: list[str], body_timeout: float,
              log: Callable[[str], None] | None, long: LongDocument | None = None) -> Any:
    """The ASGI app of :class:`ExplainServer`: routes over ``service``, the Host and Origin guards, JSON errors.

    ``allowed_hosts`` are the ``Host`` values (no port; IPv6 in brackets) that name this
    server. The security headers are not added here: uvicorn adds them (see
    :func:`make_server`). With ``long``, ``GET /long`` and ``POST /api/long/zoom`` too.
    """
    page_bytes = page_html.encode("utf-8")

    async def home(request: Request) -> Response:
        return Response(page_bytes, media_type="text/html; charset=utf-8")

    async def healthz(request: Request) -> Response:
        return Response(b"ok", media_type="text/plain; charset=utf-8")

    async def info(request: Request) -> Response:
        return _json(200, service.info())

    async def explain(request: Request) -> Response:
        body = await _read_body(request, service.max_body, body_timeout)
        content_type = request.headers.get("content-type", "")

        def work() -> tuple[bytes, bool]:  # in a worker thread: the event loop keeps answering meanwhile
            asked = service.parse(body, content_type)
            payload, hit = service.explain(asked.text, asked.focus, target=asked.target, generate=asked.generate)
            return _json_bytes(payload), hit

        answer, hit = await run_in_threadpool(work)
        return Response(answer, media_type=_JSON, headers={"X-Attnkit-Cache": "hit" if hit else "miss"})

    routes = [Route("/", home, methods=["GET"]), Route("/healthz", healthz, methods=["GET"]),
              Route("/api/info", info, methods=["GET"]), Route("/api/explain", explain, methods=["POST"])]
    if long is not None:
        routes.extend(_long_routes(long, body_timeout))
    app = Starlette(
        routes=routes,
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts, www_redirect=False),
                    Middleware(_SameOrigin, url=url)],
        exception_handlers={HTTPException: _http_error, RequestError: _refused, Exception: _internal_error},
    )
    return _Answers(app, log)


def _long_routes(long: LongDocument, body_timeout: float) -> list[Route]:
    """``GET /long`` (the long explorer, zooming through this server) and ``POST /api/long/zoom``."""
    from attnkit.viz.long import long_html

    page_bytes = long_html(long.data(zoom=True), connect=True).encode("utf-8")

    async def long_page(request: Request) -> Response:
        return Response(page_bytes, media_type="text/html; charset=utf-8")

    async def zoom(request: Request) -> Response:
        body = await _read_body(request, 4096, body_timeout)
        content_type = request.headers.get("content-type", "")

        def work() -> bytes:  # in a worker thread: a zoom may run the model up to one layer
            return _json_bytes(long.zoom(**long.parse_zoom(body, content_type)))

        return Response(await run_in_threadpool(work), media_type=_JSON)

    return [Route("/long", long_page, methods=["GET"]), Route("/api/long/zoom", zoom, methods=["POST"])]


# -- the server -----------------------------------------------------------------------------------


class _LogLines(logging.Handler):
    """uvicorn's warnings and errors (e.g. "Invalid HTTP request received."), to a ``log`` callable."""

    def __init__(self, log: Callable[[str], None] | None) -> None:
        super().__init__(logging.WARNING)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        if self.log is not None:
            self.log(f"attnkit serve: {self.format(record)}")


class ExplainServer:
    """The app, bound and ready: :meth:`serve_forever` runs it; see the module docstring for its routes.

    Make one with :func:`make_server`; run it with ``serve_forever()`` (in a thread, or
    until Ctrl-C), stop it with ``shutdown()`` (from another thread) and ``server_close()``.

    Attributes:
        url: ``http://host:port/`` as a browser on this machine should open it.
        host, port: where it listens.
        service: the :class:`~attnkit.viz.service.ExplainService` doing the work.
        model_name, max_tokens, max_body, layers, heads: the service's.
        allowed_hosts: the ``Host`` values (without port) it answers.
        warnings: what the server printed to stderr when it started (e.g. reachable from
            the network).
    """

    def __init__(self, service: ExplainService, *, host: str, port: int, max_connections: int, header_timeout: float,
                 body_timeout: float, log: Callable[[str], None] | None, example: str | None,
                 long: LongDocument | None = None) -> None:
        self.service, self.log = service, log
        self.model_name, self.max_tokens, self.max_body = service.model_name, service.max_tokens, service.max_body
        self.layers, self.heads = service.layers, service.heads
        self.warnings: list[str] = []
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind((host, port))
            self._socket.listen(socket.SOMAXCONN)
        except OSError as e:
            self._socket.close()
            if e.errno == errno.EADDRINUSE:
                raise OSError(e.errno, f"port {port} on {host} is in use; pick another port "
                                       "(port=0, or --port 0, picks a free one)") from None
            raise
        self.host, self.port = host, int(self._socket.getsockname()[1])
        wildcard = host in ("0.0.0.0", "::")
        self.url = f"http://{'127.0.0.1' if wildcard else _as_host(host)}:{self.port}/"
        self.allowed_hosts = _allowed_hosts(host)
        if not _is_loopback(host):
            self.warnings.append(
                f"attnkit serve: listening on {host}:{self.port}, which is reachable from the network: anyone who "
                "can reach this machine can run the model on their text. Bind 127.0.0.1 (the default) to keep "
                "the explorer on this machine")
            for line in self.warnings:
                print(line, file=sys.stderr, flush=True)
        html = page(f"attnkit · {self.model_name}", css=["explorer.css", "lab.css", "app.css"],
                    js=["explorer.js", "seq2seq.js", "generation.js", *LAB_SCRIPTS, "app.js"], body=_BODY, connect=True,
                    data={**service.info(), "example": example})
        app = build_app(service, page_html=html, url=self.url, allowed_hosts=self.allowed_hosts,
                        body_timeout=body_timeout, log=log, long=long)
        protocol = _protocol(header_timeout, log)
        config = uvicorn.Config(
            app, http=protocol, ws="none", lifespan="off", loop="asyncio", log_config=None, access_log=False,
            server_header=False, headers=list(SECURITY_HEADERS.items()), limit_concurrency=max_connections,
            timeout_keep_alive=_KEEP_ALIVE, timeout_graceful_shutdown=_GRACE)
        self._server = uvicorn.Server(config)
        self._stopped = threading.Event()
        self._stopped.set()

    def serve_forever(self) -> None:
        """Answer requests until :meth:`shutdown` (or, in the main thread, Ctrl-C or SIGTERM).

        In the main thread uvicorn catches SIGINT and SIGTERM, stops gracefully, then
        raises the signal again with the handlers that were there before.
        """
        uvicorn_log = logging.getLogger("uvicorn")
        handler, propagate = _LogLines(self.log), uvicorn_log.propagate
        uvicorn_log.addHandler(handler)
        uvicorn_log.propagate = False
        self._stopped.clear()
        try:
            self._server.should_exit = False
            self._server.run(sockets=[self._socket])
        finally:
            uvicorn_log.removeHandler(handler)
            uvicorn_log.propagate = propagate
            self._stopped.set()

    def shutdown(self, timeout: float = _GRACE + 5) -> None:
        """Stop :meth:`serve_forever` (called from another thread) and wait until it has returned."""
        self._server.should_exit = True
        self._stopped.wait(timeout)

    def server_close(self) -> None:
        """Close the listening socket (:meth:`serve_forever` closes it too, when it ends)."""
        self._socket.close()


def make_server(model: Any, tokenizer: Any, *, host: str = "127.0.0.1", port: int = 8000,
                max_tokens: int | None = None, max_body: int = 65536, cache_size: int = 32, workers: int = 4,
                max_connections: int = 256, header_timeout: float = 10.0, body_timeout: float = 20.0,
                log: Callable[[str], None] | None = _stderr, example: str | None = DEFAULT_EXAMPLE,
                long: LongDocument | None = None) -> ExplainServer:
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
        max_connections: connections open at once (default 256); past it, requests get 503.
        header_timeout: seconds a client has to send a request's line and headers
            (default 10), from connecting or from its previous answer; then it is cut off.
        body_timeout: seconds a client has to send a request's body (default 20); then 408.
        log: called with each access line, uvicorn's warnings and each internal error's
            traceback; default stderr; None: silent. The network warning always goes to stderr.
        example: the text the page shows and explains when it opens; None: an empty box.
        long: a :class:`~attnkit.viz.long.LongDocument` of ``model`` to serve at ``/long``, its zoom
            computing exact weights on request; None: none.

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
    host, port = _check_options(host, port, max_tokens, max_body, log)
    max_connections = require_int("max_connections", max_connections, minimum=1)
    header_timeout = _check_timeout("header_timeout", header_timeout)
    body_timeout = _check_timeout("body_timeout", body_timeout)
    if example is not None and not isinstance(example, str):
        raise TypeError(f"example must be a str or None; got {describe(example)}")
    service = ExplainService(model, tokenizer, max_tokens=max_tokens, max_body=max_body, cache_size=cache_size,
                             workers=workers)
    if long is not None and long.model is not model:
        raise ValueError("long must be a LongDocument of the model this server runs; got one of another model")
    return ExplainServer(service, host=host, port=port, max_connections=max_connections,
                         header_timeout=header_timeout, body_timeout=body_timeout, log=log, example=example,
                         long=long)


def serve(model: str = "minilm", *, host: str = "127.0.0.1", port: int = 8000, max_tokens: int | None = None,
          max_body: int = 65536, header_timeout: float = 10.0, body_timeout: float = 20.0,
          log: Callable[[str], None] | None = _stderr, long: str | os.PathLike | None = None,
          progress: Callable[[], contextlib.AbstractContextManager[Callable[[str, int, int], None]]] | None = None,
          ) -> None:
    """Load ``model`` once, print the app's URL and serve it until Ctrl-C or SIGTERM; then stop gracefully.

    Args:
        model: a bundled model's name (``"minilm"``) or a local Hugging Face model folder,
            as for :func:`attnkit.models.load`.
        host, port, max_tokens, max_body, header_timeout, body_timeout, log: as for
            :func:`make_server`; the arguments are checked before the model is loaded.
        long: a UTF-8 text file: its statistics are computed once, before serving, and the long
            explorer is served at ``/long`` (:class:`~attnkit.viz.long.LongDocument`). The explorer at
            ``/`` then reads at most 2,048 tokens unless ``max_tokens`` says otherwise: it stores full maps,
            which a long model's own limit (32K) would not bound.
        progress: a context manager factory (such as :meth:`attnkit.cli._common.Console.progress`) that
            yields ``progress(description, done, total)``, entered while they are computed; or None.
    """
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be 'minilm' or a local model folder (str or path); got {describe(model)}")
    _check_options(host, port, max_tokens, max_body, log)
    header_timeout = _check_timeout("header_timeout", header_timeout)
    body_timeout = _check_timeout("body_timeout", body_timeout)
    from attnkit import models
    from attnkit.viz.long import LongDocument, read_text

    text = None if long is None else read_text(long)
    loaded, tokenizer = models.load(model)
    document = None
    if text is not None:
        with progress() if progress is not None else contextlib.nullcontext() as step:
            document = LongDocument(loaded, tokenizer, text, progress=step)
    if document is not None and max_tokens is None:
        window = max_positions(loaded, unstated=None)
        max_tokens = _LONG_SHORT_LIMIT if window is None else min(window, _LONG_SHORT_LIMIT)
    server = make_server(loaded, tokenizer, host=host, port=port, max_tokens=max_tokens, max_body=max_body,
                         header_timeout=header_timeout, body_timeout=body_timeout, log=log, long=document)
    print(f"attnkit serve: {server.model_name} ({server.layers} layers x {server.heads} heads, up to "
          f"{server.max_tokens} tokens) at {server.url}  (Ctrl-C stops)", flush=True)
    if document is not None:
        print(f"attnkit serve: the long document ({document.length:,} tokens) at {server.url}long", flush=True)
    installed, previous = False, None
    # uvicorn stops gracefully on SIGINT and SIGTERM, then raises the signal again with the
    # handlers from before: make that SIGTERM a KeyboardInterrupt too, so both end here.
    if threading.current_thread() is threading.main_thread():
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
