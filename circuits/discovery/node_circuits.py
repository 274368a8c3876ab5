"""Node-level circuits from stored node scores (head patching, attribution patching, ablation,
DLA...), as edge rankings, so that they are evaluated and compared like any discovery run.

An edge's score is the smaller weight of its two ends: |the node's score| for heads (a key/value
head: the largest of its group's) and MLPs, and infinity for the embeddings and the logits (MLPs
too, when no MLP scores are given: they then always stay). The top edges by that score are the
edges among the top nodes, so a faithfulness curve over it is the curve of node circuits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch

from circuits.discovery.eap import edge_frame
from circuits.discovery.graph import build_graph
from circuits.patching.sweeps import HeadPatchParams
from workbench.methods import EDGE_INDEX, Metric, Outputs, get_method, register
from workbench.nodes import parse_node
from workbench.params import require
from workbench.result import Result
from workbench.spec import Need


def _per_head_metric(need: Need, component: str = "head") -> str | None:
    outputs = get_method(need.method).declared(need.params)
    fits = [m for m in outputs.metrics if m.components == (component,) and m.role in ("effect", "score")
            and set(m.index) == ({"layer", "head"} if component == "head" else {"layer"})]
    fits.sort(key=lambda m: m.role != "effect")  # causal effects first
    return fits[0].name if fits else None


@dataclass(frozen=True)
class NodeCircuitParams:
    scores: Need = field(default_factory=lambda: Need("patching.attn_head", HeadPatchParams()))
    mlp_scores: Need | None = None  # per-MLP effects over all positions, e.g. patching.mlp_out with by_position = false

    def __post_init__(self):
        require(_per_head_metric(self.scores) is not None,
                f"scores names a '{self.scores.method}' run, which writes no per-head scores")
        require(self.mlp_scores is None or _per_head_metric(self.mlp_scores, "mlp") is not None,
                "mlp_scores must name a run with one effect per MLP layer (patching.mlp_out with by_position = false)")


@register("discovery.nodes", NodeCircuitParams,
          "node-level circuits from stored head (and MLP) scores, as an edge ranking: the edges among the top nodes",
          Outputs((Metric("node_edge", "the smaller |score| of the edge's two ends (embeddings and logits: infinite)",
                          "edge", EDGE_INDEX, "score"),)),
          needs=lambda p: {"scores": p.scores, **({"mlp_scores": p.mlp_scores} if p.mlp_scores else {})})
def node_circuit(model, task, params: NodeCircuitParams, ctx) -> Result:
    graph = build_graph(model)
    heads = ctx.inputs["scores"].metric(_per_head_metric(params.scores))
    heads = heads[heads["prompt"].isna()] if "prompt" in heads else heads
    head_weight = heads.groupby(["layer", "head"])["value"].mean().abs()
    mlp_weight = {}
    if params.mlp_scores is not None:
        mlps = ctx.inputs["mlp_scores"].metric(_per_head_metric(params.mlp_scores, "mlp"))
        mlp_weight = mlps[mlps["position"].isna()].groupby("layer")["value"].mean().abs().to_dict()
    top = float(head_weight.max()) + 1.0  # stands for infinity: above every real score
    group = model.n_heads // model.n_kv_heads

    def weight(node: str) -> float:
        kind, layer, head = parse_node(node)
        if kind == "head":
            return float(head_weight.get((layer, head), 0.0))
        if kind == "kv_head":
            return max(float(head_weight.get((layer, h), 0.0)) for h in range(head * group, (head + 1) * group))
        if kind == "mlp":
            return float(mlp_weight.get(layer, top))
        return top

    src = torch.tensor([weight(s) for s in graph.sources])
    dst = torch.tensor([weight(t.node) for t in graph.targets])
    scores = torch.minimum(src[:, None], dst[None, :]) * graph.valid
    return Result(pd.DataFrame(edge_frame(graph, scores, "node_edge")),
                  meta={"scores_run": ctx.inputs["scores"].run_id})
