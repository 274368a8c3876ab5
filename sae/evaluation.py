"""How good an attention-output SAE is, measured on held-out prompts as Kissane et al. do.

L0, explained variance and MSE of hook_z, dead (never active on the evaluated tokens) and dense
(active on > 10% of them) feature shares, and cross-entropy loss recovered:
(CE_zero - CE_sae) / (CE_zero - CE_clean), with the SAE's reconstruction spliced into hook_z of
that layer vs hook_z zero-ablated there (1 = as good as the clean model, 0 = no better than
removing the layer's attention output). When zero-ablating one layer barely moves the loss (late
layers of a deep model), that ratio divides by a small difference and can pass 1; the mean
KL(clean || patched) of the next-token distributions, and `kl_recovered` = 1 - KL_sae / KL_zero,
say the same thing without the cancellation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae.activations import collect_z, z_hook
from workbench.fast_forward.attention import fused_attention


@torch.no_grad()
def reconstruction_metrics(sae, acts: Tensor) -> dict[str, float]:
    feats = sae.encode(acts)
    recon = sae.decode(feats)
    active = (feats > 0).float()
    firing = active.mean(0)
    resid = ((acts - recon) ** 2).sum(-1)
    total = ((acts - acts.mean(0)) ** 2).sum(-1)
    return {"sae_l0": active.sum(-1).mean().item(), "sae_mse": resid.mean().item() / acts.shape[1],
            "sae_explained_variance": 1 - resid.sum().item() / total.sum().item(),
            "sae_dead_share": (firing == 0).float().mean().item(), "sae_dense_share": (firing > 0.1).float().mean().item(),
            "sae_eval_tokens": float(len(acts))}


@torch.no_grad()
@fused_attention
def ce_losses(model, task, layer: int, sae, prompts: range, batch_size: int = 8) -> dict[str, float]:
    """Mean next-token loss over real positions of `prompts`: clean, with the SAE spliced in, with hook_z zeroed."""
    name = z_hook(layer)

    def splice(z, hook):
        return sae.decode(sae.encode(z.flatten(-2))).view_as(z)

    def zero(z, hook):
        return torch.zeros_like(z)

    sums = {"clean": [0.0, 0.0], "sae": [0.0, 0.0], "zero": [0.0, 0.0]}
    kl = {"sae": 0.0, "zero": 0.0}
    tokens, lengths = task.tokens("clean", device=model.device)
    for start in range(prompts.start, prompts.stop, batch_size):
        rows = slice(start, min(start + batch_size, prompts.stop))
        batch = tokens[rows, : int(lengths[rows].max())]
        mask = (torch.arange(batch.shape[1], device=batch.device)[None, 1:] < lengths[rows, None]).float()
        for kind, hooks in (("clean", []), ("sae", [(name, splice)]), ("zero", [(name, zero)])):
            logprobs = model.tl.run_with_hooks(batch, fwd_hooks=hooks).float().log_softmax(-1)[:, :-1]
            nll = -logprobs.gather(-1, batch[:, 1:, None])[..., 0]
            sums[kind][0] += (nll * mask).sum().item()
            sums[kind][1] += mask.sum().item()
            if kind == "clean":
                clean = logprobs
            else:  # KL(clean || patched) per position: how far the whole next-token distribution moved
                kl[kind] += (((clean.exp() * (clean - logprobs)).sum(-1)) * mask).sum().item()
    ce = {k: a / b for k, (a, b) in sums.items()}
    n = sums["clean"][1]
    return {"ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero_ablation": ce["zero"],
            "ce_loss_recovered": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
            "kl_sae": kl["sae"] / n, "kl_zero_ablation": kl["zero"] / n, "kl_recovered": 1 - kl["sae"] / kl["zero"]}


def evaluate(model, task, layer: int, sae, prompts: range) -> dict[str, float]:
    """Reconstruction metrics and CE loss recovered on the task's `prompts`."""
    acts = torch.cat([part["z"] for part in collect_z(model, task, layer, prompts=prompts)])
    return {**reconstruction_metrics(sae, acts.to(sae.W_enc.device)), **ce_losses(model, task, layer, sae, prompts)}
