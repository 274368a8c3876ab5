"""Runs: the store's catalog, filterable; open a run (metadata, scores, a chart); delete one."""

from __future__ import annotations

import json

import plotly.express as px
import streamlit as st

from app import common
from app.data import run_label

store = common.store()
root = str(store.root)
st.title("Runs")
st.caption(f"store: {root}")
runs = common.catalog(root)
if runs.empty:
    common.start_page(root)
    st.stop()

cols = st.columns(4)
filters = {c: cols[i].multiselect(c, sorted(runs[c].dropna().unique())) for i, c in enumerate(("model", "task", "method", "status"))}
shown = runs
for c, chosen in filters.items():
    if chosen:
        shown = shown[shown[c].isin(chosen)]
st.subheader(f"{len(shown)} of {len(runs)} runs")
table = shown.assign(size_kb=(shown["size_bytes"] / 1024).round(1)).drop(columns=["size_bytes"])
st.dataframe(table, hide_index=True, width="stretch",
             column_config={"created": st.column_config.NumberColumn(format="%.0f"),
                            "duration_s": st.column_config.NumberColumn("seconds", format="%.2f")})

done = shown[shown["status"] == "done"]
if done.empty:
    st.stop()
labels = {r.run_id: f"{r.run_id}  {run_label(done.set_index('run_id').loc[r.run_id])}" for r in done.itertuples()}
wanted = st.query_params.get("run")
ids = list(labels)
run_id = st.selectbox("Open a run", ids, index=ids.index(wanted) if wanted in ids else 0, format_func=labels.get)
st.query_params["run"] = run_id
meta = common.run_meta(root, run_id)
frame = common.run_scores(root, run_id)
left, right = st.columns([2, 1])
with left:
    st.dataframe(frame, hide_index=True, width="stretch", height=320)
    st.download_button("Download scores (CSV)", frame.to_csv(index=False), file_name=f"{run_id}.csv", mime="text/csv")
with right:
    shown_meta = {k: v for k, v in meta.items() if k not in ("responses", "tokens")}
    st.json(json.loads(json.dumps(shown_meta, default=str)), expanded=False)

per_prompt = frame[frame["metric"].isin(["logit_diff_clean", "logit_diff_corrupted"])]
if not per_prompt.empty:
    st.plotly_chart(px.bar(per_prompt, x="prompt", y="value", color="metric", barmode="group",
                           title="Logit difference per prompt"), width="stretch")
heads = frame[(frame["component"] == "head")]
if not heads.empty:
    st.page_link(common.PAGES["atlas"][0], label="See head scores on the head atlas", icon=":material/grid_on:",
                 query_params={"model": done.set_index("run_id").loc[run_id, "model"]})

with st.expander("Delete this run"):
    st.warning(f"This removes run {run_id} and its files from the store.")
    sure = st.checkbox("I am sure", key=f"confirm-{run_id}")
    if st.button("Delete run", type="primary", disabled=not sure):
        store.delete(run_id)
        common.catalog.clear()
        st.query_params.pop("run", None)
        st.success(f"deleted {run_id}")
        st.rerun()
