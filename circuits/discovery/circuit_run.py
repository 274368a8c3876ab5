"""Running circuits: the clean prompts with every edge outside a circuit ablated.

A target's input keeps the current output of each source it reaches through a kept edge and takes
the ablated output (the corrupted run's by default, as MIB; or the mean over the corrupted prompts;
or zero) of every other source. Keeping every edge is the clean run; keeping none is the
all-ablated run (with corrupted ablation, exactly the corrupted run). Several circuits run as one
batch, each a block of rows.

A target's input is built one of two equal ways, the cheaper for each circuit and block of
targets: the current residual plus the differences (ablated - current) of the sources whose edges
are ablated, or the ablated residual (the corrupted run's own residual stream; for mean and zero
ablation the sum of the ablated outputs and biases) less the differences of the kept edges'
sources. A small circuit and a nearly full one both touch few sources; only the per-source
differences some correction reads are computed, a head's as its z difference through W_O.

The forward is an ordinary one (no per-head copies of the residual stream): a head's query, key
or value is recomputed from its own input, through the layer's first norm and that head's slice
of W_Q, W_K or W_V, only for the circuits whose input for it differs from the current residual
(in place of TransformerLens's projection, not after it). An MLP whose output no kept edge reads,
or (corrupted ablation) whose input no kept edge feeds, is not run for that circuit: it takes its
ablated output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from circuits.discovery.eap import _final
from circuits.discovery.graph import Graph, check_model, source_hooks, source_outputs
from workbench.fast_forward.own_hooks import own_hooks
from circuits.patching.engine import metric_values
from workbench.fast_forward.attention import sdpa_attention
from workbench.fast_forward.replacements import swapped
from workbench.device_memory import memory_budget
from workbench.errors import WorkbenchError

ABLATIONS = ("corrupted", "mean", "zero")
CHUNK_BYTES = 256 * 2**20  # per-source differences of one chunk of prompts x circuits (CPU; GPU: a quarter of free memory)


@dataclass(frozen=True)
class Block:
    """Targets whose inputs are built at one point of the forward: a layer's queries, keys and
    values (all read the same residual; built at its `hook_q`, written at `hook_q`, `hook_k`,
    `hook_v`), an MLP's input (`hook_mlp_in`), or the logits (the last `hook_resid_post`)."""
    kind: Literal["attn", "mlp", "logits"]
    layer: int
    hooks: tuple[str, ...]  # where the block's entries are written, in entry order
    sizes: tuple[int, ...]  # entries per hook
    columns: tuple[int, ...]  # the targets, hook by hook, entry by entry
    prefix: int  # the targets read only sources [:prefix] (sources are ordered by layer)
    bias: Tensor  # the attention output biases of the layers inside the prefix, summed


@dataclass(frozen=True)
class Plan:
    circuit: int
    coef: Tensor  # [distinct entry, row]: +1 ablated edge, -1 kept edge
    rows: Tensor | int  # the stored differences it reads: the first `rows` of them, or these (gathered)
    via_residual: bool  # start from the ablated residual (else from the current one)
    entries: Tensor | None  # [entry]: its row of `coef`, where entries share one (None: one row each, or one for all)


def _blocks(model, graph: Graph) -> list[Block]:
    tl, by_block = model.tl, {}
    for i, t in enumerate(graph.targets):
        kind = "attn" if t.input in "qkv" else t.input
        by_block.setdefault((kind, t.layer), {}).setdefault(t.input, []).append(i)
    b_o = torch.stack([tl.blocks[layer].attn.b_O.detach() for layer in range(model.n_layers)])
    first_head = {layer: graph.source_layers.index(layer) for layer in range(model.n_layers)}
    blocks = []
    for (kind, layer), per_input in by_block.items():
        hooks = {"attn": [f"blocks.{layer}.attn.hook_{x}" for x in per_input], "mlp": [f"blocks.{layer}.hook_mlp_in"],
                 "logits": [f"blocks.{model.n_layers - 1}.hook_resid_post"]}[kind]
        columns = [i for cols in per_input.values() for i in cols]
        prefix = int(graph.valid[:, columns].any(1).nonzero().max()) + 1
        inside = torch.tensor([first_head[lyr] < prefix for lyr in range(model.n_layers)])
        blocks.append(Block(kind, layer, tuple(hooks), tuple(len(c) for c in per_input.values()), tuple(columns),
                            prefix, b_o[inside].sum(0)))
    return blocks


def _constant_ablation(model, task, names: set[str], ablation: str) -> dict[str, Tensor]:
    """For mean and zero ablation, each source hook's ablated value, the same at every position:
    the mean over every real position of the corrupted prompts, or zero."""
    tl = model.tl
    tokens, lengths = task.tokens("corrupted", device=model.device)
    totals: dict[str, Tensor] = {}
    for start in range(0, len(task), 16):
        rows = slice(start, start + 16)
        width = int(lengths[rows].max())
        _, cache = tl.run_with_cache(tokens[rows, :width], stop_at_layer=model.n_layers, names_filter=lambda x: x in names)
        real = (torch.arange(width, device=model.device)[None, :] < lengths[rows, None]).to(torch.float32)
        for name in names:
            act = cache[name].float()
            totals[name] = totals.get(name, 0) + (act * real.view(*real.shape, *([1] * (act.dim() - 2)))).sum((0, 1))
    count = int(lengths.sum())
    dtype = next(tl.parameters()).dtype
    return {name: (total / count if ablation == "mean" else torch.zeros_like(total)).to(dtype) for name, total in totals.items()}


class CircuitEvaluator:
    """Runs circuits of one graph on one task: the ablated values (and, for KL, the clean run's
    output) are computed once and kept while they are small, so that ACDC's thousands of
    one-circuit evaluations do not repeat them."""

    def __init__(self, model, task, graph: Graph, metric: str = "logit_diff", ablation: str = "corrupted"):
        check_model(model)
        if ablation not in ABLATIONS:
            raise WorkbenchError(f"unknown ablation '{ablation}'; choose one of {', '.join(ABLATIONS)}")
        self.model, self.task, self.graph, self.metric, self.ablation = model, task, graph, metric, ablation
        device, tl = model.device, model.tl
        self.clean, self.lengths = task.tokens("clean", device=device)
        self.corrupt, _ = task.tokens("corrupted", device=device)
        self.answers, self.wrongs = task.answer_ids(device), task.wrong_ids(device)
        self.names = set(source_hooks(model))
        layers = graph.source_layers  # a layer's sources are consecutive (its heads, then its MLP)
        self.layer_sources = {layer: range(layers.index(layer), len(layers) - layers[::-1].index(layer)) for layer in set(layers)}
        self.blocks = _blocks(model, graph)
        self.block_of = {hook: (i, sum(block.sizes[:j])) for i, block in enumerate(self.blocks) for j, hook in enumerate(block.hooks)}
        self.logits_block = next(i for i, b in enumerate(self.blocks) if b.kind == "logits")
        self.constant = _constant_ablation(model, task, self.names, ablation) if ablation != "corrupted" else None
        # a layer's query, key and value weights and biases, entry by entry as its block orders them
        self.qkv = {}
        for layer in range(model.n_layers):
            attn = tl.blocks[layer].attn
            w = [attn.W_Q, getattr(attn, "_W_K", attn.W_K), getattr(attn, "_W_V", attn.W_V)]
            b = [attn.b_Q, getattr(attn, "_b_K", attn.b_K), getattr(attn, "_b_V", attn.b_V)]
            w, b = torch.cat(w).detach(), torch.cat(b).detach()
            self.qkv[layer] = (w, b[:, None, :], w.permute(1, 0, 2).reshape(w.shape[1], -1), b.reshape(-1))
        self.per_source_prompt = int(self.lengths.max()) * model.d_model * torch.finfo(next(tl.parameters()).dtype).bits // 8
        self.chunk_bytes = memory_budget(model.device, CHUNK_BYTES, share=0.25)
        # the whole task's ablated values at once (held for later calls) when they fit a chunk's budget
        self.whole_task = self.per_source_prompt * len(graph.sources) * len(task) <= self.chunk_bytes
        self._whole: dict | None = None

    @torch.no_grad()
    def _prepared(self, start: int, stop: int) -> dict:
        """For prompts start:stop: each source hook's ablated value (`ablated`, by hook name), each
        block's ablated residual (`residuals`, [block, batch, pos, d_model], or [block, 1, 1,
        d_model] when the same everywhere) and the clean log-probs for KL."""
        tl, n, model = self.model.tl, self.model.n_layers, self.model
        lengths = self.lengths[start:stop]
        width = int(lengths.max())
        if self.constant is None:  # corrupted: the corrupted run's outputs, and its residual stream at each block
            at = {"attn": "blocks.{}.hook_resid_pre", "mlp": "blocks.{}.hook_resid_mid"}
            wanted = self.names | {at[b.kind].format(b.layer) for b in self.blocks if b.kind in at}
            final, cache = tl.run_with_cache(self.corrupt[start:stop, :width], stop_at_layer=n, names_filter=lambda x: x in wanted)
            ablated = {name: cache[name] for name in self.names}
            residuals = torch.stack([cache[at[b.kind].format(b.layer)] if b.kind in at else final for b in self.blocks])
        else:  # a constant: per block, the ablated outputs of its prefix plus biases
            ablated = self.constant
            outputs = source_outputs(model, self.graph, {k: v[None, None] for k, v in ablated.items()})[0, 0].float()
            sums = torch.stack([outputs[:b.prefix].sum(0) + b.bias.float().to(outputs.device) for b in self.blocks])
            residuals = sums.to(ablated["blocks.0.hook_resid_pre"].dtype)[:, None, None, :]
        clean_logprobs = (_final(tl, tl(self.clean[start:stop, :width], stop_at_layer=n), lengths).float().log_softmax(-1)
                          if self.metric == "kl" else None)  # KL compares with the clean run's output
        return dict(ablated=ablated, residuals=residuals, clean_logprobs=clean_logprobs)

    def _chunk(self, start: int, stop: int) -> dict:
        """The prepared values of prompts start:stop, per position up to their longest prompt;
        residuals flattened to [block, batch x pos x d_model]."""
        if self.whole_task and self._whole is None:
            self._whole = self._prepared(0, len(self.task))
        base, prepared = (0, self._whole) if self.whole_task else (start, self._prepared(start, stop))
        rows, width = slice(start - base, stop - base), int(self.lengths[start:stop].max())
        out = {k: v for k, v in prepared.items()}
        if self.constant is None:  # [batch x pos, ...], as the hooks view the current values
            out["ablated"] = {k: v[rows, :width].reshape(-1, *v.shape[2:]) for k, v in prepared["ablated"].items()}
            out["residuals"] = prepared["residuals"][:, rows, :width].reshape(len(self.blocks), -1)
        else:
            shape = (len(self.blocks), stop - start, width, self.model.d_model)
            out["residuals"] = prepared["residuals"].expand(shape).reshape(len(self.blocks), -1)
        if prepared["clean_logprobs"] is not None:
            out["clean_logprobs"] = prepared["clean_logprobs"][rows]
        return out

    def _plans(self, keeps: Tensor) -> tuple[list[list[Plan]], Tensor]:
        """Per block, per circuit, the cheaper way to its inputs (see the module's docstring); and
        [circuit, source], the differences each circuit stores: only those some input reads, in
        source order, so that an input reads a prefix of its circuit's stored rows."""
        device, dtype = self.model.device, next(self.model.tl.parameters()).dtype
        chosen_by_block, read = [], torch.zeros(keeps.shape[:2], dtype=torch.bool)
        for block in self.blocks:
            valid = self.graph.valid[: block.prefix, list(block.columns)]  # [source, entry]
            chosen_by_block.append([])
            for c, keep in enumerate(keeps[:, : block.prefix, list(block.columns)]):
                kept = keep & valid
                ablated = valid & ~kept
                via_residual = int(kept.any(1).sum()) < int(ablated.any(1).sum())
                chosen = kept if via_residual else ablated
                if via_residual or chosen.any():  # else nothing is ablated here
                    chosen_by_block[-1].append((c, chosen, via_residual))
                    read[c, : block.prefix] |= chosen.any(1)
        position = read.long().cumsum(1) - 1  # a source's row among its circuit's stored differences
        plans = []
        for block, chosen_here in zip(self.blocks, chosen_by_block):
            plans.append([])
            for c, chosen, via_residual in chosen_here:
                sources = chosen.any(1).nonzero().flatten()
                first = int(read[c, : block.prefix].sum())  # the stored rows before the block
                dense = len(sources) > first // 3  # gathering costs two more passes over the rows it reads
                coef = torch.zeros(chosen.shape[1], first, dtype=dtype) if dense else chosen[sources].T.to(dtype)
                if dense:
                    coef[:, position[c, sources]] = chosen[sources].T.to(dtype)
                distinct, entries = coef.unique(dim=0, return_inverse=True) if coef.shape[1] else (coef[:1], None)
                if len(distinct) == 1:  # one input for all
                    coef, entries = distinct, None
                elif len(distinct) < len(coef):  # entries pick their row of the distinct ones
                    coef = distinct
                else:
                    entries = None
                rows = first if dense else position[c, sources].to(device)
                plans[-1].append(Plan(c, (coef * (-1 if via_residual else 1)).to(device), rows, via_residual,
                                      None if entries is None else entries.to(device)))
        return plans, read

    @torch.no_grad()
    def metrics(self, keeps: Tensor) -> Tensor:
        """Mean metric over the task's prompts for each circuit of `keeps` [circuit, source, target].

        A circuit with no edge is the ablated residual read out at the logits, with no forward.
        The others run as one batch per chunk of prompts: the differences (ablated - current) an
        input reads are held source-major, [stored source, batch x pos x d_model] per circuit; a
        block's inputs are one matrix product per circuit, built at the block's first hook."""
        model, tl, n = self.model, self.model.tl, self.model.n_layers
        empty = ~(keeps & self.graph.valid).flatten(1).any(1)
        run = (~empty).nonzero().flatten()
        totals = torch.zeros(keeps.shape[0], dtype=torch.float64)
        batch = max(1, self.chunk_bytes // (max(1, len(run)) * len(self.graph.sources) * self.per_source_prompt))
        if len(run):
            plans, read = self._plans(keeps[run])
            stored = read.sum(1).tolist()  # each circuit's differences, one buffer after another
            offsets = [0] + torch.tensor(stored).cumsum(0).tolist()
            batch = max(1, self.chunk_bytes // (max(1, offsets[-1]) * self.per_source_prompt))
            hooks, chunk = self._hooks(plans, read)
            swaps = self._swaps(plans, self._idle_mlps(keeps[run]), chunk)
        before = tl.cfg.use_hook_mlp_in
        if not tl.cfg.attn_only:
            tl.set_use_hook_mlp_in(True)  # an MLP's input as a hook point of its own
        try:
            with own_hooks(tl, hooks if len(run) else []), swapped(swaps if len(run) else []), sdpa_attention(tl):
                delta = None
                for start in range(0, len(self.task), batch):
                    stop = min(start + batch, len(self.task))
                    prepared, lengths = self._chunk(start, stop), self.lengths[start:stop]
                    if empty.any():
                        resid = prepared["residuals"][self.logits_block].view(stop - start, -1, model.d_model)
                        totals[empty] += self._values(resid, prepared, start, stop, 1).sum().double()
                    if not len(run):
                        continue
                    size = prepared["residuals"].shape[1]
                    if delta is None or delta.shape[1] < size:  # one buffer for every chunk: fresh pages cost a zero fill each
                        delta = torch.empty(offsets[-1], size, device=model.device, dtype=prepared["residuals"].dtype)
                    chunk.update(prepared, delta=[delta[a:b, :size] for a, b in zip(offsets, offsets[1:])])
                    resid = tl(self.clean[start:stop, :int(lengths.max())].repeat(len(run), 1), stop_at_layer=n)
                    chunk.clear()
                    totals[run] += self._values(resid, prepared, start, stop, len(run)).view(len(run), -1).sum(1).double()
        finally:
            if not tl.cfg.attn_only:
                tl.set_use_hook_mlp_in(before)
        return (totals / len(self.task)).float()

    def _values(self, resid: Tensor, prepared: dict, start: int, stop: int, copies: int) -> Tensor:
        """The metric of each row of `copies` stacked copies of prompts start:stop, from the final residual."""
        logits = _final(self.model.tl, resid, self.lengths[start:stop].repeat(copies)).float()
        clean_logprobs = prepared["clean_logprobs"]
        return metric_values(self.metric, logits, self.answers[start:stop].repeat(copies), self.wrongs[start:stop].repeat(copies),
                             None if clean_logprobs is None else clean_logprobs.repeat(copies, 1)).cpu()

    def _hooks(self, plans: list[list[Plan]], read: Tensor) -> tuple[list, dict]:
        """The forward hooks of one batched run of the circuits of `plans` (`read`: what each
        stores), and the dict through which a chunk's values reach them."""
        model, tl, n = self.model, self.model.tl, self.model.n_layers
        n_circuits, position = len(read), read.long().cumsum(1) - 1
        # per layer: (circuit, the layer's heads it stores, its first row, how many), and (circuit, row) for the
        # layer's MLP (the embeddings at layer -1)
        heads_of, outputs_of = {}, {}
        for layer, idx in self.layer_sources.items():
            n_heads = model.n_heads if layer >= 0 else 0
            heads_of[layer], outputs_of[layer] = [], []
            for c in range(n_circuits):
                stored = read[c, idx.start:idx.start + n_heads].nonzero().flatten()
                if len(stored):
                    heads = slice(None) if len(stored) == n_heads else stored.to(model.device)
                    heads_of[layer].append((c, heads, int(position[c, idx.start + int(stored[0])]), len(stored)))
                if len(idx) > n_heads and read[c, idx.stop - 1]:  # the MLP, or the embeddings
                    outputs_of[layer].append((c, int(position[c, idx.stop - 1])))
        chunk: dict = {}  # a chunk's prepared values and differences, the current residual, the pending inputs

        def differences(act, hook):
            if not chunk:  # the corrupted run of `_prepared`
                return None
            rows = act.reshape(n_circuits, -1, *act.shape[2:])  # [circuit, batch x pos, ...]
            ablated = chunk["ablated"][hook.name]
            layer = -1 if hook.name == "blocks.0.hook_resid_pre" else int(hook.name.split(".")[1])
            if hook.name.endswith("hook_z"):  # z difference [batch x pos, head, d_head] -> [head, batch x pos, d_model]
                w_o = tl.blocks[layer].attn.W_O
                for c, heads, row, count in heads_of[layer]:
                    dz = (ablated - rows[c])[:, heads]
                    torch.bmm(dz.transpose(0, 1), w_o[heads], out=chunk["delta"][c][row:row + count].view(count, dz.shape[0], -1))
            else:
                for c, row in outputs_of[layer]:
                    torch.sub(ablated, rows[c], out=chunk["delta"][c][row].view(rows.shape[1:]))

        def residual(act, hook):  # the current residual a layer's queries, keys and values read
            if chunk:
                chunk["resid"] = act

        def inputs(act, hook):  # an MLP's input, or the final residual the logits read
            b, _ = self.block_of[hook.name]
            if not chunk or not plans[b]:
                return act
            rows = act.view(n_circuits, -1)
            for plan in plans[b]:
                rows[plan.circuit] = self._inputs(plan, chunk, b, rows[plan.circuit]).view(-1)
            return act

        hooks = ([(h, differences) for h in sorted(self.names)] + [(f"blocks.{layer}.hook_resid_pre", residual) for layer in range(n)]
                 + [(h, inputs) for h in self.block_of if self.blocks[self.block_of[h][0]].kind != "attn"])
        return hooks, chunk

    def _idle_mlps(self, keeps: Tensor) -> Tensor:
        """[circuit, layer]: MLPs a circuit's run need not compute, whose output is then set to its
        ablated value: one that no kept edge reads, or (corrupted ablation) one that no kept edge
        feeds, whose input is the corrupted run's and so its output too."""
        if self.model.cfg.attn_only or self.model.cfg.use_normalization_before_and_after:
            return torch.zeros(len(keeps), self.model.n_layers, dtype=torch.bool)
        kept = keeps & self.graph.valid
        sources = torch.tensor([self.layer_sources[layer].stop - 1 for layer in range(self.model.n_layers)])
        idle = ~kept[:, sources].any(2)
        if self.ablation == "corrupted":
            targets = torch.tensor([self.blocks[self.block_of[f"blocks.{layer}.hook_mlp_in"][0]].columns[0]
                                    for layer in range(self.model.n_layers)])
            idle |= ~kept[:, :, targets].any(1)
        return idle

    def _swaps(self, plans: list[list[Plan]], idle_mlps: Tensor, chunk: dict) -> list[tuple]:
        """(module, attribute, replacement) for one batched run: each layer's query/key/value
        computation, which builds every planned circuit's from its own inputs and computes the
        rest as usual (so no circuit's are computed twice), and each MLP's forward, which runs
        only the circuits' rows that need it."""
        tl, n_circuits = self.model.tl, len(idle_mlps)
        swaps = []
        for b, block in enumerate(self.blocks):
            if block.kind == "attn":
                attn = tl.blocks[block.layer].attn
                swaps.append((attn, "calculate_qkv_matrices", self._qkv(attn, b, plans[b], n_circuits, chunk)))
        for layer, idle in enumerate(idle_mlps.T):
            if idle.any():
                mlp = tl.blocks[layer].mlp
                swaps.append((mlp, "forward", _rows_of(mlp.forward, ~idle, f"blocks.{layer}.hook_mlp_out", chunk)))
        return swaps

    def _qkv(self, attn, b: int, plans: list[Plan], n_circuits: int, chunk: dict):
        """A layer's query/key/value computation for one batched run: a planned circuit's from its
        own inputs, every other circuit's from the normed residual as usual, in one product."""
        block, original = self.blocks[b], attn.calculate_qkv_matrices
        _, _, w_all, b_all = self.qkv[block.layer]
        starts = [sum(block.sizes[:i]) for i in range(len(block.sizes) + 1)]
        others = [c for c in range(n_circuits) if c not in {plan.circuit for plan in plans}]

        def qkv(query_input, key_input, value_input):
            if not chunk or not plans:
                return original(query_input, key_input, value_input)
            batch, pos, d_model = query_input.shape
            rows = query_input.view(n_circuits, -1, d_model)  # [circuit, batch x pos, d_model]
            out = w_all.new_empty(n_circuits, rows.shape[1], starts[-1], w_all.shape[1] // starts[-1])
            if others:
                rest = torch.tensor(others, device=rows.device)
                out[rest] = torch.addmm(b_all, rows[rest].flatten(0, 1), w_all).view(len(others), *out.shape[1:])
            current = chunk["resid"].view(n_circuits, -1)
            for plan in plans:
                out[plan.circuit] = self._project(block.layer, self._inputs(plan, chunk, b, current[plan.circuit]),
                                                  plan.entries, rows.shape[1])
            q, k, v = (attn.hook_q, attn.hook_k, attn.hook_v)
            q, k, v = (hook(out[:, :, i:j].reshape(batch, pos, j - i, -1)) for hook, i, j in zip((q, k, v), starts, starts[1:]))
            if attn.cfg.use_qk_norm:
                q, k = attn._apply_qk_norm(q, attn.q_norm), attn._apply_qk_norm(k, attn.k_norm)
            return q, k, v

        return qkv

    @staticmethod
    def _inputs(plan: Plan, chunk: dict, block: int, current: Tensor) -> Tensor:
        """[distinct entry, batch x pos x d_model]: one circuit's inputs to one block's targets,
        from its current residual there."""
        base = (chunk["residuals"][block] if plan.via_residual else current)[None]
        if not plan.coef.shape[1]:
            return base
        delta = chunk["delta"][plan.circuit]
        rows = delta[:plan.rows] if isinstance(plan.rows, int) else delta.index_select(0, plan.rows)
        return torch.addmm(base, plan.coef, rows)

    def _project(self, layer: int, u: Tensor, entries: Tensor | None, tokens: int) -> Tensor:
        """[batch x pos, entry, d_head]: each query/key/value head's projection of its own input,
        through the layer's first norm; u holds one input each, one for all, or the distinct ones
        that `entries` picks from."""
        w, b, w_all, b_all = self.qkv[layer]
        normed = self.model.tl.blocks[layer].ln1(u.view(u.shape[0], tokens, -1))
        if len(normed) == 1:  # one input: one product with every head's weights side by side
            return torch.addmm(b_all, normed[0], w_all).view(tokens, w.shape[0], -1)
        return torch.baddbmm(b, normed if entries is None else normed.index_select(0, entries), w).transpose(0, 1)


def _rows_of(forward, needed: Tensor, hook: str, chunk: dict):
    """An MLP's forward for one batched run: computed on the rows of the circuits that need it
    (`needed`, by circuit); the others take the MLP's ablated output, so their differences are 0."""
    which, idle = needed.nonzero().flatten(), (~needed).nonzero().flatten()

    def run(x):
        if not chunk:
            return forward(x)
        rows = x.reshape(len(needed), -1, x.shape[-1])  # [circuit, batch x pos, d_model]
        out = torch.empty_like(rows)
        out[idle.to(x.device)] = chunk["ablated"][hook]  # [batch x pos, d_model], or [d_model] for mean and zero
        if len(which):
            idx = which.to(x.device)
            out[idx] = forward(rows[idx])
        return out.view(x.shape)

    return run


def circuit_metrics(model, task, graph: Graph, keeps: Tensor, metric: str = "logit_diff",
                    ablation: str = "corrupted") -> Tensor:
    """Mean metric over the task's prompts for each circuit of `keeps` [circuit, source, target]."""
    return CircuitEvaluator(model, task, graph, metric, ablation).metrics(keeps)
