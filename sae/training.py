"""Training attention-output SAEs (Kissane et al. 2024) on `blocks.L.attn.hook_z`, all heads
concatenated (n_heads x d_head inputs), with SAELens's own `SAETrainer` fed from the store's
activation cache: every training step is an SAE update, not a model forward (SAELens's end-to-end
runner runs the model at every step), and a sweep of sizes reuses one cache.

`sae.train` caches the layer's hook_z over a task's prompts (use the `corpus` task), holds out
the last `eval_prompts` prompts, trains one SAE (standard L1, top-k or jumprelu) on the rest,
evaluates it on the held-out prompts (`sae.evaluation`), runs the feature pass over the cache
(`sae.features`: top examples, histograms, logit effects) and stores it all as one result.

Checkpoints: `n_checkpoints` times during training the SAE, the optimizer and the trainer's
counters are written to `<store>/checkpoints/<run key>/step_N/` (safetensors + JSON, renamed
into place, so a checkpoint is complete or absent); a killed run started again resumes from the
latest one and, because batches are a function of (seed, step), ends with the same weights as an
uninterrupted run. The SAE itself only reaches the store when training and evaluation are done.
SAELens's own checkpoints are not used: it writes trainer state with `torch.save`, and nothing
here is loaded with pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae.activations import ActivationCache, batches, cache_activations
from sae.evaluation import evaluate
from sae.features import feature_pass
from sae.outputs import TRAINED_SAE
from sae.saes import sae_result, to_inference
from workbench.errors import WorkbenchError
from workbench.methods import register
from workbench.result import Result
from workbench.store import Store

DEFAULT_SPARSITY = {"standard": 5.0, "jumprelu": 1.0}


def make_sae(arch: str, d_in: int, d_sae: int, sparsity_coefficient: float | None, k: int | None):
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    if arch == "standard":
        return StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=sparsity_coefficient))
    if arch == "jumprelu":
        return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l0_coefficient=sparsity_coefficient))
    return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))


def _trainer_class():
    """SAELens's SAETrainer with a progress bar showing L0 and dead features too, and safe checkpoints."""
    from sae_lens.training.sae_trainer import SAETrainer

    class Trainer(SAETrainer):
        checkpoints: tuple[Store, str] | None = None  # (store, run key)

        def _update_pbar(self, step_output, pbar, update_interval: int = 20):
            super()._update_pbar(step_output, pbar, update_interval)
            if self.n_training_steps % update_interval == 0:
                l0 = (step_output.feature_acts > 0).float().sum(-1).mean().item()
                pbar.set_postfix(L0=f"{l0:.1f}", dead=int(self.dead_neurons.sum()), refresh=False)

        def save_checkpoint(self, checkpoint_name: str, base_path=None):
            if self.checkpoints is not None:
                save_checkpoint(self, *self.checkpoints)

    return Trainer


def save_checkpoint(trainer, store: Store, key: str) -> Path:
    """Write the trainer's whole state as run `key`'s checkpoint in the store (older ones are dropped)."""
    steps = trainer.n_training_steps + 1  # called after a step, before the trainer counts it
    opt = trainer.optimizer.state_dict()
    tensors = {f"sae.{k}": v.detach().cpu().contiguous() for k, v in trainer.sae.state_dict().items()}
    for i, state in opt["state"].items():
        tensors.update({f"opt.{i}.{k}": torch.as_tensor(v).cpu().contiguous() for k, v in state.items()})
    tensors["act_freq_scores"] = trainer.act_freq_scores.cpu()
    tensors["n_forward_passes_since_fired"] = trainer.n_forward_passes_since_fired.cpu()
    state = {"n_training_samples": trainer.n_training_samples, "n_training_steps": steps,
             "n_frac_active_samples": trainer.n_frac_active_samples, "started_fine_tuning": trainer.started_fine_tuning,
             "param_groups": opt["param_groups"], "lr_scheduler": trainer.lr_scheduler.state_dict(),
             "coefficient_schedulers": {k: v.state_dict() for k, v in trainer.coefficient_schedulers.items()}}

    def write(d: Path) -> None:
        save_file(tensors, str(d / "state.safetensors"))
        (d / "state.json").write_text(json.dumps(state))

    return store.save_checkpoint(key, steps, write)


def restore_checkpoint(trainer, path: Path) -> None:
    state = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "state.safetensors"))
    trainer.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
    opt_state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, i, key = name.split(".", 2)
            opt_state.setdefault(int(i), {})[key] = value
    trainer.optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    for name, sched in state["coefficient_schedulers"].items():
        trainer.coefficient_schedulers[name].load_state_dict(sched)
    trainer.act_freq_scores = tensors["act_freq_scores"].to(trainer.cfg.device)
    trainer.n_forward_passes_since_fired = tensors["n_forward_passes_since_fired"].to(trainer.cfg.device)
    for key in ("n_training_samples", "n_training_steps", "n_frac_active_samples", "started_fine_tuning"):
        setattr(trainer, key, state[key])


def training_mean(cache: ActivationCache, train_prompts: range) -> torch.Tensor:
    """Mean hook_z over the first shard's training rows. hook_z is far from centred: on the embedded
    model's layer 15 (top-k 24, 2,304 features, 300k tokens) a decoder bias started at zero left 93%
    of features silent on held-out tokens, started at the mean 59% (19% with lr 1e-3)."""
    shard = cache.shard(0)
    keep = (shard["prompt"] >= train_prompts.start) & (shard["prompt"] < train_prompts.stop)
    return shard["z"][keep].mean(0)


def train_sae(cache: ActivationCache, train_prompts: range, params: "SAETrainParams", d_sae: int,
              checkpoints: tuple[Store, str] | None = None, device: str = "cpu"):
    """Train with SAELens's SAETrainer on shuffled cached batches, on `device` (the model's: SAELens's
    configs default to the CPU); with `checkpoints` = (store, run key) it checkpoints there and
    resumes from the latest checkpoint it finds."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    torch.manual_seed(params.seed)
    sae = make_sae(params.architecture, cache.d_in, d_sae, params.sparsity_coefficient, params.k)
    if params.b_dec_init == "mean":
        sae.b_dec.data = training_mean(cache, train_prompts)
    sae.to(device)  # before a restored optimizer state is cast to its parameters' device (fit() moves it too late)
    cfg = SAETrainerConfig(total_training_samples=params.n_tokens, train_batch_size_samples=params.batch_size,
                           lr=params.lr, lr_end=params.lr, n_checkpoints=params.n_checkpoints if checkpoints else 0,
                           logger=LoggingConfig(log_to_wandb=False), device=str(device))
    trainer_cls = _trainer_class()
    # the data provider is attached after a possible restore, so it can skip the batches already seen
    trainer = trainer_cls(cfg=cfg, sae=sae, data_provider=iter(()))
    trainer.checkpoints = checkpoints
    found = checkpoints[0].latest_checkpoint(checkpoints[1]) if checkpoints else None
    if found is not None:
        restore_checkpoint(trainer, found)
        trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t >= trainer.n_training_samples]
    trainer.data_provider = batches(cache, params.batch_size, params.seed, train_prompts, skip=trainer.n_training_steps)
    return trainer.fit(), (found is not None)


@dataclass(frozen=True)
class SAETrainParams:
    layer: int = 0
    architecture: Literal["standard", "topk", "jumprelu"] = "standard"
    expansion_factor: int = 8
    sparsity_coefficient: float | None = None  # L1 (standard, default 5) or L0 (jumprelu, default 1); not for topk
    k: int | None = None  # topk only (default 32)
    n_tokens: int = 200_000
    batch_size: int = 1024
    lr: float = 1e-3
    b_dec_init: Literal["mean", "zeros"] = "mean"  # "mean" of the training activations, or "zeros" (SAELens's own init)
    seed: int = 0
    eval_prompts: int = 32  # the task's last prompts, held out of training
    n_checkpoints: int = 4
    n_top_examples: int = 8

    def __post_init__(self):
        """Checks that need no model, so a bad job file fails before anything runs; fills the
        architecture's sparsity default (the store keys on the filled value)."""
        arch = self.architecture
        if self.layer < 0:
            raise WorkbenchError(f"layer = {self.layer} must be a layer index (0 or more)")
        if arch == "topk" and self.sparsity_coefficient is not None:
            raise WorkbenchError("topk SAEs set sparsity with k, not sparsity_coefficient; drop sparsity_coefficient")
        if arch != "topk" and self.k is not None:
            raise WorkbenchError(f"k applies to topk SAEs only; a {arch} SAE sets sparsity with sparsity_coefficient")
        if self.expansion_factor < 1 or self.batch_size < 1 or self.n_tokens < self.batch_size:
            raise WorkbenchError("expansion_factor must be >= 1 and n_tokens >= batch_size >= 1")
        if arch == "topk" and self.k is None:
            object.__setattr__(self, "k", 32)
        if arch != "topk" and self.sparsity_coefficient is None:
            object.__setattr__(self, "sparsity_coefficient", DEFAULT_SPARSITY[arch])


def check_params(params: SAETrainParams, model, task) -> None:
    """Refuse what the model or task cannot honour (the parameters alone are checked when parsed)."""
    if not 0 <= params.layer < model.n_layers:
        raise WorkbenchError(f"layer {params.layer} is outside the model (0..{model.n_layers - 1})")
    if not 1 <= params.eval_prompts < len(task):
        raise WorkbenchError(f"eval_prompts = {params.eval_prompts} must be between 1 and the task's prompt count - 1 "
                             f"({len(task) - 1}); the rest are for training")
    train_tokens = sum(len(p) for p in task.clean[: len(task) - params.eval_prompts])
    if train_tokens < params.batch_size:
        raise WorkbenchError(f"the corpus is too small: {train_tokens} training tokens, fewer than one batch of "
                             f"{params.batch_size}; raise the task's n_prompts or seq_len, or lower batch_size")


@register("sae.train", SAETrainParams,
          "train an attention-output SAE on one layer's hook_z from the activation cache (SAELens trainer), "
          "evaluate it and find its features' top examples", TRAINED_SAE, version=2,
          task="corpus", task_params={"n_prompts": 256, "seq_len": 128})
def sae_train(model, task, params: SAETrainParams, ctx) -> Result:
    check_params(params, model, task)
    cache = cache_activations(ctx.store, model, task, params.layer)
    n_train = len(task) - params.eval_prompts
    trained, resumed = train_sae(cache, range(n_train), params, params.expansion_factor * cache.d_in, (ctx.store, ctx.key),
                                 model.device)
    sae = to_inference(trained, params.layer, model.identity.name, model.device)
    metrics = evaluate(model, task, params.layer, sae, range(n_train, len(task)))
    features = feature_pass(sae, model, cache, range(n_train), params.n_top_examples)
    result = sae_result(sae, model, params.layer, metrics,
                        {"activation_cache": cache.key, "train_prompts": n_train, "train_tokens_available":
                         int(sum(len(p) for p in task.clean[:n_train])), "resumed_from_checkpoint": resumed,
                         "token_strings": features.token_strings},
                        extra_tensors=features.tensors, extra_frames=[features.frame])
    return result
