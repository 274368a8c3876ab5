"""A stored attention-output SAE applied to a task's prompts.

`sae.activations`: every feature that fires on every token of the prompts (the sparse
activations, one row per (prompt, position, feature)).

`sae.dfa`, direct feature attribution (Kissane et al.): at a destination position, hook_z of head
h is sum_s pattern[h, dst, s] * v[s] (v of the head's key/value group), and the SAE encoder is
linear before its nonlinearity, so each active feature's pre-activation splits exactly into one
term per (head, source position): pattern x value x the head's d_head slice of the encoder
column, plus the constant b_enc - b_dec @ W_enc. Rows give which features explain what each head
writes at the destination (`dfa_head`, summed over sources) and where it read them from (`dfa`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch

from sae.activations import collect_z, z_hook
from sae.features import token_strings
from sae.saes import sae_of
from sae.training import SAETrainParams
from workbench.errors import WorkbenchError
from workbench.methods import Metric, Outputs, get_method, register
from workbench.nodes import check_head_names, parse_heads
from workbench.params import require
from workbench.result import Result
from workbench.spec import Need, TaskSpec
from workbench.tasks.text import TextParams
from workbench.fast_forward.attention import fused_attention


def default_sae() -> Need:
    """The SAE `sae.train` makes with its defaults on its natural task."""
    return Need("sae.train", SAETrainParams(), TaskSpec("corpus", TextParams(n_prompts=256, seq_len=128)))


def _sae_needs(params) -> dict[str, Need]:
    return {"sae": params.sae}


def _check_sae(need: Need) -> None:
    require(get_method(need.method).declared(need.params).artifact == "sae",
            f"sae names a '{need.method}' run, which holds no SAE; name a sae.train or sae.load run")


@dataclass(frozen=True)
class SAEActivationsParams:
    sae: Need = field(default_factory=default_sae)

    def __post_init__(self):
        _check_sae(self.sae)


@register("sae.activations", SAEActivationsParams,
          "activations of a stored attention-output SAE's features on every token of a task's prompts",
          Outputs((Metric("feature_activation", "the feature's activation where it fires", "sae_feature",
                          ("layer", "feature", "prompt", "position", "token"), "detail"),)),
          needs=_sae_needs, version=2, task="corpus")
@torch.no_grad()
@fused_attention
def sae_activations(model, task, params: SAEActivationsParams, ctx) -> Result:
    sae, layer = sae_of(ctx.inputs["sae"], model.device)
    frames = []
    for part in collect_z(model, task, layer):
        acts = sae.encode(part["z"].to(sae.W_enc.device)).float().cpu()
        rows, feats = torch.nonzero(acts > 0, as_tuple=True)
        frames.append(pd.DataFrame({"component": "sae_feature", "layer": layer, "feature": feats.numpy(),
                                    "prompt": part["prompt"][rows].numpy(), "position": part["position"][rows].numpy(),
                                    "token": part["token"][rows].numpy(), "metric": "feature_activation",
                                    "value": acts[rows, feats].numpy()}))
    frame = pd.concat(frames, ignore_index=True)
    ids = {t for p in task.clean for t in p}
    return Result(frame, meta={"sae_run": ctx.inputs["sae"].run_id, "layer": layer, "token_strings": token_strings(model, ids)})


@dataclass(frozen=True)
class SAEDFAParams:
    sae: Need = field(default_factory=default_sae)
    heads: list[str] | None = None  # heads of the SAE's layer to report; None = all
    position: int = -1  # destination position; negative counts from each prompt's last real token
    n_features: int = 10  # the most active features at the destination, per prompt
    batch_size: int = 8

    def __post_init__(self):
        _check_sae(self.sae)
        check_head_names(self.heads)
        require(self.n_features >= 1 and self.batch_size >= 1, "n_features and batch_size must be at least 1")


DFA_INDEX = ("layer", "feature", "prompt", "position")
DFA_OUTPUTS = Outputs((
    Metric("feature_activation", "the feature's activation at the destination position", "sae_feature", DFA_INDEX, "detail"),
    Metric("feature_preactivation", "the pre-activation rebuilt from the per-(head, source) terms", "sae_feature",
           DFA_INDEX, "detail"),
    Metric("dfa_head", "what the head writes into the feature at the destination, summed over sources", "head",
           ("layer", "head", "feature", "prompt", "position"), "detail"),
    Metric("dfa", "what the head writes into the feature, per source position", "head",
           ("layer", "head", "feature", "prompt", "position", "src_position"), "detail"),
))


@register("sae.dfa", SAEDFAParams,
          "direct feature attribution: which SAE features each head writes at a position, per source position",
          DFA_OUTPUTS, needs=_sae_needs, version=2, task="corpus")
@torch.no_grad()
@fused_attention
def sae_dfa(model, task, params: SAEDFAParams, ctx) -> Result:
    sae, layer = sae_of(ctx.inputs["sae"], model.device)
    heads = sorted({h for lay, h in parse_heads(model, params.heads)} if params.heads else range(model.n_heads))
    if params.heads and any(lay != layer for lay, _ in parse_heads(model, params.heads)):
        raise WorkbenchError(f"the SAE reads layer {layer}; name heads of that layer (L{layer}H0..L{layer}H{model.n_heads - 1})")
    tokens, lengths = task.tokens("clean", device=model.device)
    dst_all = lengths + params.position if params.position < 0 else torch.full_like(lengths, params.position)
    if ((dst_all < 0) | (dst_all >= lengths)).any():
        raise WorkbenchError(f"position {params.position} is outside some prompts (lengths {int(lengths.min())}..{int(lengths.max())})")
    names = [f"blocks.{layer}.attn.hook_{n}" for n in ("pattern", "v")] + [z_hook(layer)]
    w_enc = sae.W_enc.float().view(model.n_heads, model.d_head, -1)  # [head, d_head, d_sae]
    constant = (sae.b_enc - (sae.b_dec @ sae.W_enc if sae.cfg.apply_b_dec_to_input else 0)).float()
    group = model.n_heads // model.n_kv_heads
    frames = []
    for start in range(0, len(task), params.batch_size):
        rows = slice(start, start + params.batch_size)
        width = int(lengths[rows].max())
        _, cache = model.tl.run_with_cache(tokens[rows, :width], stop_at_layer=layer + 1, names_filter=lambda n: n in names)
        dst = dst_all[rows]
        b = torch.arange(len(dst))
        pattern = cache[names[0]][b, :, dst].float()  # [batch, head, src]
        v = cache[names[1]].float().repeat_interleave(group, dim=2)  # [batch, src, head, d_head]
        z = cache[names[2]][b, dst].float().flatten(-2)  # [batch, d_in]
        acts = sae.encode(z)
        top = acts.topk(min(params.n_features, acts.shape[-1]), dim=-1)
        enc = w_enc[:, :, top.indices].permute(2, 3, 0, 1)  # [batch, n, head, d_head]
        per_src = torch.einsum("bhs,bshd,bnhd->bnhs", pattern, v, enc)  # [batch, n, head, src]
        for i in range(len(dst)):
            n_src = int(dst[i]) + 1
            for j, (f, a) in enumerate(zip(top.indices[i].tolist(), top.values[i].tolist())):
                if a <= 0:
                    continue
                common = {"layer": layer, "feature": f, "prompt": start + i, "position": int(dst[i])}
                frames.append(pd.DataFrame([{**common, "component": "sae_feature", "metric": "feature_activation", "value": a},
                                            {**common, "component": "sae_feature", "metric": "feature_preactivation",
                                             "value": float(per_src[i, j].sum() + constant[f])}]))
                contrib = per_src[i, j, heads, :n_src]
                frames.append(pd.DataFrame({**common, "component": "head", "head": heads, "metric": "dfa_head",
                                            "value": contrib.sum(-1).cpu().numpy()}))
                frames.append(pd.DataFrame({**common, "component": "head", "head": torch.tensor(heads).repeat_interleave(n_src).numpy(),
                                            "src_position": torch.arange(n_src).repeat(len(heads)).numpy(), "metric": "dfa",
                                            "value": contrib.flatten().cpu().numpy()}))
    if not frames:
        raise WorkbenchError("no SAE feature fires at that position on any prompt; try another position or SAE")
    return Result(pd.concat(frames, ignore_index=True), meta={"sae_run": ctx.inputs["sae"].run_id, "layer": layer})
