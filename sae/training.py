"""Attention-output SAEs (Kissane et al. 2024) on `blocks.L.attn.hook_z`, all heads concatenated
(n_heads x d_head inputs), trained with SAELens's own `SAETrainer` from activations held in
memory: every training step is an SAE update, not a model forward (SAELens's end-to-end runner
runs the model at every step).

`sae.train` collects the layer's hook_z over a task's clean prompts (use the `corpus` task),
trains one SAE, evaluates it and stores its weights with the evaluation and each feature's head
attribution (the norm of each head's d_head slice of its decoder row, normalised over heads).

Evaluation: L0, explained variance and MSE of hook_z, dead (never active on the evaluation
tokens) and dense (active on > 10% of them) feature shares, and cross-entropy loss recovered as
the paper measures it: (CE_zero - CE_sae) / (CE_zero - CE_clean), splicing the reconstruction
into the forward pass vs zero-ablating hook_z at that layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from workbench.errors import WorkbenchError
from workbench.methods import register
from workbench.result import Result

ARCHITECTURES = ("standard", "topk")


@torch.no_grad()
def collect_z(model, task, layer: int, batch_size: int = 8) -> Float[Tensor, "tokens d_in"]:
    """hook_z of `layer` at every real position of the task's clean prompts, heads concatenated."""
    tokens, lengths = task.tokens("clean", device=model.device)
    out = []
    for start in range(0, len(task), batch_size):
        rows = slice(start, start + batch_size)
        width = int(lengths[rows].max())
        _, cache = model.tl.run_with_cache(tokens[rows, :width], stop_at_layer=layer + 1,
                                           names_filter=f"blocks.{layer}.attn.hook_z")
        z = cache[f"blocks.{layer}.attn.hook_z"].flatten(-2)  # [batch, pos, head * d_head]
        valid = torch.arange(width, device=z.device)[None, :] < lengths[rows, None]
        out.append(z[valid].cpu())
    return torch.cat(out)


def make_sae(arch: str, d_in: int, d_sae: int, l1_coefficient: float, k: int):
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    if arch == "standard":
        return StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=l1_coefficient))
    return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))


def train_sae(acts: Float[Tensor, "tokens d_in"], arch: str, d_sae: int, l1_coefficient: float, k: int,
              n_tokens: int, batch_size: int, lr: float, seed: int):
    """Train with SAELens's SAETrainer on shuffled batches of `acts` (repeated as needed)."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(seed)
    sae = make_sae(arch, acts.shape[1], d_sae, l1_coefficient, k)
    gen = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            order = torch.randperm(len(acts), generator=gen)
            for i in range(0, len(order) - batch_size + 1, batch_size):
                yield acts[order[i : i + batch_size]]

    cfg = SAETrainerConfig(total_training_samples=n_tokens, train_batch_size_samples=batch_size, lr=lr, lr_end=lr,
                           logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=10)
    return SAETrainer(cfg=cfg, sae=sae, data_provider=batches()).fit()


def head_attribution(w_dec: Float[Tensor, "d_sae d_in"], n_heads: int) -> Float[Tensor, "d_sae n_heads"]:
    """Each feature's decoder norm per head slice, normalised to sum to 1 over heads."""
    norms = w_dec.view(w_dec.shape[0], n_heads, -1).norm(dim=-1)
    return norms / norms.sum(-1, keepdim=True).clamp(min=1e-12)


@torch.no_grad()
def evaluate(model, task, layer: int, sae, acts: Tensor, batch_size: int = 8) -> dict[str, float]:
    feats = sae.encode(acts)
    recon = sae.decode(feats)
    active = (feats > 0).float()
    firing = active.mean(0)
    resid = ((acts - recon) ** 2).sum(-1)
    total = ((acts - acts.mean(0)) ** 2).sum(-1)
    metrics = {"sae_l0": active.sum(-1).mean().item(), "sae_mse": resid.mean().item() / acts.shape[1],
               "sae_explained_variance": 1 - resid.sum().item() / total.sum().item(),
               "sae_dead_share": (firing == 0).float().mean().item(), "sae_dense_share": (firing > 0.1).float().mean().item()}
    name = f"blocks.{layer}.attn.hook_z"

    def splice(z, hook):
        flat = z.flatten(-2)
        return sae.decode(sae.encode(flat)).view_as(z)

    def zero(z, hook):
        return torch.zeros_like(z)

    losses = {"clean": [], "sae": [], "zero": []}
    tokens, lengths = task.tokens("clean", device=model.device)
    for start in range(0, len(task), batch_size):
        rows = slice(start, start + batch_size)
        batch = tokens[rows, : int(lengths[rows].max())]
        mask = (torch.arange(batch.shape[1], device=batch.device)[None, 1:] < lengths[rows, None]).float()
        for kind, hooks in (("clean", []), ("sae", [(name, splice)]), ("zero", [(name, zero)])):
            logprobs = model.tl.run_with_hooks(batch, fwd_hooks=hooks).log_softmax(-1)
            nll = -logprobs[:, :-1].gather(-1, batch[:, 1:, None])[..., 0]
            losses[kind].append(((nll * mask).sum().item(), mask.sum().item()))
    ce = {k: sum(a for a, _ in v) / sum(b for _, b in v) for k, v in losses.items()}
    metrics.update(ce_clean=ce["clean"], ce_sae=ce["sae"], ce_zero_ablation=ce["zero"],
                   ce_loss_recovered=(ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]))
    return metrics


@dataclass
class SAETrainParams:
    layer: int = 0
    architecture: str = "standard"
    expansion_factor: int = 8
    l1_coefficient: float = 5.0
    k: int = 16
    n_tokens: int = 200_000
    batch_size: int = 1024
    lr: float = 3e-4
    seed: int = 0


@register("sae.train", SAETrainParams,
          "train an attention-output SAE on one layer's hook_z (SAELens trainer) and evaluate it")
def sae_train(model, task, params: SAETrainParams) -> Result:
    if not 0 <= params.layer < model.n_layers:
        raise WorkbenchError(f"layer {params.layer} is outside the model (0..{model.n_layers - 1})")
    if params.architecture not in ARCHITECTURES:
        raise WorkbenchError(f"unknown architecture '{params.architecture}'; choose one of {', '.join(ARCHITECTURES)}")
    if params.expansion_factor < 1 or params.n_tokens < params.batch_size or params.batch_size < 1:
        raise WorkbenchError("expansion_factor must be >= 1 and n_tokens >= batch_size >= 1")
    acts = collect_z(model, task, params.layer)
    if len(acts) < params.batch_size:
        raise WorkbenchError(f"the task holds {len(acts)} tokens, fewer than one batch of {params.batch_size}; "
                             "use more or longer prompts (corpus task: raise n_prompts or seq_len)")
    d_in = acts.shape[1]
    sae = train_sae(acts, params.architecture, params.expansion_factor * d_in, params.l1_coefficient, params.k,
                    params.n_tokens, params.batch_size, params.lr, params.seed)
    sae.eval()
    metrics = evaluate(model, task, params.layer, sae, acts)
    w_dec = sae.W_dec.detach().float()
    attribution = head_attribution(w_dec, model.n_heads)
    frames = [pd.DataFrame({"component": "model", "layer": params.layer, "metric": list(metrics), "value": list(metrics.values())})]
    feats = torch.arange(w_dec.shape[0]).repeat_interleave(model.n_heads)
    heads = torch.arange(model.n_heads).repeat(w_dec.shape[0])
    frames.append(pd.DataFrame({"component": "sae_feature", "layer": params.layer, "head": heads.numpy(),
                                "feature": feats.numpy(), "metric": "head_attribution",
                                "value": attribution.flatten().numpy()}))
    tensors = {"W_enc": sae.W_enc.detach().float().contiguous(), "W_dec": w_dec.contiguous(),
               "b_enc": sae.b_enc.detach().float(), "b_dec": sae.b_dec.detach().float(), "head_attribution": attribution}
    meta = {"hook": f"blocks.{params.layer}.attn.hook_z", "d_in": d_in, "d_sae": w_dec.shape[0], "tokens_collected": len(acts),
            "tensor_dims": {"W_enc": ["d_in", "d_sae"], "W_dec": ["d_sae", "d_in"], "head_attribution": ["d_sae", "head"]}}
    return Result(pd.concat(frames, ignore_index=True), tensors=tensors, meta=meta)
