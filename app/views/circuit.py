"""Circuit: a task's circuit drawn from stored scores. Nodes are heads (and MLPs) whose score
passes a threshold, laid out by layer left to right; edges are stored path-patching effects
(sender -> receiver), or, where none are stored, each node's direct effect on the logits."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import common, data
from app.figures import circuit_figure

NODE_METHODS = ("patching.attn_head", "attribution.dla", "heads.ablation", "patching.attribution", "retrieval.score")

store, root, model, runs = common.model_page("Circuit")
tasks = sorted(runs["task"].unique())
task = st.selectbox("Task", tasks, index=tasks.index("ioi") if "ioi" in tasks else 0)
runs = runs[runs["task"] == task]
long = common.head_metrics(root, tuple(sorted(runs["run_id"])))
node_labels = sorted(long[long["method"].isin(NODE_METHODS)]["label"].unique()) or sorted(long["label"].unique())
if not node_labels:
    st.info(f"No per-head scores for {task} yet: run patching.attn_head or attribution.dla on it.")
    st.stop()
label = st.selectbox("Node score", node_labels)
scores = long[long["label"] == label]
top = float(scores["value"].abs().max()) or 1.0
threshold = st.slider("Show nodes with |score| at least", 0.0, top, value=round(0.25 * top, 4), format="%.4f")
nodes = scores[scores["value"].abs() >= threshold][["name", "layer", "head", "value"]]

mlp_rows = []
for r in runs[runs["method"] == "patching.mlp_out"].itertuples():
    frame = common.run_scores(root, r.run_id)
    frame = frame[(frame["component"] == "mlp") & frame["position"].isna() & (frame["metric"] == "patch_logit_diff")]
    mlp_rows.append(frame)
if mlp_rows and st.toggle("Include MLPs (all-position patching)", value=True):
    mlps = pd.concat(mlp_rows).groupby("layer", as_index=False)["value"].mean()
    mlps = mlps[mlps["value"].abs() >= threshold]
    nodes = pd.concat([nodes, pd.DataFrame({"name": [f"MLP{int(lyr)}" for lyr in mlps["layer"]], "layer": mlps["layer"].astype(int),
                                            "head": float("nan"), "value": mlps["value"]})], ignore_index=True)

edges = []
for r in runs[runs["method"] == "patching.path"].itertuples():
    frame = common.run_scores(root, r.run_id)
    frame = frame[(frame["component"] == "edge") & ~frame["metric"].str.endswith("_raw")]
    for row in frame.itertuples():
        for dst in row.dst.split(":")[0].split(","):
            edges.append(dict(src=row.src, dst=dst, value=row.value))
edges = pd.DataFrame(edges, columns=["src", "dst", "value"])
if not edges.empty:
    edges = edges[edges["value"].abs() >= st.slider("Show edges with |effect| at least", 0.0,
                                                    float(edges["value"].abs().max()) or 1.0, 0.0, format="%.4f")]
    source = "path patching"
    ends = set(edges["src"]) | set(edges["dst"])
    missing = scores[scores["name"].isin(ends - set(nodes["name"]))][["name", "layer", "head", "value"]]
    nodes = pd.concat([nodes, missing], ignore_index=True)  # an edge's heads are drawn whatever their own score
else:
    edges = nodes.assign(src=nodes["name"], dst="logits")[["src", "dst", "value"]]
    source = "each node's own score (no path-patching runs stored for this task)"
n_layers, n_heads = data.model_shape(store, runs, long)
st.caption(f"{len(nodes)} nodes; edges from {source}.")
fig = circuit_figure(nodes, edges, n_layers, n_heads, f"{task}: {label}")
event = st.plotly_chart(fig, key="circuit", on_select="rerun", selection_mode="points", width="stretch")
points = event.selection.points if event else []
picked = [p.get("customdata") for p in points if str(p.get("customdata", "")).startswith("L")]
if picked:
    common.open_head(model, picked[0])
st.dataframe(nodes.sort_values("value", key=abs, ascending=False), hide_index=True, width="stretch")
