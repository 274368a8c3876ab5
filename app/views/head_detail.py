"""One head (deep link: `head?model=NAME&head=L5H3`): its scores across tasks and metrics (with
its rank among all heads), its attention pattern on a stored prompt, its DLA per source
position, its query-key distance profile and its top features in stored attention-output SAEs."""

from __future__ import annotations

import numpy as np
import plotly.express as px
import streamlit as st

from app import common, data
from app.figures import distance_figure, pattern_figure
from workbench.nodes import HEAD_RE

title = st.empty()  # filled once the head is known, above the pickers
store, root, model, runs = common.model_page(None)
long = common.head_metrics(root, tuple(sorted(runs["run_id"])))
n_layers, n_heads = data.model_shape(store, runs, long)
names = [f"L{layer}H{h}" for layer in range(n_layers) for h in range(n_heads)]
wanted = st.query_params.get("head", names[0] if names else "L0H0")
if not HEAD_RE.match(wanted or "") or (names and wanted not in names):
    st.error(f"'{wanted}' is not a head of {model}; heads are L0H0..L{n_layers - 1}H{n_heads - 1}.")
    st.stop()
head = st.selectbox("Head", names, index=names.index(wanted)) if names else wanted
st.query_params["head"] = head
layer, h = (int(x) for x in HEAD_RE.match(head).groups())
title.title(f"{head} of {model}")

# -- scores ---------------------------------------------------------------------------------
mine = long[long["name"] == head]
if mine.empty:
    st.info("No per-head scores stored for this model yet.")
else:
    ranks = long.groupby("label")["value"].rank(ascending=False, method="min")
    abs_ranks = long["value"].abs().groupby(long["label"]).rank(ascending=False, method="min")
    table = mine.assign(rank=ranks[mine.index].astype(int), rank_abs=abs_ranks[mine.index].astype(int),
                        of=long.groupby("label")["value"].transform("size")[mine.index])
    st.subheader("Scores")
    st.dataframe(table[["metric", "task", "method", "value", "rank", "rank_abs", "of", "run_id"]]
                 .sort_values("rank_abs"), hide_index=True, width="stretch")

# -- attention pattern ----------------------------------------------------------------------
st.subheader("Attention pattern")
pattern_runs = data.with_tensor(runs, "pattern")
if pattern_runs.empty:
    st.info("No stored attention patterns for this model. Compute them for a task's first prompts on the "
            "Launch page (method `attention.patterns`), or type a prompt in the Prompt explorer.")
else:
    labels = {r.run_id: data.run_label(r) for _, r in pattern_runs.iterrows()}
    run_id = st.selectbox("Prompts from", list(labels), format_func=labels.get)
    meta = common.run_meta(root, run_id)
    tokens = meta["tokens"]
    i = st.selectbox("Prompt", range(len(tokens)), format_func=lambda j: "".join(tokens[j])[:100])
    pattern = common.run_tensor(root, run_id, "pattern")[i, layer, h]
    st.plotly_chart(pattern_figure(pattern, tokens[i], f"{head} on prompt {i}"), width="stretch")

# -- DLA per source position ----------------------------------------------------------------
frame = data.source_rows(store, runs, layer, h)
st.subheader("Direct logit attribution by source position")
if not frame.empty:
    per_pos = frame.groupby(["task", "src_position"], as_index=False)["value"].mean()
    st.plotly_chart(px.bar(per_pos, x="src_position", y="value", color="task", barmode="group",
                           labels={"value": "contribution to the logit difference (mean over prompts)"}),
                    width="stretch")
else:
    st.info(f"Not stored for {head}: run `attribution.head_sources` with heads = [\"{head}\"] (Launch page).")

# -- distance profile -----------------------------------------------------------------------
dist = data.with_tensor(runs, "distance_hist")
st.subheader("Query-key distance profile")
if dist.empty:
    st.info("Not stored: run `heads.distance` on a task (the demo runs it on corpus windows).")
else:
    r = dist.iloc[0]
    hist = common.run_tensor(root, r["run_id"], "distance_hist")[layer, h]
    bins = common.run_meta(root, r["run_id"])["distance_bins"]
    st.plotly_chart(distance_figure(np.asarray(hist), bins, f"{head} on {r['task']}"), width="stretch")

# -- SAE features ---------------------------------------------------------------------------
st.subheader("Top features in attention-output SAEs")
at_layer = [r for r in data.sae_runs(runs).itertuples() if common.run_meta(root, r.run_id).get("layer") == layer]
if not at_layer:
    st.info(f"No SAE on layer {layer} stored: train one with `sae.train` (layer = {layer}) or load one with `sae.load`.")
for r in at_layer:
    top = data.head_top_features(common.run_scores(root, r.run_id), h, 8)
    top.insert(0, "open", [f"features?model={model}&sae={r.run_id}&feature={f}&head={head}" for f in top["feature"]])
    st.caption(f"{data.run_label(r._asdict())} · {r.run_id}: features ranked by the share of their decoder norm on {head}")
    st.dataframe(top, hide_index=True, width="stretch",
                 column_config={"open": st.column_config.LinkColumn("open", display_text="open")})
