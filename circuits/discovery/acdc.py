"""ACDC (Conmy et al. 2023): exact greedy pruning of the edge graph, the slow reference that
attribution methods are measured against.

Start from the full graph. Visit targets from the logits backwards (later layers first; within a
layer the MLP's input, then the heads' values, keys and queries), and for each target its incoming
edges from the latest source back. Remove an edge for good when removing it (the circuit evaluated
exactly, everything outside it ablated as in `circuits.discovery.faithfulness`) changes the metric by less
than `threshold`: KL(clean || circuit) may grow by less than it, or the task metric moves by less
than it. Each test is one patched forward over the task's prompts, so ACDC is for small graphs or
restricted ones: `layers` limits the candidate edges to sources and targets in a layer range,
`heads_only` leaves MLP edges out; edges that are not candidates always stay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from torch import Tensor
from workbench.progress import tqdm

from circuits.discovery.circuit_run import CircuitEvaluator
from circuits.discovery.graph import Graph, build_graph
from workbench.errors import WorkbenchError
from workbench.methods import EDGE_INDEX, Metric, Outputs, register
from workbench.params import require
from workbench.result import Result

INPUT_ORDER = {"mlp": 0, "v": 1, "k": 2, "q": 3, "logits": -1}


def candidates(graph: Graph, n_layers: int, layers: tuple[int, int] | None, heads_only: bool) -> Tensor:
    """[source, target]: the edges ACDC may remove."""
    first, last = layers if layers is not None else (0, n_layers - 1)
    if not 0 <= first <= last < n_layers:
        raise WorkbenchError(f"layers = [{first}, {last}] is not a layer range of this model (0..{n_layers - 1})")
    src_ok = torch.tensor([(first <= layer <= last or (layer == -1 and first == 0))
                           and not (heads_only and name.startswith("MLP"))
                           for name, layer in zip(graph.sources, graph.source_layers)])
    dst_ok = torch.tensor([(first <= t.layer <= last or (t.input == "logits" and last == n_layers - 1))
                           and not (heads_only and t.input == "mlp") for t in graph.targets])
    return graph.valid & src_ok[:, None] & dst_ok[None, :]


def acdc(evaluator: CircuitEvaluator, allowed: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """(kept edges [source, target], the change measured when each candidate was tested)."""
    graph = evaluator.graph
    keep = graph.valid.clone()
    change = torch.zeros(keep.shape)
    current = float(evaluator.metrics(keep[None])[0])
    order = sorted(range(len(graph.targets)), key=lambda t: (-graph.targets[t].layer, INPUT_ORDER[graph.targets[t].input], t))
    tests = [(s, t) for t in order for s in reversed(range(len(graph.sources))) if allowed[s, t]]
    kl = evaluator.metric == "kl"
    for s, t in tqdm(tests, desc="ACDC edges", leave=False):
        trial = keep.clone()
        trial[s, t] = False
        value = float(evaluator.metrics(trial[None])[0])
        change[s, t] = value - current if kl else abs(value - current)
        if change[s, t] < threshold:
            keep, current = trial, value
    return keep, change


@dataclass(frozen=True)
class ACDCParams:
    threshold: float = 0.01
    metric: Literal["kl", "logit_diff", "prob", "logprob"] = "kl"
    ablation: Literal["corrupted", "mean", "zero"] = "corrupted"
    layers: list[int] | None = None  # [first, last]: candidates between these layers (inclusive)
    heads_only: bool = False

    def __post_init__(self):
        require(self.threshold > 0, f"threshold = {self.threshold} must be positive (0 would keep every edge)")
        require(self.layers is None or (len(self.layers) == 2 and 0 <= self.layers[0] <= self.layers[1]),
                f"layers = {self.layers} must be [first, last] with 0 <= first <= last")


ACDC_OUTPUTS = Outputs((
    Metric("acdc", "the change of the metric when the edge was tested for removal (kept edges: at least the threshold)",
           "edge", EDGE_INDEX, "effect"),
    Metric("acdc_in_circuit", "1 when ACDC kept the edge", "edge", EDGE_INDEX, "detail"),
))


@register("discovery.acdc", ACDCParams,
          "ACDC: exact greedy pruning of edges whose removal changes the metric less than a threshold (small or "
          "restricted graphs)", ACDC_OUTPUTS)
def acdc_method(model, task, params: ACDCParams, ctx) -> Result:
    graph = build_graph(model)
    allowed = candidates(graph, model.n_layers, tuple(params.layers) if params.layers else None, params.heads_only)
    evaluator = CircuitEvaluator(model, task, graph, params.metric, params.ablation)
    keep, change = acdc(evaluator, allowed, params.threshold)
    src, dst, dst_input = graph.edge_names()
    tested = allowed[graph.valid]
    base = pd.DataFrame({"component": "edge", "src": src, "dst": dst, "dst_input": dst_input})[tested.numpy()]
    frame = pd.concat([base.assign(metric="acdc", value=change[allowed].numpy()),
                       base.assign(metric="acdc_in_circuit", value=keep[allowed].float().numpy())], ignore_index=True)
    return Result(frame, meta={"candidates": int(allowed.sum()), "kept": int((keep & allowed).sum()),
                               "threshold": params.threshold, "metric": params.metric})
