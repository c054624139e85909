"""``attnkit serve`` for encoder-decoders (a target field, the seq2seq views) and for models that
generate (a "generate N tokens" field, the generation view).

The service is called without sockets and its payloads are decoded and compared with
``capture`` / ``capture_generation`` run here, and with a plain greedy ``generate``; the
refusals are checked by status and by the field they name; a tiny BART is served on a free
loopback port and driven by a real chromium.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch

from attnkit.inspect import capture, capture_generation
from attnkit.viz.encode import QUANTUM, decode
from attnkit.viz.server import make_server
from attnkit.viz.service import ExplainService, RequestError
from tiny_seq_models import WORDS, bart, gpt2, word_tokenizer

SOURCE, TARGET = "the bank of the river", "la rive du fleuve"
XSS = "<img src=x onerror=window.__pwned=1> </script><script>window.__pwned=2</script> &amp;"


@pytest.fixture(scope="module")
def bart_service(one_thread):
    model, tokenizer = bart()
    return ExplainService(model, tokenizer)


@pytest.fixture(scope="module")
def gpt2_service(one_thread):
    model, tokenizer = gpt2()
    return ExplainService(model, tokenizer)


def assert_maps_equal(encoding: dict, reference: torch.Tensor) -> None:
    """The first layers*heads matrices of ``encoding`` are ``reference`` (layers, heads, Lq, Lk), within
    the encoding's quantum; entries it left out are below its tolerance."""
    layers, heads, lq, lk = reference.shape
    got = decode(encoding).double()[: layers * heads].reshape(layers, heads, lq, lk)
    reference = reference.double()
    kept = got > 0
    assert float((got - reference)[kept].abs().max()) <= QUANTUM + 1e-6
    left_out = reference[~kept]
    assert left_out.numel() == 0 or float(left_out.max()) <= encoding["tolerance"]


def request(service: ExplainService, **body: object) -> tuple[dict, bool]:
    asked = service.parse(json.dumps(body).encode(), "application/json")
    return service.explain(asked.text, asked.focus, target=asked.target, generate=asked.generate)


# -- the service, without sockets ------------------------------------------------------------------


def test_seq2seq_payload_is_the_capture_of_source_and_target(bart_service):
    service = bart_service
    assert service.info()["kind"] == "encoder-decoder" and service.max_generate == 63  # 64 positions, less the start
    payload, hit = request(service, text=SOURCE, target=TARGET)
    assert payload["kind"] == "seq2seq" and not hit
    maps = capture(service.model, SOURCE, target=TARGET, tokenizer=service.tokenizer)
    tok = service.tokenizer
    assert payload["source"] == tok.convert_ids_to_tokens(tok(SOURCE)["input_ids"])
    assert payload["target"] == ["<s>", *tok.convert_ids_to_tokens(tok(text_target=TARGET)["input_ids"])]
    assert payload["title"] == f"{SOURCE} → {TARGET}"
    cross = payload["parts"]["cross"]
    assert (cross["tokens"], cross["key_tokens"]) == (payload["target"], payload["source"])
    for name in ("cross", "encoder", "decoder"):
        assert_maps_equal(payload["parts"][name]["encoding"], getattr(maps, name).attentions[0])
    assert request(service, text=SOURCE, target=TARGET)[1]  # the second time, from the cache
    other, hit = request(service, text=SOURCE, target="la banque")  # the cache key holds the target
    assert not hit and other["target"] != payload["target"]


def test_seq2seq_without_a_target_reads_the_models_greedy_output(bart_service):
    service = bart_service
    payload, _ = request(service, text=SOURCE, target="  ")  # blank: the model writes the target
    tok, model = service.tokenizer, service.model
    with torch.no_grad():
        source = tok(SOURCE, return_tensors="pt", return_token_type_ids=False)  # BART takes none
        ids = model.generate(**source, max_new_tokens=63, do_sample=False, num_beams=1)[0]
    assert len(ids) <= service.max_tokens
    assert payload["target"] == tok.convert_ids_to_tokens(ids.tolist())
    maps = capture(model, SOURCE, target=ids, tokenizer=tok)
    assert_maps_equal(payload["parts"]["cross"]["encoding"], maps.cross.attentions[0])
    assert request(service, text=SOURCE)[1]  # no target and a blank one are the same request


def test_generation_payload_is_capture_generation(gpt2_service):
    service = gpt2_service
    assert service.info()["kind"] == "decoder" and service.max_generate == 63
    payload, hit = request(service, text="the red car", generate=4)
    assert payload["kind"] == "generation" and not hit
    tok, model = service.tokenizer, service.model
    prompt = tok("the red car", return_tensors="pt")
    with torch.no_grad():
        plain = model.generate(**prompt, max_new_tokens=4, do_sample=False)[0]
    assert payload["tokens"] == tok.convert_ids_to_tokens(plain.tolist())  # the model's own greedy tokens
    assert payload["prompt"] == prompt["input_ids"].shape[1] and len(payload["tokens"]) == payload["prompt"] + 4
    gen = capture_generation(model, dict(prompt), tok, max_new_tokens=4, do_sample=False)
    assert_maps_equal(payload["decoder"], gen.decoder.attentions[0])
    assert payload["cross"] is None
    assert not request(service, text="the red car", generate=5)[1]  # the cache key holds N
    plain_text, _ = request(service, text="the red car")  # without "generate": the explorer
    assert "kind" not in plain_text and plain_text["tokens"] == tok.convert_ids_to_tokens(prompt["input_ids"][0])


@pytest.mark.parametrize("body, status, field, words", [
    ({"text": SOURCE, "target": 5}, 400, '"target"', "got a JSON number"),
    ({"text": SOURCE, "target": ["la"]}, 400, '"target"', "got a JSON array"),
    ({"text": SOURCE, "target": "la \ud800"}, 400, '"target"', "surrogate"),
    ({"text": SOURCE, "generate": 3}, 400, '"generate"', 'send "target"'),
    ({"text": SOURCE, "target": TARGET, "focus": "bank"}, 400, '"focus"', "encoder-decoder"),
    ({"text": SOURCE, "target": "la " * 63}, 413, '"target"', "at most 63"),
    ({"text": "the " * 70, "target": TARGET}, 413, "the text has 71 tokens", "at most 64"),
])
def test_seq2seq_refusals_name_the_field(bart_service, body, status, field, words):
    with pytest.raises(RequestError) as refused:
        request(bart_service, **body)
    assert refused.value.status == status
    assert field in refused.value.message and words in refused.value.message, refused.value.message


@pytest.mark.parametrize("body, status, field, words", [
    ({"text": "the red car", "generate": 0}, 400, '"generate"', "[1, 63]"),
    ({"text": "the red car", "generate": 64}, 400, '"generate"', "got 64"),
    ({"text": "the red car", "generate": -1}, 400, '"generate"', "got -1"),
    ({"text": "the red car", "generate": True}, 400, '"generate"', "got a JSON boolean"),
    ({"text": "the red car", "generate": 2.5}, 400, '"generate"', "got a JSON number"),
    ({"text": "the red car", "generate": "3"}, 400, '"generate"', "got a JSON string"),
    ({"text": "the red car", "target": "la"}, 400, '"target"', 'send "generate"'),
    ({"text": "the red car", "generate": 2, "focus": 1}, 400, '"focus"', '"generate"'),
    ({"text": "the red car " * 10, "generate": 40}, 413, '"generate"', "ask for at most 33"),
])
def test_generate_refusals_name_the_field(gpt2_service, body, status, field, words):
    with pytest.raises(RequestError) as refused:
        request(gpt2_service, **body)
    assert refused.value.status == status
    assert field in refused.value.message and words in refused.value.message, refused.value.message


def test_self_attention_models_take_neither_field():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                                     attn_implementation="eager")  # capture reads every BERT release there
    service = ExplainService(transformers.BertModel(config).eval(), word_tokenizer())
    assert (service.kind, service.max_generate) == ("encoder", 0)
    for body, field in [(b'{"text": "the", "target": "la"}', '"target"'), (b'{"text": "the", "generate": 2}',
                                                                           '"generate"')]:
        with pytest.raises(RequestError) as refused:
            service.parse(body, "application/json")
        message = refused.value.message
        assert refused.value.status == 400 and field in message and "encoder-only" in message


# -- HTTP and the page -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bart_served(one_thread):
    model, tokenizer = bart()
    server = make_server(model, tokenizer, port=0, log=None, example=None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    assert not thread.is_alive()


def post(server, body: dict) -> tuple[int, dict]:
    sent = urllib.request.Request(server.url + "api/explain", data=json.dumps(body).encode(), method="POST",
                                  headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(sent, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        assert e.headers["Content-Type"] == "application/json; charset=utf-8"
        return e.code, json.loads(e.read())


def test_http_seq2seq_answers_and_refusals(bart_served):
    assert bart_served.host == "127.0.0.1"
    with urllib.request.urlopen(bart_served.url + "api/info", timeout=10) as answer:
        info = json.loads(answer.read())
    assert (info["kind"], info["max_tokens"], info["max_generate"], info["layers"], info["heads"]) == (
        "encoder-decoder", 64, 63, 2, 4)
    status, payload = post(bart_served, {"text": SOURCE, "target": TARGET})
    assert status == 200 and payload["kind"] == "seq2seq" and payload["target"][1:] == [*TARGET.split(), "</s>"]
    status, answer = post(bart_served, {"text": SOURCE, "target": 7})
    assert status == 400 and '"target" must be a string' in answer["error"]
    status, answer = post(bart_served, {"text": SOURCE, "target": "la " * 100})
    assert status == 413 and '"target" has 101 tokens' in answer["error"]


def test_page_types_source_and_target_and_shows_the_alignment(bart_served, watched_page):
    origin = bart_served.url.rstrip("/")
    watch = watched_page(allowed=(origin,))
    page = watch.page
    page.goto(bart_served.url)
    assert page.is_visible("#aks-target") and page.is_hidden("#aks-generate")
    assert page.text_content("#aks-text-label") == "Source"
    target = f"la rive {XSS}"  # hostile words: the word tokenizer reads them as <unk>; the title holds them as text
    page.fill("#aks-text", SOURCE)
    page.fill("#aks-target", target)
    page.press("#aks-target", "Enter")
    page.wait_for_selector("#aks-app[data-status=ready]", timeout=30_000)
    assert page.get_attribute("#aks-app", "data-view") == "seq2seq"
    assert page.is_visible('[data-part-pane="cross"]') and page.is_hidden('[data-part-pane="encoder"]')
    page.click('[data-part-pane="cross"] [data-tab="matrix"]')
    assert page.locator('[data-part-pane="cross"] [data-tab="matrix"]').text_content() == "Alignment"
    assert page.is_visible('[data-part-pane="cross"] canvas[data-view="matrix"]')
    # The alignment the page holds is the cross-attention capture computes (layer 1, mean of the heads).
    maps = capture(bart_served.service.model, SOURCE, target=target, tokenizer=bart_served.service.tokenizer)
    want = maps.cross.attentions[0].double()[1].mean(0)  # (T, S)
    page.evaluate("attnkitApp.explorer.parts.cross.set({layer: 1, heads: [0, 1, 2, 3]})")
    for i in range(want.shape[0]):
        got = torch.tensor(page.evaluate(f"attnkitApp.explorer.parts.cross.aggregate({i})"), dtype=torch.float64)
        assert float((got - want[i]).abs().max()) <= QUANTUM + 1e-6
    assert f"6 → {want.shape[0]} tokens" in page.text_content("#aks-busy")
    full = f"{SOURCE} → {target}"  # as text, cut to the title's 160 characters
    assert page.text_content("#akx-app-explorer .akx-title") == (full if len(full) <= 160 else full[:159] + "…")
    assert page.evaluate("window.__pwned") is None
    assert page.evaluate("document.querySelectorAll('img, #akx-app-explorer script').length") == 0
    watch.assert_clean()
    watch.shot("serve-seq2seq")


@pytest.mark.slow
def test_page_blank_target_and_refused_target(bart_served, watched_page):
    watch = watched_page(allowed=(bart_served.url.rstrip("/"),))
    page = watch.page
    page.goto(bart_served.url)
    page.fill("#aks-text", SOURCE)  # a blank target: the model writes one
    page.press("#aks-text", "Enter")
    page.wait_for_selector("#aks-app[data-status=ready]", timeout=30_000)
    assert page.evaluate("attnkitApp.view") == "seq2seq"
    watch.assert_clean()
    page.fill("#aks-target", "la " * 100)
    page.press("#aks-target", "Enter")
    page.wait_for_selector("#aks-app[data-status=error]", timeout=30_000)
    assert '"target" has 101 tokens' in page.text_content("#aks-error")
    assert not watch.external
    assert all("status of 413" in e for e in watch.errors), watch.errors


@pytest.mark.slow
def test_page_generates_tokens_for_a_decoder_model(watched_page, one_thread):
    model, tokenizer = gpt2()
    server = make_server(model, tokenizer, port=0, log=None, example=None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        watch = watched_page(allowed=(server.url.rstrip("/"),))
        page = watch.page
        page.goto(server.url)
        assert page.is_hidden("#aks-target") and page.get_attribute("#aks-generate", "max") == "63"
        page.fill("#aks-text", "the red car")
        page.fill("#aks-generate", "5")
        page.press("#aks-generate", "Enter")
        page.wait_for_selector("#aks-app[data-status=ready]", timeout=30_000)
        assert page.evaluate("attnkitApp.view") == "generation"
        assert page.locator('#akx-app-explorer [data-view="text"] .akx-gen').count() == 5
        page.fill("#aks-generate", "0")  # 0: the text's own self-attention
        page.press("#aks-text", "Enter")
        page.wait_for_selector("#aks-app[data-status=ready]", timeout=30_000)
        assert page.evaluate("attnkitApp.view") == "explorer"
        watch.assert_clean()
        watch.shot("serve-generation")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
