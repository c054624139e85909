"""``attnkit serve`` (attnkit.viz.server over attnkit.viz.service): real HTTP to real uvicorn servers.

Two kinds of server, both on a free loopback port:

- ``served``: the bundled MiniLM in this process (a background thread), so that tests can
  compare its answers with ``capture`` of the same model and swap its capture for a
  broken or slow one;
- ``tiny``: a separate ``python`` process serving a small random BERT (the MiniLM
  tokenizer, 64 positions), with its stderr (the log) in a file: the probes, the load,
  the slow clients and the memory tests. ``minilm_process`` is the same with MiniLM, for
  the slow tier's figures.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from attnkit import models
from attnkit.inspect import capture
from attnkit.viz import server as server_module
from attnkit.viz.encode import QUANTUM, decode
from attnkit.viz.server import DEFAULT_EXAMPLE, make_server, serve
from attnkit.viz.service import ExplainRequest, ExplainService, RequestError

from conftest import assert_canvas_drawn

XSS_TEXT = "Hi <img src=x onerror=window.__pwned=1> and </script><script>window.__pwned=2</script> & bye"
SECURITY_HEADERS = {
    "Content-Security-Policy": server_module.CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
ANIMALS = ["cat", "dog", "owl", "fox", "cow", "bee", "elk", "ant", "bat", "yak"]


def distinct_text(i: int) -> str:
    return f"Request {i}: the {ANIMALS[i % 10]} chased {i} red balls."


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


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A random 2-layer BERT (hidden 32, 2 heads, 64 positions) with MiniLM's tokenizer, as a model folder."""
    import torch
    import transformers

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(folder, safe_serialization=True)
    bundled = models.path("minilm")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(bundled / name, folder / name)
    return folder


_PROCESS = """
import sys
from attnkit import models
from attnkit.viz.server import make_server
model, tokenizer = models.load(sys.argv[1])
server = make_server(model, tokenizer, port=0, header_timeout=float(sys.argv[2]), body_timeout=float(sys.argv[2]),
                     example=None)
print(server.url, flush=True)
server.serve_forever()
"""


@dataclass
class Process:
    process: subprocess.Popen
    url: str
    log_path: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].strip("/"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def start_process(model: str, log_path: Path, timeout: float) -> Process:
    """``make_server`` in a new python process, serving until SIGTERM; its stderr goes to ``log_path``."""
    log = log_path.open("w")
    process = subprocess.Popen([sys.executable, "-c", _PROCESS, model, str(timeout)], stdout=subprocess.PIPE,
                               stderr=log, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    log.close()
    line = process.stdout.readline()
    if not line.startswith("http://127.0.0.1:"):
        process.kill()
        raise AssertionError(f"the server did not start: {line!r}; log: {log_path.read_text()}")
    return Process(process, line.strip(), log_path)


def stop_process(served: Process) -> None:
    """SIGTERM: uvicorn stops gracefully, then the signal's default action ends the process."""
    served.process.send_signal(signal.SIGTERM)
    try:
        served.process.wait(timeout=20)
    finally:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait()
    assert served.process.returncode == -signal.SIGTERM, served.log()
    assert "Traceback" not in served.log(), served.log()


@pytest.fixture(scope="module")
def tiny(tiny_folder, tmp_path_factory):
    served = start_process(str(tiny_folder), tmp_path_factory.mktemp("tiny-log") / "serve.log", timeout=2)
    yield served
    stop_process(served)


@pytest.fixture(scope="module")
def patient(tiny_folder, tmp_path_factory):
    """The tiny model behind header and body deadlines of 8 s: a wide margin over the milliseconds a request
    takes, so that a busy machine does not cut clients off before a test has looked at them."""
    served = start_process(str(tiny_folder), tmp_path_factory.mktemp("patient-log") / "serve.log", timeout=8)
    yield served
    stop_process(served)


@pytest.fixture(scope="module")
def minilm_process(tmp_path_factory):
    served = start_process("minilm", tmp_path_factory.mktemp("minilm-log") / "serve.log", timeout=10)
    yield served
    stop_process(served)


def call(served: Served | Process, path: str, body: object = None, *, method: str | None = None,
         headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request; a dict or list body is sent as JSON, bytes as they are."""
    sent = {"Content-Type": "application/json"} if body is not None else {}
    sent.update(headers or {})
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    origin = served.origin if isinstance(served, Served) else served.url.rstrip("/")
    request = urllib.request.Request(origin + path, data=data, headers=sent, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def raw(port: int, data: bytes, *, timeout: float = 10) -> bytes:
    """Send ``data`` as it is on a new connection; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(data)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer


def parse_raw(answer: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    return status, {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}, body


def error_of(status_headers_body: tuple[int, dict[str, str], bytes]) -> tuple[int, str]:
    status, headers, body = status_headers_body
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    for name, value in SECURITY_HEADERS.items():
        assert headers[name] == value, name
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
    assert json.loads(body) == {"model": "sentence-transformers/all-MiniLM-L6-v2", "kind": "encoder",
                                "max_tokens": 512, "max_generate": 0, "max_body": 65536, "layers": 6, "heads": 12}

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
    opened = explain(served, "The dog barked at the mailman.")  # the cached payload is not changed
    assert opened["focus"] is not None and opened["view_reason"] and len(opened["view"]["heads"]) == 1
    other = 3 if opened["focus"] != 3 else 2  # another query than the one the page opens on
    assert explain(served, "The dog barked at the mailman.", focus=other)["view"] is None  # no head chosen for another
    assert explain(served, "The dog barked at the mailman.", focus=opened["focus"])["view"] == opened["view"]
    status, message = error_of(call(served, "/api/explain", {"text": "The dog barked.", "focus": "cat"}))
    assert status == 400 and "'cat'" in message and "dog" in message


def test_serve_opens_on_one_query_and_its_most_specific_head(served):
    payload = explain(served, DEFAULT_EXAMPLE)
    attn = capture(served.model, DEFAULT_EXAMPLE, tokenizer=served.tokenizer).attentions[0].double()
    tokens = payload["tokens"]
    n = len(tokens)
    special = {0, n - 1}  # [CLS], [SEP]
    # Every (query, layer, head, key): the query's weight minus the key's column mean, keys more than 2 tokens
    # away and not special; the page opens on the largest, computed here by loops.
    best = max((float(attn[lay, hd, q, j]) - float(attn[lay, hd, :, j].mean()), q, lay, hd)
               for q in range(n) if q not in special for lay in range(6) for hd in range(12)
               for j in range(n) if abs(q - j) > 2 and j not in special)
    _, q, layer, head = best
    assert payload["focus"] == q and payload["view"] == {"layer": layer, "heads": [head]}
    assert payload["view_reason"].startswith(f"Opened on layer {layer} head {head}, query '{tokens[q]}'")


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
    # starlette's TrustedHostMiddleware refuses another Host (DNS rebinding) with 400, as JSON here
    status, message = error_of(call(served, "/api/info", headers={"Host": f"evil.example:{port}"}))
    assert status == 400 and "host" in message
    status, message = error_of(call(served, "/api/info", headers={"Host": f"127.0.0.1.evil.example:{port}"}))
    assert status == 400
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

    monkeypatch.setattr(served.server.service, "_capture", broken)
    status, message = error_of(call(served, "/api/explain", {"text": "A text that is not cached yet."}))
    assert status == 500 and "RuntimeError" in message and "fell over" not in message
    deadline = time.monotonic() + 5  # the server logs the traceback, then the access line, once it has answered
    while '"POST /api/explain" 500' not in "\n".join(served.logs) and time.monotonic() < deadline:
        time.sleep(0.05)
    logged = "\n".join(served.logs)
    assert "Traceback" in logged and "the model fell over" in logged
    assert '"POST /api/explain" 500' in logged


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
    with pytest.raises(ValueError, match="max_connections must be >= 1; got 0"):
        make_server(model, tok, port=0, max_connections=0)
    with pytest.raises(ValueError, match=r"header_timeout must be > 0 seconds; got 0\.0"):
        make_server(model, tok, port=0, header_timeout=0)
    with pytest.raises(TypeError, match="body_timeout must be a real number; got str"):
        make_server(model, tok, port=0, body_timeout="5")
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
        # bound to every interface: the machine's names and addresses, never another name
        assert {"localhost", "127.0.0.1", "[::1]", socket.gethostname().lower()} <= set(quiet.allowed_hosts)
        assert "evil.example" not in quiet.allowed_hosts
    finally:
        quiet.server_close()
    local = make_server(served.model, served.tokenizer, port=0, log=None, max_tokens=64)
    try:
        assert not local.warnings and "reachable" not in capsys.readouterr().err
        assert local.max_tokens == 64 and local.allowed_hosts == ["127.0.0.1", "[::1]", "localhost"]
    finally:
        local.server_close()


def test_cache_is_bounded(served):
    small = ExplainService(served.model, served.tokenizer, cache_size=2)  # no socket: the service alone
    hits = [small.explain(text)[1] for text in ["one fish", "two fish", "one fish", "red fish", "two fish"]]
    assert hits == [False, False, True, False, False]  # "two fish" was the least recently used


@pytest.mark.parametrize("stop", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_serve_until_interrupted(stop, tiny_folder):
    """``serve`` as the CLI runs it: loads the model, prints the URL, stops cleanly on Ctrl-C or kill,
    while a client holds a connection with half its headers sent."""
    process = subprocess.Popen(
        # Ctrl-C's handler set explicitly: a process started from a background job inherits SIGINT ignored.
        [sys.executable, "-c", "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                               "from attnkit.viz.server import serve; "
                               "serve(sys.argv[1], port=0, header_timeout=600, log=None)",
         str(tiny_folder)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        line = process.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert url, f"no URL in {line!r}; stderr: {process.stderr.read() if process.poll() is not None else ''}"
        with urllib.request.urlopen(url.group(0) + "healthz", timeout=10) as response:
            assert response.read() == b"ok"
        port = int(url.group(0).rsplit(":", 1)[1].strip("/"))
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.sendall(b"GET / HTTP/1.1\r\nHost: 127.")
        process.send_signal(stop)
        # The held connection has 600 s to finish its headers: a server that waited for it would not stop
        # within the 120 s allowed here (the bound is loose so that a loaded machine cannot fail it).
        out, err = process.communicate(timeout=120)
        held.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "stopped" in out and "Traceback" not in err


# -- the service alone (no sockets) ----------------------------------------------------------------


def test_service_parse_rules(served):
    service = served.server.service
    assert service.parse(b'{"text": "a b", "focus": 2}', "application/json; charset=utf-8") == ExplainRequest("a b", 2)
    for body, content_type, status, words in [
        (b"x" * 65537, "application/json", 413, "65,536"),
        (b'{"text": "a"}', "text/plain", 415, "application/json"),
        (b'{"text": "a"}', "", 415, "no Content-Type"),
        (b'{"text": true}', "application/json", 400, "got a JSON boolean"),
        (b'{"text": "a", "focus": false}', "application/json", 400, "focus"),
        (b'{"text": "a", "focus": 1.5}', "application/json", 400, "got a JSON number"),
        (b'{"text": "a", "target": "b"}', "application/json", 400, '"target" needs an encoder-decoder'),
        (b'{"text": "a", "generate": 3}', "application/json", 400, '"generate" needs a model that generates'),
    ]:
        with pytest.raises(RequestError) as refused:
            service.parse(body, content_type)
        assert refused.value.status == status and words in refused.value.message, refused.value.message
    with pytest.raises(RequestError) as refused:
        service.explain("The dog barked.", focus="#9")
    assert refused.value.status == 400 and "#9" in refused.value.message
    with pytest.raises(ValueError, match=r"max_tokens must be at most 512.*got 513"):
        ExplainService(served.model, served.tokenizer, max_tokens=513)


# -- a separate server process: probes, load, slow clients, memory ---------------------------------


def test_probes_get_their_4xx_and_no_traceback(tiny):
    """What probes sent to the http.server version, and the documented refusals, on raw connections."""
    port = tiny.port
    host = f"Host: 127.0.0.1:{port}\r\n".encode()
    json_post = b"POST /api/explain HTTP/1.1\r\n" + host + b"Content-Type: application/json\r\n"

    def refusal(data: bytes, status: int) -> str:
        line, headers, body = parse_raw(raw(port, data))
        assert line.startswith(f"HTTP/1.1 {status} "), (data[:80], line, body)
        assert headers["content-type"] == "application/json; charset=utf-8"
        for name, value in SECURITY_HEADERS.items():
            assert headers[name.lower()] == value, (data[:80], name)
        return json.loads(body)["error"]

    # Content-Length: ² (str.isdigit() said yes, int() said no: a 500 before) and one past int()'s digit limit
    refusal(json_post + b"Content-Length: \xb2\r\n\r\n", 400)
    refusal(json_post + b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n", 400)
    # a request line, or headers, that HTTP/1.1 does not allow
    refusal(b"GET / HTTP/1.1 junk\r\n" + host + b"\r\n", 400)
    refusal(b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n", 400)
    refusal(b"GET / HTTP/1.1\r\n" + host + b"X-Big: " + b"a" * 20_000, 400)  # 16 KiB and the headers go on
    # HTTP/2.0 in the request line: answered in HTTP/1.1, with the security headers (not an HTTP/0.9 body)
    line, headers, body = parse_raw(raw(port, b"GET /healthz HTTP/2.0\r\n" + host + b"Connection: close\r\n\r\n"))
    assert line == "HTTP/1.1 200 OK" and body == b"ok" and headers["x-frame-options"] == "DENY"

    close = b"Connection: close\r\n"
    assert "chunked" in refusal(json_post + close + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411)
    assert "Content-Length" in refusal(json_post + close + b"\r\n", 411)
    assert "65,536" in refusal(json_post + b"Content-Length: 70000\r\n\r\n" + b"x" * 70_000, 413)
    body = json.dumps({"text": "word " * 100}).encode()
    message = refusal(json_post + close + b"Content-Length: %d\r\n\r\n" % len(body) + body, 413)
    assert "102 tokens" in message and "at most 64" in message
    # a body that stops half-way: 408 after body_timeout (2 s here)
    assert "within 2 s" in refusal(json_post + b"Content-Length: 20\r\n\r\n{\"te", 408)
    assert "/api/info takes GET" in refusal(b"PUT /api/info HTTP/1.1\r\n" + host + close + b"\r\n", 405)
    refusal(b"GET /api/info HTTP/1.1\r\nHost: evil.example\r\n" + close + b"\r\n", 400)
    refusal(b"GET /api/info HTTP/1.0\r\n\r\n", 400)  # no Host at all

    # a body nobody reads (a GET's), trickled after the answer: cut off at the header deadline too
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\n" + host + b"Content-Length: 1000\r\n\r\n")
        start = time.monotonic()
        assert connection.recv(4096).startswith(b"HTTP/1.1 200 ")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while time.monotonic() - start < 6:
                connection.sendall(b"x")
                time.sleep(0.2)
        assert time.monotonic() - start < 4  # closed after 2 s (the send fails once the server has closed)

    # clients that leave before their answer is written
    baseline = _socket_count(tiny)
    for data in (json_post + b"Content-Length: 9\r\n\r\n{not json", json_post + b"Content-Length: 99999999\r\n\r\n",
                 json_post + b"Content-Length: 40\r\n\r\n{\"text\":"):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            connection.sendall(data)  # then a reset, not a clean close
    assert call(tiny, "/healthz")[0] == 200
    # polled: the server holds no more sockets than before once it has handled and closed each reset connection
    assert _poll(lambda: _socket_count(tiny), lambda n: n <= baseline) <= baseline, "reset connections stay open"
    log = tiny.log()
    assert "Traceback" not in log and "Exception" not in log, log


def _poll(fn, done, deadline: float = 30.0):
    """Call ``fn`` until ``done(result)`` or the deadline; the last result."""
    end = time.monotonic() + deadline
    while True:
        result = fn()
        if done(result) or time.monotonic() > end:
            return result
        time.sleep(0.02)


def _socket_count(served: Process) -> int:
    """How many sockets the server process holds open (its listening socket and its connections)."""
    fds = Path(f"/proc/{served.process.pid}/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):  # closed while listed
            count += os.readlink(fd).startswith("socket:")
    return count


def load(served: Process, clients: int, requests: int, offset: int) -> tuple[list[float], list[str]]:
    """``clients`` threads, each sending ``requests`` explain requests of distinct texts: latencies and errors."""
    def client(n: int) -> tuple[list[float], list[str]]:
        times, errors = [], []
        for r in range(requests):
            text = distinct_text(offset + n * requests + r)
            start = time.perf_counter()
            status, _, body = call(served, "/api/explain", {"text": text}, timeout=120)
            times.append(time.perf_counter() - start)
            if status != 200 or json.loads(body)["title"] != text:
                errors.append(f"{status} {body[:200]!r}")
        return times, errors

    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(client, range(clients)))
    return [t for times, _ in results for t in times], [e for _, errors in results for e in errors]


def summary(times: list[float], seconds: float) -> str:
    cuts = statistics.quantiles(times, n=20)
    return (f"{len(times)} requests in {seconds:.1f} s: p50 {statistics.median(times) * 1000:.0f} ms, "
            f"p95 {cuts[18] * 1000:.0f} ms")


def report(request, line: str) -> None:
    """Show ``line`` in pytest's output, captured or not."""
    plugins = request.config.pluginmanager
    with plugins.get_plugin("capturemanager").global_and_fixture_disabled():
        plugins.get_plugin("terminalreporter").write_line(f"\n{line}")


def test_concurrent_clients(tiny):
    times, errors = load(tiny, clients=4, requests=2, offset=0)
    assert not errors and len(times) == 8, errors


@pytest.mark.slow
def test_concurrent_clients_at_scale(minilm_process, request):
    """20 clients x 10 requests of distinct texts against MiniLM: no error; the latencies are reported."""
    start = time.perf_counter()
    times, errors = load(minilm_process, clients=20, requests=10, offset=1000)
    figures = summary(times, time.perf_counter() - start)
    report(request, f"attnkit serve, MiniLM, 20 clients x 10 requests: {figures}")
    assert not errors and len(times) == 200, (errors[:5], figures)
    assert "Traceback" not in minilm_process.log()


def slow_clients(served: Process, count: int, timeout: float) -> None:
    """``count`` clients trickling their headers a byte at a time while one normal request is answered
    before any of them is let go; then each is cut off once its header deadline (``timeout`` s) has passed."""
    held = []
    for _ in range(count):
        connection = socket.create_connection(("127.0.0.1", served.port), timeout=10)
        connection.sendall(b"POST /api/explain HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        held.append(connection)
    opened = time.monotonic()
    try:
        for connection in held:
            connection.sendall(b"a")
        status, _, _ = call(served, "/api/explain", {"text": "A normal request among slow ones."}, timeout=5)
        assert status == 200
        for connection in held:  # answered while every slow client still holds its connection, not after
            connection.setblocking(False)
            with pytest.raises(BlockingIOError):
                connection.recv(1024)
            connection.setblocking(True)
        assert call(served, "/healthz", timeout=5)[0] == 200
        time.sleep(max(0.0, timeout + 1 - (time.monotonic() - opened)))
        for connection in held:
            connection.settimeout(5)
            with contextlib.suppress(ConnectionResetError):  # closed by the server, no answer
                assert connection.recv(1024) == b""
    finally:
        for connection in held:
            connection.close()
    assert "Traceback" not in served.log()


def test_slow_clients(patient):
    slow_clients(patient, 10, timeout=8)


@pytest.mark.slow
def test_slow_clients_at_scale(patient):
    slow_clients(patient, 100, timeout=8)


def memory(served: Process, texts: int) -> tuple[float, float]:
    """RSS (MiB) after the first quarter of ``texts`` distinct texts and after all of them."""
    for i in range(texts // 4):
        assert call(served, "/api/explain", {"text": distinct_text(10_000 + i)})[0] == 200
    warm = served.rss_mib()
    for i in range(texts // 4, texts):
        assert call(served, "/api/explain", {"text": distinct_text(10_000 + i)})[0] == 200
    return warm, served.rss_mib()


def test_memory_is_flat(tiny):
    warm, after = memory(tiny, 60)
    assert after - warm < 20, f"RSS grew from {warm:.1f} MiB to {after:.1f} MiB over 45 distinct texts"


@pytest.mark.slow
def test_memory_is_flat_at_scale(minilm_process, request):
    warm, after = memory(minilm_process, 200)
    report(request, f"attnkit serve, MiniLM: RSS {warm:.1f} MiB after 50 distinct texts, {after:.1f} MiB after 200")
    assert after - warm < 40, f"RSS grew from {warm:.1f} MiB to {after:.1f} MiB over 150 distinct texts"


def test_a_uvicorn_without_the_members_the_header_deadline_needs_still_serves(monkeypatch):
    """uvicorn has no public header deadline; where its h11 protocol changes, serve says so and uses uvicorn's own."""
    import attnkit.viz.server as server_module

    said = []
    assert issubclass(server_module._protocol(3.0, said.append), server_module._Protocol) and not said
    monkeypatch.delattr(server_module.H11Protocol, "on_response_complete")
    assert server_module._protocol(3.0, said.append) == "h11"
    assert "has no on_response_complete: serving without a header deadline" in said[0]


def test_connection_cap(tiny_folder):
    """Past ``max_connections`` uvicorn answers 503 at once (with the security headers), and serves again after."""
    model, tokenizer = models.load(tiny_folder)
    capped = make_server(model, tokenizer, port=0, log=None, max_connections=3, example=None)
    thread = threading.Thread(target=capped.serve_forever, daemon=True)
    thread.start()
    try:
        idle = [socket.create_connection(("127.0.0.1", capped.port), timeout=5) for _ in range(3)]

        def probe() -> tuple[str, dict]:
            line, headers, _ = parse_raw(raw(capped.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
            return line, headers

        # polled: the server counts the idle connections once its event loop has accepted them
        line, headers = _poll(probe, lambda answer: answer[0].startswith("HTTP/1.1 503"))
        assert line.startswith("HTTP/1.1 503") and headers["x-frame-options"] == "DENY"
        for connection in idle:
            connection.close()
        line, _ = _poll(probe, lambda answer: answer[0].startswith("HTTP/1.1 200"))
        assert line.startswith("HTTP/1.1 200")
    finally:
        capped.shutdown()
        capped.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()


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
    opened = page.evaluate("attnkitApp.explorer.state()")  # one query and one head, not every head's tangle
    assert opened["focus"] is not None and len(opened["heads"]) == 1
    assert page.text_content("#akx-app-explorer [data-role=why]").startswith("Opened on layer")

    # Shift+Enter is a new line, not a request
    page.fill("#aks-text", "first line")
    page.press("#aks-text", "Shift+Enter")
    assert page.input_value("#aks-text") == "first line\n"
    assert page.get_attribute("#aks-app", "data-status") == "ready"

    # the busy indicator, while the model runs
    release = threading.Event()
    real = served.server.service._capture

    def slow(*args, **kwargs):
        release.wait(20)
        return real(*args, **kwargs)

    monkeypatch.setattr(served.server.service, "_capture", slow)
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
    assert_canvas_drawn(page, "#akx-app-explorer canvas[data-view=head]")  # drawn, not a blank canvas
    assert "tokens" in page.text_content("#aks-busy")
    watch.assert_clean()
    watch.shot("serve-explorer")

    page.click("[data-app-tab=lab]")
    page.wait_for_selector("#akl-app-lab .akl-root")
    assert page.is_hidden("[data-app-pane=explorer]")
    assert page.evaluate("attnkitApp.lab.state().tokens") == XSS_TEXT.split()[:12]  # the typed text's words
    assert page.evaluate("document.querySelectorAll('img').length") == 0
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
