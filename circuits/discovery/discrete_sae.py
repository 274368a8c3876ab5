"""Discrete-SAE head identification (O'Neill & Bui, "Sparse Autoencoders Enable Scalable and
Reliable Circuit Identification").

Positive prompts are clean prompts the model answers (logit difference > 0); negative prompts are
corrupted prompts on which it does not prefer the clean answer. Each head's output (hook_z)
averaged over a prompt's real positions is one vector per (prompt, head); a small SAE per head,
trained on those vectors, turns each into an integer code (its most active feature, -1 when none
fires). A head scores the number of codes that occur on positives and never on negatives; a pair
of heads the number of joint codes (the two codes together) that do, stored for the pairs that
score above both heads alone (what the pair adds).

The SAEs are tiny (a few hundred features on a few dozen vectors) and there is one per head, so
they are trained here all at once as one batched problem (SAELens trains one SAE at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from circuits.patching.engine import unembed_final
from workbench.errors import WorkbenchError
from workbench.methods import Metric, Outputs, register
from workbench.nodes import head_name
from workbench.params import require
from workbench.result import Result
from workbench.fast_forward.attention import fused_attention


@torch.no_grad()
@fused_attention
def head_means(model, task, which: str, batch_size: int = 16) -> tuple[Tensor, Tensor]:
    """([prompt, layer, head, d_head] hook_z averaged over real positions, [prompt] logit difference)."""
    tl = model.tl
    tokens, lengths = task.tokens(which, device=model.device)
    answers, wrongs = task.answer_ids(model.device), task.wrong_ids(model.device)
    means, diffs = [], []
    names = {f"blocks.{layer}.attn.hook_z" for layer in range(model.n_layers)}
    for start in range(0, len(task), batch_size):
        rows = slice(start, start + batch_size)
        width = int(lengths[rows].max())
        resid, cache = tl.run_with_cache(tokens[rows, :width], stop_at_layer=model.n_layers, names_filter=lambda n: n in names)
        valid = (torch.arange(width, device=resid.device)[None, :] < lengths[rows, None]).to(resid.dtype)
        z = torch.stack([cache[f"blocks.{layer}.attn.hook_z"] for layer in range(model.n_layers)], 2)  # [b, pos, L, H, d]
        means.append(((z * valid[:, :, None, None, None]).sum(1) / valid.sum(1)[:, None, None, None]).float().cpu())
        idx = torch.arange(resid.shape[0], device=resid.device)
        logits = unembed_final(tl, resid[idx, lengths[rows] - 1][:, None])[:, 0]
        diffs.append((logits[idx, answers[rows]] - logits[idx, wrongs[rows]]).float().cpu())
    return torch.cat(means), torch.cat(diffs)


def train_codes(x: Tensor, n_features: int, steps: int, l1: float, lr: float, seed: int) -> Tensor:
    """x: [sae, vector, d]. One ReLU SAE per leading index, trained jointly; returns [sae, vector] codes."""
    gen = torch.Generator().manual_seed(seed)
    x = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)  # each head on its own scale
    k, _, d = x.shape
    w_enc = (torch.randn(k, d, n_features, generator=gen) / d**0.5).requires_grad_(True)
    w_dec = (torch.randn(k, n_features, d, generator=gen) / n_features**0.5).requires_grad_(True)
    b_enc = torch.zeros(k, 1, n_features, requires_grad=True)
    b_dec = torch.zeros(k, 1, d, requires_grad=True)
    opt = torch.optim.Adam([w_enc, w_dec, b_enc, b_dec], lr=lr)
    for _ in range(steps):
        f = torch.relu(torch.bmm(x - b_dec, w_enc) + b_enc)
        loss = ((torch.bmm(f, w_dec) + b_dec - x) ** 2).sum(-1).mean() + l1 * f.abs().sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        f = torch.relu(torch.bmm(x - b_dec, w_enc) + b_enc)
        return torch.where(f.max(-1).values > 0, f.argmax(-1), torch.full(f.shape[:2], -1))


def code_scores(positive: Tensor, negative: Tensor) -> Tensor:
    """[sae]: how many distinct codes occur on positives and never on negatives (-1 = no code)."""
    return torch.tensor([float(len(set(p.tolist()) - set(q.tolist()) - {-1})) for p, q in zip(positive, negative)])


def pair_scores(positive: Tensor, negative: Tensor) -> Tensor:
    """[sae, sae]: for each pair of SAEs, how many distinct joint codes (both codes together, -1 in
    either = none) occur on positives and never on negatives; vectorised, one first SAE at a time."""
    n = positive.shape[0]
    out = torch.zeros(n, n)
    earlier = torch.ones(positive.shape[1], positive.shape[1], dtype=torch.bool).tril(-1)  # [i, j]: j < i
    for a in range(n):
        pos = torch.stack([positive[a].expand_as(positive), positive], -1)  # [sae, prompt, 2]
        neg = torch.stack([negative[a].expand_as(negative), negative], -1)
        on_negatives = (pos[:, :, None] == neg[:, None]).all(-1).any(-1)  # [sae, positive prompt]
        repeated = ((pos[:, :, None] == pos[:, None]).all(-1) & earlier).any(-1)  # seen on an earlier positive
        coded = (pos >= 0).all(-1)
        out[a] = (coded & ~on_negatives & ~repeated).sum(-1).float()
    return out


@dataclass(frozen=True)
class DiscreteSAEParams:
    n_features: int = 200
    steps: int = 400
    l1: float = 1e-3
    lr: float = 1e-2
    seed: int = 0

    def __post_init__(self):
        require(self.n_features >= 2 and self.steps >= 1, "n_features must be at least 2 and steps at least 1")
        require(self.l1 >= 0 and self.lr > 0, "l1 must be >= 0 and lr > 0")


@register("discovery.discrete_sae", DiscreteSAEParams,
          "heads scored by discrete SAE codes (O'Neill & Bui): codes of positive prompts that never occur on negatives",
          Outputs((Metric("discrete_sae_score", "distinct SAE codes of the head's mean output on positive prompts that "
                          "never occur on negative ones"),
                   Metric("discrete_sae_pair_score", "distinct joint codes of two heads (src, dst: node names, src "
                          "first) on positive prompts that never occur on negative ones; pairs scoring above both "
                          "heads alone", "head", ("src", "dst"), "detail"),
                   Metric("positive_prompts", "clean prompts the model answers", "model", (), "summary"),
                   Metric("negative_prompts", "corrupted prompts on which it does not prefer the answer", "model", (), "summary"))))
def discrete_sae(model, task, params: DiscreteSAEParams, ctx) -> Result:
    clean, clean_diff = head_means(model, task, "clean")
    corrupt, corrupt_diff = head_means(model, task, "corrupted")
    pos, neg = clean[clean_diff > 0], corrupt[corrupt_diff <= 0]
    if len(pos) == 0 or len(neg) == 0:
        raise WorkbenchError(f"discrete-SAE scoring needs clean prompts the model answers ({len(pos)}) and corrupted "
                             f"prompts it does not ({len(neg)}); use more prompts or another task")
    n_layers, n_heads, d = pos.shape[1:]
    vectors = torch.cat([pos, neg]).permute(1, 2, 0, 3).reshape(n_layers * n_heads, len(pos) + len(neg), d)
    codes = train_codes(vectors, params.n_features, params.steps, params.l1, params.lr, params.seed)
    scores = code_scores(codes[:, : len(pos)], codes[:, len(pos):]).view(n_layers, n_heads)
    frame = pd.DataFrame([dict(component="head", layer=lyr, head=h, metric="discrete_sae_score", value=float(scores[lyr, h]))
                          for lyr in range(n_layers) for h in range(n_heads)])
    pairs = pair_scores(codes[:, : len(pos)], codes[:, len(pos):])
    single = scores.flatten()
    better = (pairs > torch.maximum(single[:, None], single[None, :])).triu(1).nonzero().tolist()
    name = [head_name(lyr, h) for lyr in range(n_layers) for h in range(n_heads)]
    frame = pd.concat([frame, pd.DataFrame([dict(component="head", src=name[a], dst=name[b], metric="discrete_sae_pair_score",
                                                 value=float(pairs[a, b])) for a, b in better],
                                           columns=["component", "src", "dst", "metric", "value"])], ignore_index=True)
    summary = pd.DataFrame({"component": "model", "metric": ["positive_prompts", "negative_prompts"],
                            "value": [float(len(pos)), float(len(neg))]})
    return Result(pd.concat([frame, summary], ignore_index=True))
