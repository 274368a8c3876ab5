"""Path patching (Wang et al. 2022): the effect of a sender head on the metric *through* chosen
receiver heads' queries, keys or values only.

Denoising convention, so 0 = corrupted baseline and 1 = clean as everywhere else:
1. run the corrupted prompts with the sender's output (z, all positions) taken from the clean
   run and every other head's output frozen at its corrupted value (MLPs recompute), from the
   sender's layer up to the last receiver layer, and record the receivers' input (q, k or v);
2. run the corrupted prompts again with only the receivers' inputs replaced by the recorded
   values; the metric there is the path's effect.
All senders of one layer run in one batch, and both steps start at a layer from the cached
residual. Under grouped-query attention a receiver's key or value is its key/value head's, which
the query heads of its group share: patching it patches the group.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from typing import Literal

from workbench.fast_forward.own_hooks import own_hooks
from workbench.fast_forward.attention import sdpa_attention
from circuits.patching.engine import PatchingRun, unembed_final
from workbench.errors import WorkbenchError
from workbench.methods import EDGE_INDEX, Metric, Outputs, register
from workbench.nodes import check_head_names, head_name, parse_heads
from workbench.params import require
from workbench.result import Result

INPUTS = ("q", "k", "v")


class PathPatchingRun(PatchingRun):
    def __init__(self, model, task, metric: str = "logit_diff"):
        super().__init__(model, task, metric, "denoise", activations=("z", "q", "k", "v"))

    def receiver_slots(self, receivers: list[tuple[int, int]], receiver_input: str) -> dict[int, list[int]]:
        """Per receiver layer, the head indices of the hooked input (key/value heads for k and v)."""
        group = self.model.n_heads // self.model.n_kv_heads
        slots: dict[int, set[int]] = {}
        for layer, head in receivers:
            slots.setdefault(layer, set()).add(head // group if receiver_input in ("k", "v") else head)
        return {layer: sorted(heads) for layer, heads in slots.items()}

    @torch.no_grad()
    def run_paths(self, senders: list[tuple[int, int]], receivers: list[tuple[int, int]], receiver_input: str) -> Tensor:
        """Batch-mean metric (unnormalised) per sender."""
        if receiver_input not in INPUTS:
            raise WorkbenchError(f"receiver_input must be one of {', '.join(INPUTS)}, not '{receiver_input}'")
        first_receiver = min(layer for layer, _ in receivers)
        late = [f"{head_name(*s)}" for s in senders if s[0] >= first_receiver]
        if late:
            raise WorkbenchError(f"sender(s) {late} are not before the first receiver layer {first_receiver}; choose earlier senders")
        slots = self.receiver_slots(receivers, receiver_input)
        out = torch.empty(len(senders))
        by_layer: dict[int, list[int]] = {}
        for i, (layer, _) in enumerate(senders):
            by_layer.setdefault(layer, []).append(i)
        with sdpa_attention(self.model.tl):
            for layer, members in by_layer.items():
                out[members] = self._run_layer(layer, [senders[i][1] for i in members], slots, receiver_input).cpu()
        return out

    def _run_layer(self, sender_layer: int, sender_heads: list[int], slots: dict[int, list[int]], x: str) -> Tensor:
        tl, batch, n = self.model.tl, len(self.task), len(sender_heads)
        last_receiver = max(slots)
        base, source = self.base_cache, self.source_cache
        recorded: dict[int, Tensor] = {}

        def freeze_z(act, hook):
            layer = hook.layer()
            act[:] = base[hook.name].repeat(n, 1, 1, 1)
            if layer == sender_layer:
                view = act.view(n, batch, *act.shape[1:])
                for j, h in enumerate(sender_heads):
                    view[j, :, :, h] = source[hook.name][:, :, h]
            return act

        def record(act, hook):
            recorded[hook.layer()] = act[:, :, slots[hook.layer()]].clone()
            return act

        hooks = [(f"blocks.{layer}.attn.hook_z", freeze_z) for layer in range(sender_layer, last_receiver)]
        hooks += [(f"blocks.{layer}.attn.hook_{x}", record) for layer in slots]
        start = base[f"blocks.{sender_layer}.hook_resid_pre"].repeat(n, 1, 1)
        with own_hooks(tl, hooks):
            tl(start, start_at_layer=sender_layer, stop_at_layer=last_receiver + 1)

        def patch(act, hook):
            act[:, :, slots[hook.layer()]] = recorded[hook.layer()]
            return act

        first_receiver = min(slots)
        start = base[f"blocks.{first_receiver}.hook_resid_pre"].repeat(n, 1, 1)
        with own_hooks(tl, [(f"blocks.{layer}.attn.hook_{x}", patch) for layer in slots]):
            resid = tl(start, start_at_layer=first_receiver, stop_at_layer=self.model.n_layers)
        rows = torch.arange(n * batch, device=resid.device)
        logits = unembed_final(tl, resid[rows, self.final_idx.repeat(n)][:, None, :])[:, 0]
        return self._values(logits, n).view(n, batch).mean(1)


@dataclass(frozen=True)
class PathPatchParams:
    receivers: list[str]
    receiver_input: Literal["q", "k", "v"] = "q"
    senders: list[str] | None = None
    metric: Literal["logit_diff", "prob", "logprob", "kl"] = "logit_diff"

    def __post_init__(self):
        require(bool(self.receivers), 'path patching needs receivers, e.g. receivers = ["L23H3"]')
        check_head_names(self.receivers)
        check_head_names(self.senders)


def _path_outputs(params: PathPatchParams) -> Outputs:
    return Outputs((
        Metric(f"path_patch_{params.metric}", "normalised effect of the edge src -> dst (the receiver's dst_input) alone "
               "(0 = corrupted, 1 = clean)", "edge", EDGE_INDEX, "effect"),
        Metric(f"path_patch_{params.metric}_raw", f"{params.metric} with only that edge patched", "edge", EDGE_INDEX, "raw"),
    ))


@register("patching.path", PathPatchParams,
          "path patching: each sender head's effect through each receiver's query, key or value (one edge a row)",
          _path_outputs, version=2)
def path_patching(model, task, params: PathPatchParams, ctx) -> Result:
    receivers = parse_heads(model, list(params.receivers))
    chosen = parse_heads(model, params.senders) if params.senders is not None else None
    run = PathPatchingRun(model, task, params.metric)
    frames = []
    for receiver in receivers:
        if chosen is None:
            senders = [(layer, h) for layer in range(receiver[0]) for h in range(model.n_heads)]
        else:
            senders = [s for s in chosen if s[0] < receiver[0]]
        if not senders:
            raise WorkbenchError(f"no sender comes before receiver {head_name(*receiver)} (layer {receiver[0]})")
        raw = run.run_paths(senders, [receiver], params.receiver_input)
        base = pd.DataFrame({"component": "edge", "src": [head_name(*s) for s in senders], "dst": head_name(*receiver),
                             "dst_input": params.receiver_input})
        frames += [base.assign(metric=f"path_patch_{params.metric}", value=run.baselines.normalise(raw).numpy()),
                   base.assign(metric=f"path_patch_{params.metric}_raw", value=raw.numpy())]
    return Result(pd.concat(frames, ignore_index=True),
                  meta={"baselines": {"clean": run.baselines.clean, "corrupted": run.baselines.corrupted}})
