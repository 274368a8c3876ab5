"""What the dashboard reads from the store, as plain frames (no Streamlit here, so tests and
notebooks can call it): per-head scalar scores of every run, joined into one table per model."""

from __future__ import annotations

import json

import pandas as pd

from workbench.errors import WorkbenchError
from workbench.methods import Outputs, get_method
from workbench.nodes import head_name, parse_node
from workbench.store import RUN_ID_LEN, Store


def done_runs(store: Store, model: str | None = None) -> pd.DataFrame:
    runs = store.catalog(status="done")
    return runs if model is None else runs[runs["model"] == model].reset_index(drop=True)


def run_scores(store: Store, run_id: str) -> pd.DataFrame:
    """A run's score frame, read from Parquet alone (no tensors)."""
    return store.scores(run_id)


def declared(method: str, params: str) -> Outputs | None:
    """What a stored run's method declares it wrote (None for a method this install lacks)."""
    try:
        return get_method(method).declared(json.loads(params) if params else {})
    except WorkbenchError:
        return None


def runs_declaring(runs: pd.DataFrame, test) -> pd.DataFrame:
    """The runs whose declared outputs pass `test(outputs)`."""
    keep = [(d := declared(r.method, r.params)) is not None and bool(test(d)) for r in runs.itertuples()]
    return runs[keep] if len(runs) else runs


def with_tensor(runs: pd.DataFrame, name: str) -> pd.DataFrame:
    return runs_declaring(runs, lambda d: name in d.tensors)


def metrics_where(outputs: Outputs, test) -> list[str]:
    return [m.name for m in outputs.metrics if test(m)]


def _defaults(kind: str, name: str) -> dict:
    from workbench.methods import all_methods
    from workbench.params import defaults
    from workbench.tasks import TASKS

    registry = {n: m.params for n, m in all_methods().items()} if kind == "method" else {n: g.params for n, g in TASKS.items()}
    return defaults(registry[name]) if name in registry else {}


def _params_text(kind: str, name: str, params: str) -> str:
    """Parameters that differ from the defaults, `k=v, ...` (what tells two runs apart)."""
    parsed = json.loads(params) if params else {}
    defaults = _defaults(kind, name)
    return ", ".join(f"{k}={v}" for k, v in sorted(parsed.items()) if k not in defaults or defaults[k] != v)


def run_label(run: pd.Series) -> str:
    """How a run is named in menus: task (non-default params) / method (non-default params)."""
    task_params = _params_text("task", run["task"], run["task_params"])
    params = _params_text("method", run["method"], run["params"])
    return f"{run['task']}{f' ({task_params})' if task_params else ''} / {run['method']}{f' ({params})' if params else ''}"


def head_rows(scores: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """The rows of declared per-head metrics: one value per (layer, head, metric). Rows per prompt
    (a decomposition's per-prompt terms) and key/value-head rows are left out of the map."""
    rows = scores[(scores["component"] == "head") & scores["metric"].isin(metrics)]
    if "prompt" in rows:
        rows = rows[rows["prompt"].isna()]
    if "head_kind" in rows:
        rows = rows[rows["head_kind"].fillna("query") == "query"]
    return rows.groupby(["layer", "head", "metric"], as_index=False)["value"].mean()


def head_metrics(store: Store, runs: pd.DataFrame) -> pd.DataFrame:
    """Long frame over runs: run_id, task, method, metric, label, layer, head, name, value."""
    parts = []
    for run in runs.itertuples():
        outputs = declared(run.method, run.params)
        metrics = metrics_where(outputs, lambda m: m.per_head) if outputs else []
        if not metrics:
            continue
        rows = head_rows(run_scores(store, run.run_id), metrics)
        roles = {m.name: m.role for m in outputs.metrics}
        series = pd.Series(run._asdict())
        rows = rows.assign(run_id=run.run_id, task=run.task, method=run.method, run=run_label(series),
                           role=rows["metric"].map(roles))
        parts.append(rows)
    if not parts:
        return pd.DataFrame(columns=["run_id", "task", "method", "run", "metric", "role", "label", "layer", "head", "name", "value"])
    long = pd.concat(parts, ignore_index=True)
    long["label"] = long["metric"] + " · " + long["run"]
    long["layer"], long["head"] = long["layer"].astype(int), long["head"].astype(int)
    long["name"] = [head_name(lyr, h) for lyr, h in zip(long["layer"], long["head"])]
    return long


def head_table(long: pd.DataFrame) -> pd.DataFrame:
    """One row per head (layer, head, name), one column per metric label."""
    wide = long.pivot_table(index=["layer", "head", "name"], columns="label", values="value", aggfunc="mean")
    wide.columns.name = None
    return wide.reset_index()


def grid(long: pd.DataFrame, label: str, n_layers: int, n_heads: int) -> pd.DataFrame:
    """layer x head matrix of one metric label (missing cells NaN)."""
    rows = long[long["label"] == label]
    full = rows.pivot_table(index="layer", columns="head", values="value", aggfunc="mean")
    return full.reindex(index=range(n_layers), columns=range(n_heads))


def run_meta(store: Store, run_id: str) -> dict:
    return store.meta(run_id)


def model_shape(store: Store, runs: pd.DataFrame, long: pd.DataFrame) -> tuple[int, int]:
    """(n_layers, n_heads) from the run metadata the store keeps (no model load); runs stored
    without it fall back to the largest head index seen."""
    for run in runs.itertuples():
        shape = run_meta(store, run.run_id).get("model_shape")
        if shape:
            return int(shape["n_layers"]), int(shape["n_heads"])
    if long.empty:
        return 0, 0
    return int(long["layer"].max()) + 1, int(long["head"].max()) + 1


def sae_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The stored SAEs among `runs` (methods declaring an SAE artifact)."""
    return runs_declaring(runs, lambda d: d.artifact == "sae")


def run_tensors(store: Store, run_id: str, names: list[str]) -> dict:
    """Only the named tensors of a run, as numpy (an SAE's weights are not read to draw one feature)."""
    return store.tensors(run_id, names, framework="np")


def node_effects(store: Store, runs: pd.DataFrame, component: str) -> pd.DataFrame:
    """Per-layer effects of `component` nodes (MLPs) from runs declaring such an effect over all positions."""
    parts = []
    for r in runs.itertuples():
        outputs = declared(r.method, r.params)
        names = metrics_where(outputs, lambda m: m.role == "effect" and m.components == (component,)
                              and m.index == ("layer",)) if outputs else []
        if names:
            frame = run_scores(store, r.run_id)
            parts.append(frame[(frame["component"] == component) & frame["metric"].isin(names)])
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["layer", "value"])


def edge_effects(store: Store, runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Stored edge effects (src, dst, dst_input, value) per run, of runs declaring edge effects."""
    out = {}
    for r in runs.itertuples():
        outputs = declared(r.method, r.params)
        names = metrics_where(outputs, lambda m: m.role == "effect" and m.components == ("edge",)) if outputs else []
        if names:
            frame = run_scores(store, r.run_id)
            out[r.run_id] = frame[frame["metric"] == names[0]][["src", "dst", "dst_input", "value"]]
    return out


def source_rows(store: Store, runs: pd.DataFrame, layer: int, head: int) -> pd.DataFrame:
    """A head's per-source-position rows (declared index layer, head, prompt, src_position), with the task."""
    parts = []
    for r in runs.itertuples():
        outputs = declared(r.method, r.params)
        names = metrics_where(outputs, lambda m: m.index == ("layer", "head", "prompt", "src_position")) if outputs else []
        if names:
            frame = run_scores(store, r.run_id)
            frame = frame[frame["metric"].isin(names) & (frame["layer"] == layer) & (frame["head"] == head)]
            parts.append(frame.assign(task=r.task))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def feature_examples(tensors: dict, token_strings: dict[str, str], feature: int) -> list[dict]:
    """A feature's stored top examples: tokens and the feature's activation on each, in context."""
    out = []
    for i, peak in enumerate(tensors["example_max"][feature]):
        ids = tensors["example_tokens"][feature, i]
        if peak <= 0:
            break
        keep = ids >= 0
        out.append({"rank": i, "max": float(peak), "prompt": int(tensors["example_prompt"][feature, i]),
                    "position": int(tensors["example_position"][feature, i]),
                    "tokens": [token_strings.get(str(int(t)), f"<{int(t)}>") for t in ids[keep]],
                    "acts": [float(a) for a in tensors["example_acts"][feature, i][keep]]})
    return out


def head_top_features(scores: pd.DataFrame, head: int, n: int = 10) -> pd.DataFrame:
    """A head's features ranked by head attribution (with how often each fires, when stored)."""
    att = scores[(scores["metric"] == "head_attribution") & (scores["head"] == head)]
    table = att[["feature", "value"]].rename(columns={"value": "attribution"})
    freq = scores[scores["metric"] == "feature_frequency"][["feature", "value"]].rename(columns={"value": "frequency"})
    if not freq.empty:
        table = table.merge(freq, on="feature")
        table = table[table["frequency"] > 0]
    table = table.sort_values("attribution", ascending=False).head(n).reset_index(drop=True)
    return table.astype({"feature": int})


def edge_ranking_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs that score edges (discovery methods; path patching too)."""
    return runs_declaring(runs, lambda d: any(m.components == ("edge",) and m.role in ("effect", "score") for m in d.metrics))


def top_circuit(store: Store, run_id: str, n_edges: int) -> tuple[pd.DataFrame, pd.DataFrame, int, int]:
    """The circuit of a stored edge ranking's top `n_edges` edges by |score|, pruned as the MIB curve
    prunes it: (nodes: name, layer, head, value = summed kept outgoing scores; edges: src, dst, value,
    a key/value head's edge drawn to each head of its group; edges kept; the graph's edge count).
    Built from the stored scores and the model's shape alone (no model)."""
    from types import SimpleNamespace

    from circuits.discovery.faithfulness import edge_metric, scores_from_rows, top_edges
    from circuits.discovery.graph import build_graph
    from workbench.spec import Need

    meta = store.meta(run_id)
    shape = meta["model_shape"]
    spec = meta["spec"]
    metric = edge_metric(Need.make(spec["method"], spec["params"]))
    model = SimpleNamespace(n_layers=shape["n_layers"], n_heads=shape["n_heads"], n_kv_heads=shape["n_kv_heads"],
                            cfg=SimpleNamespace(attn_only=shape.get("attn_only", False)))
    graph = build_graph(model)
    rows = store.scores(run_id)
    scores = scores_from_rows(graph, rows[rows["metric"] == metric])
    group = shape["n_heads"] // shape["n_kv_heads"]
    keep = top_edges(graph, scores, n_edges, group)
    edges = []
    for s, t in keep.nonzero().tolist():
        dst = graph.targets[t].node
        kind, layer, head = parse_node(dst)
        for d in ([head_name(layer, h) for h in range(head * group, (head + 1) * group)] if kind == "kv_head" else [dst]):
            edges.append(dict(src=graph.sources[s], dst=d, value=float(scores[s, t])))
    edges = pd.DataFrame(edges, columns=["src", "dst", "value"])
    out = edges.groupby("src")["value"].sum()
    names = sorted((set(edges["src"]) | set(edges["dst"])) - {"embed", "logits"},
                   key=lambda n: (parse_node(n)[1], parse_node(n)[2] if parse_node(n)[2] is not None else 1 << 20))
    nodes = pd.DataFrame([dict(name=n, layer=parse_node(n)[1], head=parse_node(n)[2] if parse_node(n)[0] == "head" else float("nan"),
                               value=float(out.get(n, 0.0))) for n in names], columns=["name", "layer", "head", "value"])
    return nodes, edges, int(keep.sum()), graph.n_edges()


def faithfulness_of(store: Store, runs: pd.DataFrame, run_id: str) -> dict | None:
    """The stored faithfulness curve of a discovery run (the newest), as {curve, cpr, cmd, run_id}."""
    key = store.meta(run_id)["key"]
    for r in runs_declaring(runs, lambda d: d.metric("cpr") is not None).itertuples():
        meta = store.meta(r.run_id)
        if meta["spec"].get("needs", {}).get("discovery") == key:
            scores = store.scores(r.run_id)
            per = scores[scores["metric"].isin(["cpr", "cmd"])].set_index(["metric", "ranking"])["value"]
            return {"curve": scores[scores["metric"] == "faithfulness"], "cpr": per.to_dict(), "run_id": r.run_id,
                    "n_edges": meta["n_edges"]}
    return None


def masking_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs that store a masking curve (accuracy with K heads masked, top-K against random)."""
    return runs_declaring(runs, lambda d: d.metric("masking_curve") is not None)


def masking_curve(scores: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A masking run's curve (k, masked, value, low, high: the 95% bootstrap band over tests) and its
    per-draw accuracies (k, masked, draw, value, heads)."""
    wide = scores[scores["metric"].str.startswith("masking_curve")].pivot_table(
        index=["k", "masked"], columns="metric", values="value").reset_index()
    curve = wide.rename(columns={"masking_curve": "value", "masking_curve_low": "low", "masking_curve_high": "high"})
    draws = scores[scores["metric"] == "needle_accuracy"][["k", "masked", "draw", "value", "heads"]]
    return curve[["k", "masked", "value", "low", "high"]].sort_values(["masked", "k"]), draws


def job_table(records: list[dict]) -> pd.DataFrame:
    """One row per job record (newest first): id, state, executor, file, units per state, start time."""
    from workbench.job_record import counts, job_state

    rows = [{"job_id": r["job_id"], "state": job_state(r), "executor": r["executor"], "file": r["file"],
             "units": len(r["units"]), **counts(r), "started": pd.to_datetime(r["started"], unit="s")} for r in records]
    return pd.DataFrame(rows, columns=["job_id", "state", "executor", "file", "units", "pending", "running", "done",
                                       "skipped", "failed", "started"])


def job_units(record: dict) -> pd.DataFrame:
    """One row per unit of a job: state (a running unit of an interrupted job shows as interrupted),
    run id, what it runs, where, attempts, the method's own progress (0-1, when it reports one) and
    a failure's message."""
    from workbench.job_record import job_state

    interrupted = job_state(record) == "interrupted"
    rows = []
    for i, u in enumerate(record["units"]):
        p = u.get("progress") or {}
        rows.append({"unit": i, "state": "interrupted" if interrupted and u["state"] == "running" else u["state"],
                     "run_id": u["run_id"], "method": u["spec"]["method"], "unit_label": u["label"], "node": u["node"],
                     "attempts": u["attempts"], "progress": p["n"] / p["total"] if p.get("total") else None,
                     "step": p.get("desc"), "message": u["message"]})
    return pd.DataFrame(rows, columns=["unit", "state", "run_id", "method", "unit_label", "node", "attempts", "progress",
                                       "step", "message"])


def job_circuits(store: Store, record: dict) -> pd.DataFrame:
    """The circuits a job scored: one row per stored faithfulness run among its units, with the
    task, the seed, the discovery method it ranked, CPR and CMD as MIB reports them (CPR of the
    signed ranking, CMD of the absolute one) and for random, and the discovery run's id (open it
    on the Circuit page)."""
    rows = []
    for u in record["units"]:
        if u["spec"]["method"] != "circuit.faithfulness" or u["state"] not in ("done", "skipped"):
            continue
        meta = store.meta(u["run_id"])
        discovery = u["spec"]["params"]["discovery"]
        scores = store.scores(u["run_id"])
        per = scores[scores["metric"].isin(["cpr", "cmd"])].set_index(["metric", "ranking"])["value"]
        inner = discovery.get("params", {}).get("scores", {}).get("method")
        rows.append({"task": meta["spec"]["task"]["name"], "seed": meta["spec"]["task"]["params"].get("seed", 0),
                     "discovery": discovery["method"] + (f" ({inner})" if inner else ""),
                     "cpr": per[("cpr", "signed")], "cpr_random": per[("cpr", "random")],
                     "cmd": per[("cmd", "absolute")], "cmd_random": per[("cmd", "random")],
                     "discovery_run": meta["spec"]["needs"]["discovery"][:RUN_ID_LEN], "faithfulness_run": u["run_id"]})
    return pd.DataFrame(rows, columns=["task", "seed", "discovery", "cpr", "cpr_random", "cmd", "cmd_random",
                                       "discovery_run", "faithfulness_run"])
