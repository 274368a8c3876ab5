"""Circuits as sets of edges, and how faithful they are, as the MIB circuit-localization track scores them.

Evaluating a circuit runs the clean prompts with every edge outside it ablated: a target's input
keeps the current output of each source it reaches through a kept edge and takes the ablated
output (the corrupted run's by default, as MIB; or the mean over the corrupted prompts; or zero)
of every other source. Keeping every edge is the clean run; keeping none is the all-ablated run
(with corrupted ablation, exactly the corrupted run). Faithfulness = (m(circuit) - m(none)) /
(m(full) - m(none)). A curve takes the top edges by |score| at fractions of all edges, after MIB's
pruning of edges that cannot reach the logits or be reached from the embeddings; CPR is the area
under it (trapezoids over the fraction), CMD the area between it and 1. Several circuits run in
one batched forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pandas as pd
import torch
from torch import Tensor

from circuits.eap import EAPIGParams, _final
from circuits.graph import Graph, build_graph, check_model, source_hooks, source_outputs, split_inputs
from circuits.own_hooks import own_hooks
from circuits.patching import metric_values
from workbench.device_memory import memory_budget
from workbench.errors import WorkbenchError
from workbench.methods import Metric, Outputs, get_method, register
from workbench.nodes import parse_node
from workbench.params import require
from workbench.result import Result
from workbench.spec import Need

FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
ABLATIONS = ("corrupted", "mean", "zero")
CHUNK_BYTES = 512 * 2**20  # per-source differences of one chunk of prompts x circuits (CPU; GPU: a quarter of free memory)


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


def top_edges(graph: Graph, scores: Tensor, n: int, group: int) -> Tensor:
    """[source, target]: the n valid edges of largest |score|, pruned."""
    valid = graph.valid
    flat = torch.where(valid, scores.abs(), torch.full_like(scores, -1.0)).flatten()
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[flat.argsort(descending=True, stable=True)[:n]] = True
    return prune(graph, keep.view_as(scores) & valid, group)


class CircuitEvaluator:
    """Runs circuits of one graph on one task: the ablated source outputs (and, for KL, the clean
    run's output) are computed once per chunk of prompts and kept while they are small, so that
    ACDC's thousands of one-circuit evaluations do not repeat them."""

    def __init__(self, model, task, graph: Graph, metric: str = "logit_diff", ablation: str = "corrupted"):
        check_model(model)
        if ablation not in ABLATIONS:
            raise WorkbenchError(f"unknown ablation '{ablation}'; choose one of {', '.join(ABLATIONS)}")
        self.model, self.task, self.graph, self.metric, self.ablation = model, task, graph, metric, ablation
        device = model.device
        self.clean, self.lengths = task.tokens("clean", device=device)
        self.corrupt, _ = task.tokens("corrupted", device=device)
        self.answers, self.wrongs = task.answer_ids(device), task.wrong_ids(device)
        self.names = set(source_hooks(model))
        self.layer_sources = {layer: [i for i, s in enumerate(graph.source_layers) if s == layer]
                              for layer in set(graph.source_layers)}
        self.by_hook: dict[str, list[tuple[int, int | None]]] = {}
        for i, t in enumerate(graph.targets):
            self.by_hook.setdefault(t.hook, []).append((i, t.index))
        valid = graph.valid
        # sources are ordered by layer: a hook's targets read only a prefix of them
        self.prefix = {h: int(valid[:, [i for i, _ in e]].any(1).nonzero().max()) + 1 for h, e in self.by_hook.items()}
        self.mean_out = _mean_outputs(model, graph, task, self.names) if ablation == "mean" else None
        self.per_prompt = int(self.lengths.max()) * len(graph.sources) * model.d_model * 4
        self.chunk_bytes = memory_budget(model.device, CHUNK_BYTES, share=0.25)
        self.keep_cache = self.per_prompt * len(task) <= self.chunk_bytes
        self._cache: dict[int, tuple[Tensor, Tensor | None]] = {}

    @torch.no_grad()
    def _prepared(self, start: int, stop: int) -> tuple[Tensor, Tensor | None]:
        """(ablated source outputs, source-major [source, batch x pos x d_model], and the clean
        log-probs for KL) of prompts start:stop."""
        if start in self._cache:
            return self._cache[start]
        tl, n, model = self.model.tl, self.model.n_layers, self.model
        lengths = self.lengths[start:stop]
        width = int(lengths.max())
        shape = (stop - start, width, len(self.graph.sources), model.d_model)
        if self.ablation == "corrupted":
            _, cache = tl.run_with_cache(self.corrupt[start:stop, :width], stop_at_layer=n, names_filter=lambda x: x in self.names)
            ablated = source_outputs(model, self.graph, cache)
        elif self.mean_out is None:
            ablated = torch.zeros(shape, device=model.device, dtype=next(tl.parameters()).dtype)
        else:
            ablated = self.mean_out.expand(shape)
        clean_logprobs = (_final(tl, tl(self.clean[start:stop, :width], stop_at_layer=n), lengths).float().log_softmax(-1)
                          if self.metric == "kl" else None)  # KL compares with the clean run's output
        source_major = ablated.permute(2, 0, 1, 3).reshape(shape[2], -1)
        if self.keep_cache:
            self._cache[start] = (source_major, clean_logprobs)
        return source_major, clean_logprobs

    @torch.no_grad()
    def metrics(self, keeps: Tensor) -> Tensor:
        """Mean metric over the task's prompts for each circuit of `keeps` [circuit, source, target].

        The per-source differences (ablated - current) are held source-major, [circuit, source,
        batch x pos x d_model], so a target's correction is one batched matrix product over the
        sources that come before it (sources are ordered by layer)."""
        model, graph, tl, n = self.model, self.graph, self.model.tl, self.model.n_layers
        d_model, n_circuits, n_sources = model.d_model, keeps.shape[0], len(graph.sources)
        ablate = (graph.valid[None] & ~keeps).to(model.device)  # [circuit, source, target]
        batch = max(1, self.chunk_bytes // (n_circuits * self.per_prompt))
        totals = torch.zeros(n_circuits, dtype=torch.float64)
        for start in range(0, len(self.task), batch):
            stop = min(start + batch, len(self.task))
            source_major, clean_logprobs = self._prepared(start, stop)
            lengths = self.lengths[start:stop]
            b, width = stop - start, int(lengths.max())
            delta = torch.empty(n_circuits, n_sources, b * width * d_model, device=model.device, dtype=source_major.dtype)

            def put(idx, current):  # current: [circuit, n, batch, pos, d_model]
                delta[:, idx] = source_major[idx][None] - current.reshape(n_circuits, len(idx), -1)

            def source(act, hook):
                if hook.name == "blocks.0.hook_resid_pre":
                    put([0], act.view(n_circuits, 1, b, width, d_model))
                    return
                layer = int(hook.name.split(".")[1])
                idx = self.layer_sources[layer]
                if hook.name.endswith("hook_z"):
                    out = torch.einsum("bphd,hdm->bhpm", act, tl.blocks[layer].attn.W_O)
                    heads = idx[: out.shape[1]]
                    put(heads, out.view(n_circuits, b, len(heads), width, d_model).transpose(1, 2))
                else:
                    put(idx[-1:], act.view(n_circuits, 1, b, width, d_model))

            def target(act, hook):
                entries, prefix = self.by_hook[hook.name], self.prefix[hook.name]
                coef = ablate[:, :prefix, [i for i, _ in entries]]  # [circuit, source, entry]
                active = coef.any(2).any(0).nonzero().flatten()  # only sources with an ablated edge here
                if len(active) == 0:
                    return act
                coef = coef[:, active].to(delta.dtype)
                part = delta[:, :prefix] if len(active) == prefix else delta[:, active]
                add = torch.bmm(coef.transpose(1, 2), part)  # [circuit, entry, batch x pos x d_model]
                add = add.view(n_circuits, len(entries), b, width, d_model).permute(0, 2, 3, 1, 4)
                if entries[0][1] is None:
                    return act + add[:, :, :, 0].reshape(act.shape)
                view = act.view(n_circuits, b, width, act.shape[2], d_model).clone()
                view[:, :, :, [j for _, j in entries]] += add
                return view.view(act.shape)

            hooks = [(h, source) for h in sorted(self.names)] + [(h, target) for h in self.by_hook]
            with split_inputs(tl), own_hooks(tl, hooks):
                resid = tl(self.clean[start:stop, :width].repeat(n_circuits, 1), stop_at_layer=n)
            logits = _final(tl, resid, lengths.repeat(n_circuits)).float()
            values = metric_values(self.metric, logits, self.answers[start:stop].repeat(n_circuits),
                                   self.wrongs[start:stop].repeat(n_circuits),
                                   None if clean_logprobs is None else clean_logprobs.repeat(n_circuits, 1))
            totals += values.view(n_circuits, b).sum(1).double().cpu()
        return (totals / len(self.task)).float()


def circuit_metrics(model, task, graph: Graph, keeps: Tensor, metric: str = "logit_diff",
                    ablation: str = "corrupted") -> Tensor:
    """Mean metric over the task's prompts for each circuit of `keeps` [circuit, source, target]."""
    return CircuitEvaluator(model, task, graph, metric, ablation).metrics(keeps)


def _mean_outputs(model, graph: Graph, task, names: set[str]) -> Tensor:
    """[1, 1, source, d_model]: each source's output averaged over every real position of the corrupted prompts."""
    tl = model.tl
    tokens, lengths = task.tokens("corrupted", device=model.device)
    total, count = 0, 0
    for start in range(0, len(task), 16):
        rows = slice(start, start + 16)
        width = int(lengths[rows].max())
        _, cache = tl.run_with_cache(tokens[rows, :width], stop_at_layer=model.n_layers, names_filter=lambda x: x in names)
        out = source_outputs(model, graph, cache)
        valid = (torch.arange(width, device=out.device)[None, :] < lengths[rows, None]).to(out.dtype)
        total = total + (out * valid[:, :, None, None]).sum((0, 1))
        count += int(lengths[rows].sum())
    return (total / count)[None, None]


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
                "(discovery.eap, discovery.eap_ig)")
        require(bool(self.fractions) and all(0 < f <= 1 for f in self.fractions)
                and list(self.fractions) == sorted(set(self.fractions)),
                f"fractions = {list(self.fractions)} must be distinct, ascending shares of the edges in (0, 1]")


CURVE = ("fraction", "ranking")
FAITHFULNESS_OUTPUTS = Outputs((
    Metric("faithfulness", "(m(circuit) - m(none)) / (m(full) - m(none)) for the top edges at `fraction` of all edges "
           "(`ranking`: the discovery scores, or random; `edges`: kept after pruning)", "model", CURVE, "detail"),
    Metric("circuit_metric", "the task metric with only the circuit's edges kept", "model", CURVE, "detail"),
    Metric("cpr", "area under the faithfulness curve (higher is better)", "model", ("ranking",), "summary"),
    Metric("cmd", "area between the faithfulness curve and 1 (lower is better)", "model", ("ranking",), "summary"),
    Metric("metric_full", "the metric with every edge kept (the clean run)", "model", (), "summary"),
    Metric("metric_empty", "the metric with every edge ablated", "model", (), "summary"),
))


@register("circuit.faithfulness", FaithfulnessParams,
          "faithfulness curve of a discovery run's circuits (top edges at MIB's fractions), with CPR / CMD, "
          "against a random ranking", FAITHFULNESS_OUTPUTS, needs=lambda p: {"discovery": p.discovery})
def faithfulness(model, task, params: FaithfulnessParams, ctx) -> Result:
    graph = build_graph(model)
    stored = ctx.inputs["discovery"]
    scores = scores_from_rows(graph, stored.metric(edge_metric(params.discovery)))
    group = model.n_heads // model.n_kv_heads
    n_edges = graph.n_edges()
    generator = torch.Generator().manual_seed(params.seed)
    random_scores = torch.rand(scores.shape, generator=generator)
    sizes = [max(1, int(f * n_edges)) for f in params.fractions]
    keeps = [torch.zeros_like(graph.valid), graph.valid.clone()]  # none, every edge
    keeps += [top_edges(graph, scores, n, group) for n in sizes]
    keeps += [top_edges(graph, random_scores, n, group) for n in sizes]
    unique: dict[bytes, int] = {}  # the same circuit (every edge, at 100% of either ranking) is evaluated once
    slot = [unique.setdefault(k.numpy().tobytes(), len(unique)) for k in keeps]
    firsts = [slot.index(i) for i in range(len(unique))]
    evaluated = circuit_metrics(model, task, graph, torch.stack([keeps[i] for i in firsts]), params.metric, params.ablation)
    values = [float(evaluated[i]) for i in slot]
    empty, full = values[0], values[1]
    if abs(full - empty) < 1e-9:
        raise WorkbenchError("the metric is the same with every edge kept and every edge ablated; faithfulness is "
                             "undefined: check that the corrupted prompts change the answer")
    rows, k = [], len(sizes)
    for r, ranking in enumerate(("scores", "random")):
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
