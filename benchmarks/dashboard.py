"""Time to first render of the head atlas (and a head page) in a real browser, on a populated store.

Starts `workbench dashboard` on the store, opens the pages in Debian's chromium (Playwright) and
times from navigation until the first plotly heatmap is drawn and Streamlit is idle. The first
visit reads every run from disk (cold); later visits hit Streamlit's caches (warm). The
reference, timed the same way in the same browser: a bare Streamlit page holding one plotly
heatmap, i.e. what loading Streamlit's frontend and plotly.js costs before any of our work.
`--screenshots DIR` also saves the pictures README shows.

    .venv/bin/workbench demo --no-serve --store /tmp/demo   # populate a store first
    .venv/bin/python benchmarks/dashboard.py --store /tmp/demo [--screenshots docs]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from dashboard_browser import HEATMAP, browser, exceptions, free_port, render, served  # noqa: E402

from workbench.store import Store  # noqa: E402


BARE_PAGE = """import numpy as np, plotly.graph_objects as go, streamlit as st
st.title("Bare page")
st.plotly_chart(go.Figure(go.Heatmap(z=np.random.default_rng(0).random((30, 9)))))
"""


def bare_page_seconds(b, repeats: int) -> list[float]:
    """Render times of the reference page (a bare Streamlit page with one heatmap)."""
    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "bare.py"
        script.write_text(BARE_PAGE)
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(script), "--server.port", str(port),
                                 "--server.headless", "true", "--browser.gatherUsageStats", "false"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    urllib.request.urlopen(url + "/_stcore/health", timeout=2)
                    break
                except OSError:
                    time.sleep(0.2)
            times = []
            for _ in range(repeats):
                page, seconds = render(b, url, "Bare page", HEATMAP)
                page.close()
                times.append(seconds)
            return times
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--head", default="L23H3")
    parser.add_argument("--sae-head", default="L15H4", help="head whose top features the features page opens on")
    parser.add_argument("--screenshots", type=Path, default=None)
    args = parser.parse_args()
    store = Store(args.store)
    runs = store.catalog(status="done")
    if runs.empty:
        sys.exit(f"the store at {store.root} has no runs; populate it with `workbench demo --no-serve --store ...`")
    model = runs["model"].value_counts().index[0]
    print(f"store {store.root}: {len(runs)} runs; model {model}")
    with served(store.root) as url, browser() as b:
        bare = bare_page_seconds(b, args.repeats)
        bare_warm = statistics.median(bare[1:]) if len(bare) > 1 else bare[0]
        print(f"{'reference (bare page)':>22}: first render {bare[0]:.2f} s, {bare_warm:.2f} s (median of the rest)")
        pages = [("head atlas", "/atlas", "Every stored metric per head"),
                 (f"head page {args.head}", f"/head?model={quote(model, safe='')}&head={args.head}", f"{args.head} of {model}")]
        if runs["method"].isin(["sae.train", "sae.load"]).any():
            pages.append(("features page", f"/features?model={quote(model, safe='')}&head={args.sae_head}",
                          "Top-activating examples"))
        for name, path, text in pages:
            times = []
            for i in range(args.repeats):
                page, seconds = render(b, url + path, text, HEATMAP)
                if exceptions(page):
                    sys.exit(f"{name}: the page shows an exception: {exceptions(page)}")
                times.append(seconds)
                if i == 0 and args.screenshots:
                    args.screenshots.mkdir(parents=True, exist_ok=True)
                    out = args.screenshots / f"dashboard_{name.split()[0]}_{name.split()[1]}.png"
                    page.set_viewport_size({"width": 1500, "height": 2200})  # Streamlit scrolls inside the page
                    page.wait_for_timeout(1500)
                    page.screenshot(path=str(out))
                page.close()
            warm = statistics.median(times[1:]) if len(times) > 1 else float("nan")
            print(f"{name:>22}: first render {times[0]:.2f} s (cold), {warm:.2f} s (warm, median of {len(times) - 1}); "
                  f"warm / reference {warm / bare_warm:.2f}x")


if __name__ == "__main__":
    main()
