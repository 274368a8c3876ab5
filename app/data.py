"""What the dashboard reads from the store, as plain frames (no Streamlit here, so tests and
notebooks can call it): per-head scalar scores of every run, joined into one table per model."""

from __future__ import annotations

import json

import pandas as pd

from workbench.result import head_name
from workbench.store import Store


def done_runs(store: Store, model: str | None = None) -> pd.DataFrame:
    runs = store.catalog(status="done")
    return runs if model is None else runs[runs["model"] == model].reset_index(drop=True)


def run_scores(store: Store, run_id: str) -> pd.DataFrame:
    """A run's score frame, read from Parquet alone (no tensors)."""
    return pd.read_parquet(store.run_dir(store.resolve(run_id)) / "scores.parquet")


def _defaults(kind: str, name: str) -> dict:
    from workbench.methods import all_methods
    from workbench.params import to_dict
    from workbench.tasks import TASKS

    registry = {n: m.params for n, m in all_methods().items()} if kind == "method" else {n: g.params for n, g in TASKS.items()}
    return to_dict(registry[name]()) if name in registry else {}


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


def head_rows(scores: pd.DataFrame) -> pd.DataFrame:
    """The per-head scalars of a score frame: one value per (layer, head, metric); rows per
    position or per prompt are left out (they are views of their own, not map cells)."""
    rows = scores[(scores["component"] == "head") & scores["position"].isna()]
    if "prompt" in rows:
        rows = rows[rows["prompt"].isna()]
    if "head_kind" in rows:
        rows = rows[rows["head_kind"].fillna("query") == "query"]
    rows = rows[rows["layer"].notna() & rows["head"].notna() & ~rows["metric"].str.endswith("_raw")]
    return rows.groupby(["layer", "head", "metric"], as_index=False)["value"].mean()


def head_metrics(store: Store, runs: pd.DataFrame) -> pd.DataFrame:
    """Long frame over runs: run_id, task, method, metric, label, layer, head, name, value."""
    parts = []
    for run in runs.itertuples():
        rows = head_rows(run_scores(store, run.run_id))
        if rows.empty:
            continue
        series = pd.Series(run._asdict())
        rows = rows.assign(run_id=run.run_id, task=run.task, method=run.method, run=run_label(series))
        parts.append(rows)
    if not parts:
        return pd.DataFrame(columns=["run_id", "task", "method", "run", "metric", "label", "layer", "head", "name", "value"])
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
    return json.loads((store.run_dir(store.resolve(run_id)) / "meta.json").read_text())


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


SAE_METHODS = ("sae.train", "sae.load")


def sae_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The stored SAEs among `runs`."""
    return runs[runs["method"].isin(SAE_METHODS)]


def run_tensors(store: Store, run_id: str, names: list[str]) -> dict:
    """Only the named tensors of a run, as numpy (an SAE's weights are not read to draw one feature)."""
    from safetensors import safe_open

    path = store.run_dir(store.resolve(run_id)) / "tensors.safetensors"
    with safe_open(str(path), framework="np") as f:
        present = set(f.keys())
        return {n: f.get_tensor(n) for n in names if n in present}


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
