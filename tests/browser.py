"""Open a page in headless Debian chromium through playwright: images, headings, console errors, screenshot."""

from __future__ import annotations

import functools
import os
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class _QuietHandler(SimpleHTTPRequestHandler):
    """Static file handler that does not log to stderr."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        return


def browse(index_html: Path, shot: Path) -> dict:
    """Serve index_html's folder on 127.0.0.1, load it in chromium, screenshot it; skip (or fail under CI) without chromium."""
    chromium = shutil.which("chromium")
    ci = os.environ.get("CI", "").lower() not in ("", "0", "false")
    if chromium is None:
        if ci:
            pytest.fail("chromium is not installed (CI=true): run `apt-get install -y chromium`")
        pytest.skip("chromium is not installed (set CI=true to make this a failure)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if ci:
            pytest.fail("the playwright package is not installed (CI=true): pip install -e '.[dev]'")
        pytest.skip("the playwright package is not installed")

    handler = functools.partial(_QuietHandler, directory=str(index_html.parent))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{index_html.name}"
    errors: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
                page.on("requestfailed", lambda r: errors.append(f"requestfailed: {r.url}"))
                page.on("response", lambda r: errors.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
                resp = page.goto(url, wait_until="load")
                ok = resp is not None and resp.ok
                images = page.evaluate(
                    "() => Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
                )
                out = {"ok": ok, "title": page.title(), "images": images, "errors": errors,
                       "headings": page.locator("h2").all_inner_texts()}
                page.screenshot(path=str(shot), full_page=True)
            finally:
                browser.close()
    finally:
        server.shutdown()
        server.server_close()
    return out
