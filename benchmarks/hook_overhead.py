"""What adding and removing temporary hooks costs per forward: TransformerLens's `run_with_hooks`
(which walks every hook point of the model on exit) against `own_hooks` (which removes only its
own handles), with a plain forward as the floor, on the embedded model at IOI length.

    .venv/bin/python benchmarks/hook_overhead.py [--calls 300] [--prompts 1]

Patching, path patching, circuit evaluation and masked decoding run one short forward per chunk,
so the per-call overhead is paid hundreds of times per run (on a GPU at short prompts it was a
quarter of the time). The device is synchronised before every clock read.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from workbench.fast_forward.own_hooks import own_hooks
from workbench.models import load_model
from workbench.tasks import build_task


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def one_call(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--prompts", type=int, default=1)
    args = parser.parse_args()
    model = load_model("smollm2-135m")
    tl = model.tl
    tokens, _ = build_task(model, "ioi", {"n_prompts": args.prompts}).tokens("clean", device=model.device)
    hooks = [("blocks.12.attn.hook_z", lambda act, hook: act)]

    def with_own():
        with own_hooks(tl, hooks):
            tl(tokens)

    variants = {"plain": lambda: tl(tokens), "run_with_hooks": lambda: tl.run_with_hooks(tokens, fwd_hooks=hooks),
                "own_hooks": with_own}
    times = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():
            fn()  # warm up
        for _ in range(args.calls):  # round robin, so drift in machine load hits every variant alike
            for name, fn in variants.items():
                times[name].append(one_call(fn, model.device))
    best = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{len(tl.hook_dict)} hook points; {tuple(tokens.shape)} tokens on {model.device}; median of {args.calls} calls each")
    for name, seconds in best.items():
        print(f"{name:>15}: {seconds * 1e3:7.2f} ms per forward, overhead over plain {1e3 * (seconds - best['plain']):6.2f} ms")
    print(f"run_with_hooks / own_hooks: {best['run_with_hooks'] / best['own_hooks']:.3f}x")


if __name__ == "__main__":
    main()
