"""Head scores from attention patterns and ablations, one value per (layer, head), so any of them
can go on the same layer x head map.

- `heads.detect`: previous-token, duplicate-token and induction scores as TransformerLens's head
  detector defines them ("mul": share of a head's attention on the detection pattern, averaged
  over prompts); on an induction task also the behavioural loss on the first copy and the repeat.
- `heads.sinks`: attention sinks as Gu et al. 2024 define them (alpha_k = mean attention token k
  receives from the queries that can see it; sink rate = share of heads with alpha_1 > 0.3),
  plus later positions and tokens that draw more attention than uniform attention would give.
- `heads.distance`: each head's query-key distance profile (mean, spread, log2 histogram).
- `heads.ablation`: the metric drop when a head's output is zero-, mean- or resample-ablated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from workbench.fast_forward.attention_pass import for_each_pattern
from circuits.patching.engine import PatchingRun, head_indices
from workbench.fast_forward.attention import fused_attention
from workbench.errors import WorkbenchError
from workbench.methods import Metric, Outputs, register
from workbench.nodes import check_head_names, parse_heads
from workbench.params import require
from workbench.result import Result

DETECTORS = ("previous_token", "duplicate_token", "induction")


def head_frame(model, values: Tensor, metric: str) -> pd.DataFrame:
    layers, heads = torch.meshgrid(torch.arange(model.n_layers), torch.arange(model.n_heads), indexing="ij")
    return pd.DataFrame({"component": "head", "layer": layers.flatten().numpy(), "head": heads.flatten().numpy(),
                         "metric": metric, "value": values.detach().cpu().double().flatten().numpy()})


# ---------------------------------------------------------------------------------------------
# detectors
# ---------------------------------------------------------------------------------------------


def detection_patterns(tokens: Int[Tensor, "batch pos"], queries: slice | None = None) -> dict[str, Bool[Tensor, "batch query key"]]:
    """TransformerLens's detection patterns, batched: where each head type should attend; for the
    queries at `queries` (default: all) against keys 0 .. queries.stop - 1."""
    queries = queries or slice(0, tokens.shape[1])
    q = torch.arange(queries.start, queries.stop, device=tokens.device)[:, None]
    k = torch.arange(queries.stop, device=tokens.device)[None, :]
    duplicate = (tokens[:, queries, None] == tokens[:, None, : queries.stop]) & (k < q)
    induction = torch.zeros_like(duplicate)
    induction[:, :, 1:] = duplicate[:, :, :-1]  # attend to the token after an earlier copy of the current one
    previous = (k == q - 1).expand_as(duplicate)
    return {"previous_token": previous, "duplicate_token": duplicate, "induction": induction}


@torch.no_grad()
def detector_scores(model, tokens: Int[Tensor, "batch pos"], lengths: Int[Tensor, "batch"],
                    exclude_bos: bool = False, exclude_current_token: bool = False,
                    batch_size: int = 16) -> dict[str, Tensor]:
    """{detector: [n_layers, n_heads]} mean over prompts of TransformerLens's "mul" score: a
    prompt's attention on the detection pattern over its total attention (the sums taken over
    every block of queries before dividing)."""
    shape = (tokens.shape[0], model.n_layers, model.n_heads)
    on = {d: torch.zeros(shape, dtype=torch.float64) for d in DETECTORS}
    total = torch.zeros(shape, dtype=torch.float64)

    def fn(layer, pattern, valid, rows, queries):
        p = pattern.float()
        if exclude_bos or exclude_current_token:
            p = p.clone()
            if exclude_bos:
                p[..., 0] = 0
            if exclude_current_token:  # key index = query position
                p[..., torch.arange(p.shape[-2]), torch.arange(queries.start, queries.stop)] = 0
        p = p * valid[:, None, queries, None]
        total[rows, layer] += p.sum((-2, -1)).cpu()  # [batch, head]
        for name, det in detection_patterns(tokens[rows, : valid.shape[1]], queries).items():
            on[name][rows, layer] += (p * det[:, None]).sum((-2, -1)).cpu()

    for_each_pattern(model, tokens, lengths, fn, batch_size, desc="head detectors")
    return {d: (on[d] / total).mean(0).float() for d in DETECTORS}


@torch.no_grad()
@fused_attention
def repeat_losses(model, task) -> tuple[float, float]:
    """Mean next-token loss on the first copy and on the repeat of an induction task."""
    tokens, lengths = task.tokens("clean", device=model.device)
    logprobs = model.tl(tokens).float().log_softmax(-1)
    first, repeat = [], []
    for i, row in enumerate(task.rows):
        n = int(lengths[i])
        nll = -logprobs[i, : n - 1].gather(-1, tokens[i, 1:n, None])[:, 0]  # loss of predicting token t+1 at t
        first.append(nll[row["first_copy_start"] : row["repeat_start"] - 1])
        repeat.append(nll[row["repeat_start"] - 1 :])
    return torch.cat(first).mean().item(), torch.cat(repeat).mean().item()


def _batch_ok(batch_size: int) -> None:
    require(batch_size >= 1, f"batch_size = {batch_size} must be at least 1")


@dataclass(frozen=True)
class DetectParams:
    exclude_bos: bool = False
    exclude_current_token: bool = False
    batch_size: int = 16

    def __post_init__(self):
        _batch_ok(self.batch_size)


DETECT_OUTPUTS = Outputs((
    Metric("previous_token_score", "attention to the previous token (TransformerLens's head detector, mean over prompts)"),
    Metric("duplicate_token_score", "attention to earlier copies of the current token (head detector)"),
    Metric("induction_score", "attention to the token after an earlier copy of the current token (head detector)"),
    Metric("induction_loss_first", "mean loss on the first copy of the repeated sequence", "model", (), "summary"),
    Metric("induction_loss_repeat", "mean loss on the repeat (far below the first copy when induction works)", "model", (), "summary"),
))


@register("heads.detect", DetectParams,
          "previous-token, duplicate-token and induction head scores (TransformerLens's head detector), per head",
          DETECT_OUTPUTS, task="induction")
def detect_heads(model, task, params: DetectParams, ctx) -> Result:
    tokens, lengths = task.tokens("clean", device=model.device)
    scores = detector_scores(model, tokens, lengths, params.exclude_bos, params.exclude_current_token, params.batch_size)
    frames = [head_frame(model, s, f"{name}_score") for name, s in scores.items()]
    if task.rows and "repeat_start" in task.rows[0]:
        first, repeat = repeat_losses(model, task)
        frames.append(pd.DataFrame({"component": "model", "metric": ["induction_loss_first", "induction_loss_repeat"],
                                    "value": [first, repeat]}))
    return Result(pd.concat(frames, ignore_index=True))


# ---------------------------------------------------------------------------------------------
# attention sinks
# ---------------------------------------------------------------------------------------------


@dataclass
class SinkStats:
    alpha: Tensor  # [layer, head, key pos]: mean attention key k receives from queries q >= k
    uniform: Tensor  # [key pos]: what uniform causal attention would give key k
    token_ratio: dict[int, tuple[float, int]]  # token id -> (attention received / uniform, occurrences), keys k >= 1


@torch.no_grad()
def sink_stats(model, tokens: Int[Tensor, "batch pos"], lengths: Int[Tensor, "batch"], batch_size: int = 16) -> SinkStats:
    n_pos = tokens.shape[1]
    alpha_sum = torch.zeros(model.n_layers, model.n_heads, n_pos)
    prompts_per_key = torch.zeros(n_pos)
    received = torch.zeros(tokens.shape[0], n_pos)  # received / uniform, summed over layers and heads
    uniform_sum = torch.zeros(n_pos)
    for length in lengths.tolist():
        q = torch.arange(length, dtype=torch.float64)
        prompts_per_key[:length] += 1
        # mean over queries q >= k of 1 / (q + 1)
        uniform_sum[:length] += (torch.flip(torch.cumsum(torch.flip(1 / (q + 1), [0]), 0), [0]) / (length - q)).float()

    def fn(layer, pattern, valid, rows, queries):
        p = pattern.float() * valid[:, None, queries, None]
        keys = p.shape[-1]
        seen_by = valid.sum(1, keepdim=True) - torch.arange(keys, device=p.device)[None, :]  # queries q >= k
        seen_by = seen_by.clamp(min=1)
        alpha_sum[layer, :, :keys] += (p.sum(-2) / seen_by[:, None, :]).sum(0).cpu()
        # p * (q + 1): 1 under uniform attention
        scaled = p * torch.arange(queries.start + 1, queries.stop + 1, device=p.device)[None, None, :, None]
        received[rows, :keys] += (scaled.sum(-2).sum(1) / seen_by).cpu()

    for_each_pattern(model, tokens, lengths, fn, batch_size, desc="attention sinks")
    alpha = alpha_sum / prompts_per_key.clamp(min=1)
    received /= model.n_layers * model.n_heads
    token_ratio: dict[int, list[float]] = {}
    for b, length in enumerate(lengths.tolist()):
        for k in range(1, length):
            token_ratio.setdefault(int(tokens[b, k]), []).append(float(received[b, k]))
    return SinkStats(alpha, uniform_sum / prompts_per_key.clamp(min=1),
                     {t: (sum(v) / len(v), len(v)) for t, v in token_ratio.items()})


@dataclass(frozen=True)
class SinkParams:
    threshold: float = 0.3
    top_tokens: int = 10
    min_occurrences: int = 3
    batch_size: int = 16

    def __post_init__(self):
        require(0 < self.threshold < 1, "the sink threshold is an attention share: give a value in (0, 1), e.g. 0.3")
        require(self.top_tokens >= 0 and self.min_occurrences >= 1, "top_tokens must be >= 0 and min_occurrences >= 1")
        _batch_ok(self.batch_size)


SINK_OUTPUTS = Outputs((
    Metric("sink_alpha", "alpha_1: mean attention the first token receives"),
    Metric("sink_ratio", "alpha_1 divided by what uniform causal attention would give the first token"),
    Metric("later_sink_alpha", "the largest mean attention any later key receives (src_position: which key)",
           "head", ("layer", "head", "src_position")),
    Metric("sink_rate", "share of heads with alpha_1 above the threshold", "model", (), "summary"),
    Metric("token_sink_ratio", "attention a token draws relative to uniform, for the most-attended tokens", "model",
           ("token",), "detail"),
), tensors={"alpha": ("layer", "head", "key_position")})


@register("heads.sinks", SinkParams,
          "attention sinks: alpha_1 per head, the sink rate (share of heads with alpha_1 > threshold), later sinks",
          SINK_OUTPUTS, task="corpus")
def sinks(model, task, params: SinkParams, ctx) -> Result:
    tokens, lengths = task.tokens("clean", device=model.device)
    if int(lengths.min()) < 4:
        raise WorkbenchError("attention sinks need prompts of at least 4 tokens (the paper uses 64-token inputs)")
    stats = sink_stats(model, tokens, lengths, params.batch_size)
    first = stats.alpha[:, :, 0]
    # later sinks: keys seen by at least half of the queries of the shortest prompt
    horizon = max(2, int(lengths.min()) // 2)
    later = stats.alpha[:, :, 1:horizon]
    later_val, later_pos = later.max(-1)
    frames = [
        head_frame(model, first, "sink_alpha"),
        head_frame(model, first / stats.uniform[0], "sink_ratio"),
        head_frame(model, later_val, "later_sink_alpha").assign(src_position=(later_pos + 1).flatten().numpy()),
        pd.DataFrame({"component": "model", "metric": ["sink_rate"], "value": [(first > params.threshold).float().mean().item()],
                      "threshold": [params.threshold]}),
    ]
    common = [(t, r, c) for t, (r, c) in stats.token_ratio.items() if c >= params.min_occurrences]
    common.sort(key=lambda x: -x[1])
    if common:
        top = common[: params.top_tokens]
        names = model.to_str_tokens([t for t, _, _ in top]) if model.tokenizer is not None else [str(t) for t, _, _ in top]
        frames.append(pd.DataFrame({"component": "model", "metric": "token_sink_ratio", "value": [r for _, r, _ in top],
                                    "token": names, "token_id": [t for t, _, _ in top], "occurrences": [c for _, _, c in top]}))
    return Result(pd.concat(frames, ignore_index=True), tensors={"alpha": stats.alpha},
                  meta={"tensor_dims": {"alpha": ["layer", "head", "key_position"]}})


# ---------------------------------------------------------------------------------------------
# distance profile
# ---------------------------------------------------------------------------------------------


def distance_bins(n_pos: int) -> list[str]:
    """Histogram bins: distance 0, 1, 2-3, 4-7, ... (powers of two), as labels."""
    labels, lo = ["0"], 1
    while lo < n_pos:
        hi = min(2 * lo, n_pos) - 1
        labels.append(str(lo) if hi == lo else f"{lo}-{hi}")
        lo *= 2
    return labels


@dataclass(frozen=True)
class DistanceParams:
    batch_size: int = 16

    def __post_init__(self):
        _batch_ok(self.batch_size)


@register("heads.distance", DistanceParams, "each head's query-key distance profile: mean, spread and a log2 histogram",
          Outputs((Metric("attn_distance_mean", "mean query-key distance, weighted by attention"),
                   Metric("attn_distance_std", "spread of the query-key distance")),
                  tensors={"distance_hist": ("layer", "head", "distance_bin")}), task="corpus")
@torch.no_grad()
def distance_profile(model, task, params: DistanceParams, ctx) -> Result:
    tokens, lengths = task.tokens("clean", device=model.device)
    n_pos = tokens.shape[1]
    labels = distance_bins(n_pos)
    mean_sum = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
    sq_sum = torch.zeros_like(mean_sum)
    hist = torch.zeros(model.n_layers, model.n_heads, len(labels), dtype=torch.float64)
    n_queries = int(lengths.sum())

    def fn(layer, pattern, valid, rows, queries):
        p = pattern.double() * valid[:, None, queries, None]
        d = (torch.arange(queries.start, queries.stop)[:, None] - torch.arange(p.shape[-1])[None, :]).clamp(min=0)
        d = d.to(p.device, torch.float64)
        mean_sum[layer] += (p * d).sum((0, 2, 3)).cpu()
        sq_sum[layer] += (p * d**2).sum((0, 2, 3)).cpu()
        bins = torch.where(d > 0, torch.floor(torch.log2(d.clamp(min=1))) + 1, torch.zeros_like(d)).long()
        mass = p.sum(0)  # [head, query, key]
        hist[layer].index_add_(1, bins.flatten().cpu(), mass.flatten(1).cpu())

    for_each_pattern(model, tokens, lengths, fn, params.batch_size, desc="distance profile")
    mean = mean_sum / n_queries
    std = (sq_sum / n_queries - mean**2).clamp(min=0).sqrt()
    hist /= n_queries
    frames = [head_frame(model, mean, "attn_distance_mean"), head_frame(model, std, "attn_distance_std")]
    return Result(pd.concat(frames, ignore_index=True), tensors={"distance_hist": hist.float()},
                  meta={"tensor_dims": {"distance_hist": ["layer", "head", "distance_bin"]}, "distance_bins": labels})


# ---------------------------------------------------------------------------------------------
# ablation importance
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
@fused_attention
def mean_z(model, task, batch_size: int = 8) -> dict[str, Tensor]:
    """Each head's output (hook_z, [head, d_head]) averaged over every real position of the task's clean prompts."""
    tokens, lengths = task.tokens("clean", device=model.device)
    sums: dict[str, Tensor] = {}

    def add(z, hook):
        valid = (torch.arange(z.shape[1], device=z.device)[None, :] < lengths[rows, None]).to(z.dtype)
        total = (z * valid[:, :, None, None]).sum((0, 1))
        sums[hook.name] = sums[hook.name] + total if hook.name in sums else total

    for start in range(0, len(task), batch_size):
        rows = slice(start, start + batch_size)
        model.tl.run_with_hooks(tokens[rows, : int(lengths[rows].max())], stop_at_layer=model.n_layers,
                                fwd_hooks=[(lambda n: n.endswith("attn.hook_z"), add)])
    return {name: total / lengths.sum() for name, total in sums.items()}


@dataclass(frozen=True)
class AblationParams:
    ablation: Literal["zero", "mean", "resample"] = "mean"
    metric: Literal["logit_diff", "prob", "logprob", "kl"] = "logit_diff"
    heads: list[str] | None = None
    chunk_tokens: int = 16384

    def __post_init__(self):
        check_head_names(self.heads)
        require(self.chunk_tokens >= 1, f"chunk_tokens = {self.chunk_tokens} must be at least 1")


def _ablation_outputs(params: AblationParams) -> Outputs:
    return Outputs((
        Metric(f"ablation_{params.metric}", f"{params.metric} with the head {params.ablation}-ablated", "head", HEADS, "raw"),
        Metric("ablation_effect", "(clean - ablated) / (clean - corrupted): 1 = ablating the head does as much damage "
               "as corrupting the prompt", "head", HEADS, "effect"),
    ))


HEADS = ("layer", "head")


@register("heads.ablation", AblationParams,
          "each head's importance: the metric drop when its output is zero-, mean- or resample-ablated", _ablation_outputs)
def ablation_importance(model, task, params: AblationParams, ctx) -> Result:
    """Ablating a head = replacing its z in the clean run: by zeros, by its mean over the task, or
    by its value on the row's corrupted prompt (resample ablation from the corrupted distribution).
    Reported as the raw metric and as the effect (clean - ablated) / (clean - corrupted): 1 means
    ablating this one head does as much damage as corrupting the prompt."""
    heads = parse_heads(model, params.heads) if params.heads is not None else None
    run = PatchingRun(model, task, params.metric, "noise", ("z",))
    if params.ablation != "resample":
        means = mean_z(model, task) if params.ablation == "mean" else None
        run.source_cache = {
            name: (torch.zeros_like(act) if means is None else means[name].expand_as(act).contiguous())
            for name, act in ((f"blocks.{layer}.attn.hook_z", run.clean_cache[f"blocks.{layer}.attn.hook_z"])
                              for layer in range(model.n_layers))
        }
    indices = head_indices(model, "z", run.clean_tokens.shape[1], False, heads)
    raw = run.run("z", indices, params.chunk_tokens)
    effect = 1 - run.baselines.normalise(raw)
    base = pd.DataFrame({"component": "head", "layer": [i.layer for i in indices], "head": [i.head for i in indices],
                         "ablation": params.ablation})
    frames = [base.assign(metric=f"ablation_{params.metric}", value=raw.numpy()),
              base.assign(metric="ablation_effect", value=effect.numpy())]
    meta = {"baselines": {"clean": run.baselines.clean, "corrupted": run.baselines.corrupted}}
    return Result(pd.concat(frames, ignore_index=True), meta=meta)
