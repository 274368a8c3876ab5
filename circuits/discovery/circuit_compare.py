"""A discovery run's ranking against a reference circuit (ACDC's evaluation, MIB's circuit
recovery): ROC AUC of the edge ranking by |score|, and precision / recall of the top edges at the
reference's size; the same over nodes (heads and MLPs, each scored by the |scores| of its outgoing
edges; a node is in the reference when a reference edge leaves or enters it).

The reference is a list of edges (`"L0H0->L1H0.k"`, `"embed->L1H0.v"`, `"L1H0->logits"`) or a
stored run whose declared in-circuit edges are taken (an ACDC run, by spec).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor

from circuits.discovery.faithfulness import discovery_default, edge_metric, roc_auc, scores_from_rows
from circuits.discovery.graph import Graph, build_graph
from workbench.errors import WorkbenchError
from workbench.methods import Metric, Outputs, get_method, register
from workbench.nodes import DST_INPUTS, parse_node
from workbench.params import require
from workbench.spec import Need


def parse_edge(text: str) -> tuple[str, str, str]:
    """`SRC->DST.INPUT` (or `SRC->logits`) as (src, dst, dst_input), syntax checked."""
    src, arrow, rest = text.partition("->")
    dst, _, dst_input = rest.partition(".")
    dst_input = dst_input or ("logits" if dst == "logits" else "")
    if not arrow or dst_input not in DST_INPUTS:
        raise WorkbenchError(f"'{text}' is not an edge; write SRC->DST.INPUT with INPUT one of q, k, v, mlp "
                             "(e.g. L0H0->L1H0.k, embed->MLP0.mlp) or SRC->logits")
    parse_node(src), parse_node(dst)
    return src, dst, dst_input


def reference_mask(graph: Graph, edges) -> Tensor:
    index = {(graph.sources[s], graph.targets[t].node, graph.targets[t].input): (s, t)
             for s, t in torch.nonzero(graph.valid).tolist()}
    mask = torch.zeros(graph.valid.shape, dtype=torch.bool)
    for edge in edges:
        if edge not in index:
            raise WorkbenchError(f"the reference edge {edge[0]}->{edge[1]}.{edge[2]} is not in this model's graph "
                                 "(a node the model lacks, or a source that does not come before its target)")
        mask[index[edge]] = True
    return mask


def node_scores_and_reference(graph: Graph, scores: Tensor, ref: Tensor, group: int) -> tuple[Tensor, Tensor]:
    names = [s for s in graph.sources if s != "embed"]
    rows = [graph.sources.index(n) for n in names]
    node_scores = scores.abs().sum(1)[rows]
    touched = set(graph.sources[s] for s in torch.nonzero(ref.any(1)).flatten().tolist())
    for t in torch.nonzero(ref.any(0)).flatten().tolist():
        kind, layer, head = parse_node(graph.targets[t].node)
        if kind == "kv_head":
            touched |= {f"L{layer}H{h}" for h in range(head * group, (head + 1) * group)}
        elif kind in ("head", "mlp"):
            touched.add(graph.targets[t].node)
    return node_scores, torch.tensor([n in touched for n in names])


def precision_recall(scores: Tensor, positive: Tensor) -> tuple[float, float]:
    """Precision and recall of the top items by score, as many as the reference holds (at that size the
    two are equal; both are reported as ACDC and MIB report them)."""
    k = int(positive.sum())
    hits = int(positive[scores.argsort(descending=True, stable=True)[:k]].sum())
    return hits / k, hits / int(positive.sum())


def _reference_metric(need: Need) -> str | None:
    outputs = get_method(need.method).declared(need.params)
    return next((m.name for m in outputs.metrics if m.components == ("edge",) and m.name.endswith("_in_circuit")), None)


@dataclass(frozen=True)
class CompareParams:
    discovery: Need = field(default_factory=discovery_default)
    reference: list[str] = ()  # edges, e.g. ["L0H0->L1H0.k", "L1H0->logits"]
    reference_run: Need | None = None  # or a run holding an in-circuit edge set (discovery.acdc)

    def __post_init__(self):
        require(edge_metric(self.discovery) is not None,
                f"discovery names a '{self.discovery.method}' run, which scores no edges; name a discovery run")
        require(bool(self.reference) != (self.reference_run is not None),
                "give the reference circuit either as reference = [edges] or as reference_run = { method = ... }")
        for edge in self.reference:
            parse_edge(edge)
        require(self.reference_run is None or _reference_metric(self.reference_run) is not None,
                "reference_run must name a run that keeps a circuit of edges (discovery.acdc)")


COMPARE_OUTPUTS = Outputs(tuple(
    Metric(f"{level}_{name}", meaning.format(level=level), "model", (), "summary")
    for level in ("edge", "node")
    for name, meaning in (("roc_auc", "ROC AUC of the {level} ranking against the reference"),
                          ("precision", "share of the top {level}s (as many as the reference has) inside the reference"),
                          ("recall", "share of the reference's {level}s among the top ones"),
                          ("reference_size", "{level}s in the reference circuit"))
))


def _needs(params: CompareParams) -> dict[str, Need]:
    return {"discovery": params.discovery, **({"reference": params.reference_run} if params.reference_run else {})}


@register("circuit.compare", CompareParams,
          "a discovery ranking against a reference circuit: ROC AUC, precision and recall over edges and nodes",
          COMPARE_OUTPUTS, needs=_needs)
def compare(model, task, params: CompareParams, ctx):
    from workbench.result import Result

    graph = build_graph(model)
    group = model.n_heads // model.n_kv_heads
    scores = scores_from_rows(graph, ctx.inputs["discovery"].metric(edge_metric(params.discovery)))
    if params.reference_run is not None:
        rows = ctx.inputs["reference"].metric(_reference_metric(params.reference_run))
        rows = rows[rows["value"] > 0]
        edges = list(zip(rows["src"], rows["dst"], rows["dst_input"]))
    else:
        edges = [parse_edge(e) for e in params.reference]
    ref = reference_mask(graph, edges)
    edge_scores, edge_ref = scores[graph.valid].abs(), ref[graph.valid]
    node_scores, node_ref = node_scores_and_reference(graph, scores, ref, group)
    out = []
    for level, s, r in (("edge", edge_scores, edge_ref), ("node", node_scores, node_ref)):
        precision, recall = precision_recall(s, r)
        out += [(f"{level}_roc_auc", roc_auc(s, r)), (f"{level}_precision", precision), (f"{level}_recall", recall),
                (f"{level}_reference_size", float(r.sum()))]
    frame = pd.DataFrame({"component": "model", "metric": [m for m, _ in out], "value": [v for _, v in out]})
    return Result(frame, meta={"discovery_run": ctx.inputs["discovery"].run_id, "reference_edges": len(edges)})


def _other_default() -> Need:
    from circuits.discovery.eap import EAPIGParams
    from workbench.spec import TaskSpec

    return Need("discovery.eap_ig", EAPIGParams(), TaskSpec.parse("reciprocal"))


@dataclass(frozen=True)
class OverlapParams:
    discovery: Need = field(default_factory=discovery_default)  # on this run's task
    other: Need = field(default_factory=_other_default)  # on the task to compare with
    fraction: float = 0.02  # each circuit: the top edges at this share of all edges (pruned)

    def __post_init__(self):
        for name in ("discovery", "other"):
            need = getattr(self, name)
            require(edge_metric(need) is not None, f"{name} names a '{need.method}' run, which scores no edges")
        require(self.other.task is not None,
                "other must name its task, e.g. other = { method = 'discovery.eap_ig', task = 'reciprocal' }")
        require(0 < self.fraction <= 1, f"fraction = {self.fraction} must be a share of the edges in (0, 1]")


OVERLAP_OUTPUTS = Outputs(tuple(
    Metric(f"{level}_{name}", meaning.format(level=level), "model", (), "summary")
    for level in ("edge", "head")
    for name, meaning in (("shared_of_this", "share of this task's in-circuit {level}s that the other task's circuit has"),
                          ("shared_of_other", "share of the other task's in-circuit {level}s that this circuit has"),
                          ("jaccard", "in-circuit {level}s in both / in either"),
                          ("count_this", "in-circuit {level}s of this task"), ("count_other", "in-circuit {level}s of the other task"))
))


def circuit_heads(graph: Graph, keep: Tensor, group: int) -> set[str]:
    """Heads a circuit's edges leave or enter (a key/value head counts as its group's query heads)."""
    heads = {graph.sources[s] for s in torch.nonzero(keep.any(1)).flatten().tolist()}
    for t in torch.nonzero(keep.any(0)).flatten().tolist():
        kind, layer, head = parse_node(graph.targets[t].node)
        if kind == "kv_head":
            heads |= {f"L{layer}H{h}" for h in range(head * group, (head + 1) * group)}
        elif kind == "head":
            heads.add(graph.targets[t].node)
    return {h for h in heads if parse_node(h)[0] == "head"}


@register("circuit.overlap", OverlapParams,
          "component reuse across tasks (Merullo et al.): shared in-circuit edges and heads of two tasks' circuits",
          OVERLAP_OUTPUTS, needs=lambda p: {"discovery": p.discovery, "other": p.other})
def overlap(model, task, params: OverlapParams, ctx):
    from circuits.discovery.faithfulness import top_edges
    from workbench.result import Result

    graph = build_graph(model)
    group = model.n_heads // model.n_kv_heads
    n = max(1, int(params.fraction * graph.n_edges()))
    keeps = [top_edges(graph, scores_from_rows(graph, ctx.inputs[name].metric(edge_metric(need))), n, group)
             for name, need in (("discovery", params.discovery), ("other", params.other))]
    out = []
    for level, a, b in (("edge", set(map(tuple, torch.nonzero(keeps[0]).tolist())), set(map(tuple, torch.nonzero(keeps[1]).tolist()))),
                        ("head", circuit_heads(graph, keeps[0], group), circuit_heads(graph, keeps[1], group))):
        both = len(a & b)
        out += [(f"{level}_shared_of_this", both / max(1, len(a))), (f"{level}_shared_of_other", both / max(1, len(b))),
                (f"{level}_jaccard", both / max(1, len(a | b))), (f"{level}_count_this", float(len(a))),
                (f"{level}_count_other", float(len(b)))]
    frame = pd.DataFrame({"component": "model", "metric": [m for m, _ in out], "value": [v for _, v in out]})
    return Result(frame, meta={"runs": {k: ctx.inputs[k].run_id for k in ("discovery", "other")}, "edges_each": n,
                               "heads_this": sorted(circuit_heads(graph, keeps[0], group)),
                               "heads_other": sorted(circuit_heads(graph, keeps[1], group))})
