"""Edge attribution patching (EAP) and EAP with integrated gradients on the inputs (EAP-IG), over
every edge of `circuits.graph`.

The score of an edge u -> v is (clean output of u - corrupted output of u) . d metric / d input of
v, summed over positions, averaged over prompts and divided by the clean - corrupted metric gap:
a first-order estimate of the normalised effect of patching that edge alone into the corrupted
run (0 = corrupted, 1 = clean), the convention of every patching method here. EAP takes the
gradient on the corrupted run; EAP-IG (Hanna et al. 2024) averages it over `steps` runs whose
input embeddings move from the corrupted toward the clean ones (alpha = 0, 1/steps, ...), so
EAP is EAP-IG with one step.

Cost per chunk of prompts: a clean and a corrupted forward for the source outputs, then one
forward + backward per step; the scores are one matrix product per target hook. Nothing of size
sources x targets x positions is ever held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from circuits.graph import Graph, build_graph, check_model, source_hooks, source_outputs, split_inputs
from circuits.patching import Baselines, metric_values, unembed_final
from workbench.methods import EDGE_INDEX, Metric, Outputs, register
from workbench.nodes import parse_node
from workbench.params import require
from workbench.result import Result

MetricName = Literal["logit_diff", "prob", "logprob", "kl"]


def _final(tl, resid: Tensor, lengths: Tensor) -> Tensor:
    rows = torch.arange(resid.shape[0], device=resid.device)
    return unembed_final(tl, resid[rows, lengths - 1][:, None, :])[:, 0]


def eap_scores(model, task, graph: Graph, metric: str = "logit_diff", steps: int = 1,
               batch_size: int = 16) -> tuple[Tensor, Baselines]:
    """[source, target] scores (0 where no edge) and the clean / corrupted metric baselines."""
    check_model(model)
    tl, device, n = model.tl, model.device, model.n_layers
    clean_all, lengths_all = task.tokens("clean", device=device)
    corrupt_all, _ = task.tokens("corrupted", device=device)
    answers_all, wrongs_all = task.answer_ids(device), task.wrong_ids(device)
    hooks = sorted({t.hook for t in graph.targets})
    by_hook = {h: [(i, t.index) for i, t in enumerate(graph.targets) if t.hook == h] for h in hooks}
    names = set(source_hooks(model))
    scores = torch.zeros(len(graph.sources), len(graph.targets), dtype=torch.float64)
    values = {"clean": 0.0, "corrupted": 0.0}
    chunks = range(0, len(task), batch_size)
    for start in tqdm(chunks, desc=f"EAP{'-IG' if steps > 1 else ''} edges", leave=False):
        rows = slice(start, start + batch_size)
        lengths = lengths_all[rows]
        width = int(lengths.max())
        clean, corrupt = clean_all[rows, :width], corrupt_all[rows, :width]
        answers, wrongs = answers_all[rows], wrongs_all[rows]
        with torch.no_grad():
            clean_resid, clean_cache = tl.run_with_cache(clean, stop_at_layer=n, names_filter=lambda x: x in names)
            corrupt_resid, corrupt_cache = tl.run_with_cache(corrupt, stop_at_layer=n, names_filter=lambda x: x in names)
            clean_logprobs = _final(tl, clean_resid, lengths).float().log_softmax(-1)
            for which, resid in (("clean", clean_resid), ("corrupted", corrupt_resid)):
                logits = _final(tl, resid, lengths).float()
                values[which] += float(metric_values(metric, logits, answers, wrongs, clean_logprobs).sum())
            diff = (source_outputs(model, graph, clean_cache) - source_outputs(model, graph, corrupt_cache)).float()
            clean_in, corrupt_in = clean_cache["blocks.0.hook_resid_pre"], corrupt_cache["blocks.0.hook_resid_pre"]
            del clean_cache, corrupt_cache
        grads: dict[str, Tensor] = {}
        for step in range(steps):
            alpha = step / steps
            kept: dict[str, Tensor] = {}

            def interpolate(act, hook, alpha=alpha):
                return (corrupt_in + alpha * (clean_in - corrupt_in)).detach().requires_grad_(True)

            def keep(act, hook):
                act.retain_grad()
                kept[hook.name] = act

            with split_inputs(tl), tl.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", interpolate)]
                                             + [(h, keep) for h in hooks]):
                resid = tl(corrupt, stop_at_layer=n)
                logits = _final(tl, resid, lengths).float()
                metric_values(metric, logits, answers, wrongs, clean_logprobs).sum().backward()
            for h, act in kept.items():
                grads[h] = grads[h] + act.grad if h in grads else act.grad
        for h, grad in grads.items():
            targets = torch.tensor([i for i, _ in by_hook[h]])
            if by_hook[h][0][1] is None:  # MLP input or logits: [batch, pos, d_model]
                scores[:, targets[0]] += torch.einsum("bpsd,bpd->s", diff, grad.float()).double() / steps
            else:
                index = torch.tensor([j for _, j in by_hook[h]], device=grad.device)
                part = torch.einsum("bpsd,bphd->sh", diff, grad[:, :, index].float()).double() / steps
                scores[:, targets] += part.cpu()
    baselines = Baselines(values["clean"] / len(task), values["corrupted"] / len(task))
    # normalising the corrupted value gives 0 and refuses a task whose corruption changes nothing
    gap = baselines.clean - baselines.corrupted if baselines.normalise(torch.tensor(baselines.corrupted)) == 0 else 0
    return torch.where(graph.valid, scores / len(task) / gap, torch.zeros_like(scores)).float(), baselines


def edge_frame(graph: Graph, scores: Tensor, metric: str) -> pd.DataFrame:
    src, dst, dst_input = graph.edge_names()
    return pd.DataFrame({"component": "edge", "src": src, "dst": dst, "dst_input": dst_input, "metric": metric,
                         "value": scores[graph.valid].numpy()})


def node_frame(graph: Graph, scores: Tensor, name: str) -> pd.DataFrame:
    """Each head's and MLP's outgoing edge scores summed: to first order, the effect of patching its
    whole output (attribution patching of the node)."""
    rows = []
    for node, total in zip(graph.sources, scores.sum(1).tolist()):
        kind, layer, head = parse_node(node)
        if kind == "head":
            rows.append(dict(component="head", layer=layer, head=head, metric=f"{name}_head", value=total))
        elif kind == "mlp":
            rows.append(dict(component="mlp", layer=layer, metric=f"{name}_mlp", value=total))
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class EAPParams:
    metric: MetricName = "logit_diff"
    batch_size: int = 16

    def __post_init__(self):
        require(self.batch_size >= 1, f"batch_size = {self.batch_size} must be at least 1")


@dataclass(frozen=True)
class EAPIGParams(EAPParams):
    steps: int = 5

    def __post_init__(self):
        super().__post_init__()
        require(self.steps >= 1, f"steps = {self.steps} must be at least 1")


def _outputs(name: str):
    def outputs(params) -> Outputs:
        return Outputs((
            Metric(name, f"estimated normalised {params.metric} effect of patching the edge alone (0 = corrupted, 1 = clean)",
                   "edge", EDGE_INDEX, "effect"),
            Metric(f"{name}_head", "the head's outgoing edge scores summed (first-order effect of patching its output)",
                   "head", ("layer", "head"), "effect"),
            Metric(f"{name}_mlp", "the MLP's outgoing edge scores summed", "mlp", ("layer",), "effect"),
        ))

    return outputs


def _result(model, task, params, steps: int, name: str) -> Result:
    graph = build_graph(model)
    scores, baselines = eap_scores(model, task, graph, params.metric, steps, params.batch_size)
    frame = pd.concat([edge_frame(graph, scores, name), node_frame(graph, scores, name)], ignore_index=True)
    meta = {"baselines": {"clean": baselines.clean, "corrupted": baselines.corrupted}, "edges": graph.n_edges(),
            "sources": len(graph.sources), "targets": len(graph.targets)}
    return Result(frame, meta=meta)


@register("discovery.eap", EAPParams, "edge attribution patching: a first-order score for every edge of the model's graph",
          _outputs("eap"))
def eap(model, task, params: EAPParams, ctx) -> Result:
    return _result(model, task, params, 1, "eap")


@register("discovery.eap_ig", EAPIGParams,
          "EAP with integrated gradients on the input embeddings (corrupted -> clean, `steps` points)", _outputs("eap_ig"))
def eap_ig(model, task, params: EAPIGParams, ctx) -> Result:
    return _result(model, task, params, params.steps, "eap_ig")
