"""Head atlas: any stored per-head metric as a layer x head map, several side by side, and one
table joining every stored metric per head (sortable, downloadable); click a cell to open a head."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import common, data
from app.figures import head_heatmap, masking_figure

store, root, model, runs = common.model_page("Head atlas")
tasks = sorted(runs["task"].unique())
chosen_tasks = st.multiselect("Tasks", tasks, default=tasks)
runs = runs[runs["task"].isin(chosen_tasks)]
long = common.head_metrics(root, tuple(sorted(runs["run_id"])))
if long.empty:
    st.info("No per-head scores for this model yet: run a head method (heads.detect, heads.sinks, retrieval.score, "
            "patching.attn_head, attribution.dla, heads.ablation...) from a job file or the Launch page.")
    st.stop()
n_layers, n_heads = data.model_shape(store, runs, long)
labels = sorted(long["label"].unique())
effects = sorted(long[long["role"] == "effect"]["label"].unique())  # causal effects first, then scores
default = (effects + [lab for lab in labels if lab not in effects])[:3]
chosen = st.multiselect("Metrics on the map", labels, default=default)
if chosen:
    cols = st.columns(min(3, len(chosen)))
    for i, label in enumerate(chosen):
        metric, _, run = label.partition(" · ")
        fig = head_heatmap(data.grid(long, label, n_layers, n_heads), metric, run)
        with cols[i % len(cols)]:
            event = st.plotly_chart(fig, key=f"map-{label}", on_select="rerun", selection_mode="points", width="stretch")
            points = event.selection.points if event else []
            if points:
                common.open_head(model, points[0]["customdata"])

st.subheader("Every stored metric per head")
table = data.head_table(long)
sort_by = st.selectbox("Sort by", [c for c in table.columns if c not in ("layer", "head", "name")],
                       index=0 if not chosen else [c for c in table.columns if c not in ("layer", "head", "name")].index(chosen[0]))
by_abs = st.toggle("Sort by absolute value", value=True)
order = table[sort_by].abs() if by_abs else table[sort_by]
table = table.loc[order.sort_values(ascending=False, na_position="last").index]
table.insert(0, "open", [f"head?model={model}&head={name}" for name in table["name"]])
st.dataframe(table, hide_index=True, width="stretch", height=420,
             column_config={"open": st.column_config.LinkColumn("open", display_text="open")})
st.download_button("Download table (CSV)", table.drop(columns=["open"]).to_csv(index=False),
                   file_name=f"head_atlas_{model}.csv", mime="text/csv")
head = st.selectbox("Open a head", table["name"], key="open-head")
if st.button("Open head page"):
    common.open_head(model, head)

masking = data.masking_runs(runs)
if len(masking):
    st.subheader("Causal check: masking the top-K heads against K random heads")
    labels = {r.run_id: data.run_label(pd.Series(r._asdict())) for r in masking.itertuples()}
    run_id = st.selectbox("Masking run", list(labels), format_func=lambda r: f"{r} · {labels[r]}")
    meta = common.run_meta(root, run_id)
    curve, draws = data.masking_curve(common.run_scores(root, run_id))
    st.plotly_chart(masking_figure(curve, draws, f"Needle accuracy with heads masked ({meta.get('mask', 'query')} mask)"),
                    width="stretch")
    st.caption(f"{meta['tests']} tests; unmasked, {meta.get('answered_unmasked', '?')} answered; heads chosen on "
               f"{meta.get('selection', 'the same tests')}; bands: 95% bootstrap over tests.")
    for warning in meta.get("warnings", []):
        st.warning(warning)
