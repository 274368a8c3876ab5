"""Circuit: a task's circuit drawn from stored scores. Nodes are heads (and MLPs) whose score
passes a threshold, laid out by layer left to right; edges are stored edge effects (src -> dst),
or, where none are stored, each node's direct effect on the logits. Which runs hold node effects,
MLP effects and edges is read from the methods' declarations."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import common, data
from app.figures import circuit_figure, faithfulness_figure

store, root, model, runs = common.model_page("Circuit")
tasks = sorted(runs["task"].unique())
task = st.selectbox("Task", tasks, index=tasks.index("ioi") if "ioi" in tasks else 0)
runs = runs[runs["task"] == task]
discovered = data.edge_ranking_runs(runs)
if not discovered.empty and st.radio("Circuit from", ["a discovery run", "node scores"], horizontal=True) == "a discovery run":
    with_curve = {r: data.faithfulness_of(store, runs, r) is not None for r in discovered["run_id"]}
    labels = {r.run_id: data.run_label(r) for _, r in discovered.iterrows()}
    effects = set(data.runs_declaring(discovered, lambda d: any(m.components == ("edge",) and m.role == "effect"
                                                                for m in d.metrics))["run_id"])
    run_id = st.selectbox("Discovery run", sorted(labels, key=lambda r: (not with_curve[r], r not in effects)),
                          format_func=labels.get)
    total = common.edge_count(root, run_id)
    n_edges = st.slider("Edges in the circuit (the top ones by |score|, pruned as MIB prunes them)", 1,
                        min(total, 3000), value=min(total, 200))
    nodes, edges, kept = common.top_circuit(root, run_id, n_edges)
    n_layers, n_heads = data.model_shape(store, runs, common.head_metrics(root, tuple(sorted(runs["run_id"]))))
    st.caption(f"{kept} of {total} edges after pruning; {len(nodes)} heads and MLPs.")
    event = st.plotly_chart(circuit_figure(nodes, edges, n_layers, n_heads, f"{task}: {labels[run_id]}"), key="discovered",
                            on_select="rerun", selection_mode="points", width="stretch")
    picked = [p.get("customdata") for p in (event.selection.points if event else []) if str(p.get("customdata", "")).startswith("L")]
    if picked:
        common.open_head(model, picked[0])
    found = data.faithfulness_of(store, runs, run_id)
    if found is None:
        st.info("No faithfulness curve stored for this ranking: run `circuit.faithfulness` with "
                f"discovery = {{ method = \"{discovered.set_index('run_id').loc[run_id, 'method']}\" }} on this task.")
    else:
        c1, c2 = st.columns(2)
        # as MIB's leaderboard reports them: CPR of the signed ranking, CMD of the absolute one
        c1.metric("CPR (area under the signed ranking's curve)", f"{found['cpr'][('cpr', 'signed')]:.3f}",
                  f"random {found['cpr'][('cpr', 'random')]:.3f}", delta_color="off")
        c2.metric("CMD (area between the |score| ranking's curve and 1)", f"{found['cpr'][('cmd', 'absolute')]:.3f}",
                  f"random {found['cpr'][('cmd', 'random')]:.3f}", delta_color="off")
        st.plotly_chart(faithfulness_figure(found["curve"], n_edges / found["n_edges"]), width="stretch")
    st.dataframe(edges.sort_values("value", key=abs, ascending=False), hide_index=True, width="stretch")
    st.stop()
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

by_run = data.edge_effects(store, runs)
edge_labels = {r.run_id: data.run_label(r) for _, r in runs[runs["run_id"].isin(list(by_run))].iterrows()}
# the sparsest stored edge set reads best as a node circuit's wiring (path patching rather than a full ranking)
choice = st.selectbox("Edges from", sorted(by_run, key=lambda r: len(by_run[r])) + ["each node's own score"],
                      format_func=lambda r: edge_labels.get(r, r))
edges = by_run[choice][["src", "dst", "value"]] if choice in by_run else pd.DataFrame(columns=["src", "dst", "value"])
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
