"""Self-contained pages: one HTML file, its CSS and JS inline, its data as embedded JSON.

Every page carries a Content-Security-Policy that forbids loading anything from
anywhere (``default-src 'none'``; inline scripts and styles and ``data:``/``blob:``
images only), so a page cannot make a network request even if a bug tried to, and
works offline. Data goes in a ``<script type="application/json">`` block with ``<``,
``>`` and ``&`` written as JSON escapes, so no token text can close the block or
open a tag; pages put text on screen with ``textContent`` only.
"""

from __future__ import annotations

import html
import json
from importlib import resources
from typing import Any

__all__ = ["CSP", "asset", "embed_json", "page"]

CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'")


def asset(name: str) -> str:
    """The text of ``static/<name>`` shipped inside the package."""
    return resources.files("attnkit.viz").joinpath("static").joinpath(name).read_text(encoding="utf-8")


def embed_json(value: Any) -> str:
    """``value`` as JSON that is safe inside ``<script type="application/json">``.

    >>> embed_json({"t": "</script><img src=x onerror=alert(1)>&"})
    '{"t": "\\\\u003c/script\\\\u003e\\\\u003cimg src=x onerror=alert(1)\\\\u003e\\\\u0026"}'
    """
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def page(title: str, *, css: list[str], js: list[str], body: str, data: dict[str, Any] | None = None,
         connect: bool = False) -> str:
    """One HTML document.

    Args:
        title: plain text, escaped here.
        css, js: names of files in ``static/``, inlined in order.
        body: trusted HTML markup written by attnkit (never user text: that goes in ``data``).
        data: embedded as ``<script type="application/json" id="attnkit-data">``.
        connect: allow ``fetch`` to the page's own origin (the ``serve`` app); reports and
            the lab forbid every connection.
    """
    csp = CSP if connect else CSP.replace("connect-src 'self'", "connect-src 'none'")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{html.escape(csp)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        *(f"<style>\n{asset(name)}\n</style>" for name in css),
        "</head><body>",
        body,
    ]
    if data is not None:
        parts.append(f'<script type="application/json" id="attnkit-data">{embed_json(data)}</script>')
    parts.extend(f"<script>\n{_script(asset(name))}\n</script>" for name in js)
    parts.append("</body></html>")
    return "\n".join(parts)


def _script(text: str) -> str:
    if "</script" in text.lower():
        raise ValueError("a static script contains '</script'; split the string in the source")
    return text
