"""Logit attribution: which components write the answer-minus-wrong direction at the final token.

- `attribution.dla`: direct logit attribution of the embeddings, every head (its z @ W_O, no
  bias), every attention output bias, every MLP output and the constant biases, to each
  prompt's logit difference. The final norm's scale is frozen from the clean run (the
  standard treatment), so the parts add up exactly to the model's logit difference.
- `attribution.head_sources`: for chosen heads, how much each source position's value
  contributes through the head to the answer direction (pattern x value x W_O . direction).
- `attribution.logit_lens`: the logit difference, answer probability and rank, and top tokens
  read off the residual stream before every layer and after the last one (the final norm
  recomputed from that residual, as the logit lens does).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench.errors import WorkbenchError
from workbench.methods import Metric, Outputs, register
from workbench.nodes import check_head_names, parse_heads
from workbench.params import require
from workbench.result import Result
from circuits.patching.engine import unembed_final
from workbench.fast_forward.attention import fused_attention


def answer_directions(model, task) -> Float[Tensor, "batch d_model"]:
    """W_U[:, answer] - W_U[:, wrong] per prompt: the residual direction of the logit difference (float32)."""
    W_U = model.tl.W_U
    return (W_U[:, task.answer_ids(W_U.device)] - W_U[:, task.wrong_ids(W_U.device)]).T.float()


def _final(x: Tensor, lengths: Int[Tensor, "batch"]) -> Tensor:
    """x[b, lengths[b]-1, ...]: each prompt's value at its own last token."""
    return x[torch.arange(x.shape[0], device=x.device), lengths.to(x.device) - 1]


def frozen_final_norm(model, x: Float[Tensor, "batch ... d_model"], scale: Float[Tensor, "batch 1"]) -> Tensor:
    """The linear part of the final norm with the run's scale frozen (biases are separate terms)."""
    norm = model.cfg.normalization_type
    if norm is None:
        return x
    if norm in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    shape = (scale.shape[0],) + (1,) * (x.dim() - 2) + (1,)
    x = x / scale.reshape(shape)
    if norm in ("LN", "RMS"):
        x = x * model.tl.ln_final.w.to(x.dtype)
    return x


@dataclass(frozen=True)
class DLAParams:
    batch_size: int = 16

    def __post_init__(self):
        require(self.batch_size >= 1, f"batch_size = {self.batch_size} must be at least 1")


def _cache_names(model):
    names = {"hook_embed", "hook_pos_embed", "ln_final.hook_scale"}
    for layer in range(model.n_layers):
        names.add(f"blocks.{layer}.attn.hook_z")
        if not model.cfg.attn_only:
            names.add(f"blocks.{layer}.hook_mlp_out")
    return names


def _batches(task, model, batch_size: int):
    if batch_size < 1:
        raise WorkbenchError("batch_size must be at least 1")
    tokens, lengths = task.tokens("clean", device=model.device)
    for start in range(0, len(task), batch_size):
        sl = slice(start, start + batch_size)
        yield sl, tokens[sl, : int(lengths[sl].max())], lengths[sl]


@torch.no_grad()
@fused_attention
def dla_components(model, task, batch_size: int = 16) -> tuple[pd.DataFrame, Float[Tensor, "batch layer head"]]:
    """Per-prompt contributions of every component to the logit difference, and the actual one.

    Returns a frame (prompt, component, layer, head, term, value) and the head tensor.
    """
    names = _cache_names(model)
    directions = answer_directions(model, task)
    rows, head_parts = [], []
    tl = model.tl
    for sl, tokens, lengths in _batches(task, model, batch_size):
        logits, cache = tl.run_with_cache(tokens, names_filter=lambda n: n in names)
        d = directions[sl]
        scale = _final(cache["ln_final.hook_scale"], lengths) if model.cfg.normalization_type else torch.ones(len(tokens), 1)

        def project(x: Tensor) -> Tensor:  # [batch, ..., d_model] -> [batch, ...]
            y = frozen_final_norm(model, x.float(), scale.float())  # projected in float32
            return torch.einsum("b...d,bd->b...", y, d)

        ids = range(sl.start, sl.start + len(tokens))
        parts = [("embed", None, None, "W_E", project(_final(cache["hook_embed"], lengths)))]
        if "hook_pos_embed" in cache.cache_dict:
            parts.append(("embed", None, None, "W_pos", project(_final(cache["hook_pos_embed"], lengths))))
        heads = []
        for layer in range(model.n_layers):
            z = _final(cache[f"blocks.{layer}.attn.hook_z"], lengths)  # [batch, head, d_head]
            out = torch.einsum("bhk,hkd->bhd", z, tl.blocks[layer].attn.W_O)
            heads.append(project(out))
            b_O = tl.blocks[layer].attn.b_O.expand(len(tokens), -1)
            parts.append(("bias", layer, None, "b_O", project(b_O)))
            if not model.cfg.attn_only:
                parts.append(("mlp", layer, None, "mlp_out", project(_final(cache[f"blocks.{layer}.hook_mlp_out"], lengths))))
        heads = torch.stack(heads, 1)  # [batch, layer, head]
        head_parts.append(heads.cpu())
        if model.cfg.normalization_type == "LN":
            parts.append(("bias", None, None, "ln_final.b", (tl.ln_final.b * d).sum(-1)))
        b_U = tl.b_U
        parts.append(("bias", None, None, "b_U", b_U[task.answer_ids(b_U.device)[sl]] - b_U[task.wrong_ids(b_U.device)[sl]]))
        actual = _final(logits, lengths)
        actual = actual.gather(1, task.answer_ids(actual.device)[sl, None])[:, 0] - actual.gather(1, task.wrong_ids(actual.device)[sl, None])[:, 0]
        for i, b in enumerate(ids):
            for comp, layer, head, term, v in parts:
                rows.append((b, comp, layer, head, term, float(v[i])))
            for layer in range(model.n_layers):
                for h in range(model.n_heads):
                    rows.append((b, "head", layer, h, "z@W_O", float(heads[i, layer, h])))
            rows.append((b, "model", None, None, "actual", float(actual[i])))
    frame = pd.DataFrame(rows, columns=["prompt", "component", "layer", "head", "term", "value"])
    return frame, torch.cat(head_parts)


DLA_OUTPUTS = Outputs((
    Metric("dla", "direct contribution to logit(answer) - logit(wrong) through the frozen final norm; terms add up to "
           "the logit difference (mean over prompts, and per prompt)", ("embed", "head", "mlp", "bias"),
           ("layer", "head"), "score"),
    Metric("logit_diff", "the model's logit difference the terms add up to", "model", (), "summary"),
), tensors={"head_dla": ("prompt", "layer", "head")})


@register("attribution.dla", DLAParams, "direct logit attribution of embeddings, heads, MLPs and biases to the logit difference",
          DLA_OUTPUTS)
def dla(model, task, params: DLAParams, ctx) -> Result:
    frame, heads = dla_components(model, task, params.batch_size)
    frame["metric"] = "dla"
    frame.loc[frame["term"] == "actual", "metric"] = "logit_diff"
    mean = frame.groupby(["component", "layer", "head", "term", "metric"], dropna=False, sort=False)["value"].mean().reset_index()
    mean["prompt"] = pd.NA
    scores = pd.concat([mean, frame], ignore_index=True)
    scores["prompt"] = scores["prompt"].astype("Int64")
    return Result(scores, {"head_dla": heads}, {"tensor_dims": {"head_dla": ["prompt", "layer", "head"]}})


@dataclass(frozen=True)
class HeadSourcesParams:
    heads: list[str] | None = None
    batch_size: int = 16

    def __post_init__(self):
        check_head_names(self.heads)
        require(self.batch_size >= 1, f"batch_size = {self.batch_size} must be at least 1")


@torch.no_grad()
@fused_attention
def head_source_attribution(model, task, heads: list[tuple[int, int]], batch_size: int = 16) -> pd.DataFrame:
    """Rows (prompt, layer, head, position=source, value): each source token's contribution
    through the head to the logit difference at the final token (frozen final-norm scale)."""
    directions = answer_directions(model, task)
    layers = sorted({layer for layer, _ in heads})
    names = {"ln_final.hook_scale"} | {f"blocks.{layer}.attn.hook_{x}" for layer in layers for x in ("v", "pattern")}
    group = model.n_heads // model.n_kv_heads
    rows = []
    tl = model.tl
    for sl, tokens, lengths in _batches(task, model, batch_size):
        _, cache = tl.run_with_cache(tokens, names_filter=lambda n: n in names)
        scale = _final(cache["ln_final.hook_scale"], lengths) if model.cfg.normalization_type else torch.ones(len(tokens), 1)
        for layer, h in heads:
            pattern = _final(cache[f"blocks.{layer}.attn.hook_pattern"][:, h], lengths)  # [batch, src]
            v = cache[f"blocks.{layer}.attn.hook_v"][:, :, h // group]  # [batch, src, d_head]
            out = torch.einsum("bs,bsk,kd->bsd", pattern, v, tl.blocks[layer].attn.W_O[h])
            y = frozen_final_norm(model, out.float(), scale.float())  # projected in float32, as `dla_components` does
            contrib = torch.einsum("bsd,bd->bs", y, directions[sl])
            for i in range(len(tokens)):
                for s in range(int(lengths[i])):
                    rows.append((sl.start + i, layer, h, s, float(contrib[i, s])))
    return pd.DataFrame(rows, columns=["prompt", "layer", "head", "src_position", "value"])


@register("attribution.head_sources", HeadSourcesParams, "per-source-position contribution of chosen heads to the logit difference",
          Outputs((Metric("dla_by_source", "a head's direct logit attribution at the final position, split by the source "
                          "position it reads from", "head", ("layer", "head", "prompt", "src_position"), "detail"),)))
def head_sources(model, task, params: HeadSourcesParams, ctx) -> Result:
    heads = parse_heads(model, params.heads)
    frame = head_source_attribution(model, task, heads, params.batch_size)
    frame["component"], frame["metric"] = "head", "dla_by_source"
    return Result(frame)


@dataclass(frozen=True)
class LogitLensParams:
    top_k: int = 5
    batch_size: int = 16

    def __post_init__(self):
        require(self.top_k >= 1, f"top_k = {self.top_k} must be at least 1")
        require(self.batch_size >= 1, f"batch_size = {self.batch_size} must be at least 1")


LENS = {"logit_lens_logit_diff": "logit(answer) - logit(wrong)", "logit_lens_answer_prob": "probability of the answer",
        "logit_lens_answer_rank": "rank of the answer (0 = top)"}


@register("attribution.logit_lens", LogitLensParams,
          "logit difference, answer prob/rank and top tokens read off the residual stream per layer",
          Outputs(tuple(Metric(name, f"{meaning} read off the residual stream at (layer, hook) through the final norm "
                               "and unembedding (mean over prompts, and per prompt)", "resid", ("layer", "hook"), "score")
                        for name, meaning in LENS.items()),
                  tensors={"top_tokens": ("stage", "prompt", "k")}))
@torch.no_grad()
@fused_attention
def logit_lens(model, task, params: LogitLensParams, ctx) -> Result:
    tl = model.tl
    n = model.n_layers
    names = {f"blocks.{layer}.hook_resid_pre" for layer in range(n)} | {f"blocks.{n - 1}.hook_resid_post"}
    rows, tops = [], []
    for sl, tokens, lengths in _batches(task, model, params.batch_size):
        _, cache = tl.run_with_cache(tokens, names_filter=lambda name: name in names)
        resid = [_final(cache[f"blocks.{layer}.hook_resid_pre"], lengths) for layer in range(n)]
        resid.append(_final(cache[f"blocks.{n - 1}.hook_resid_post"], lengths))
        stack = torch.stack(resid, 0)  # [n+1, batch, d_model]
        logits = unembed_final(tl, stack[:, :, None, :])[:, :, 0].float()  # [n+1, batch, vocab]
        a, w = task.answer_ids(logits.device)[sl], task.wrong_ids(logits.device)[sl]
        idx = torch.arange(len(tokens), device=logits.device)
        diff = logits[:, idx, a] - logits[:, idx, w]
        probs = logits.softmax(-1)
        prob = probs[:, idx, a]
        rank = (logits > logits[:, idx, a][..., None]).sum(-1)
        tops.append(logits.topk(params.top_k, dim=-1).indices.cpu())
        for stage in range(n + 1):
            layer, hook = (stage, "resid_pre") if stage < n else (n - 1, "resid_post")
            for i in range(len(tokens)):
                p = sl.start + i
                rows += [("resid", layer, hook, p, "logit_lens_logit_diff", float(diff[stage, i])),
                         ("resid", layer, hook, p, "logit_lens_answer_prob", float(prob[stage, i])),
                         ("resid", layer, hook, p, "logit_lens_answer_rank", float(rank[stage, i]))]
    frame = pd.DataFrame(rows, columns=["component", "layer", "hook", "prompt", "metric", "value"])
    mean = frame.groupby(["component", "layer", "hook", "metric"], sort=False)["value"].mean().reset_index()
    mean["prompt"] = pd.NA
    scores = pd.concat([mean, frame], ignore_index=True)
    scores["prompt"] = scores["prompt"].astype("Int64")
    return Result(scores, {"top_tokens": torch.cat(tops, 1)},
                  {"tensor_dims": {"top_tokens": ["stage", "prompt", "k"]},
                   "stage_meaning": "stage s < n_layers is resid_pre of layer s; stage n_layers is resid_post of the last layer"})
