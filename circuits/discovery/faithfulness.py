"""Circuits as sets of edges, and how faithful they are, as the MIB circuit-localization track scores them.

A circuit runs with every edge outside it ablated (`circuits.discovery.circuit_run`). Faithfulness = (m(circuit) - m(none)) /
(m(full) - m(none)). A curve takes the top int(f N) edges at fractions f of the N edges of the
workbench's graph (as MIB's `evaluate_area_under_curve` counts them, so a fraction below 1/N keeps
none), after MIB's pruning of edges that cannot reach the logits or be reached from the
embeddings; CPR is the area under it (trapezoids over the fraction), CMD the area between it and
1. Edges are ranked two ways: by |score| ("absolute") and by score, most positive first
("signed"). MIB's leaderboard reports CPR of the signed ranking and CMD of the absolute one. On an
attention-only model N counts no MLP edges; MIB's graph keeps MLP nodes there, so its fractions are
of a larger N. Several circuits run in one batched forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pandas as pd
import torch
from torch import Tensor

from circuits.discovery.circuit_run import circuit_metrics
from circuits.discovery.eap import EAPIGParams
from circuits.discovery.graph import Graph, build_graph
from workbench.errors import WorkbenchError
from workbench.methods import Metric, Outputs, get_method, register
from workbench.nodes import parse_node
from workbench.params import require
from workbench.result import Result
from workbench.spec import Need

FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def _feeds(graph: Graph, group: int) -> Tensor:
    """[target, source]: True where the target's input is read by that source node (a head's q, its
    key/value head's k and v, an MLP's input)."""
    out = torch.zeros(len(graph.targets), len(graph.sources), dtype=torch.bool)
    index = {name: i for i, name in enumerate(graph.sources)}
    for t, target in enumerate(graph.targets):
        kind, layer, head = parse_node(target.node)
        if kind == "kv_head":
            for h in range(head * group, (head + 1) * group):
                out[t, index[f"L{layer}H{h}"]] = True
        elif kind in ("head", "mlp"):
            out[t, index[target.node]] = True
    return out


def prune(graph: Graph, keep: Tensor, group: int) -> Tensor:
    """Drop kept edges that cannot matter: from a source no kept edge reaches (the embeddings are
    always reached), or into a target whose node has no kept edge onward (the logits always count)."""
    feeds = _feeds(graph, group)
    is_logits = torch.tensor([t.input == "logits" for t in graph.targets])
    is_embed = torch.tensor([s == "embed" for s in graph.sources])
    keep = keep.clone()
    while True:
        source_used = keep.any(1)  # [source]: has a kept outgoing edge
        target_alive = is_logits | (feeds & source_used[None, :]).any(1)
        reached = is_embed | (feeds & keep.any(0)[:, None]).any(0)  # [source]: a kept edge reaches its input
        pruned = keep & target_alive[None, :] & reached[:, None]
        if torch.equal(pruned, keep):
            return keep
        keep = pruned


def top_edges(graph: Graph, scores: Tensor, n: int, group: int, absolute: bool = True) -> Tensor:
    """[source, target]: the n valid edges of largest |score| (or, not `absolute`, of largest score), pruned."""
    valid = graph.valid
    ranked = scores.abs() if absolute else scores
    flat = torch.where(valid, ranked, torch.full_like(scores, -torch.inf)).flatten()
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[flat.argsort(descending=True, stable=True)[:n]] = True
    return prune(graph, keep.view_as(scores) & valid, group)


def areas(fractions: list[float], faithfulness: list[float]) -> tuple[float, float]:
    """(CPR, CMD): trapezoid areas under the curve and between it and 1, over the fraction of edges."""
    cpr = cmd = 0.0
    for (x1, f1), (x2, f2) in zip(zip(fractions, faithfulness), zip(fractions[1:], faithfulness[1:])):
        cpr += (x2 - x1) * (f1 + f2) / 2
        cmd += (x2 - x1) * (abs(1 - f1) + abs(1 - f2)) / 2
    return cpr, cmd


def scores_from_rows(graph: Graph, rows) -> Tensor:
    """[source, target] scores from stored edge rows (src, dst, dst_input, value); a missing edge is an error."""
    index = {(graph.sources[s], graph.targets[t].node, graph.targets[t].input): (s, t)
             for s, t in torch.nonzero(graph.valid).tolist()}
    scores = torch.zeros(len(graph.sources), len(graph.targets))
    for src, dst, dst_input, value in zip(rows["src"], rows["dst"], rows["dst_input"], rows["value"]):
        if (src, dst, dst_input) not in index:
            raise WorkbenchError(f"edge {src} -> {dst}.{dst_input} is not in this model's graph")
        scores[index[(src, dst, dst_input)]] = value
    return scores


def discovery_default() -> Need:
    return Need("discovery.eap_ig", EAPIGParams())


def edge_metric(need: Need) -> str | None:
    outputs = get_method(need.method).declared(need.params)
    return next((m.name for m in outputs.metrics if m.components == ("edge",) and m.role in ("effect", "score")), None)


@dataclass(frozen=True)
class FaithfulnessParams:
    discovery: Need = field(default_factory=discovery_default)
    ablation: Literal["corrupted", "mean", "zero"] = "corrupted"
    metric: Literal["logit_diff", "prob", "logprob", "kl"] = "logit_diff"
    fractions: list[float] = FRACTIONS
    seed: int = 0  # of the random ranking, the baseline curve

    def __post_init__(self):
        require(edge_metric(self.discovery) is not None,
                f"discovery names a '{self.discovery.method}' run, which scores no edges; name a discovery run "
                "(discovery.eap, discovery.eap_ig, discovery.eap_ig_activations)")
        require(bool(self.fractions) and all(0 < f <= 1 for f in self.fractions)
                and list(self.fractions) == sorted(set(self.fractions)),
                f"fractions = {list(self.fractions)} must be distinct, ascending shares of the edges in (0, 1]")


CURVE = ("fraction", "ranking")
RANKINGS = ("absolute", "signed", "random")
FAITHFULNESS_OUTPUTS = Outputs((
    Metric("faithfulness", "(m(circuit) - m(none)) / (m(full) - m(none)) for the top int(fraction x edges) edges "
           "(`ranking`: the discovery scores by |score| or signed, or random; `edges`: kept after pruning)",
           "model", CURVE, "detail"),
    Metric("circuit_metric", "the task metric with only the circuit's edges kept", "model", CURVE, "detail"),
    Metric("cpr", "area under the faithfulness curve (higher is better; MIB reports the signed ranking's)",
           "model", ("ranking",), "summary"),
    Metric("cmd", "area between the faithfulness curve and 1 (lower is better; MIB reports the absolute ranking's)",
           "model", ("ranking",), "summary"),
    Metric("metric_full", "the metric with every edge kept (the clean run)", "model", (), "summary"),
    Metric("metric_empty", "the metric with every edge ablated", "model", (), "summary"),
))


@register("circuit.faithfulness", FaithfulnessParams,
          "faithfulness curve of a discovery run's circuits (top edges at MIB's fractions), with CPR / CMD, "
          "against a random ranking", FAITHFULNESS_OUTPUTS, needs=lambda p: {"discovery": p.discovery}, version=2)
def faithfulness(model, task, params: FaithfulnessParams, ctx) -> Result:
    graph = build_graph(model)
    stored = ctx.inputs["discovery"]
    scores = scores_from_rows(graph, stored.metric(edge_metric(params.discovery)))
    group = model.n_heads // model.n_kv_heads
    n_edges = graph.n_edges()
    generator = torch.Generator().manual_seed(params.seed)
    random_scores = torch.rand(scores.shape, generator=generator)
    sizes = [int(f * n_edges) for f in params.fractions]
    keeps = [torch.zeros_like(graph.valid), graph.valid.clone()]  # none, every edge
    for ranked, absolute in ((scores, True), (scores, False), (random_scores, True)):  # in the order of RANKINGS
        keeps += [top_edges(graph, ranked, n, group, absolute) for n in sizes]
    unique: dict[bytes, int] = {}  # the same circuit (none, every edge, the same top edges) is evaluated once
    slot = [unique.setdefault(k.numpy().tobytes(), len(unique)) for k in keeps]
    firsts = [slot.index(i) for i in range(len(unique))]
    evaluated = circuit_metrics(model, task, graph, torch.stack([keeps[i] for i in firsts]), params.metric, params.ablation)
    values = [float(evaluated[i]) for i in slot]
    empty, full = values[0], values[1]
    if abs(full - empty) < 1e-9:
        raise WorkbenchError("the metric is the same with every edge kept and every edge ablated; faithfulness is "
                             "undefined: check that the corrupted prompts change the answer")
    rows, k = [], len(sizes)
    for r, ranking in enumerate(RANKINGS):
        curve = [(v - empty) / (full - empty) for v in values[2 + r * k: 2 + (r + 1) * k]]
        for fraction, keep, value, faith in zip(params.fractions, keeps[2 + r * k:], values[2 + r * k:], curve):
            common = dict(component="model", fraction=fraction, ranking=ranking, edges=int(keep.sum()))
            rows += [dict(common, metric="faithfulness", value=faith), dict(common, metric="circuit_metric", value=value)]
        cpr, cmd = areas(list(params.fractions), curve)
        rows += [dict(component="model", ranking=ranking, metric="cpr", value=cpr),
                 dict(component="model", ranking=ranking, metric="cmd", value=cmd)]
    rows += [dict(component="model", metric="metric_full", value=full), dict(component="model", metric="metric_empty", value=empty)]
    return Result(pd.DataFrame(rows), meta={"discovery_run": stored.run_id, "n_edges": n_edges, "ablation": params.ablation})


def roc_auc(scores: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve of `scores` for the `positive` mask: the chance a positive outranks a
    negative (ties count half), as the Mann-Whitney statistic."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        raise WorkbenchError("a reference circuit needs edges both inside and outside it to score a ranking")
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + ties / 2)
