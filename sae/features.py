"""What an attention-output SAE's features are: the feature pass over the activation cache.

For every feature: how often it fires, its mean and max activation, a histogram of log10
activations, its top-activating cached tokens with the context around them (token ids and the
feature's activation on each context token, so a page can highlight them), and its direct effect
on the logits: the decoder vector written through each head's W_O and the unembedding (the final
norm's weight is folded into W_U; its per-token scale is left out, as in direct logit attribution).

Per head: whether it is polysemantic by the paper's feature families (`sae.families`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor
from workbench.progress import tqdm

from sae.activations import ActivationCache
from sae.families import head_families
from sae.saes import head_attribution

HIST_EDGES = torch.linspace(-4, 2, 49)  # log10 activation bins
CONTEXT_BEFORE, CONTEXT_AFTER = 12, 3
N_LOGITS = 10
CHUNK = 4096


@dataclass
class FeaturePass:
    frame: pd.DataFrame
    tensors: dict[str, Tensor]
    token_strings: dict[str, str] = field(default_factory=dict)


def token_strings(model, ids) -> dict[str, str]:
    """Display strings of token ids (keys are str for JSON)."""
    ids = sorted({int(i) for i in ids if int(i) >= 0})
    if model.tokenizer is None:
        return {str(i): f"<{i}>" for i in ids}
    return {str(i): model.tokenizer.decode([i]) for i in ids}


@torch.no_grad()
def encode_chunks(sae, z: Tensor):
    for start in range(0, len(z), CHUNK):
        yield start, sae.encode(z[start : start + CHUNK])


@torch.no_grad()
def logit_effects(sae, model, layer: int, n: int = N_LOGITS) -> dict[str, Tensor]:
    """Top and bottom `n` tokens of each feature's direct logit effect: W_dec (per head) @ W_O @ W_U."""
    w_dec = sae.W_dec.float().view(sae.cfg.d_sae, model.n_heads, model.d_head)
    out = torch.einsum("fhd,hdm->fm", w_dec.to(model.device), model.tl.W_O[layer].float())
    top_v, top_i, bot_v, bot_i = [], [], [], []
    for start in range(0, len(out), 256):
        logits = out[start : start + 256] @ model.tl.W_U.float()
        t = logits.topk(n, dim=-1)
        b = logits.topk(n, dim=-1, largest=False)
        top_v.append(t.values.cpu()), top_i.append(t.indices.cpu()), bot_v.append(b.values.cpu()), bot_i.append(b.indices.cpu())
    return {"logit_top_ids": torch.cat(top_i).int(), "logit_top_values": torch.cat(top_v),
            "logit_bottom_ids": torch.cat(bot_i).int(), "logit_bottom_values": torch.cat(bot_v)}


@torch.no_grad()
def feature_pass(sae, model, cache: ActivationCache, prompts: range, n_top: int) -> FeaturePass:
    """Frequencies, histograms, top examples in context and logit effects of every feature over the cache."""
    data = cache.load(prompts)
    z, d_sae = data["z"].to(sae.W_enc.device), sae.cfg.d_sae
    n_bins = len(HIST_EDGES) + 1
    fired = torch.zeros(d_sae)
    act_sum = torch.zeros(d_sae)
    hist = torch.zeros(d_sae * n_bins)
    top_v = torch.zeros(d_sae, 0)
    top_i = torch.zeros(d_sae, 0, dtype=torch.long)
    for start, acts in tqdm(encode_chunks(sae, z), total=-(-len(z) // CHUNK), desc="feature pass", unit="chunk"):
        acts = acts.float().cpu()
        fired += (acts > 0).sum(0)
        act_sum += acts.sum(0)
        rows, feats = torch.nonzero(acts > 0, as_tuple=True)
        bins = torch.bucketize(acts[rows, feats].log10(), HIST_EDGES)
        hist += torch.bincount(feats * n_bins + bins, minlength=d_sae * n_bins)
        k = min(n_top, len(acts))
        chunk_top = acts.topk(k, dim=0)
        top_v = torch.cat([top_v, chunk_top.values.T], 1)
        top_i = torch.cat([top_i, chunk_top.indices.T + start], 1)
        keep = top_v.topk(min(n_top, top_v.shape[1]), dim=1)
        top_v, top_i = keep.values, top_i.gather(1, keep.indices)
    top_i = torch.where(top_v > 0, top_i, torch.full_like(top_i, -1))
    ex_rows = top_i
    ex_tokens, ex_acts = _contexts(sae, z, data, top_i)
    effects = logit_effects(sae, model, cache_layer(cache))
    w_dec = sae.W_dec.detach().float().cpu()
    attribution = head_attribution(w_dec, model.n_heads)
    frequency = fired / len(z)
    feats = torch.arange(d_sae).numpy()
    layer = cache_layer(cache)
    frames = [pd.DataFrame({"component": "sae_feature", "layer": layer, "feature": feats, "metric": metric, "value": values.numpy()})
              for metric, values in (("feature_frequency", frequency), ("feature_mean_activation", act_sum / fired.clamp(min=1)),
                                     ("feature_max_activation", top_v[:, 0] if top_v.shape[1] else torch.zeros(d_sae)))]
    families = head_families(sae, model, layer, data, ex_rows, attribution, fired > 0)
    per_head = families[families["component"] == "head"].pivot_table(index="head", columns="metric", values="value")
    judged = per_head[per_head["sae_head_families"] > 0]["sae_polysemantic"]  # heads with a top feature in a family
    frames += [families, pd.DataFrame({"component": "model", "layer": [layer, layer],
                                       "metric": ["sae_polysemantic_head_share", "sae_feature_pass_tokens"],
                                       "value": [float(judged.mean()) if len(judged) else float("nan"), float(len(z))]})]
    tensors = {"activation_histogram": hist.view(d_sae, n_bins), "histogram_edges": HIST_EDGES.clone(),
               "example_prompt": torch.where(ex_rows >= 0, data["prompt"][ex_rows.clamp(min=0)], -1).int(),
               "example_position": torch.where(ex_rows >= 0, data["position"][ex_rows.clamp(min=0)], -1).int(),
               "example_tokens": ex_tokens, "example_acts": ex_acts, "example_max": top_v.contiguous(), **effects}
    ids = torch.cat([ex_tokens.flatten(), effects["logit_top_ids"].flatten(), effects["logit_bottom_ids"].flatten()])
    return FeaturePass(pd.concat(frames, ignore_index=True), tensors, token_strings(model, ids.unique()))


def cache_layer(cache: ActivationCache) -> int:
    return int(cache.hook.split(".")[1])


@torch.no_grad()
def _contexts(sae, z: Tensor, data: dict[str, Tensor], top_i: Tensor):
    """Context windows around each top example: the window's token ids (-1 outside the prompt) and
    the feature's activation on each window token."""
    d_sae, n_top = top_i.shape
    offsets = torch.arange(-CONTEXT_BEFORE, CONTEXT_AFTER + 1)
    rows = top_i[..., None] + offsets  # [d_sae, n_top, window]
    inside = (top_i[..., None] >= 0) & (rows >= 0) & (rows < len(z))
    rows = torch.where(inside, rows, torch.zeros_like(rows))
    inside &= data["prompt"][rows] == data["prompt"][top_i.clamp(min=0)][..., None]
    tokens = torch.where(inside, data["token"][rows], torch.full_like(rows, -1)).int()
    acts = torch.zeros(rows.shape)
    # encode only the rows some window needs, a block of features at a time
    for f0 in range(0, d_sae, 128):
        block = slice(f0, f0 + 128)
        need, where = torch.unique(rows[block][inside[block]], return_inverse=True)
        values = torch.cat([a for _, a in encode_chunks(sae, z[need])]).float().cpu() if len(need) else torch.zeros(0, d_sae)
        feat = torch.arange(f0, min(f0 + 128, d_sae))[:, None, None].expand_as(rows[block])[inside[block]]
        block_acts = acts[block]
        block_acts[inside[block]] = values[where, feat]
        acts[block] = block_acts
    return tokens, acts
