"""The model's computational graph at edge level, as circuit discovery sees it (Hanna et al.; MIB).

Sources write into the residual stream: the embeddings (`embed`), every attention head's output
(`L5H3`: its z times its W_O slice) and every MLP's output (`MLP5`). Targets read from it: every
query head's query input, every key/value head's key and value inputs (under grouped-query
attention one key/value head, `L5KV1`, is shared by its group), every MLP's input and the logits
(the final residual). An edge runs from each source to each later target; a target's input is the
sum of its sources' outputs (plus biases, equal on clean and corrupted runs). Targets are the
pre-norm inputs TransformerLens exposes with split q/k/v inputs and `hook_mlp_in`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from workbench.errors import WorkbenchError
from workbench.nodes import head_name, kv_name, mlp_name


@dataclass(frozen=True)
class Target:
    node: str
    input: str  # q, k, v, mlp, logits
    layer: int  # the layer it reads in (logits: n_layers)
    hook: str  # the TransformerLens hook of its input
    index: int | None  # the head / key-value head index within that hook, None for MLPs and logits


@dataclass(frozen=True)
class Graph:
    sources: tuple[str, ...]
    source_layers: tuple[int, ...]  # embed: -1
    targets: tuple[Target, ...]

    @cached_property
    def valid(self) -> Tensor:
        """[source, target]: True where the edge exists (the source writes before the target reads)."""
        src = torch.tensor(self.source_layers)[:, None]
        mlp_src = torch.tensor([s.startswith("MLP") for s in self.sources])[:, None]
        layer = torch.tensor([t.layer for t in self.targets])[None, :]
        reads_mlp_layer = torch.tensor([t.input == "mlp" for t in self.targets])[None, :]
        # an MLP reads its own layer's heads; a head reads only earlier layers; MLPs write after heads
        return (src < layer) | (reads_mlp_layer & (src == layer) & ~mlp_src)

    def n_edges(self) -> int:
        return int(self.valid.sum())

    def edge_names(self) -> tuple[list[str], list[str], list[str]]:
        """(src, dst, dst_input) of every valid edge, in row-major [source, target] order."""
        idx = torch.nonzero(self.valid)
        return ([self.sources[int(s)] for s in idx[:, 0]], [self.targets[int(t)].node for t in idx[:, 1]],
                [self.targets[int(t)].input for t in idx[:, 1]])


def build_graph(model) -> Graph:
    n, kv = model.n_layers, model.n_kv_heads
    mlps = not model.cfg.attn_only
    sources, layers, targets = ["embed"], [-1], []
    kv_node = head_name if kv == model.n_heads else kv_name
    for layer in range(n):
        for h in range(model.n_heads):
            sources.append(head_name(layer, h))
            layers.append(layer)
            targets.append(Target(head_name(layer, h), "q", layer, f"blocks.{layer}.hook_q_input", h))
        for x in ("k", "v"):
            for g in range(kv):
                targets.append(Target(kv_node(layer, g), x, layer, f"blocks.{layer}.hook_{x}_input", g))
        if mlps:
            sources.append(mlp_name(layer))
            layers.append(layer)
            targets.append(Target(mlp_name(layer), "mlp", layer, f"blocks.{layer}.hook_mlp_in", None))
    targets.append(Target("logits", "logits", n, f"blocks.{n - 1}.hook_resid_post", None))
    return Graph(tuple(sources), tuple(layers), tuple(targets))


def source_hooks(model) -> list[str]:
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{layer}.attn.hook_z" for layer in range(model.n_layers)]
    if not model.cfg.attn_only:
        names += [f"blocks.{layer}.hook_mlp_out" for layer in range(model.n_layers)]
    return names


def source_outputs(model, graph: Graph, cache: dict[str, Tensor]) -> Tensor:
    """[batch, pos, source, d_model]: what each source writes into the residual stream."""
    tl = model.tl
    parts = [cache["blocks.0.hook_resid_pre"][:, :, None]]
    for layer in range(model.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"]
        parts.append(torch.einsum("bphd,hdm->bphm", z, tl.blocks[layer].attn.W_O))
        if not model.cfg.attn_only:
            parts.append(cache[f"blocks.{layer}.hook_mlp_out"][:, :, None])
    out = torch.cat(parts, dim=2)
    if out.shape[2] != len(graph.sources):
        raise WorkbenchError("the graph does not match the model's sources")
    return out


def check_model(model) -> None:
    """Refuse architectures whose attention inputs are not the first norm of the residual stream,
    which the graph's q/k/v targets and their gradients assume."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg = model.cfg
    if getattr(cfg, "parallel_attn_mlp", False):
        raise WorkbenchError(f"model '{model.name}' runs attention and MLP in parallel; edge graphs are built for "
                             "sequential blocks only")
    if cfg.original_architecture in POST_NORM_ARCHITECTURES or cfg.positional_embedding_type == "shortformer":
        raise WorkbenchError(f"model '{model.name}' ({cfg.original_architecture}, {cfg.positional_embedding_type} positions) "
                             "does not read its attention inputs through a norm of the residual stream alone; edge graphs "
                             "are built for pre-norm blocks")
    if getattr(cfg, "ungroup_grouped_query_attention", False):
        raise WorkbenchError(f"model '{model.name}' is loaded with ungroup_grouped_query_attention; edge graphs keep "
                             "key/value heads grouped: load it without that option")
