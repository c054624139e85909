"""Shared test helpers.

The tolerance rule (flash-attn's): a kernel under test, run in some dtype, may be at
most ``factor`` times as far from the float64 reference as a plain PyTorch attention
run in that same dtype is (2x for outputs, 3x for gradients), plus a small floor for
outputs that are exact in that dtype.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch

from attnkit.functional import tiled

if os.environ.get("PYTEST_XDIST_WORKER"):  # one process per core (scripts/test.sh): one torch thread each
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run slow, exhaustive tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or os.environ.get("ATTNKIT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow or ATTNKIT_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def under_ci() -> bool:
    """Whether this run is CI's (``CI=true``, as CI services set it; ``CI=false`` or ``0`` is not)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _missing_dependency(report) -> str | None:
    """The message of a skip that ``pytest.importorskip`` raised, if this report is one."""
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return None
    message = str(report.longrepr[2])
    return message if "could not import" in message else None


def _fail_missing_under_ci(report) -> None:
    """Under CI (``CI=true``) a test dependency that is missing fails instead of skipping: ``.ci/run`` installs
    every one (the test extra), so a skip there would hide a broken install."""
    missing = _missing_dependency(report)
    if missing and under_ci():
        report.outcome, report.longrepr = "failed", f"under CI every test dependency is installed: {missing}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    _fail_missing_under_ci((yield).get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped at import (a module-level ``importorskip``)."""
    _fail_missing_under_ci((yield).get_result())


@pytest.fixture(autouse=True)
def _native_off_unless_marked(request, monkeypatch):
    """``kernel("auto")`` takes the native kernel for some calls once a build is cached in the user's folder,
    so which kernel a test ran would depend on that cache. Every test runs with ``ATTNKIT_NATIVE=0`` (the
    native kernel off) unless marked ``native``; those pin their kernels themselves."""
    if request.node.get_closest_marker("native") is None:
        monkeypatch.setenv("ATTNKIT_NATIVE", "0")


@pytest.fixture(scope="session")
def _empty_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("attnkit-cache")


@pytest.fixture(autouse=True)
def _no_user_tuning_cache(_empty_cache_dir, monkeypatch):
    """``kernel("auto")`` follows the user's tuning cache (``attnkit backends --tune``), so every test runs with
    ``ATTNKIT_CACHE_DIR`` at an empty temporary folder; tests of the cache point it at their own."""
    monkeypatch.setenv("ATTNKIT_CACHE_DIR", str(_empty_cache_dir))


@contextmanager
def native_only_if(allowed: bool):
    """``ATTNKIT_NATIVE`` unset (the native kernel may run, and build) inside the block if ``allowed``,
    else ``0``; restored after."""
    before = os.environ.get("ATTNKIT_NATIVE")
    if allowed:
        os.environ.pop("ATTNKIT_NATIVE", None)
    else:
        os.environ["ATTNKIT_NATIVE"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("ATTNKIT_NATIVE", None)
        else:
            os.environ["ATTNKIT_NATIVE"] = before


@pytest.fixture(params=["auto", "math"])
def tiled_kernel(request):
    """Run a test once with the fused CPU kernel allowed and once with plain math only."""
    with tiled.kernel(request.param):
        yield request.param


def qkv(batch=1, heads=2, kv_heads=None, q_len=7, k_len=None, head_dim=16, v_dim=None,
        dtype=torch.float64, seed=0, requires_grad=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or heads
    k_len = q_len if k_len is None else k_len
    v_dim = v_dim or head_dim

    def make(*shape):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
        return t.requires_grad_(requires_grad)

    return (make(batch, heads, q_len, head_dim), make(batch, kv_heads, k_len, head_dim),
            make(batch, kv_heads, k_len, v_dim))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference, treating equal infinities as equal."""
    a, b = a.detach().double(), b.detach().double()
    same_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    diff = torch.where(same_inf, 0.0, (a - b).abs())
    return float(diff.max()) if diff.numel() else 0.0


def assert_within(test_err: float, baseline_err: float, factor: float, floor: float, what: str):
    bound = factor * baseline_err + floor
    assert test_err <= bound, f"{what}: error {test_err:.3g} > {factor} x baseline {baseline_err:.3g} + {floor:g}"


@dataclass
class MapsStandIn:
    """A stand-in for attnkit.inspect.AttentionMaps: the attributes roles and compare read."""

    attentions: list
    tokens: list
    token_ids: list | None
    layers: tuple
    heads: tuple
    model_name: str = "stand-in"


@pytest.fixture(scope="module")
def one_thread():
    """Small models run faster on one thread, and are immune to oversubscription on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- a real browser (Debian's chromium driven by Playwright) for the pages' tests ---

CHROMIUM = os.environ.get("ATTNKIT_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "artifacts")
# Flags that keep chromium off the network on its own account (no background fetches,
# updates, sync or QUIC probing), as root, without a screen.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def browser():
    """A headless chromium. Skipped where chromium or Playwright is missing, except under
    CI (``CI=true``), where ``.ci/run`` installs both, so a missing one is a failure."""
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed (pip install playwright; it is in the test extra)"
    if reason is None and not os.path.exists(CHROMIUM):
        reason = f"no chromium at {CHROMIUM} (apt-get install chromium)"
    if reason is not None:
        if under_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@dataclass
class PageWatch:
    """A browser page with what it said and asked for: console errors, uncaught
    exceptions, and every request that left the page (anything but data:, blob:, about:
    and the ``allowed`` origins)."""

    page: object
    errors: list
    external: list

    def shot(self, name: str) -> str:
        """Save a screenshot under ``artifacts/`` (git-ignored; the run's test artefacts)."""
        os.makedirs(ARTIFACTS, exist_ok=True)
        path = os.path.join(ARTIFACTS, f"{name}.png")
        self.page.screenshot(path=path, full_page=True)
        return path

    def assert_clean(self) -> None:
        assert not self.errors, f"the page logged errors: {self.errors}"
        assert not self.external, f"the page made external requests: {self.external}"


def watch_page(page, allowed: tuple[str, ...] = ()) -> PageWatch:
    """Start recording ``page``'s console errors, exceptions and requests beyond ``allowed``."""
    watch = PageWatch(page, [], [])
    page.on("console", lambda m: m.type == "error" and watch.errors.append(m.text))
    page.on("pageerror", lambda e: watch.errors.append(str(e)))

    def request(r):
        if not r.url.startswith(("data:", "blob:", "about:", *allowed)):
            watch.external.append(r.url)

    page.on("request", request)
    return watch


@pytest.fixture
def watched_page(browser):
    """``watched_page(allowed=("http://127.0.0.1:PORT",))`` -> PageWatch; closed after the test."""
    pages = []

    def make(allowed: tuple[str, ...] = (), width: int = 1400, height: int = 1000) -> PageWatch:
        context = browser.new_context(viewport={"width": width, "height": height})
        pages.append(context)
        return watch_page(context.new_page(), allowed)

    yield make
    for context in pages:
        context.close()


# --- PNG figures: their pixels, not only their signature ---


def png_rgb(path):
    """The (height, width, 3) int16 RGB pixels of a PNG file."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def canvas_rgb(page, selector):
    """The (height, width, 3) int16 RGB pixels a page's canvas holds (its backing store, via toDataURL)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    url = page.eval_on_selector(selector, "c => c.toDataURL('image/png')")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_canvas_drawn(page, selector, min_colours=8, min_ink=0.01):
    """The canvas shows a figure, not a blank: as :func:`assert_drawn` for a PNG file."""
    import numpy as np

    rgb = canvas_rgb(page, selector)
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) >= min_colours, f"{selector}: too few colours"
    assert (rgb.min(-1) < 200).mean() > min_ink, f"{selector}: almost blank"


def assert_drawn(path, min_colours=8, min_ink=0.01):
    """The PNG is a real figure: at least ``min_colours`` distinct colours, and more than
    ``min_ink`` of its pixels darker than near-white (a blank figure has neither)."""
    import numpy as np

    rgb = png_rgb(path)
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) >= min_colours, f"{path}: too few colours"
    assert (rgb.min(-1) < 200).mean() > min_ink, f"{path}: almost blank"


# --- a server of attnkit serve's, running in a thread ---


@contextmanager
def serving(server):
    """Run ``server`` (from ``attnkit.viz.server.make_server``) in a thread for the block; stop and close it after."""
    import threading

    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        assert not thread.is_alive()
