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

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal

import pandas as pd
import torch
from torch import Tensor
from workbench.progress import tqdm

from circuits.graph import Graph, build_graph, check_model, source_hooks, source_outputs
from circuits.patching import Baselines, metric_values, unembed_final
from workbench.device_memory import memory_budget
from workbench.methods import EDGE_INDEX, Metric, Outputs, register
from workbench.nodes import parse_node
from workbench.params import require
from workbench.result import Result

MetricName = Literal["logit_diff", "prob", "logprob", "kl"]
GRAD_BYTES = 512 * 2**20  # on the CPU; on a GPU a quarter of its free memory


def _final(tl, resid: Tensor, lengths: Tensor) -> Tensor:
    rows = torch.arange(resid.shape[0], device=resid.device)
    return unembed_final(tl, resid[rows, lengths - 1][:, None, :])[:, 0]


@contextmanager
def input_hooks(tl) -> Iterator[dict[str, Tensor]]:
    """Keep, on a forward with gradients, what `input_gradients` needs: each layer's residual input
    and the gradients at q, k, v and the MLP input, and the final residual's gradient."""
    kept: dict[str, Tensor] = {}

    def value(act, hook):
        kept[hook.name] = act.detach()

    def grad(act, hook):
        act.retain_grad()
        kept[hook.name] = act

    n = tl.cfg.n_layers
    hooks = [(f"blocks.{n - 1}.hook_resid_post", grad)]
    for layer in range(n):
        hooks += [(f"blocks.{layer}.hook_resid_pre", value)] + [(f"blocks.{layer}.attn.hook_{x}", grad) for x in "qkv"]
        if not tl.cfg.attn_only:
            hooks.append((f"blocks.{layer}.hook_mlp_in", grad))
    before = tl.cfg.use_hook_mlp_in
    if not tl.cfg.attn_only:
        tl.set_use_hook_mlp_in(True)  # a clone of the MLP's input, read by the MLP alone: its gradient is the MLP path's
    try:
        with tl.hooks(fwd_hooks=hooks):
            yield kept
    finally:
        if not tl.cfg.attn_only:
            tl.set_use_hook_mlp_in(before)


def input_gradients(model, kept: dict[str, Tensor]) -> dict[str, Tensor]:
    """The metric's gradient at every graph target's input, target-major: for each hook of
    `circuits.graph`, [entry (head, key/value head, or 1), batch, pos, d_model]. From one
    ordinary backward: a head's query input gets its query gradient through its W_Q slice and back
    through the layer's first norm (one vector-Jacobian product per head, vectorised), likewise a
    key/value head's key and value inputs. The same values TransformerLens's split q/k/v inputs
    give, without the per-head copies of the residual stream in the forward and backward."""
    tl, out = model.tl, {}
    n = model.n_layers
    out[f"blocks.{n - 1}.hook_resid_post"] = kept[f"blocks.{n - 1}.hook_resid_post"].grad.detach()[None]
    for layer in range(n):
        attn = tl.blocks[layer].attn
        w = {"q": attn.W_Q, "k": getattr(attn, "_W_K", attn.W_K), "v": getattr(attn, "_W_V", attn.W_V)}
        parts = [torch.einsum("bphe,hde->hbpd", kept[f"blocks.{layer}.attn.hook_{x}"].grad, w[x]) for x in "qkv"]
        _, vjp = torch.func.vjp(tl.blocks[layer].ln1, kept[f"blocks.{layer}.hook_resid_pre"])
        grads = torch.func.vmap(vjp)(torch.cat(parts))[0].detach()  # [entry, batch, pos, d_model]
        for x, g in zip("qkv", grads.split([p.shape[0] for p in parts])):
            out[f"blocks.{layer}.hook_{x}_input"] = g
        if not model.cfg.attn_only:
            out[f"blocks.{layer}.hook_mlp_in"] = kept[f"blocks.{layer}.hook_mlp_in"].grad[None]
    return out


def target_blocks(graph: Graph, n_blocks: int = 6) -> list[tuple[int, int, int]]:
    """(first target, last target, source prefix) for blocks of consecutive targets: each block's
    scores are one matrix product with only the sources that can reach it (about 60% of a full
    sources x targets product, in products wide enough to run at speed)."""
    reach = graph.valid.any(0).nonzero().flatten()  # targets with edges
    prefix = [int(graph.valid[:, t].nonzero().max()) + 1 for t in range(len(graph.targets))]
    size = -(-len(graph.targets) // n_blocks)
    return [(a, min(a + size, len(graph.targets)), max(prefix[a:a + size])) for a in range(0, int(reach.max()) + 1, size)]


def eap_scores(model, task, graph: Graph, metric: str = "logit_diff", steps: int = 1,
               batch_size: int = 16) -> tuple[Tensor, Baselines]:
    """[source, target] scores (0 where no edge) and the clean / corrupted metric baselines."""
    check_model(model)
    tl, device, n = model.tl, model.device, model.n_layers
    clean_all, lengths_all = task.tokens("clean", device=device)
    corrupt_all, _ = task.tokens("corrupted", device=device)
    answers_all, wrongs_all = task.answer_ids(device), task.wrong_ids(device)
    rows_of = {}
    for i, t in enumerate(graph.targets):
        first, _ = rows_of.get(t.hook, (i, i))
        rows_of[t.hook] = (first, i + 1)
    blocks = target_blocks(graph)
    names = set(source_hooks(model))
    n_sources, n_targets = len(graph.sources), len(graph.targets)
    scores = torch.zeros(n_sources, n_targets, dtype=torch.float64)
    values = {"clean": 0.0, "corrupted": 0.0}
    # the gradients of one chunk at every target, [target, batch x pos x d_model], bounded in size
    grad_bytes = memory_budget(device, GRAD_BYTES, share=0.25)
    batch_size = max(1, min(batch_size, grad_bytes // (n_targets * int(lengths_all.max()) * model.d_model * 4)))
    for start in tqdm(range(0, len(task), batch_size), desc=f"EAP{'-IG' if steps > 1 else ''} edges", leave=False):
        rows = slice(start, start + batch_size)
        lengths = lengths_all[rows]
        width = int(lengths.max())
        clean, corrupt = clean_all[rows, :width], corrupt_all[rows, :width]
        answers, wrongs = answers_all[rows], wrongs_all[rows]
        with torch.no_grad():
            clean_resid, cache = tl.run_with_cache(clean, stop_at_layer=n, names_filter=lambda x: x in names)
            clean_logits = _final(tl, clean_resid, lengths).float()
            clean_logprobs = clean_logits.log_softmax(-1)
            values["clean"] += float(metric_values(metric, clean_logits, answers, wrongs, clean_logprobs).sum())
            diff = source_outputs(model, graph, cache).float()
            clean_in = cache["blocks.0.hook_resid_pre"]
            del cache
        grads = torch.zeros(n_targets, clean.numel() * model.d_model, device=device)
        corrupted: dict[str, Tensor] = {}
        for step in range(steps):  # step 0 (alpha = 0) is the corrupted run itself: its sources are read there
            alpha = step / steps

            def start_here(act, hook, alpha=alpha):
                x = act if step == 0 else corrupted["blocks.0.hook_resid_pre"] + alpha * (clean_in - corrupted["blocks.0.hook_resid_pre"])
                return x.detach().requires_grad_(True)

            def read(act, hook):
                corrupted[hook.name] = act.detach()

            reads = [(h, read) for h in names] if step == 0 else []
            with input_hooks(tl) as kept, tl.hooks(fwd_hooks=reads + [("blocks.0.hook_resid_pre", start_here)]):
                resid = tl(corrupt, stop_at_layer=n)
                logits = _final(tl, resid, lengths).float()
                value = metric_values(metric, logits, answers, wrongs, clean_logprobs).sum()
                value.backward()
            if step == 0:
                values["corrupted"] += float(value.detach())
                with torch.no_grad():
                    diff = (diff - source_outputs(model, graph, corrupted)).permute(2, 0, 1, 3).reshape(n_sources, -1)
            for h, grad in input_gradients(model, kept).items():
                first, last = rows_of[h]  # a hook's targets are consecutive, in the order of its entries
                grads[first:last] += grad.float().reshape(last - first, -1)
        for first, last, prefix in blocks:  # only the sources that come before each block of targets
            scores[:prefix, first:last] += (diff[:prefix] @ grads[first:last].T).double().cpu() / steps
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
