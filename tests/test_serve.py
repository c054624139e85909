"""``attnkit serve`` (attnkit.viz.server): real HTTP against a real MiniLM, and the page in a browser.

One server, on a free port in a background thread, serves the whole module. Its answers
are checked against attnkit directly: the explorer payload's tokens against the
tokenizer's, its maps against ``capture`` of the same model on the same text.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from attnkit import models
from attnkit.inspect import capture
from attnkit.viz import server as server_module
from attnkit.viz.encode import QUANTUM, decode
from attnkit.viz.lab import DEFAULT_TOKENS
from attnkit.viz.server import DEFAULT_EXAMPLE, make_server, serve

XSS_TEXT = "Hi <img src=x onerror=window.__pwned=1> and </script><script>window.__pwned=2</script> & bye"
SECURITY_HEADERS = {
    "Content-Security-Policy": server_module.CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass
class Served:
    server: server_module.ExplainServer
    model: object
    tokenizer: object
    logs: list[str] = field(default_factory=list)

    @property
    def origin(self) -> str:
        return self.server.url.rstrip("/")

    @property
    def port(self) -> int:
        return self.server.port


@pytest.fixture(scope="module")
def served():
    model, tokenizer = models.load("minilm")
    logs: list[str] = []
    server = make_server(model, tokenizer, port=0, log=logs.append)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Served(server, model, tokenizer, logs)
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    assert not thread.is_alive()


def call(served: Served, path: str, body: object = None, *, method: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request; a dict or list body is sent as JSON, bytes as they are."""
    sent = {"Content-Type": "application/json"} if body is not None else {}
    sent.update(headers or {})
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    request = urllib.request.Request(served.origin + path, data=data, headers=sent, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def error_of(status_headers_body: tuple[int, dict[str, str], bytes]) -> tuple[int, str]:
    status, headers, body = status_headers_body
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    message = json.loads(body)["error"]
    assert isinstance(message, str) and "Traceback" not in message
    return status, message


def explain(served: Served, text: str, **extra: object) -> dict:
    status, headers, body = call(served, "/api/explain", {"text": text, **extra})
    assert status == 200, body
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    return json.loads(body)


# -- HTTP, end to end ------------------------------------------------------------------------------


def test_explain_matches_capture(served):
    payload = explain(served, DEFAULT_EXAMPLE)
    tok = served.tokenizer
    assert payload["tokens"] == tok.convert_ids_to_tokens(tok(DEFAULT_EXAMPLE)["input_ids"])
    assert payload["title"] == DEFAULT_EXAMPLE
    assert payload["model"] == "sentence-transformers/all-MiniLM-L6-v2"

    maps = capture(served.model, DEFAULT_EXAMPLE, tokenizer=tok)
    reference = maps.attentions[0].double()  # (layers, heads, L, L)
    n_layers, n_heads, length, _ = reference.shape
    assert (payload["layers"], payload["heads"]) == (list(range(n_layers)), list(range(n_heads)))
    encoding = payload["encoding"]
    assert encoding["blocks"] == 0, "a short text keeps every peak that matters, with no background"
    decoded = decode(encoding).double()
    assert decoded.shape == (n_layers * n_heads + n_layers, length, length)  # head maps, then rollout per layer
    heads = decoded[: n_layers * n_heads].reshape(n_layers, n_heads, length, length)
    kept = heads > 0
    assert kept.float().mean() > 0.5
    assert float((heads - reference)[kept].abs().max()) <= QUANTUM + 1e-6
    left_out = reference[~kept]
    assert left_out.numel() == 0 or float(left_out.max()) <= encoding["tolerance"]  # only small entries
    row_gap = (heads.sum(-1) - reference.sum(-1)).abs().max()
    assert float(row_gap) <= encoding["tolerance"] + length * QUANTUM / 2


def test_routes_status_and_headers(served):
    status, headers, body = call(served, "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    page = body.decode()
    assert "connect-src &#x27;self&#x27;" in page and "://" not in page
    assert 'id="akx-app-explorer"' in page and 'id="attnkit-explorer"' not in page
    for name, value in SECURITY_HEADERS.items():
        assert headers[name] == value

    status, headers, body = call(served, "/api/info")
    assert status == 200 and headers["Content-Type"] == "application/json; charset=utf-8"
    assert json.loads(body) == {"model": "sentence-transformers/all-MiniLM-L6-v2", "max_tokens": 512,
                                "max_body": 65536, "layers": 6, "heads": 12}

    status, headers, body = call(served, "/healthz")
    assert (status, body) == (200, b"ok")
    status, headers, body = call(served, "/", method="HEAD")
    assert (status, body) == (200, b"") and int(headers["Content-Length"]) == len(page.encode())
    assert headers["X-Content-Type-Options"] == "nosniff"

    status, message = error_of(call(served, "/nope?x=1"))
    assert status == 404 and "/nope" in message

    answer = call(served, "/api/explain")  # GET
    assert answer[1]["Allow"] == "POST"
    for name, value in SECURITY_HEADERS.items():
        assert answer[1][name] == value
    status, message = error_of(answer)
    assert status == 405 and "POST" in message
    status, message = error_of(call(served, "/api/info", {"text": "a"}))
    assert status == 405
    status, message = error_of(call(served, "/", method="DELETE"))
    assert status == 405


def test_cache_and_focus(served):
    call(served, "/api/explain", {"text": "The dog barked at the mailman."})
    status, headers, _ = call(served, "/api/explain", {"text": "The dog barked at the mailman."})
    assert status == 200 and headers["X-Attnkit-Cache"] == "hit"
    payload = explain(served, "The dog barked at the mailman.", focus="dog")
    assert payload["tokens"][payload["focus"]] == "dog"
    assert explain(served, "The dog barked at the mailman.", focus=3)["focus"] == 3
    assert explain(served, "The dog barked at the mailman.")["focus"] is None  # the cached payload is not changed
    status, message = error_of(call(served, "/api/explain", {"text": "The dog barked.", "focus": "cat"}))
    assert status == 400 and "'cat'" in message and "dog" in message


# -- refusals --------------------------------------------------------------------------------------


def test_too_many_tokens(served):
    status, message = error_of(call(served, "/api/explain", {"text": "word " * 2000}))
    assert status == 413
    assert "2,002 tokens" in message and "at most 512" in message


def test_body_over_max_body(served):
    status, message = error_of(call(served, "/api/explain", {"text": "a" * 70_000}))
    assert status == 413 and "65,536" in message and "max_body" in message


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "JSON"),
    (b"\xff\xfe", 400, "UTF-8"),
    ([1, 2], 400, "object"),
    ({"focus": "cat"}, 400, '"text"'),
    ({"text": 5}, 400, "string"),
    ({"text": None}, 400, "string"),
    ({"text": "  \n "}, 400, "empty"),
    ({"text": "\u200b"}, 400, "special"),  # a zero-width space: no token but [CLS] and [SEP]
    ({"text": "a", "colour": "red"}, 400, "'colour'"),
    ({"text": "a", "focus": [1]}, 400, "focus"),
    (b'{"text": "hi \\ud800"}', 400, "surrogate"),
    (b"[" * 30000, 400, "nested"),
    (b'{"text": "hi", "focus": 1' + b"0" * 5000 + b"}", 400, "JSON"),  # past Python's int digit limit
])
def test_bad_requests(served, body, status, words):
    got, message = error_of(call(served, "/api/explain", body))
    assert got == status and words in message


def test_wrong_content_type_and_length(served):
    status, message = error_of(call(served, "/api/explain", b'{"text": "a"}', headers={"Content-Type": "text/plain"}))
    assert status == 415 and "application/json" in message
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
    connection.putrequest("POST", "/api/explain")
    connection.putheader("Content-Type", "application/json")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]
    connection.close()


def test_host_and_origin_guards(served):
    port = served.port
    status, message = error_of(call(served, "/api/info", headers={"Host": f"evil.example:{port}"}))
    assert status == 403 and "evil.example" in message
    assert call(served, "/api/info", headers={"Host": f"localhost:{port}"})[0] == 200
    assert call(served, "/api/info", headers={"Host": f"127.0.0.1:{port}"})[0] == 200

    body = {"text": DEFAULT_EXAMPLE}
    status, message = error_of(call(served, "/api/explain", body, headers={"Origin": "http://evil.example"}))
    assert status == 403 and "evil.example" in message
    status, _ = error_of(call(served, "/api/explain", body, headers={"Origin": "null"}))
    assert status == 403
    assert call(served, "/api/explain", body, headers={"Origin": served.origin})[0] == 200
    assert call(served, "/api/explain", body, headers={"Origin": f"http://localhost:{port}",
                                                        "Host": f"localhost:{port}"})[0] == 200


def test_internal_error_is_json_and_logged(served, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the model fell over")

    monkeypatch.setattr(served.server, "_capture", broken)
    status, message = error_of(call(served, "/api/explain", {"text": "A text that is not cached yet."}))
    assert status == 500 and "RuntimeError" in message and "fell over" not in message
    logged = "\n".join(served.logs)
    assert "Traceback" in logged and "the model fell over" in logged


def test_concurrent_requests(served):
    animals = ["cat", "dog", "owl", "fox", "cow", "bee", "elk", "ant", "bat", "yak"]
    texts = [f"Request {i}: the {animals[i % 10]} chased {i} red balls." for i in range(20)]

    def one(text: str) -> tuple[int, str, dict]:
        status, headers, body = call(served, "/api/explain", {"text": text})
        return status, headers.get("X-Attnkit-Cache", ""), json.loads(body)

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, texts))
    tok = served.tokenizer
    for text, (status, cache, payload) in zip(texts, results):
        assert (status, cache) == (200, "miss")
        assert payload["tokens"] == tok.convert_ids_to_tokens(tok(text)["input_ids"])
    # The maps are each text's own, not another request's: compare a few with a direct capture.
    for n in (0, 7, 19):
        payload = results[n][2]
        direct = capture(served.model, texts[n], tokenizer=tok).attentions[0].flatten(0, 1)
        got = decode(payload["encoding"])[: direct.shape[0]]
        kept = got > 0
        assert (got[kept] - direct[kept]).abs().max() <= QUANTUM + 1e-6


# -- the Python API --------------------------------------------------------------------------------


def test_argument_errors(served):
    model, tok = served.model, served.tokenizer
    with pytest.raises(ValueError, match=r"port must be in \[0, 65535\].*got 70000"):
        make_server(model, tok, port=70000)
    with pytest.raises(TypeError, match="port must be an int; got str '80'"):
        make_server(model, tok, port="80")
    with pytest.raises(TypeError, match=r"host must be a str.*got int 127"):
        make_server(model, tok, host=127, port=0)
    with pytest.raises(ValueError, match="host must be an address"):
        make_server(model, tok, host="", port=0)
    with pytest.raises(ValueError, match="max_tokens must be >= 1; got 0"):
        make_server(model, tok, port=0, max_tokens=0)
    with pytest.raises(ValueError, match=r"max_tokens must be at most 512.*got 1000"):
        make_server(model, tok, port=0, max_tokens=1000)
    with pytest.raises(ValueError, match="max_body must be >= 1; got 0"):
        make_server(model, tok, port=0, max_body=0)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        make_server("minilm", tok, port=0)
    with pytest.raises(TypeError, match="log must be a callable"):
        make_server(model, tok, port=0, log="stderr")
    with pytest.raises(OSError, match=f"port {served.port} on 127.0.0.1 is in use"):
        make_server(model, tok, port=served.port, log=None)
    # serve checks its arguments before it loads a model
    with pytest.raises(ValueError, match="port must be in"):
        serve(port=-1)
    with pytest.raises(TypeError, match="model must be 'minilm' or a local model folder"):
        serve(model=3)


def test_network_warning(served, capsys):
    quiet = make_server(served.model, served.tokenizer, host="0.0.0.0", port=0, log=None)
    try:
        assert "reachable from the network" in capsys.readouterr().err
        assert quiet.warnings and quiet.url.startswith("http://127.0.0.1:")
        # bound to every interface: any address of the machine may be in Host, but no other name
        assert quiet.host_allowed("192.168.1.5:8000") and quiet.host_allowed("localhost:8000")
        assert not quiet.host_allowed("evil.example:8000")
    finally:
        quiet.server_close()
    local = make_server(served.model, served.tokenizer, port=0, log=None, max_tokens=64)
    try:
        assert not local.warnings and "reachable" not in capsys.readouterr().err
        assert local.max_tokens == 64 and not local.host_allowed("192.168.1.5:8000")
    finally:
        local.server_close()


def test_cache_is_bounded(served):
    small = make_server(served.model, served.tokenizer, port=0, log=None, cache_size=2, example=None)
    try:
        hits = [small.explain(text)[1] for text in ["one fish", "two fish", "one fish", "red fish", "two fish"]]
        assert hits == [False, False, True, False, False]  # "two fish" was the least recently used
    finally:
        small.server_close()


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_serve_until_interrupted(stop):
    """``serve`` as the CLI runs it: loads the model, prints the URL, stops cleanly on Ctrl-C or kill."""
    process = subprocess.Popen(
        # Ctrl-C's handler set explicitly: a process started from a background job inherits SIGINT ignored.
        [sys.executable, "-c", "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                               "from attnkit.viz.server import serve; serve(port=0, log=None)"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = process.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert url, f"no URL in {line!r}; stderr: {process.stderr.read() if process.poll() is not None else ''}"
        with urllib.request.urlopen(url.group(0) + "healthz", timeout=10) as response:
            assert response.read() == b"ok"
        process.send_signal(stop)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "stopped" in out and "Traceback" not in err


# -- the page in a browser -------------------------------------------------------------------------


def test_page_in_browser(served, watched_page, monkeypatch):
    from playwright.sync_api import expect

    watch = watched_page(allowed=(served.origin,))
    page = watch.page
    page.goto(served.origin + "/")
    page.wait_for_selector("#aks-app[data-status=ready]", timeout=30_000)
    assert page.eval_on_selector("#akx-app-explorer .akx-title", "e => e.textContent") == DEFAULT_EXAMPLE
    meta = page.text_content("#aks-meta")
    assert "all-MiniLM-L6-v2" in meta and "512 tokens" in meta

    # Shift+Enter is a new line, not a request
    page.fill("#aks-text", "first line")
    page.press("#aks-text", "Shift+Enter")
    assert page.input_value("#aks-text") == "first line\n"
    assert page.get_attribute("#aks-app", "data-status") == "ready"

    # the busy indicator, while the model runs
    release = threading.Event()
    real = served.server._capture

    def slow(*args, **kwargs):
        release.wait(20)
        return real(*args, **kwargs)

    monkeypatch.setattr(served.server, "_capture", slow)
    page.fill("#aks-text", XSS_TEXT)
    page.press("#aks-text", "Enter")
    page.wait_for_selector("#aks-app[data-status=busy]")
    assert page.is_disabled("#aks-submit") and "Running the model" in page.text_content("#aks-busy")
    release.set()

    title = page.locator("#akx-app-explorer .akx-title")
    expect(title).to_have_text(XSS_TEXT, timeout=30_000)  # the text shows as text
    page.wait_for_selector("#aks-app[data-status=ready]")
    assert page.evaluate("window.__pwned") is None
    assert page.evaluate("document.querySelectorAll('img, #akx-app-explorer script').length") == 0
    assert page.evaluate("attnkitApp.explorer.matrices") == 6 * 12 + 6
    assert page.is_visible("#akx-app-explorer canvas[data-view=head]")
    assert "tokens" in page.text_content("#aks-busy")
    watch.assert_clean()
    watch.shot("serve-explorer")

    page.click("[data-app-tab=lab]")
    page.wait_for_selector("#akl-app-lab .akl-root")
    assert page.is_hidden("[data-app-pane=explorer]")
    assert page.evaluate("attnkitApp.lab.state().tokens") == list(DEFAULT_TOKENS)
    watch.assert_clean()
    watch.shot("serve-lab")

    page.click("[data-app-tab=explorer]")
    page.fill("#aks-text", "word " * 600)
    page.press("#aks-text", "Enter")
    page.wait_for_selector("#aks-app[data-status=error]")
    error = page.text_content("#aks-error")
    assert page.is_visible("#aks-error") and "602 tokens" in error and "at most 512" in error
    assert page.eval_on_selector("#akx-app-explorer .akx-title", "e => e.textContent") == XSS_TEXT  # kept
    assert not watch.external
    # the browser itself reports the refused request; nothing else may be logged
    assert all("status of 413" in e for e in watch.errors), watch.errors
