"""Circuit: a task's circuit drawn from stored scores. Nodes are heads (and MLPs) whose score
passes a threshold, laid out by layer left to right; edges are stored edge effects (src -> dst),
or, where none are stored, each node's direct effect on the logits. Which runs hold node effects,
MLP effects and edges is read from the methods' declarations."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import common, data
from app.figures import circuit_figure

store, root, model, runs = common.model_page("Circuit")
tasks = sorted(runs["task"].unique())
task = st.selectbox("Task", tasks, index=tasks.index("ioi") if "ioi" in tasks else 0)
runs = runs[runs["task"] == task]
long = common.head_metrics(root, tuple(sorted(runs["run_id"])))
effects = sorted(long[long["role"] == "effect"]["label"].unique())
node_labels = effects + sorted(set(long["label"]) - set(effects))
if not node_labels:
    st.info(f"No per-head scores for {task} yet: run patching.attn_head or attribution.dla on it.")
    st.stop()
label = st.selectbox("Node score", node_labels)
scores = long[long["label"] == label]
top = float(scores["value"].abs().max()) or 1.0
threshold = st.slider("Show nodes with |score| at least", 0.0, top, value=round(0.25 * top, 4), format="%.4f")
nodes = scores[scores["value"].abs() >= threshold][["name", "layer", "head", "value"]]

mlp_rows = data.node_effects(store, runs, "mlp")
if not mlp_rows.empty and st.toggle("Include MLPs (all-position effects)", value=True):
    mlps = mlp_rows.groupby("layer", as_index=False)["value"].mean()
    mlps = mlps[mlps["value"].abs() >= threshold]
    nodes = pd.concat([nodes, pd.DataFrame({"name": [f"MLP{int(lyr)}" for lyr in mlps["layer"]], "layer": mlps["layer"].astype(int),
                                            "head": float("nan"), "value": mlps["value"]})], ignore_index=True)

edges = data.edge_effects(store, runs)[["src", "dst", "value"]]
if not edges.empty:
    edges = edges[edges["value"].abs() >= st.slider("Show edges with |effect| at least", 0.0,
                                                    float(edges["value"].abs().max()) or 1.0, 0.0, format="%.4f")]
    source = "stored edge effects"
    ends = set(edges["src"]) | set(edges["dst"])
    missing = scores[scores["name"].isin(ends - set(nodes["name"]))][["name", "layer", "head", "value"]]
    nodes = pd.concat([nodes, missing], ignore_index=True)  # an edge's heads are drawn whatever their own score
else:
    edges = nodes.assign(src=nodes["name"], dst="logits")[["src", "dst", "value"]]
    source = "each node's own score (no edge effects stored for this task)"
n_layers, n_heads = data.model_shape(store, runs, long)
st.caption(f"{len(nodes)} nodes; edges from {source}.")
fig = circuit_figure(nodes, edges, n_layers, n_heads, f"{task}: {label}")
event = st.plotly_chart(fig, key="circuit", on_select="rerun", selection_mode="points", width="stretch")
points = event.selection.points if event else []
picked = [p.get("customdata") for p in points if str(p.get("customdata", "")).startswith("L")]
if picked:
    common.open_head(model, picked[0])
st.dataframe(nodes.sort_values("value", key=abs, ascending=False), hide_index=True, width="stretch")
