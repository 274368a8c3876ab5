"""Registered activation-patching sweeps: thin wrappers over the engine in `circuits.patching`.

Every result row is one patch: `layer`, `position` (null = all positions), `head` (for head
activations; a key/value head index for `k` and `v`, see `head_kind`), the normalised metric
`patch_<metric>` (0 = corrupted baseline, 1 = clean) and the raw batch mean `patch_<metric>_raw`.
Under grouped-query attention `k`/`v` patch a key/value head (and so its whole group of query
heads); `k_per_query`/`v_per_query` patch the key or value as one query head sees it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from circuits.heads_spec import parse_heads
from circuits.patching import ACTIVATIONS, DIRECTIONS, METRICS, PatchIndex, PatchingRun, head_indices, layer_pos_indices
from workbench.errors import WorkbenchError
from workbench.methods import register
from workbench.result import Result


@dataclass
class PatchParams:
    metric: str = "logit_diff"
    direction: str = "denoise"
    chunk_tokens: int = 16384


@dataclass
class ResidPatchParams(PatchParams):
    hook: str = "resid_pre"
    by_position: bool = True


@dataclass
class LayerOutPatchParams(PatchParams):
    by_position: bool = True


@dataclass
class HeadPatchParams(PatchParams):
    activation: str = "z"
    by_position: bool = False
    heads: list[str] | None = None


def _check(params: PatchParams) -> None:
    if params.metric not in METRICS:
        raise WorkbenchError(f"unknown metric '{params.metric}'; choose one of {', '.join(METRICS)}")
    if params.direction not in DIRECTIONS:
        raise WorkbenchError(f"unknown direction '{params.direction}'; choose 'denoise' or 'noise'")
    if params.chunk_tokens < 1:
        raise WorkbenchError("chunk_tokens must be at least 1")


def _result(run: PatchingRun, activation: str, component: str, indices: list[PatchIndex], params: PatchParams) -> Result:
    raw = run.run(activation, indices, params.chunk_tokens)
    norm = run.baselines.normalise(raw)
    base = pd.DataFrame({
        "component": component,
        "layer": [i.layer for i in indices],
        "head": [i.head for i in indices],
        "position": [i.pos for i in indices],
        "activation": activation,
    })
    if ACTIVATIONS[activation][1] != "pos":
        base["head_kind"] = "kv" if ACTIVATIONS[activation][1] == "kv_head" else "query"
    frames = [base.assign(metric=f"patch_{params.metric}", value=norm.numpy()),
              base.assign(metric=f"patch_{params.metric}_raw", value=raw.numpy())]
    meta = {"baselines": {"clean": run.baselines.clean, "corrupted": run.baselines.corrupted},
            "direction": params.direction}
    return Result(pd.concat(frames, ignore_index=True), meta=meta)


@register("patching.resid", ResidPatchParams, "patch the residual stream (resid_pre/mid/post) by layer x position")
def patch_resid(model, task, params: ResidPatchParams) -> Result:
    _check(params)
    if params.hook not in ("resid_pre", "resid_mid", "resid_post"):
        raise WorkbenchError(f"hook must be resid_pre, resid_mid or resid_post, not '{params.hook}'")
    run = PatchingRun(model, task, params.metric, params.direction, (params.hook,))
    indices = layer_pos_indices(model, run.clean_tokens.shape[1], params.by_position)
    return _result(run, params.hook, "resid", indices, params)


def _layer_out(model, task, params: LayerOutPatchParams, activation: str, component: str) -> Result:
    _check(params)
    if activation == "mlp_out" and model.cfg.attn_only:
        raise WorkbenchError(f"model '{model.name}' is attention-only: it has no MLP outputs to patch")
    run = PatchingRun(model, task, params.metric, params.direction, (activation,))
    indices = layer_pos_indices(model, run.clean_tokens.shape[1], params.by_position)
    return _result(run, activation, component, indices, params)


@register("patching.attn_out", LayerOutPatchParams, "patch each attention layer's output by layer x position")
def patch_attn_out(model, task, params: LayerOutPatchParams) -> Result:
    return _layer_out(model, task, params, "attn_out", "attn")


@register("patching.mlp_out", LayerOutPatchParams, "patch each MLP's output by layer x position")
def patch_mlp_out(model, task, params: LayerOutPatchParams) -> Result:
    return _layer_out(model, task, params, "mlp_out", "mlp")


@register("patching.attn_head", HeadPatchParams,
          "patch every attention head's output (z) or its query, key, value or pattern, all positions or by position")
def patch_attn_head(model, task, params: HeadPatchParams) -> Result:
    _check(params)
    allowed = ("z", "q", "k", "v", "pattern", "k_per_query", "v_per_query")
    if params.activation not in allowed:
        raise WorkbenchError(f"activation must be one of {', '.join(allowed)}, not '{params.activation}'")
    kv = ACTIVATIONS[params.activation][1] == "kv_head"
    heads = parse_heads(model, params.heads, model.n_kv_heads if kv else None) if params.heads is not None else None
    run = PatchingRun(model, task, params.metric, params.direction, (params.activation,))
    indices = head_indices(model, params.activation, run.clean_tokens.shape[1], params.by_position, heads)
    return _result(run, params.activation, "head", indices, params)
