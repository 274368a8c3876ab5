"""`circuit.faithfulness` checked by the EAP-IG library's own circuit evaluation, the code MIB's
circuit track runs (it pins the library at commit 7af394a).

    EAP_IG_SRC=/path/to/EAP-IG .venv/bin/python benchmarks/mib_faithfulness.py [--prompts 8] [--shape gpt2-small]

The library is not on PyPI: EAP_IG_SRC names a checkout (the repository root or its `src/`). It
imports matplotlib, which the workbench does not need; put it on PYTHONPATH. Without a checkout the
script says why and exits 0: CI checks circuit runs against the independent hook reference of
tests/circuit_reference.py instead.

A random model of `--shape` (GPT-2 small's by default: no grouped-query attention, so the library's
graph and the workbench's have the same N edges, 32491, MIB's own count for GPT-2) with the
embedded model's tokenizer and a BOS token, as the library's tokenizer call prepends one; IOI
prompts. `discovery.eap_ig` scores every edge and is exported as MIB JSON; the library reads it
(`Graph.from_json`) and, at each of MIB's fractions f and for both rankings (signed, which MIB's
leaderboard takes CPR from, and |score|, which it takes CMD from), keeps `apply_topn(int(f N),
absolute, prune=True)` and evaluates it (`evaluate_graph`, patching). Printed beside
`circuit.faithfulness`'s curve from the same scores: the edges each keeps, both faithfulness values
and their difference, then CPR and CMD from both (trapezoids over the fraction, as MIB's
`evaluate_area_under_curve` without log scale), and the seconds each took. The library hard-codes
device 'cuda' only on paths not taken here (mean ablation, Gemma-2's extra norms), so this runs on
the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def library(checkout: str | None):
    """The library's Graph and evaluation functions from the checkout, or None with the reason."""
    if not checkout:
        return None, "EAP_IG_SRC is not set; point it at a checkout of the EAP-IG library (commit 7af394a)"
    root = Path(checkout).expanduser()
    src = root / "src" if (root / "src" / "eap").is_dir() else root
    if not (src / "eap" / "evaluate.py").is_file():
        return None, f"EAP_IG_SRC={checkout} holds no eap/evaluate.py; give the EAP-IG repository root or its src/"
    sys.path.insert(0, str(src))
    try:
        from eap.evaluate import evaluate_baseline, evaluate_graph
        from eap.graph import Graph
    except ImportError as e:
        return None, f"the EAP-IG library at {src} does not import ({e}); install its dependencies (matplotlib)"
    return (Graph, evaluate_graph, evaluate_baseline), ""


def areas(fractions, curve) -> tuple[float, float]:
    """(area under, area between the curve and 1): trapezoids over the fraction, as MIB computes them."""
    under = between = 0.0
    for i in range(len(curve) - 1):
        dx = fractions[i + 1] - fractions[i]
        under += dx * (curve[i] + curve[i + 1]) / 2
        between += dx * (abs(1 - curve[i]) + abs(1 - curve[i + 1])) / 2
    return under, between


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--shape", default="gpt2-small")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    found, why = library(os.environ.get("EAP_IG_SRC"))
    if found is None:
        print(f"skipped: {why}")
        return
    Graph, evaluate_graph, evaluate_baseline = found
    torch.set_num_threads(args.threads)

    from circuits.discovery.faithfulness import FRACTIONS
    from workbench.mib import mib_circuit
    from workbench.models.shapes import random_model
    from workbench.runner import run_method
    from workbench.store import Store
    from workbench.tasks import build_task

    model = random_model(args.shape, device="cpu")
    model.identity = dataclasses.replace(model.identity, prepend_bos=True)  # the library's tokenize_plus prepends BOS
    task = build_task(model, "ioi", {"n_prompts": args.prompts})
    store = Store(tempfile.mkdtemp())
    start = time.perf_counter()
    discovery = run_method(model, task, "discovery.eap_ig", {}, store)
    discovered = time.perf_counter() - start
    start = time.perf_counter()
    ours = run_method(model, task, "circuit.faithfulness", {}, store)
    ours_s = time.perf_counter() - start
    rows = discovery.metric("eap_ig")[["src", "dst", "dst_input", "value"]].to_dict("records")
    shape = {"n_layers": model.n_layers, "n_heads": model.n_heads, "n_kv_heads": model.n_kv_heads, "d_model": model.d_model}
    path = Path(store.root) / "circuit.json"
    path.write_text(json.dumps(mib_circuit(rows, shape)))
    graph = Graph.from_json(str(path))
    n_edges = len(graph.edges)
    print(f"{args.shape} shape, random weights, {len(task)} IOI prompts; edges: workbench {ours.meta['n_edges']}, "
          f"library {n_edges}; discovery.eap_ig {discovered:.1f} s")

    # the library's evaluation on TransformerLens's own forward, with the hook points it asks for
    tl, tokenizer = model.tl, model.tokenizer
    clean = [tokenizer.decode(t[1:]) for t in task.clean]
    corrupted = [tokenizer.decode(t[1:]) for t in task.corrupted]
    labels = torch.stack([task.answer_ids(), task.wrong_ids()], 1)
    batches = [(clean[i:i + 4], corrupted[i:i + 4], labels[i:i + 4]) for i in range(0, len(clean), 4)]
    retokenized = [model.to_tokens(text) for text in clean]
    if retokenized != [list(t) for t in task.clean]:
        sys.exit("the prompts do not survive decoding and re-tokenizing; the two evaluations would read different tokens")

    def logit_diff(logits, clean_logits, input_lengths, label):
        rows = torch.arange(len(logits))
        last = logits[rows, input_lengths - 1]
        return last[rows, label[:, 0]] - last[rows, label[:, 1]]

    tl.set_use_attn_result(True)
    tl.set_use_split_qkv_input(True)
    tl.set_use_hook_mlp_in(True)
    start = time.perf_counter()
    full = evaluate_baseline(tl, batches, logit_diff, quiet=True).mean().item()
    graph.apply_topn(0, True)
    empty = evaluate_graph(tl, graph, batches, logit_diff, quiet=True).mean().item()
    theirs = {}
    for absolute in (False, True):
        for f in FRACTIONS:
            graph.apply_topn(int(f * n_edges), absolute, prune=True)
            value = evaluate_graph(tl, graph, batches, logit_diff, quiet=True).mean().item()
            theirs[(absolute, f)] = (graph.count_included_edges(), (value - empty) / (full - empty))
    theirs_s = time.perf_counter() - start
    tl.set_use_attn_result(False)
    tl.set_use_split_qkv_input(False)
    tl.set_use_hook_mlp_in(False)

    curve = ours.metric("faithfulness").set_index(["ranking", "fraction"])
    print(f"metric: full {full:.5f} (workbench {ours.value('metric_full'):.5f}), "
          f"empty {empty:.5f} (workbench {ours.value('metric_empty'):.5f})")
    print(f"{'ranking':<9} {'fraction':>8} {'edges':>13} {'faithfulness':>12} {'library':>9} {'difference':>10}")
    worst = 0.0
    for absolute, ranking in ((False, "signed"), (True, "absolute")):
        for f in FRACTIONS:
            edges, lib = theirs[(absolute, f)]
            row = curve.loc[(ranking, f)]
            mine, kept = float(row["value"]), int(row["edges"])
            worst = max(worst, abs(mine - lib))
            print(f"{ranking:<9} {f:8.3f} {kept:>6}/{edges:<6} {mine:12.5f} {lib:9.5f} {mine - lib:10.2e}")
    cpr = ours.metric("cpr").set_index("ranking")["value"]
    cmd = ours.metric("cmd").set_index("ranking")["value"]
    lib_cpr = areas(FRACTIONS, [theirs[(False, f)][1] for f in FRACTIONS])[0]
    lib_cmd = areas(FRACTIONS, [theirs[(True, f)][1] for f in FRACTIONS])[1]
    print(f"as MIB reports them: CPR (signed) workbench {cpr['signed']:.5f}, library {lib_cpr:.5f}; "
          f"CMD (|score|) workbench {cmd['absolute']:.5f}, library {lib_cmd:.5f}")
    print(f"largest faithfulness difference {worst:.2e}; seconds: workbench {ours_s:.1f} (signed, |score| and random "
          f"curves), library {theirs_s:.1f} (signed and |score|)")


if __name__ == "__main__":
    main()
