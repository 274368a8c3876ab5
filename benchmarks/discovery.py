"""Circuit discovery and evaluation on the embedded model, in forward-equivalents.

    .venv/bin/python benchmarks/discovery.py [--prompts 16] [--threads 2]

Times, on the same IOI prompts in one process: a plain forward of the clean prompts (the unit),
EAP over every edge of the model's graph, EAP-IG with 5 steps, and the 10-point faithfulness curve
(10 circuits plus the empty one, in one batched evaluation). Prints seconds and the ratio to the
plain forward. Targets (issue): EAP <= 3, EAP-IG (5 steps) <= 8, the curve <= 12.
"""

from __future__ import annotations

import argparse
import time

import torch


def timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from circuits.eap import eap_scores
    from circuits.faithfulness import FRACTIONS, circuit_metrics, top_edges
    from circuits.graph import build_graph
    from workbench.models import load_model
    from workbench.tasks import build_task

    model = load_model("smollm2-135m")
    task = build_task(model, "ioi", {"n_prompts": args.prompts})
    tokens, _ = task.tokens("clean")
    graph = build_graph(model)
    with torch.no_grad():
        model.tl(tokens)  # weights loaded, caches warm
        forward = timed(lambda: model.tl(tokens), repeats=3)
    print(f"embedded model, {args.prompts} IOI prompts x {tokens.shape[1]} tokens, {args.threads} threads; "
          f"graph: {len(graph.sources)} sources, {len(graph.targets)} targets, {graph.n_edges()} edges")
    print(f"{'case':<34} {'seconds':>8} {'forwards':>9}")
    print(f"{'plain forward (the unit)':<34} {forward:8.2f} {1:9.2f}")
    scores = {}

    def eap(steps):
        scores[steps], _ = eap_scores(model, task, graph, steps=steps, batch_size=args.prompts)

    for label, steps in (("EAP (all edges)", 1), ("EAP-IG, 5 steps", 5)):
        t = timed(lambda: eap(steps))
        print(f"{label:<34} {t:8.2f} {t / forward:9.2f}")
    group = model.n_heads // model.n_kv_heads
    keeps = torch.stack([torch.zeros_like(graph.valid)] +
                        [top_edges(graph, scores[5], max(1, int(f * graph.n_edges())), group) for f in FRACTIONS])
    t = timed(lambda: circuit_metrics(model, task, graph, keeps))
    print(f"{'faithfulness curve (10 + empty)':<34} {t:8.2f} {t / forward:9.2f}")


if __name__ == "__main__":
    main()
