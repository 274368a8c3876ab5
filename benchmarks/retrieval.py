"""Retrieval-head scoring vs plain greedy generation of the same answer: time and peak memory.

For each context length, in separate processes (so peak memory is each variant's own):
- `score`: our decode (KV cache, argmax of one attention row per head per step),
- `generate`: TransformerLens's `generate` (KV cache, greedy), as many new tokens as `score` made,
- `full` (up to 2k tokens): the naive alternative, one forward over prompt + answer caching every
  layer's full attention pattern, to show what reading one row per step saves.
Every variant decodes exactly `--max-new-tokens` tokens (no stop at special tokens). Peak memory is the process's peak RSS above its RSS after loading the model (VmHWM reset via
/proc/self/clear_refs). Target: score within 1.5x of generate in time and 1.2x in peak memory.

    .venv/bin/python benchmarks/retrieval.py [--lengths 1024 2048 4096]
    .venv/bin/python benchmarks/retrieval.py --formats --lengths 1024 2048   # chat template vs plain prompt
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def child(variant: str, length: int, n_new: int, prompt_format: str = "auto") -> dict:
    import torch

    from circuits.heads.retrieval import greedy_generate
    from workbench.models import load_model
    from workbench.tasks import build_task

    model = load_model("smollm2-135m")
    task = build_task(model, "needle", {"context_lengths": [length], "depths": [0.5], "needles": [0],
                                        "prompt_format": prompt_format})
    prompt = task.clean[0]
    model.tl  # load the weights before measuring
    base = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    t0 = time.perf_counter()
    with torch.no_grad():
        if variant == "score":
            greedy_generate(model, prompt, n_new, track_argmax=True, stop_at_special=False)
        elif variant == "generate":
            model.tl.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False, use_past_kv_cache=True,
                              stop_at_eos=False, verbose=False)
        else:
            gen = greedy_generate(model, prompt, n_new, stop_at_special=False)
            full = torch.tensor([prompt + gen.tokens])
            _, cache = model.tl.run_with_cache(full, names_filter=lambda n: n.endswith("hook_pattern"))
            del cache
    seconds = time.perf_counter() - t0
    return {"variant": variant, "length": len(prompt), "new_tokens": n_new, "seconds": seconds,
            "peak_mib": (_rss_kib("VmHWM") - base) / 1024}


def measure(variant: str, length: int, n_new: int, prompt_format: str = "auto") -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", variant, str(length), str(n_new), prompt_format],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--formats", action="store_true",
                        help="instead: scoring on the chat-formatted prompt against the plain one, twice each")
    parser.add_argument("--child", nargs=4)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]), args.child[3])))
        return
    if args.formats:
        compare_formats(args.lengths, args.max_new_tokens)
        return
    print(f"{'tokens':>7} {'new':>4} {'score s':>8} {'generate s':>10} {'time x':>7} {'score MiB':>9} {'gen MiB':>8} "
          f"{'mem x':>6} {'full-pattern s / MiB':>21}")
    for length in args.lengths:
        score = measure("score", length, args.max_new_tokens)
        gen = measure("generate", length, args.max_new_tokens)
        full = measure("full", length, args.max_new_tokens) if length <= 2048 else None
        full_txt = f"{full['seconds']:.1f} / {full['peak_mib']:.0f}" if full else "(skipped)"
        print(f"{score['length']:>7} {score['new_tokens']:>4} {score['seconds']:>8.1f} {gen['seconds']:>10.1f} "
              f"{score['seconds'] / gen['seconds']:>7.2f} {score['peak_mib']:>9.0f} {gen['peak_mib']:>8.0f} "
              f"{score['peak_mib'] / gen['peak_mib']:>6.2f} {full_txt:>21}", flush=True)


def compare_formats(lengths: list[int], n_new: int) -> None:
    """The chat template adds a few dozen tokens around the same haystack: scoring time and memory
    should move by no more than run-to-run noise (each format measured twice, alternating)."""
    print(f"{'tokens':>7} {'plain s':>14} {'chat s':>14} {'time x':>7} {'plain MiB':>14} {'chat MiB':>14} {'mem x':>6}")
    for length in lengths:
        runs = {f: [] for f in ("plain", "chat")}
        for _ in range(2):
            for f in runs:
                runs[f].append(measure("score", length, n_new, f))
        s = {f: [r["seconds"] for r in rs] for f, rs in runs.items()}
        m = {f: [r["peak_mib"] for r in rs] for f, rs in runs.items()}
        mean = lambda xs: sum(xs) / len(xs)
        print(f"{length:>7} {s['plain'][0]:>6.1f}/{s['plain'][1]:<7.1f} {s['chat'][0]:>6.1f}/{s['chat'][1]:<7.1f} "
              f"{mean(s['chat']) / mean(s['plain']):>7.2f} {m['plain'][0]:>6.0f}/{m['plain'][1]:<7.0f} "
              f"{m['chat'][0]:>6.0f}/{m['chat'][1]:<7.0f} {mean(m['chat']) / mean(m['plain']):>6.2f}", flush=True)


if __name__ == "__main__":
    main()
