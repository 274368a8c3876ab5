"""Attribution patching of one long prompt: the whole backward against one layer at a time.

    .venv/bin/python benchmarks/long_backward.py [--tokens 2048] [--dtype float32] [--device cpu] [--modes layers]

Random weights in the embedded model's shape. Each way runs in its own process (the memory
budget forced so that `backward_plan` picks it) so that its peak is its own: resident memory on
the CPU, allocated device memory on a GPU (above the model's). Prints seconds, peak, and the
largest difference between the two estimates.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def one(tokens: int, dtype: str, device: str, mode: str) -> dict:
    sys.path.insert(0, "benchmarks")
    from device import random_task

    import circuits.patching.attribution_patching as atp
    from workbench.models.shapes import random_model
    from workbench.paths import configure_threads

    configure_threads()
    model = random_model("smollm2-135m", dtype, device)
    task = random_task(model, 1, tokens)
    per_layer = atp.backward_bytes_per_token(model.cfg, tokens, patterns=False) * tokens  # z only: fused attention
    budget = per_layer * (model.n_layers + 1) if mode == "whole" else per_layer
    atp.memory_budget = lambda device, cpu_bytes, share=0.5: budget
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    est, _, _ = atp.attribution_patch(model, task, ("z",))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - before if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"seconds": seconds, "peak_gib": peak / 2**30, "plan": atp.backward_plan(model, tokens, patterns=False),
            "estimate": est["z"].float().flatten().tolist()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", nargs="+", default=["whole", "layers"], help="which ways to run")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # set in the child processes
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(one(args.tokens, args.dtype, args.device, args.mode)))
        return
    results = {}
    for mode in args.modes:
        out = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--dtype", args.dtype,
                              "--device", args.device, "--mode", mode], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{mode}: failed ({out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode})")
            continue
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[mode]
        peak = "peak resident memory of the process" if args.device == "cpu" else "peak device memory above the model"
        print(f"{mode:>6} backward, {args.tokens} tokens, {args.dtype}, {args.device}: {r['seconds']:.1f} s, "
              f"{r['peak_gib']:.2f} GiB {peak} (plan: {r['plan']})", flush=True)
    if len(results) == 2:
        diff = max(abs(a - b) for a, b in zip(results["whole"]["estimate"], results["layers"]["estimate"]))
        print(f"largest difference between the two estimates: {diff:.2e}")


if __name__ == "__main__":
    main()
