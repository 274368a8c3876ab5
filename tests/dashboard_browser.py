"""Drive the real dashboard in a real browser: `workbench dashboard` on a store, Debian's
chromium through Playwright. Used by the browser test and `benchmarks/dashboard.py`."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
WORKBENCH = str(Path(sys.executable).parent / "workbench")
HEATMAP = ".js-plotly-plot .hm"  # a drawn plotly heatmap


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(store_root, timeout: float = 90):
    """`workbench dashboard` on `store_root`; yields its base URL and stops it afterwards."""
    port = free_port()
    proc = subprocess.Popen([WORKBENCH, "dashboard", "--store", str(store_root), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the dashboard did not come up on {url}")
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def render(b, url: str, text: str, selector: str | None = None, timeout_ms: int = 120_000, width: int = 1500):
    """Open `url`, wait until `text` (and `selector`, when given) show; return (page, seconds)."""
    page = b.new_page(viewport={"width": width, "height": 1100})
    start = time.perf_counter()
    page.goto(url)
    page.get_by_text(text).first.wait_for(timeout=timeout_ms)
    if selector:
        page.wait_for_selector(selector, timeout=timeout_ms)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=timeout_ms)
    return page, time.perf_counter() - start


def exceptions(page) -> list[str]:
    """Streamlit's exception boxes and any traceback text on the page."""
    boxes = page.locator('[data-testid="stException"]').all_inner_texts()
    body = page.inner_text("body")
    problems = [marker for marker in ("Traceback (most recent call last)", "Page not found") if marker in body]
    return boxes + problems
