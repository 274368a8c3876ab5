"""Attribution patching: the first-order estimate of every patch at once.

effect(node) ~ (a_clean - a_corrupted) . d metric / d a, the gradient taken on the corrupted
run (the denoising direction), normalised by the clean - corrupted gap so it reads on the same
scale as exact patching. Cost: one clean forward, one corrupted forward, one backward, for every
node of every activation asked for. Prompts go in chunks whose backward fits the memory budget;
a prompt too long for one whole backward (8k tokens on the embedded model) is differentiated a
layer at a time (`circuits.patching.metric_gradients`), at the cost of one more forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from torch import Tensor

from circuits.patching.metric_gradients import gradients
from workbench.fast_forward.own_hooks import own_hooks
from workbench.fast_forward.attention import covered, fused_attention
from circuits.patching.engine import ACTIVATIONS, METRICS, hook_name, metric_values, unembed_final
from workbench.device_memory import backward_bytes_per_token, memory_budget
from workbench.errors import WorkbenchError
from workbench.methods import Metric, Outputs, register
from workbench.params import require
from workbench.progress import tqdm
from workbench.result import Result

BACKWARD_BYTES = 4 * 2**30  # on the CPU; on a GPU half its free memory
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


@fused_attention
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
    tl, device, n_layers = model.tl, model.device, model.n_layers
    clean_all, lengths_all = task.tokens("clean", device=device)
    corrupt_all, _ = task.tokens("corrupted", device=device)
    answers_all, wrongs_all = task.answer_ids(device), task.wrong_ids(device)
    names = [hook_name(a, layer) for a in activations for layer in range(n_layers)]
    patterns = "pattern" in activations or not all(covered(block.attn) for block in tl.blocks)
    batch_size, layerwise = backward_plan(model, clean_all.shape[1], patterns)
    sums: dict[str, list[Tensor]] = {a: [0] * n_layers for a in activations}
    totals = {"clean": 0.0, "corrupted": 0.0}
    chunks = range(0, len(task), batch_size)
    steps = n_layers if layerwise else 1
    bar = tqdm(total=len(chunks) * steps, desc="attribution patching" + (" (layers backward)" if layerwise else " (chunks)"),
               leave=False, disable=len(chunks) * steps == 1)
    for start in chunks:
        rows = slice(start, start + batch_size)
        lengths, answers, wrongs = lengths_all[rows], answers_all[rows], wrongs_all[rows]

        def final_logits(resid):  # unembed only where the metric reads: each prompt's last token
            return unembed_final(tl, resid[torch.arange(len(lengths), device=device), lengths - 1][:, None, :])[:, 0]

        clean_cache: dict[str, Tensor] = {}

        def keep(act, hook):
            clean_cache[hook.name] = act

        with torch.no_grad(), own_hooks(tl, [(n, keep) for n in names]):
            clean_final = final_logits(tl(clean_all[rows], stop_at_layer=n_layers))
        clean_logprobs = clean_final.float().log_softmax(-1)
        totals["clean"] += float(metric_values(metric, clean_final, answers, wrongs, clean_logprobs).sum())
        value, acts, grads = gradients(
            tl, corrupt_all[rows], names,
            lambda resid: metric_values(metric, final_logits(resid), answers, wrongs, clean_logprobs).sum(), layerwise,
            bar.update)
        totals["corrupted"] += value
        for a in activations:
            kind = ACTIVATIONS[a][1]
            for layer in range(n_layers):
                n = hook_name(a, layer)
                sums[a][layer] += _reduce((clean_cache[n].float() - acts[n].float()) * grads[n].float(), kind, by_position)
        del clean_cache, acts, grads
        if not layerwise:
            bar.update()
    bar.close()
    clean_value, corrupt_value = totals["clean"] / len(task), totals["corrupted"] / len(task)
    gap = clean_value - corrupt_value
    if abs(gap) < 1e-9:
        raise WorkbenchError("the metric is the same on clean and corrupted prompts; nothing to attribute")
    out = {a: (torch.stack(sums[a]) / len(task) / gap).cpu() for a in activations}
    return out, clean_value, corrupt_value


def backward_plan(model, n_tokens: int, patterns: bool = True) -> tuple[int, bool]:
    """(prompts per chunk, a layer at a time?): whole backwards over as many prompts as the memory
    budget holds; when not even one prompt's fits, one layer's graph at a time (`metric_gradients`).
    `patterns`: whether the backward keeps attention patterns (unfused attention)."""
    per_prompt_layer = backward_bytes_per_token(model.cfg, n_tokens, patterns) * n_tokens
    budget = memory_budget(model.device, BACKWARD_BYTES)
    whole = budget // (per_prompt_layer * model.n_layers)
    if whole >= 1:
        return int(whole), False
    return max(1, int(budget // per_prompt_layer)), True


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
