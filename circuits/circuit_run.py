"""Running circuits: the clean prompts with every edge outside a circuit ablated.

A target's input keeps the current output of each source it reaches through a kept edge and takes
the ablated output (the corrupted run's by default, as MIB; or the mean over the corrupted prompts;
or zero) of every other source. Keeping every edge is the clean run; keeping none is the
all-ablated run (with corrupted ablation, exactly the corrupted run). Several circuits run as one
batch, each a block of rows.

The input of a target is its current input plus a correction, built one of two equal ways, the
cheaper for each circuit and block of targets: the differences (ablated - current) of the sources
whose edges are ablated, or the difference of the whole residual stream (ablated sources plus
biases - current residual) less the differences of the kept edges' sources. A small circuit and a
nearly full one both touch few sources; only the per-source differences some correction reads are
computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from circuits.eap import _final
from circuits.graph import Graph, check_model, source_hooks, source_outputs, split_inputs
from circuits.own_hooks import own_hooks
from circuits.patching import metric_values
from workbench.device_memory import memory_budget
from workbench.errors import WorkbenchError

ABLATIONS = ("corrupted", "mean", "zero")
CHUNK_BYTES = 512 * 2**20  # per-source differences of one chunk of prompts x circuits (CPU; GPU: a quarter of free memory)


@dataclass(frozen=True)
class Block:
    """Targets whose inputs are corrected at one point of the forward: a layer's q, k and v inputs
    (all read the same residual), an MLP's input, or the logits."""
    hooks: tuple[str, ...]
    sizes: tuple[int, ...]  # entries per hook
    columns: tuple[int, ...]  # the targets, hook by hook, entry by entry
    prefix: int  # the targets read only sources [:prefix] (sources are ordered by layer)
    bias: Tensor  # the attention output biases of the layers inside the prefix, summed


@dataclass(frozen=True)
class Plan:
    circuit: int
    sources: Tensor  # the sources whose differences the correction reads
    coef: Tensor  # [entry, sources] (+1 ablated edge, -1 kept edge)
    dense: bool  # `sources` is the whole prefix (one product without gathering)
    via_residual: bool  # add the whole residual's difference


def _blocks(model, graph: Graph) -> list[Block]:
    tl, hooks = model.tl, {}
    for i, t in enumerate(graph.targets):
        key = (t.layer, "mlp" if t.input == "mlp" else "logits" if t.input == "logits" else "attn")
        hooks.setdefault(key, {}).setdefault(t.hook, []).append(i)
    b_o = torch.stack([tl.blocks[layer].attn.b_O.detach() for layer in range(model.n_layers)])
    first_head = {layer: graph.source_layers.index(layer) for layer in range(model.n_layers)}
    blocks = []
    for per_hook in hooks.values():
        columns = [i for cols in per_hook.values() for i in cols]
        prefix = int(graph.valid[:, columns].any(1).nonzero().max()) + 1
        inside = torch.tensor([first_head[layer] < prefix for layer in range(model.n_layers)])
        blocks.append(Block(tuple(per_hook), tuple(len(c) for c in per_hook.values()), tuple(columns), prefix,
                            b_o[inside].sum(0)))
    return blocks


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
        layers = graph.source_layers  # a layer's sources are consecutive (its heads, then its MLP)
        self.layer_sources = {layer: range(layers.index(layer), len(layers) - layers[::-1].index(layer)) for layer in set(layers)}
        self.blocks = _blocks(model, graph)
        self.block_of = {hook: (b, sum(block.sizes[:j])) for b, block in enumerate(self.blocks)
                         for j, hook in enumerate(block.hooks)}
        self.mean_out = _mean_outputs(model, graph, task, self.names) if ablation == "mean" else None
        self.per_prompt = int(self.lengths.max()) * len(graph.sources) * model.d_model * 4
        self.chunk_bytes = memory_budget(model.device, CHUNK_BYTES, share=0.25)
        self.keep_cache = self.per_prompt * len(task) <= self.chunk_bytes
        self._cache: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor | None]] = {}

    @torch.no_grad()
    def _prepared(self, start: int, stop: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """For prompts start:stop: the ablated source outputs, source-major [source, batch x pos x
        d_model]; each block's ablated residual (its prefix's ablated outputs plus biases),
        [block, batch x pos x d_model]; the clean log-probs for KL."""
        if (start, stop) in self._cache:
            return self._cache[start, stop]
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
        residuals, total, done = [], torch.zeros(source_major.shape[1], device=model.device), 0
        for block in self.blocks:  # prefixes grow block by block
            total = total + source_major[done:block.prefix].float().sum(0)
            done = block.prefix
            bias = block.bias.float().to(model.device)[None, None].expand(shape[0], width, -1).reshape(-1)
            residuals.append((total + bias).to(source_major.dtype))
        out = (source_major, torch.stack(residuals), clean_logprobs)
        if self.keep_cache:
            self._cache[start, stop] = out
        return out

    def _plans(self, keeps: Tensor) -> list[list[Plan]]:
        """Per block, per circuit, the cheaper correction (see the module's docstring)."""
        device, dtype = self.model.device, next(self.model.tl.parameters()).dtype
        plans = []
        for block in self.blocks:
            valid = self.graph.valid[: block.prefix, list(block.columns)]  # [source, entry]
            plans.append([])
            for c, keep in enumerate(keeps[:, : block.prefix, list(block.columns)]):
                kept = keep & valid
                ablated = valid & ~kept
                via_residual = int(kept.any(1).sum()) < int(ablated.any(1).sum())
                chosen = kept if via_residual else ablated
                sources = chosen.any(1).nonzero().flatten()
                if len(sources) == 0 and not via_residual:
                    continue  # nothing ablated here
                dense = len(sources) > block.prefix // 3  # gathering costs two more passes over the rows it reads
                coef = (chosen if dense else chosen[sources]).T.to(device=device, dtype=dtype) * (-1 if via_residual else 1)
                plans[-1].append(Plan(c, torch.arange(block.prefix) if dense else sources, coef.contiguous(), dense, via_residual))
        return plans

    @torch.no_grad()
    def metrics(self, keeps: Tensor) -> Tensor:
        """Mean metric over the task's prompts for each circuit of `keeps` [circuit, source, target].

        Per chunk of prompts, the differences (ablated - current) a correction reads are held
        source-major, [circuit, source, batch x pos x d_model]; a block's correction is one matrix
        product per circuit, computed at the block's first hook."""
        model, tl, n = self.model, self.model.tl, self.model.n_layers
        d_model, n_circuits, n_sources = model.d_model, keeps.shape[0], len(self.graph.sources)
        plans = self._plans(keeps)
        read = torch.zeros(n_circuits, n_sources, dtype=torch.bool)  # differences some correction reads
        for plan in (p for block_plans in plans for p in block_plans):
            read[plan.circuit, plan.sources] = True
        reads = {layer: [c for c in range(n_circuits) if read[c, idx.start:idx.stop].any()]
                 for layer, idx in self.layer_sources.items()}
        chunk: dict = {}  # this chunk's ablated outputs and residuals, the differences, the pending corrections

        def put(layer: int, idx: range, current: Tensor):  # current: [circuit, n, batch, pos, d_model]
            for c in reads[layer]:
                out = chunk["delta"][c, idx.start:idx.stop]
                torch.sub(chunk["ablated"][idx.start:idx.stop], current[c].reshape(out.shape), out=out)

        def source(act, hook):
            if not chunk:  # the corrupted run of `_prepared`
                return None
            rows = act.view(n_circuits, -1, *act.shape[1:])  # [circuit, batch, pos, ...]
            if hook.name == "blocks.0.hook_resid_pre":
                return put(-1, range(1), rows[:, None])
            layer = int(hook.name.split(".")[1])
            idx = self.layer_sources[layer]
            if hook.name.endswith("hook_z"):
                if reads[layer]:
                    out = torch.einsum("cbphd,hdm->chbpm", rows, tl.blocks[layer].attn.W_O)
                    put(layer, idx[: out.shape[1]], out)
            else:
                put(layer, idx[-1:], rows[:, None])

        def target(act, hook):
            b, offset = self.block_of[hook.name]
            if not chunk or not plans[b]:
                return act
            split = act.dim() == 4  # [batch, pos, entry, d_model]
            rows = act.view(n_circuits, -1, act.shape[1], act.shape[2] if split else 1, d_model)
            if offset == 0:  # the block's first hook: every correction of the block, for its later hooks too
                residual = rows[:, :, :, 0].reshape(n_circuits, -1)
                chunk["pending"] = [(plan, self._correction(plan, chunk, b, residual[plan.circuit])) for plan in plans[b]]
            rows = rows.clone()
            size = rows.shape[3]
            for plan, add in chunk["pending"]:
                part = add[offset:offset + size] if add.shape[0] > 1 else add.expand(size, -1)
                rows[plan.circuit] += part.view(size, rows.shape[1], rows.shape[2], d_model).permute(1, 2, 0, 3)
            return rows.view(act.shape)

        batch = max(1, self.chunk_bytes // (n_circuits * self.per_prompt))
        totals = torch.zeros(n_circuits, dtype=torch.float64)
        hooks = [(h, source) for h in sorted(self.names)] + [(h, target) for h in self.block_of]
        with own_hooks(tl, hooks):  # added once: adding ~240 hooks costs about 60 ms on a CPU
            for start in range(0, len(self.task), batch):
                stop = min(start + batch, len(self.task))
                ablated, residuals, clean_logprobs = self._prepared(start, stop)
                lengths = self.lengths[start:stop]
                chunk.update(ablated=ablated, residuals=residuals,
                             delta=torch.empty(n_circuits, n_sources, ablated.shape[1], device=model.device, dtype=ablated.dtype))
                with split_inputs(tl):
                    resid = tl(self.clean[start:stop, :int(lengths.max())].repeat(n_circuits, 1), stop_at_layer=n)
                chunk.clear()
                logits = _final(tl, resid, lengths.repeat(n_circuits)).float()
                values = metric_values(self.metric, logits, self.answers[start:stop].repeat(n_circuits),
                                       self.wrongs[start:stop].repeat(n_circuits),
                                       None if clean_logprobs is None else clean_logprobs.repeat(n_circuits, 1))
                totals += values.view(n_circuits, -1).sum(1).double().cpu()
        return (totals / len(self.task)).float()

    @staticmethod
    def _correction(plan: Plan, chunk: dict, block: int, residual: Tensor) -> Tensor:
        """[entry or 1, batch x pos x d_model]: what one circuit adds to one block's inputs, given
        its current residual there."""
        delta, add = chunk["delta"][plan.circuit], None
        if len(plan.sources):
            rows = delta[:plan.coef.shape[1]] if plan.dense else delta.index_select(0, plan.sources.to(delta.device))
            add = plan.coef @ rows
        if plan.via_residual:
            whole = chunk["residuals"][block] - residual  # ablated residual - current residual
            add = whole[None] if add is None else add + whole
        return add


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
