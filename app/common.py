"""Streamlit plumbing the pages share: the store, cached reads, the empty-store start page and
the model picker. Reads of a run are cached by run id: a stored run never changes."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import data
from workbench.store import Store

PAGES = {  # url path -> (script, title)
    "runs": ("views/runs.py", "Runs"),
    "atlas": ("views/head_atlas.py", "Head atlas"),
    "head": ("views/head_detail.py", "Head"),
    "circuit": ("views/circuit.py", "Circuit"),
    "features": ("views/features.py", "Features"),
    "explore": ("views/prompt_explorer.py", "Prompt explorer"),
    "launch": ("views/launch.py", "Launch"),
    "jobs": ("views/jobs.py", "Jobs"),
}


def store() -> Store:
    return Store()


@st.cache_data(ttl=3, show_spinner=False)
def catalog(root: str) -> pd.DataFrame:
    return Store(root).catalog()


@st.cache_data(show_spinner=False, max_entries=256)
def run_scores(root: str, run_id: str) -> pd.DataFrame:
    return data.run_scores(Store(root), run_id)


@st.cache_data(show_spinner=False, max_entries=256)
def run_meta(root: str, run_id: str) -> dict:
    return data.run_meta(Store(root), run_id)


@st.cache_data(show_spinner=False, max_entries=32)
def head_metrics(root: str, run_ids: tuple[str, ...]) -> pd.DataFrame:
    s = Store(root)
    runs = s.catalog(status="done")
    return data.head_metrics(s, runs[runs["run_id"].isin(run_ids)])


@st.cache_data(show_spinner=False, max_entries=64)
def top_circuit(root: str, run_id: str, n_edges: int):
    nodes, edges, kept, _ = data.top_circuit(Store(root), run_id, n_edges)
    return nodes, edges, kept


@st.cache_data(show_spinner=False, max_entries=64)
def edge_count(root: str, run_id: str) -> int:
    return data.top_circuit(Store(root), run_id, 1)[3]


@st.cache_data(show_spinner=False, max_entries=64)
def run_tensor(root: str, run_id: str, name: str):
    """One stored tensor as a numpy array (cached: patterns are read on every rerun otherwise)."""
    s = Store(root)
    return s.tensors(run_id, [name], framework="np")[name]


def start_page(root) -> None:
    st.info(
        f"The store at `{root}` has no results yet.\n\n"
        "- `workbench demo --no-serve` computes the demo analyses on the embedded model,\n"
        "- `workbench run JOB.toml` runs a job file (see README),\n"
        "- or start a run from the **Launch** page.\n\nThen reload this page."
    )


def done_runs_or_stop(root) -> pd.DataFrame:
    runs = catalog(str(root))
    done = runs[runs["status"] == "done"]
    if done.empty:
        start_page(root)
        st.stop()
    return done


def pick_model(done: pd.DataFrame, key: str = "model") -> str:
    """A model picker that follows and sets the `model` query parameter (deep links)."""
    models = sorted(done["model"].dropna().unique())
    wanted = st.query_params.get("model")
    index = models.index(wanted) if wanted in models else 0
    model = st.selectbox("Model", models, index=index, key=key)
    st.query_params["model"] = model
    return model


def model_page(title: str | None):
    """The start of every per-model page: (store, root, runs of the chosen model); stops with the
    start page on an empty store. `title=None` leaves the title to the page."""
    s = store()
    root = str(s.root)
    if title:
        st.title(title)
    done = done_runs_or_stop(root)
    model = pick_model(done)
    return s, root, model, done[done["model"] == model]


def open_head(model: str, head: str) -> None:
    st.switch_page(PAGES["head"][0], query_params={"model": model, "head": head})
