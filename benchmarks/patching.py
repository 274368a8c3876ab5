"""Exact head patching: ours against TransformerLens's reference loop, same model, same prompts.

    .venv/bin/python benchmarks/patching.py [--prompts 16] [--sample 120]

On the embedded model with IOI prompts of one template (equal length, as the reference needs):
- all-positions head sweep (n_layers x n_heads patches): both timed in full;
- by-position head sweep (n_layers x n_pos x n_heads patches): ours in full; the reference on a
  random sample of indices, its full time extrapolated from that sample (it runs one full
  forward per index, so time is linear in the number of indices).
Prints seconds, the ratio and the maximum absolute difference of the normalised metric; then
attribution patching of every head: its time as a multiple of one forward pass over the same
prompts, and its Spearman correlation with the exact all-positions sweep.
"""

import argparse
import random
import time

import pandas as pd
import torch
import transformer_lens.patching as P

from circuits.patching.engine import PatchingRun, head_indices
from workbench.models import load_model
from workbench.tasks import build_task

TEMPLATE = "When {A} and {B} went to the {PLACE}, {S} gave a {OBJECT} to"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--sample", type=int, default=120, help="reference indices timed for the by-position sweep")
    ap.add_argument("--quick", action="store_true",
                    help="only our all-positions sweep and attribution patching (no reference loops, no by-position sweep)")
    args = ap.parse_args()
    model = load_model("smollm2-135m")
    task = build_task(model, "ioi", {"n_prompts": args.prompts, "templates": [TEMPLATE]})
    run = PatchingRun(model, task, activations=("z",))
    n_pos = run.clean_tokens.shape[1]
    rows = torch.arange(len(task))

    def metric(logits):
        last = logits[rows, run.final_idx]
        ld = (last[rows, task.answer_ids()] - last[rows, task.wrong_ids()]).mean()
        return run.baselines.normalise(ld)

    print(f"{model.name}, {len(task)} prompts x {n_pos} tokens, {torch.get_num_threads()} threads, device {model.device}")

    start = time.perf_counter()
    ours = run.baselines.normalise(run.run("z", head_indices(model, "z", n_pos, False), progress=False))
    t_ours = time.perf_counter() - start
    if args.quick:
        print(f"all-positions head sweep ({len(ours)} patches): ours {t_ours:.1f} s")
    else:
        start = time.perf_counter()
        with torch.no_grad():
            ref = P.get_act_patch_attn_head_out_all_pos(model.tl, run.corrupt_tokens, run.clean_cache, metric).reshape(-1).cpu()
        t_ref = time.perf_counter() - start
        print(f"all-positions head sweep ({len(ours)} patches): ours {t_ours:.1f} s, TransformerLens {t_ref:.1f} s, "
              f"ratio {t_ref / t_ours:.1f}x, max |diff| {(ours - ref).abs().max():.2e}")

    exact_all_pos = ours.clone()
    from circuits.patching.attribution_patching import attribution_patch

    with torch.no_grad():
        model.tl(run.clean_tokens)
        start = time.perf_counter()
        for _ in range(3):
            model.tl(run.clean_tokens)
        t_forward = (time.perf_counter() - start) / 3
    attribution_patch(model, task, ("z",))  # warm-up: first backward allocates
    start = time.perf_counter()
    est, _, _ = attribution_patch(model, task, ("z",))
    t_atp = time.perf_counter() - start
    rho = pd.Series(est["z"].reshape(-1).numpy()).corr(pd.Series(exact_all_pos.numpy()), method="spearman")
    print(f"attribution patching, all heads: {t_atp:.2f} s = {t_atp / t_forward:.1f} forwards "
          f"(one forward {t_forward:.2f} s); Spearman with exact head patching {rho:.3f}")

    if args.quick:
        return
    indices = head_indices(model, "z", n_pos, True)
    start = time.perf_counter()
    ours = run.baselines.normalise(run.run("z", indices, progress=False))
    t_ours = time.perf_counter() - start
    sample = random.Random(0).sample(range(len(indices)), min(args.sample, len(indices)))
    index_df = pd.DataFrame([(indices[i].layer, indices[i].pos, indices[i].head) for i in sample], columns=["layer", "pos", "head"])
    setter = P.get_act_patch_attn_head_out_by_pos.keywords["patch_setter"]
    start = time.perf_counter()
    with torch.no_grad():
        ref = P.generic_activation_patch(model.tl, run.corrupt_tokens, run.clean_cache, metric, patch_setter=setter,
                                         activation_name="z", index_df=index_df).cpu()
    t_sample = time.perf_counter() - start
    t_ref = t_sample * len(indices) / len(sample)
    diff = (ours[sample] - ref).abs().max()
    print(f"by-position head sweep ({len(indices)} patches): ours {t_ours:.1f} s, TransformerLens ~{t_ref:.0f} s "
          f"(extrapolated from {len(sample)} indices in {t_sample:.1f} s), ratio ~{t_ref / t_ours:.1f}x, "
          f"max |diff| on the sample {diff:.2e}")


if __name__ == "__main__":
    main()
