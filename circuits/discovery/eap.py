"""Edge attribution patching (EAP) and EAP with integrated gradients on the inputs (EAP-IG), over
every edge of `circuits.discovery.graph`.

The score of an edge u -> v is (clean output of u - corrupted output of u) . d metric / d input of
v, summed over positions, averaged over prompts and divided by the clean - corrupted metric gap:
a first-order estimate of the normalised effect of patching that edge alone into the corrupted
run (0 = corrupted, 1 = clean), the convention of every patching method here.

Where the gradient is taken (`linearise`) is a point on the path corrupted + alpha (clean -
corrupted): "clean" takes alpha = 1/steps, ..., 1 (the last point is the clean run), "corrupted"
alpha = 0, ..., (steps - 1)/steps (the first is the corrupted run). Each method's default is the
literature's, as Hanna et al.'s EAP-IG code (which MIB's circuit track runs) computes it: EAP
(Syed et al. 2023) takes the gradient on the clean run; EAP-IG (Hanna et al. 2024) averages it
over `steps` runs whose input embeddings move from the corrupted toward the clean ones from the
corrupted end; EAP-IG-activations interpolates each node group on the clean prompts toward the
clean end. EAP is EAP-IG with one step at the clean end.

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

from circuits.discovery.graph import Graph, build_graph, check_model, source_hooks
from circuits.patching.engine import Baselines, metric_values, unembed_final
from workbench.fast_forward.own_hooks import own_hooks
from workbench.fast_forward.attention import covered, fused_attention
from circuits.patching.attribution_patching import BACKWARD_BYTES
from workbench.device_memory import backward_bytes_per_token, memory_budget
from workbench.errors import WorkbenchError
from workbench.methods import EDGE_INDEX, Metric, Outputs, register
from workbench.nodes import parse_node
from workbench.params import require
from workbench.result import Result

MetricName = Literal["logit_diff", "prob", "logprob", "kl"]
Linearise = Literal["clean", "corrupted"]
GRAD_BYTES = 512 * 2**20  # on the CPU; on a GPU a quarter of its free memory


def _final(tl, resid: Tensor, lengths: Tensor) -> Tensor:
    rows = torch.arange(resid.shape[0], device=resid.device)
    return unembed_final(tl, resid[rows, lengths - 1][:, None, :])[:, 0]


@contextmanager
def input_hooks(tl) -> Iterator[dict[str, Tensor]]:
    """Keep, on a forward with gradients, what `add_input_gradients` needs: each layer's residual
    input, q, k and v with their gradients, the MLP input's and the final residual's gradients."""
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
        with own_hooks(tl, hooks):
            yield kept
    finally:
        if not tl.cfg.attn_only:
            tl.set_use_hook_mlp_in(before)


def norm_vjp(norm, x: Tensor, cotangents: Tensor) -> Tensor:
    """[entry, batch, pos, d_model]: x's gradient through a norm with weights for each cotangent,
    through `torch.func` (the weightless pre-norms take the closed form of `add_input_gradients`)."""
    _, vjp = torch.func.vjp(norm, x)
    return torch.func.vmap(vjp)(cotangents)[0].detach()


CLOSED_FORM_NORMS = ("RMSNormPre", "LayerNormPre", "Identity")


@torch.no_grad()
def add_input_gradients(model, kept: dict[str, Tensor], out: Tensor, rows_of: dict[str, tuple[int, int]],
                        copies: int, overwrite: bool) -> None:
    """Add (or, with `overwrite`, write) the metric's gradient at every graph target's input into
    `out` [target, batch x pos x d_model], summed over `copies` stacked copies of the chunk.

    From one ordinary backward: a head's query input gets its query gradient g through its W_Q
    slice and back through the layer's first norm, likewise a key/value head's key and value
    inputs; the same values TransformerLens's split q/k/v inputs give, without their per-head
    copies of the residual stream. Under a weightless norm y = (x - mean) r the input gradient is
    r (W g - mean(W g) - y (y . W g) / d) (RMS: no mean), and y . W g = (q - b_Q) . g and
    mean(W g) are head-space products, so each target costs one product written into `out` and
    one pass that adds its y term: no per-head d_model tensor is built, copied or reduced."""
    tl, n = model.tl, model.n_layers

    def put(rows: tuple[int, int], value: Tensor) -> None:
        view = out[rows[0]:rows[1]]
        view.copy_(value) if overwrite else view.add_(value)

    last = f"blocks.{n - 1}.hook_resid_post"
    put(rows_of[last], kept[last].grad.float().view(copies, 1, -1).sum(0))
    for layer in range(n):
        norm, attn = tl.blocks[layer].ln1, tl.blocks[layer].attn
        kind = type(norm).__name__
        x = kept[f"blocks.{layer}.hook_resid_pre"].float()
        if kind == "LayerNormPre":
            x = x - x.mean(-1, keepdim=True)
        r = (x.pow(2).mean(-1, keepdim=True) + norm.eps).rsqrt() if kind != "Identity" else torch.ones_like(x[..., :1])
        y = x * r  # [copies x batch, pos, d_model]
        d = x.shape[-1]
        for name in "qkv":
            w = {"q": attn.W_Q, "k": getattr(attn, "_W_K", attn.W_K), "v": getattr(attn, "_W_V", attn.W_V)}[name].float()
            bias = {"q": attn.b_Q, "k": getattr(attn, "_b_K", attn.b_K), "v": getattr(attn, "_b_V", attn.b_V)}[name].float()
            act = kept[f"blocks.{layer}.attn.hook_{name}"]  # [copies x batch, pos, head, d_head]
            g = act.grad.float()
            lo, hi = rows_of[f"blocks.{layer}.hook_{name}_input"]
            heads, tokens = hi - lo, g.shape[0] // copies * g.shape[1]
            if kind not in CLOSED_FORM_NORMS:
                grads = norm_vjp(norm, kept[f"blocks.{layer}.hook_resid_pre"], torch.einsum("bphe,hde->hbpd", g, w))
                put((lo, hi), grads.float().reshape(heads, copies, -1).sum(1))
                continue
            view = out[lo:hi].view(heads, tokens, d)
            rg = (g * r[..., None]).view(copies, tokens, heads, -1).sum(0).transpose(0, 1)
            torch.baddbmm(view, rg, w.transpose(1, 2), beta=0 if overwrite else 1, out=view)
            if kind == "Identity":
                continue
            # minus r (y . W g) / d for each copy: y's coefficient, [copies, head, batch x pos, 1]
            coef = ((act.detach().float() - bias) * g).sum(-1).mul_(r).div_(-d)
            coef = coef.view(copies, tokens, heads).transpose(1, 2)[..., None]
            for c, y_c in enumerate(y.view(copies, 1, tokens, d)):
                view.addcmul_(y_c, coef[c])
            if kind == "LayerNormPre":  # minus r mean(W g), a constant along d_model
                mean = (g * w.mean(1)).sum(-1).mul_(r).view(copies, tokens, heads).sum(0)
                view.sub_(mean.T[..., None])
        if not model.cfg.attn_only:
            mlp = f"blocks.{layer}.hook_mlp_in"
            put(rows_of[mlp], kept[mlp].grad.float().view(copies, 1, -1).sum(0))


def target_blocks(graph: Graph, n_blocks: int = 6) -> list[tuple[int, int, int]]:
    """(first target, last target, source prefix) for blocks of consecutive targets: each block's
    scores are one matrix product with only the sources that can reach it (about 60% of a full
    sources x targets product, in products wide enough to run at speed)."""
    reach = graph.valid.any(0).nonzero().flatten()  # targets with edges
    prefix = [int(graph.valid[:, t].nonzero().max()) + 1 for t in range(len(graph.targets))]
    size = -(-len(graph.targets) // n_blocks)
    return [(a, min(a + size, len(graph.targets)), max(prefix[a:a + size])) for a in range(0, int(reach.max()) + 1, size)]


def group_hooks(model) -> list[str]:
    """The node groups EAP-IG-activations interpolates one at a time (as Hanna et al.'s code and
    MIB do): the embeddings, each layer's attention output (all its heads) and each MLP's output."""
    names = ["blocks.0.hook_resid_pre"]
    for layer in range(model.n_layers):
        names.append(f"blocks.{layer}.hook_attn_out")
        if not model.cfg.attn_only:
            names.append(f"blocks.{layer}.hook_mlp_out")
    return names


def source_differences(model, graph: Graph, clean: dict[str, Tensor], corrupted: dict[str, Tensor]) -> Tensor:
    """[source, batch x pos x d_model], clean - corrupted output of every source, in float32; a
    head's difference is its z difference through its W_O slice (one product, not two)."""
    tl = model.tl
    first = clean["blocks.0.hook_resid_pre"]
    out = torch.empty(len(graph.sources), *first.shape, device=first.device, dtype=torch.float32)
    out[0] = first - corrupted["blocks.0.hook_resid_pre"]
    i = 1
    for layer in range(model.n_layers):
        dz = (clean[f"blocks.{layer}.attn.hook_z"] - corrupted[f"blocks.{layer}.attn.hook_z"]).float()
        b, p = dz.shape[:2]  # [head, batch x pos, d_head] @ [head, d_head, d_model], written in place
        torch.bmm(dz.reshape(b * p, model.n_heads, -1).transpose(0, 1), tl.blocks[layer].attn.W_O.float(),
                  out=out[i:i + model.n_heads].view(model.n_heads, b * p, -1))
        i += model.n_heads
        if not model.cfg.attn_only:
            out[i] = clean[f"blocks.{layer}.hook_mlp_out"] - corrupted[f"blocks.{layer}.hook_mlp_out"]
            i += 1
    if i != len(graph.sources):
        raise WorkbenchError("the graph does not match the model's sources")
    return out.view(len(graph.sources), -1)


@fused_attention
def eap_scores(model, task, graph: Graph, metric: str = "logit_diff", steps: int = 1, batch_size: int = 16,
               interpolate: Literal["inputs", "activations"] = "inputs",
               linearise: Linearise = "clean") -> tuple[Tensor, Baselines]:
    """[source, target] scores (0 where no edge) and the clean / corrupted metric baselines.

    `interpolate="inputs"` is EAP-IG (EAP at one step). `"activations"` is EAP-IG-activations:
    for each node group in turn (`group_hooks`) and each alpha, that group's output is set to
    corrupted + alpha (clean - corrupted), held fixed (no gradient flows through it), on the run
    of the `linearise` end's prompts; a target's gradient is the mean over every group and alpha.
    It costs groups x steps forwards and backwards (on the embedded model 61 x steps)."""
    if linearise not in ("clean", "corrupted"):
        raise WorkbenchError(f"linearise = {linearise!r}: choose 'clean' or 'corrupted'")
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
    groups = group_hooks(model) if interpolate == "activations" else []
    names = set(source_hooks(model)) | set(groups)
    at_clean = linearise == "clean"
    alphas = [(step + at_clean) / steps for step in range(steps)]
    passes = [(g, alpha) for g in groups for alpha in alphas] if groups else [(None, alpha) for alpha in alphas]
    # corrupted inputs' first pass (alpha = 0) is the corrupted run: its sources are read there
    read_first = not groups and not at_clean
    n_sources, n_targets = len(graph.sources), len(graph.targets)
    scores = torch.zeros(n_sources, n_targets, dtype=torch.float64)
    values = {"clean": 0.0, "corrupted": 0.0}
    # the gradients of one chunk at every target, [target, batch x pos x d_model], bounded in size
    grad_bytes = memory_budget(device, GRAD_BYTES, share=0.25)
    batch_size = max(1, min(batch_size, grad_bytes // (n_targets * int(lengths_all.max()) * model.d_model * 4)))
    grads = None
    desc = {"inputs": "EAP-IG" if steps > 1 else "EAP", "activations": "EAP-IG-activations"}[interpolate]
    bar = tqdm(total=-(-len(task) // batch_size) * len(passes), desc=f"{desc} edges (gradient passes)", leave=False)
    for start in range(0, len(task), batch_size):
        rows = slice(start, start + batch_size)
        lengths = lengths_all[rows]
        width = int(lengths.max())
        clean, corrupt = clean_all[rows, :width], corrupt_all[rows, :width]
        base = clean if at_clean else corrupt  # the prompts every gradient pass runs
        answers, wrongs = answers_all[rows], wrongs_all[rows]

        def value_of(resid, copies=1):
            logits = _final(tl, resid, lengths.repeat(copies)).float()
            return metric_values(metric, logits, answers.repeat(copies), wrongs.repeat(copies), clean_logprobs.repeat(copies, 1))

        with torch.no_grad():
            clean_resid, clean_cache = tl.run_with_cache(clean, stop_at_layer=n, names_filter=lambda x: x in names)
            clean_logprobs = _final(tl, clean_resid, lengths).float().log_softmax(-1)
            values["clean"] += float(value_of(clean_resid).sum())
            corrupted: dict[str, Tensor] = {}
            if not read_first:  # the corrupted outputs first: every pass interpolates between them and the clean
                corrupt_resid, corrupted = tl.run_with_cache(corrupt, stop_at_layer=n, names_filter=lambda x: x in names)
                values["corrupted"] += float(value_of(corrupt_resid).sum())
        if grads is None or grads.shape[1] < clean.numel() * model.d_model:  # one buffer for every chunk: fresh pages cost a zero fill each
            grads = torch.empty(n_targets, batch_size * int(lengths_all.max()) * model.d_model, device=device)
        grads_here = grads[:, :clean.numel() * model.d_model]
        # several passes run as stacked copies of the chunk in one forward and backward when memory allows
        per_pass = backward_bytes_per_token(model.cfg, width, patterns=not all(covered(b.attn) for b in tl.blocks)) * n * clean.numel()
        copies = max(1, min(len(passes), memory_budget(device, BACKWARD_BYTES, share=0.25) // per_pass))
        for first in range(0, len(passes), copies):
            batch = passes[first:first + copies]
            hooks = _interpolation_hooks(batch, len(clean), clean_cache, corrupted, at_clean)
            if read_first and first == 0:
                def read(act, hook, into=corrupted, size=len(clean)):
                    into[hook.name] = act[:size].detach()

                hooks += [(h, read) for h in names]
            # the interpolation hooks first: `input_hooks` keeps the residuals the run actually reads
            with own_hooks(tl, hooks), input_hooks(tl) as kept:
                resid = tl(base.repeat(len(batch), 1), stop_at_layer=n)
                value = value_of(resid, len(batch))
                value.sum().backward()
            if read_first and first == 0:
                values["corrupted"] += float(value[:len(clean)].detach().sum())
            add_input_gradients(model, kept, grads_here, rows_of, len(batch), overwrite=first == 0)
            del kept
            bar.update(len(batch))
        with torch.no_grad():
            diff = source_differences(model, graph, clean_cache, corrupted)
        del clean_cache, corrupted
        for lo, hi, prefix in blocks:  # only the sources that come before each block of targets
            scores[:prefix, lo:hi] += (diff[:prefix] @ grads_here[lo:hi].T).double().cpu() / len(passes)
    bar.close()
    baselines = Baselines(values["clean"] / len(task), values["corrupted"] / len(task))
    # normalising the corrupted value gives 0 and refuses a task whose corruption changes nothing
    gap = baselines.clean - baselines.corrupted if baselines.normalise(torch.tensor(baselines.corrupted)) == 0 else 0
    return torch.where(graph.valid, scores / len(task) / gap, torch.zeros_like(scores)).float(), baselines


def _interpolation_hooks(batch: list[tuple[str | None, float]], size: int, clean: dict[str, Tensor],
                         corrupted: dict[str, Tensor], on_clean: bool) -> list:
    """Forward hooks for one gradient pass over len(batch) copies of a chunk of `size` prompts (the
    clean ones if `on_clean`, else the corrupted): copy r has its group batch[r][0] (None: the input
    embeddings) set to corrupted + alpha (clean - corrupted). The embeddings become the leaf the
    backward reaches."""
    embed = "blocks.0.hook_resid_pre"

    def start(act, hook):
        out = act.detach().clone()
        for r, (group, alpha) in enumerate(batch):
            rows = slice(r * size, (r + 1) * size)
            if group not in (None, embed) or alpha == (1 if on_clean else 0):
                continue  # the run's own embeddings
            if on_clean:
                out[rows] = torch.lerp(corrupted[embed], clean[embed], alpha)
            else:  # read from the run itself: on the corrupted prompts' first pass they are not yet kept
                out[rows].lerp_(clean[embed], alpha)
        return out.requires_grad_(True)

    def fixed(act, hook):
        out = act.clone()
        for r, (group, alpha) in enumerate(batch):
            if group == hook.name:
                value = corrupted[hook.name] + alpha * (clean[hook.name] - corrupted[hook.name])
                out[r * size:(r + 1) * size] = value.detach()
        return out

    hooks = [(embed, start)]
    hooks += [(g, fixed) for g in dict.fromkeys(g for g, _ in batch if g not in (None, embed))]
    return hooks


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
    """`linearise`: the end of the corrupted -> clean path the gradient is taken at (module docstring)."""
    metric: MetricName = "logit_diff"
    batch_size: int = 16
    linearise: Linearise = "clean"  # Syed et al.'s EAP: the clean run's gradient

    def __post_init__(self):
        require(self.batch_size >= 1, f"batch_size = {self.batch_size} must be at least 1")


@dataclass(frozen=True)
class EAPIGParams(EAPParams):
    steps: int = 5
    linearise: Linearise = "corrupted"  # Hanna et al.'s EAP-IG: alpha = 0, 1/steps, ..., (steps - 1)/steps

    def __post_init__(self):
        super().__post_init__()
        require(self.steps >= 1, f"steps = {self.steps} must be at least 1")


@dataclass(frozen=True)
class EAPIGActivationsParams(EAPIGParams):
    linearise: Linearise = "clean"  # Hanna et al.'s code: the clean prompts, alpha = 1/steps, ..., 1


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


def _result(model, task, params, steps: int, name: str, interpolate: str = "inputs") -> Result:
    graph = build_graph(model)
    scores, baselines = eap_scores(model, task, graph, params.metric, steps, params.batch_size, interpolate, params.linearise)
    frame = pd.concat([edge_frame(graph, scores, name), node_frame(graph, scores, name)], ignore_index=True)
    meta = {"baselines": {"clean": baselines.clean, "corrupted": baselines.corrupted}, "edges": graph.n_edges(),
            "sources": len(graph.sources), "targets": len(graph.targets)}
    return Result(frame, meta=meta)


@register("discovery.eap", EAPParams, "edge attribution patching: a first-order score for every edge of the model's graph",
          _outputs("eap"), version=2)
def eap(model, task, params: EAPParams, ctx) -> Result:
    return _result(model, task, params, 1, "eap")


@register("discovery.eap_ig", EAPIGParams,
          "EAP with integrated gradients on the input embeddings (corrupted -> clean, `steps` points)", _outputs("eap_ig"))
def eap_ig(model, task, params: EAPIGParams, ctx) -> Result:
    return _result(model, task, params, params.steps, "eap_ig")


@register("discovery.eap_ig_activations", EAPIGActivationsParams,
          "EAP-IG on the activations: each node group's output (embeddings, a layer's attention, an MLP) moved "
          "corrupted -> clean in turn, `steps` points each; groups x steps backward passes", _outputs("eap_ig_activations"), version=2)
def eap_ig_activations(model, task, params: EAPIGParams, ctx) -> Result:
    return _result(model, task, params, params.steps, "eap_ig_activations", "activations")
