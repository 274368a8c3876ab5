"""`Result`: what every method returns, in the one score schema of DESIGN.md.

A tidy long frame (`component, layer, head, position, metric, value` plus extra columns) and
optional named tensors (dims listed in `meta["tensor_dims"]`), with metadata the store fills in
(spec, run id, timings, versions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from torch import Tensor

from workbench.errors import WorkbenchError

SCORE_COLUMNS = ["component", "layer", "head", "position", "metric", "value"]
COMPONENTS = {"model", "head", "mlp", "resid", "attn", "embed", "bias", "sae_feature", "edge"}
SCHEMA_VERSION = 2  # 2: typed run specs, needs in keys, src_position, edge schema, list columns
INTEGER_EXTRAS = ("feature", "prompt", "src_position", "k", "draw")  # extra columns that index things: never floats


def normalize_scores(frame: pd.DataFrame) -> pd.DataFrame:
    """Coerce a score frame to the schema's dtypes; refuse one that does not fit it."""
    missing = [c for c in ("component", "metric", "value") if c not in frame.columns]
    if missing:
        raise ValueError(f"score frame lacks required column(s) {missing}")
    out = frame.copy()
    for col in ("layer", "head", "position"):
        out[col] = pd.array(out[col] if col in out else [None] * len(out), dtype="Int64")
    for col in INTEGER_EXTRAS:
        if col in out:
            out[col] = pd.array(out[col], dtype="Int64")
    for col in out.columns:  # list cells (a masking run's heads) come back from Parquet as arrays
        if out[col].dtype == object and any(hasattr(v, "tolist") and not isinstance(v, str) for v in out[col]):
            out[col] = [v.tolist() if hasattr(v, "tolist") else v for v in out[col]]
    out["component"] = out["component"].astype(str)
    out["metric"] = out["metric"].astype(str)
    out["value"] = out["value"].astype("float64")
    bad = sorted(set(out["component"]) - COMPONENTS)
    if bad:
        raise ValueError(f"unknown component(s) {bad}; the schema allows {sorted(COMPONENTS)}")
    extras = [c for c in out.columns if c not in SCORE_COLUMNS]
    return out[SCORE_COLUMNS + extras].reset_index(drop=True)


@dataclass
class Result:
    scores: pd.DataFrame
    tensors: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.scores = normalize_scores(self.scores)

    @property
    def run_id(self) -> str | None:
        return self.meta.get("run_id")

    def metric(self, name: str) -> pd.DataFrame:
        """Rows of one metric; an unknown name is an error, not an empty frame."""
        rows = self.scores[self.scores["metric"] == name]
        if rows.empty:
            raise WorkbenchError(f"result has no metric '{name}'; it has {sorted(self.scores['metric'].unique())}")
        return rows

    def value(self, metric: str) -> float:
        """The single value of a scalar metric."""
        rows = self.metric(metric)
        if len(rows) != 1:
            raise WorkbenchError(f"metric '{metric}' has {len(rows)} rows, not one; use result.metric('{metric}')")
        return float(rows["value"].iloc[0])
