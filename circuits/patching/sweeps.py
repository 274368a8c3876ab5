"""Registered activation-patching sweeps: thin wrappers over the engine in `circuits.patching.engine`.

Every result row is one patch: `layer`, `position` (null = all positions), `head` (for head
activations; a key/value head index for `k` and `v`, see `head_kind`), the normalised metric
`patch_<metric>` (0 = corrupted baseline, 1 = clean) and the raw batch mean `patch_<metric>_raw`.
Under grouped-query attention `k`/`v` patch a key/value head (and so its whole group of query
heads); `k_per_query`/`v_per_query` patch the key or value as one query head sees it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pandas as pd

from circuits.patching.engine import ACTIVATIONS, PatchIndex, PatchingRun, head_indices, layer_pos_indices
from workbench.errors import WorkbenchError
from workbench.methods import Metric, Outputs, register
from workbench.nodes import check_head_names, parse_heads
from workbench.params import require
from workbench.result import Result

MetricName = Literal["logit_diff", "prob", "logprob", "kl"]


@dataclass(frozen=True)
class PatchParams:
    metric: MetricName = "logit_diff"
    direction: Literal["denoise", "noise"] = "denoise"
    chunk_tokens: int = 16384

    def __post_init__(self):
        require(self.chunk_tokens >= 1, f"chunk_tokens = {self.chunk_tokens} must be at least 1")


@dataclass(frozen=True)
class ResidPatchParams(PatchParams):
    hook: Literal["resid_pre", "resid_mid", "resid_post"] = "resid_pre"
    by_position: bool = True


@dataclass(frozen=True)
class LayerOutPatchParams(PatchParams):
    by_position: bool = True


@dataclass(frozen=True)
class HeadPatchParams(PatchParams):
    activation: Literal["z", "q", "k", "v", "pattern", "k_per_query", "v_per_query"] = "z"
    by_position: bool = False
    heads: list[str] | None = None

    def __post_init__(self):
        super().__post_init__()
        check_head_names(self.heads)


def patch_outputs(component: str, index: tuple[str, ...]):
    """Declared rows of a patching sweep: the normalised effect and its raw twin."""

    def outputs(params) -> Outputs:
        by_pos = ("position",) if params.by_position else ()
        return Outputs((
            Metric(f"patch_{params.metric}", f"normalised {params.metric} after patching (0 = corrupted run, 1 = clean)",
                   component, index + by_pos, "effect"),
            Metric(f"patch_{params.metric}_raw", f"{params.metric} after patching, averaged over prompts",
                   component, index + by_pos, "raw"),
        ))

    return outputs


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


@register("patching.resid", ResidPatchParams, "patch the residual stream (resid_pre/mid/post) by layer x position",
          patch_outputs("resid", ("layer",)))
def patch_resid(model, task, params: ResidPatchParams, ctx) -> Result:
    run = PatchingRun(model, task, params.metric, params.direction, (params.hook,))
    indices = layer_pos_indices(model, run.clean_tokens.shape[1], params.by_position)
    return _result(run, params.hook, "resid", indices, params)


def _layer_out(model, task, params: LayerOutPatchParams, activation: str, component: str) -> Result:
    if activation == "mlp_out" and model.cfg.attn_only:
        raise WorkbenchError(f"model '{model.name}' is attention-only: it has no MLP outputs to patch")
    run = PatchingRun(model, task, params.metric, params.direction, (activation,))
    indices = layer_pos_indices(model, run.clean_tokens.shape[1], params.by_position)
    return _result(run, activation, component, indices, params)


@register("patching.attn_out", LayerOutPatchParams, "patch each attention layer's output by layer x position",
          patch_outputs("attn", ("layer",)))
def patch_attn_out(model, task, params: LayerOutPatchParams, ctx) -> Result:
    return _layer_out(model, task, params, "attn_out", "attn")


@register("patching.mlp_out", LayerOutPatchParams, "patch each MLP's output by layer x position",
          patch_outputs("mlp", ("layer",)))
def patch_mlp_out(model, task, params: LayerOutPatchParams, ctx) -> Result:
    return _layer_out(model, task, params, "mlp_out", "mlp")


@register("patching.attn_head", HeadPatchParams,
          "patch every attention head's output (z) or its query, key, value or pattern, all positions or by position",
          patch_outputs("head", ("layer", "head")))
def patch_attn_head(model, task, params: HeadPatchParams, ctx) -> Result:
    kv = ACTIVATIONS[params.activation][1] == "kv_head"
    heads = parse_heads(model, params.heads, model.n_kv_heads if kv else None) if params.heads is not None else None
    run = PatchingRun(model, task, params.metric, params.direction, (params.activation,))
    indices = head_indices(model, params.activation, run.clean_tokens.shape[1], params.by_position, heads)
    return _result(run, params.activation, "head", indices, params)
