"""Polysemantic heads, by the feature families of Kissane et al.

The paper read each head's top features (by head attribution) and called a head polysemantic when
they fall into more than one family; the families it names are defined by where the head reads
from. Here each of a head's top features is put in a family from its top example: the head's
direct feature attribution per source position (pattern x value x the head's slice of the
encoder column) on that example's prompt, its positive part split into
- `induction`: sources right after an earlier occurrence of the destination token,
- `local`: sources within `LOCAL` tokens of the destination (incl. itself),
- `long_range`: the rest;
a family takes a feature when it holds at least half of that mass (else `mixed`; no positive mass
or no example: `none`). A head is polysemantic when its top features span two or more of the three
families. Reading the features, as the paper did, tells roles apart within a family too, so this
share is a lower bound of theirs.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import Tensor

FAMILIES = ("induction", "local", "long_range")
LOCAL = 4
MIN_ATTRIBUTION, TOP_PER_HEAD = 0.2, 10


def classify(contrib: Tensor, tokens: list[int]) -> tuple[str, float, float]:
    """(family, induction share, local share) of one head's DFA per source for the last token of `tokens`."""
    dst = len(tokens) - 1
    positive = contrib[: dst + 1].clamp(min=0)
    total = float(positive.sum())
    if total <= 0:
        return "none", 0.0, 0.0
    induction = torch.tensor([0 < s < dst and tokens[s - 1] == tokens[dst] for s in range(dst + 1)])
    local = torch.arange(dst + 1) >= dst - LOCAL
    shares = {"induction": float(positive[induction].sum()) / total, "local": float(positive[local & ~induction].sum()) / total}
    shares["long_range"] = 1 - shares["induction"] - shares["local"]
    family = max(shares, key=shares.get)
    return (family if shares[family] >= 0.5 else "mixed"), shares["induction"], shares["local"]


def top_head_features(attribution: Tensor, live: Tensor) -> dict[int, list[int]]:
    """Each head's top features by head attribution: live, at least MIN_ATTRIBUTION on the head, at most TOP_PER_HEAD."""
    out = {}
    for h in range(attribution.shape[1]):
        score = torch.where(live & (attribution[:, h] >= MIN_ATTRIBUTION), attribution[:, h], torch.tensor(-1.0))
        top = score.topk(min(TOP_PER_HEAD, len(score))).indices
        out[h] = top[score[top] > 0].tolist()
    return out


@torch.no_grad()
def head_families(sae, model, layer: int, data: dict[str, Tensor], example_rows: Tensor, attribution: Tensor,
                  live: Tensor, batch_size: int = 8) -> pd.DataFrame:
    """Family of each head's top features (from their top cached example) and each head's polysemanticity."""
    top = top_head_features(attribution, live)
    pairs = [(h, f) for h, feats in top.items() for f in feats if int(example_rows[f, 0]) >= 0]
    rows = sorted({int(example_rows[f, 0]) for _, f in pairs})
    contexts = {r: data["token"][r - int(data["position"][r]) : r + 1].tolist() for r in rows}
    w_enc = sae.W_enc.float().view(model.n_heads, model.d_head, -1)
    group = model.n_heads // model.n_kv_heads
    names = [f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_v"]
    reads = {}  # example row -> (pattern row of the last token [head, src], v [src, head, d_head])
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(contexts[r]) for r in chunk)
        batch = torch.zeros((len(chunk), width), dtype=torch.long)  # right padding: never attended to
        for i, r in enumerate(chunk):
            batch[i, : len(contexts[r])] = torch.tensor(contexts[r])
        _, cache = model.tl.run_with_cache(batch.to(model.device), stop_at_layer=layer + 1, names_filter=lambda n: n in names)
        for i, r in enumerate(chunk):
            dst = len(contexts[r]) - 1
            reads[r] = (cache[names[0]][i, :, dst, : dst + 1].float().cpu(),
                        cache[names[1]][i, : dst + 1].float().repeat_interleave(group, dim=1).cpu())
    out = []
    for h, f in pairs:
        r = int(example_rows[f, 0])
        pattern, v = reads[r]
        contrib = pattern[h] * (v[:, h] @ w_enc[h, :, f].cpu())
        family, induction, local = classify(contrib, contexts[r])
        out.append({"head": h, "feature": f, "family": family, "induction_share": induction, "local_share": local})
    frame = pd.DataFrame(out, columns=["head", "feature", "family", "induction_share", "local_share"])
    per_head = []
    for h in range(model.n_heads):
        fams = set(frame[frame["head"] == h]["family"]) & set(FAMILIES)
        n = int((frame["head"] == h).sum())
        per_head += [{"head": h, "metric": "sae_head_features", "value": float(n)},
                     {"head": h, "metric": "sae_head_families", "value": float(len(fams))},
                     {"head": h, "metric": "sae_polysemantic", "value": float(len(fams) >= 2)}]
    features = frame.melt(id_vars=["head", "feature", "family"], value_vars=["induction_share", "local_share"],
                          var_name="metric", value_name="value")
    features["metric"] = "family_" + features["metric"]
    return pd.concat([pd.DataFrame(per_head).assign(component="head"), features.assign(component="sae_feature")],
                     ignore_index=True).assign(layer=layer)
