"""Attribution patching: the first-order estimate of every patch at once.

effect(node) ~ (a_clean - a_corrupted) . d metric / d a, the gradient taken on the corrupted
run (the denoising direction), normalised by the clean - corrupted gap so it reads on the same
scale as exact patching. Cost: one clean forward, one corrupted forward, one backward, for every
node of every activation asked for. With frozen weights nothing requires grad, so the embedding
output is made to (a `hook_embed` hook) and gradients flow back to every hooked activation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from torch import Tensor

from circuits.patching import ACTIVATIONS, METRICS, hook_name, metric_values, unembed_final
from workbench.errors import WorkbenchError
from workbench.methods import Metric, Outputs, register
from workbench.params import require
from workbench.result import Result

COMPONENT = {"resid_pre": "resid", "resid_mid": "resid", "resid_post": "resid", "attn_out": "attn", "mlp_out": "mlp"}


def _reduce(x: Tensor, kind: str, by_position: bool) -> Tensor:
    """Sum a [batch, ...] product over batch and feature dims to [pos?, head?] as the activation indexes."""
    x = x.sum(0)
    if kind == "pos":  # [pos, d]
        return x.sum(-1) if by_position else x.sum()
    if kind in ("head", "kv_head"):  # [pos, head, d]
        x = x.sum(-1)
        return x if by_position else x.sum(0)
    x = x.sum(-1)  # pattern [head, dest, src] -> [head, dest]
    return x.T if by_position else x.sum(-1)


def attribution_patch(model, task, activations: tuple[str, ...] = ("z",), metric: str = "logit_diff",
                      by_position: bool = False) -> tuple[dict[str, Tensor], float, float]:
    """Estimated normalised effect per activation: [layer, pos?, head?] tensors, plus the baselines."""
    if metric not in METRICS:
        raise WorkbenchError(f"unknown metric '{metric}'; choose one of {', '.join(METRICS)}")
    supported = [a for a in ACTIVATIONS if not a.endswith("_per_query")]
    if not activations or any(a not in supported for a in activations):
        raise WorkbenchError(f"activations must be a non-empty list of {', '.join(supported)}; got {list(activations)}")
    if "mlp_out" in activations and model.cfg.attn_only:
        raise WorkbenchError(f"model '{model.name}' is attention-only: it has no MLP outputs")
    tl = model.tl
    device = model.device
    clean, lengths = task.tokens("clean", device=device)
    corrupt, _ = task.tokens("corrupted", device=device)
    answers, wrongs = task.answer_ids(device), task.wrong_ids(device)
    rows = torch.arange(len(task), device=device)
    names = [hook_name(a, layer) for a in activations for layer in range(model.n_layers)]
    n_layers = model.n_layers

    def final_logits(resid):  # unembed only where the metric reads: each prompt's last token
        return unembed_final(tl, resid[rows, lengths - 1][:, None, :])[:, 0]

    with torch.no_grad():
        clean_resid, clean_cache = tl.run_with_cache(clean, names_filter=lambda n: n in names, stop_at_layer=n_layers)
    clean_final = final_logits(clean_resid)
    clean_logprobs = clean_final.float().log_softmax(-1)
    clean_value = metric_values(metric, clean_final, answers, wrongs, clean_logprobs).mean()

    acts: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}

    def save_act(act, hook):
        acts[hook.name] = act.detach()

    def save_grad(grad, hook):
        grads[hook.name] = grad.detach()

    def need_grad(act, hook):
        return act.requires_grad_(True)

    fwd = [("hook_embed", need_grad)] + [(n, save_act) for n in names]
    with torch.enable_grad(), tl.hooks(fwd_hooks=fwd, bwd_hooks=[(n, save_grad) for n in names]):
        value = metric_values(metric, final_logits(tl(corrupt, stop_at_layer=n_layers)), answers, wrongs, clean_logprobs).mean()
        value.backward()
    corrupt_value = value.item()
    gap = clean_value.item() - corrupt_value
    if abs(gap) < 1e-9:
        raise WorkbenchError("the metric is the same on clean and corrupted prompts; nothing to attribute")
    out = {}
    for a in activations:
        kind = ACTIVATIONS[a][1]
        per_layer = []
        for layer in range(model.n_layers):
            n = hook_name(a, layer)
            per_layer.append(_reduce((clean_cache[n].float() - acts[n].float()) * grads[n].float(), kind, by_position) / gap)
        out[a] = torch.stack(per_layer).cpu()
    return out, clean_value.item(), corrupt_value


ATP_ACTIVATIONS = tuple(a for a in ACTIVATIONS if not a.endswith("_per_query"))


@dataclass(frozen=True)
class AttributionPatchParams:
    activations: list[str] = ("z",)
    metric: Literal["logit_diff", "prob", "logprob", "kl"] = "logit_diff"
    by_position: bool = False

    def __post_init__(self):
        require(bool(self.activations) and all(a in ATP_ACTIVATIONS for a in self.activations),
                f"activations must be a non-empty list of {', '.join(ATP_ACTIVATIONS)}; got {list(self.activations)}")


def _atp_outputs(params: AttributionPatchParams) -> Outputs:
    heads = any(ACTIVATIONS[a][1] != "pos" for a in params.activations)
    index = ("layer",) + (("head",) if heads else ()) + (("position",) if params.by_position else ())
    return Outputs((Metric(f"atp_{params.metric}", f"first-order estimate of the normalised {params.metric} effect of "
                           "patching each activation (0 = corrupted, 1 = clean)",
                           tuple(sorted({COMPONENT.get(a, "head") for a in params.activations})), index, "effect"),))


@register("patching.attribution", AttributionPatchParams,
          "attribution patching: first-order estimate of every patch (two forwards, one backward)", _atp_outputs)
def attribution_patching(model, task, params: AttributionPatchParams, ctx) -> Result:
    effects, clean, corrupt = attribution_patch(model, task, tuple(params.activations), params.metric, params.by_position)
    frames = []
    for a, t in effects.items():
        kind = ACTIVATIONS[a][1]
        idx = torch.nonzero(torch.ones_like(t, dtype=torch.bool))
        frame = pd.DataFrame({"layer": idx[:, 0].numpy(), "value": t.reshape(-1).numpy()})
        col = 1
        frame["position"] = idx[:, col].numpy() if params.by_position else None
        col += params.by_position
        frame["head"] = idx[:, col].numpy() if kind != "pos" else None
        frame["component"] = COMPONENT.get(a, "head")
        frame["activation"] = a
        if kind != "pos":
            frame["head_kind"] = "kv" if kind == "kv_head" else "query"
        frames.append(frame)
    scores = pd.concat(frames, ignore_index=True)
    scores["metric"] = f"atp_{params.metric}"
    return Result(scores, meta={"baselines": {"clean": clean, "corrupted": corrupt}})
