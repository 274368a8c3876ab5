"""The dashboard start page through Streamlit's AppTest (the full dashboard is its own issue)."""

from pathlib import Path

from streamlit.testing.v1 import AppTest

from workbench.runner import run_method
from workbench.tasks import build_task

HOME = str(Path(__file__).resolve().parent.parent / "app" / "Home.py")


def test_empty_store_shows_how_to_start(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "nothing"))
    at = AppTest.from_file(HOME, default_timeout=60).run()
    assert not at.exception
    assert "workbench demo" in at.info[0].value


def test_catalog_lists_runs_and_opens_one(tmp_path, monkeypatch, toy):
    from workbench.store import Store

    store = Store(tmp_path / "s")
    for n in (3, 4):
        run_method(toy, build_task(toy, "induction", {"n_prompts": n, "seq_len": 5}), "logit_diff", {}, store)
    monkeypatch.setenv("WORKBENCH_HOME", str(store.root))
    at = AppTest.from_file(HOME, default_timeout=60).run()
    assert not at.exception
    catalog, scores = at.dataframe[0].value, at.dataframe[1].value
    assert len(catalog) == 2 and set(catalog["status"]) == {"done"}
    chosen = at.selectbox[0].value
    assert len(scores) == len(store.get(chosen).scores)
