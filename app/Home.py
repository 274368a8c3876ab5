"""Dashboard start page: the run catalog of the store, and one run's scores.

`workbench dashboard` serves it with WORKBENCH_HOME set to the store.
"""

from __future__ import annotations

import plotly.express as px
import streamlit as st

from workbench.errors import WorkbenchError
from workbench.store import Store

st.set_page_config(page_title="Workbench", layout="wide")
store = Store()
st.title("Workbench")
st.caption(f"store: {store.root}")


@st.cache_data(ttl=5)
def catalog(root: str):
    return Store(root).catalog()


@st.cache_data
def scores(root: str, run_id: str):
    return Store(root).get(run_id).scores


runs = catalog(str(store.root))
if runs.empty:
    st.info(
        "This store has no results yet. Compute the demo with `workbench demo --no-serve`, "
        "or a batch job with `workbench run JOB.toml`, then reload this page."
    )
    st.stop()

cols = st.columns(3)
filters = {c: cols[i].multiselect(c, sorted(runs[c].dropna().unique())) for i, c in enumerate(("model", "task", "method"))}
shown = runs
for c, chosen in filters.items():
    if chosen:
        shown = shown[shown[c].isin(chosen)]
st.subheader(f"Runs ({len(shown)})")
st.dataframe(shown, hide_index=True, use_container_width=True)

done = shown[shown["status"] == "done"]
if not done.empty:
    run_id = st.selectbox("Open a run", done["run_id"], format_func=lambda r: f"{r}  {done.set_index('run_id').loc[r, 'task']} / {done.set_index('run_id').loc[r, 'method']}")
    try:
        frame = scores(str(store.root), run_id)
    except WorkbenchError as e:
        st.error(str(e))
        st.stop()
    st.dataframe(frame, hide_index=True, use_container_width=True)
    per_prompt = frame[frame["metric"].isin(["logit_diff_clean", "logit_diff_corrupted"])]
    if not per_prompt.empty:
        st.plotly_chart(px.bar(per_prompt, x="prompt", y="value", color="metric", barmode="group",
                               title="Logit difference per prompt"), use_container_width=True)
