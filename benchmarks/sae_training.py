"""Attention-output SAE training throughput: ours (SAELens's SAETrainer fed from the store's
activation cache) vs SAELens's own `LanguageModelSAETrainingRunner` (which runs the model to get
activations while it trains), same SAE, same layer, same batch size, in one run; plus the time
to cache the activations once.

    .venv/bin/python benchmarks/sae_training.py [--layer 15] [--prompts 200] [--ours-tokens 400000]
                                                [--saelens-tokens 40000] [--expansion 8] [--k 24]

Prints tokens/s of each, the ratio, and whole sweeps of 1, 2 and 4 SAEs with the cache time counted.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--prompts", type=int, default=200, help="128-token corpus windows to cache")
    ap.add_argument("--ours-tokens", type=int, default=400_000)
    ap.add_argument("--saelens-tokens", type=int, default=40_000)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=24)
    ap.add_argument("--batch", type=int, default=1024)
    args = ap.parse_args()

    from datasets import Dataset
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    from sae.activations import cache_activations
    from sae.training import SAETrainParams, train_sae
    from workbench.models import load_model
    from workbench.store import Store
    from workbench.tasks import build_task

    model = load_model("smollm2-135m")
    task = build_task(model, "corpus", {"n_prompts": args.prompts, "seq_len": 128})
    d_in = model.n_heads * model.d_head
    d_sae = args.expansion * d_in
    print(f"layer {args.layer} hook_z, d_in {d_in}, d_sae {d_sae}, top-k {args.k}, batch {args.batch}, "
          f"device {model.device}, torch threads {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        cache = cache_activations(Store(root), model, task, args.layer)
        cache_s = time.perf_counter() - start
        print(f"cache: {cache.n_tokens} tokens in {cache_s:.1f} s ({cache.n_tokens / cache_s:,.0f} tokens/s, one model pass)")

        params = SAETrainParams(layer=args.layer, architecture="topk", k=args.k, expansion_factor=args.expansion,
                                n_tokens=args.ours_tokens, batch_size=args.batch, lr=1e-3)
        start = time.perf_counter()
        train_sae(cache, range(len(task)), params, d_sae, device=model.device)
        ours_s = time.perf_counter() - start
    ours = args.ours_tokens / ours_s
    print(f"ours, from the cache: {args.ours_tokens} tokens in {ours_s:.1f} s ({ours:,.0f} tokens/s)")

    windows = [p[:128] for p in task.clean]
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=args.k), model_name="smollm2-135m",
        hook_name=f"blocks.{args.layer}.attn.hook_z", dataset_path="in-memory", is_dataset_tokenized=True, streaming=False,
        context_size=128, prepend_bos=False, training_tokens=args.saelens_tokens, train_batch_size_tokens=args.batch,
        store_batch_size_prompts=8, n_batches_in_buffer=16, lr=1e-3, lr_end=1e-3, logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None, output_path=None, n_batches_for_norm_estimate=10, device=str(model.device), verbose=False)
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=Dataset.from_dict({"input_ids": windows}),
                                            override_model=model.tl)
    start = time.perf_counter()
    runner.run()
    ref_s = time.perf_counter() - start
    ref = args.saelens_tokens / ref_s
    print(f"SAELens runner, model in the loop: {args.saelens_tokens} tokens in {ref_s:.1f} s ({ref:,.0f} tokens/s)")
    print(f"ratio (ours / SAELens): {ours / ref:.1f}x")
    for n in (1, 2, 4):  # a sweep of n SAEs, each trained on ours-tokens tokens, sharing one cache
        saelens_total = n * args.ours_tokens / ref
        print(f"  sweep of {n} SAE(s) incl. the cache: SAELens {saelens_total:.0f} s, ours {cache_s + n * ours_s:.0f} s "
              f"({saelens_total / (cache_s + n * ours_s):.1f}x)")


if __name__ == "__main__":
    main()
