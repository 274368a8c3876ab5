"""Circuit discovery and evaluation on the embedded model, in forward-equivalents.

    .venv/bin/python benchmarks/discovery.py [--prompts 16] [--threads 2]

Times (warm, best of 2-3), on the same IOI prompts in one process: a plain forward of the clean prompts (the unit),
EAP over every edge of the model's graph, EAP-IG with 5 steps, and the 10-point faithfulness curve
(10 circuits plus the empty one, in one batched evaluation); with --activations, EAP-IG-activations. Prints seconds and the ratio to the
plain forward. Targets (issue): EAP <= 3, EAP-IG (5 steps) <= 8, the curve <= 12. Then the floors:
the passes each method cannot skip, timed the same way. Then ACDC (KL,
threshold 0.01) on a restricted graph (heads of the last `--acdc-layers` layers into each other and
the logits) against EAP on the same edges: the speed ratio and the ROC AUC of EAP's ranking of those
edges against ACDC's circuit.
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


def floors(model, task, tokens, forward: float, n_circuits: int) -> None:
    """What no implementation on TransformerLens's forward can skip, timed here with the fused
    attention the methods run: the clean forward (no unembedding), one gradient pass (forward and
    backward of the corrupted prompts to their embeddings, metric at the last token), five such
    passes stacked, and one forward of the curve's circuits' rows. EAP needs the first two, 5-step
    EAP-IG the first and the stacked passes, the curve the last. Also the plain forward (the unit)
    with fused attention, for scale."""
    from workbench.fast_forward.own_hooks import own_hooks
    from circuits.patching.engine import unembed_final
    from workbench.fast_forward.attention import sdpa_attention

    tl, n = model.tl, model.n_layers
    corrupt, lengths = task.tokens("corrupted")
    answers, wrongs = task.answer_ids(), task.wrong_ids()

    def gradient_pass(copies):
        def leaf(act, hook):
            return act.detach().requires_grad_(True)

        with own_hooks(tl, [("blocks.0.hook_resid_pre", leaf)]):
            resid = tl(corrupt.repeat(copies, 1), stop_at_layer=n)
        rows = torch.arange(len(resid))
        logits = unembed_final(tl, resid[rows, lengths.repeat(copies) - 1][:, None])[:, 0]
        (logits[rows, answers.repeat(copies)] - logits[rows, wrongs.repeat(copies)]).sum().backward()

    with torch.no_grad(), sdpa_attention(tl):  # the attention the methods run
        clean = timed(lambda: tl(tokens, stop_at_layer=n), repeats=3)
        circuits = timed(lambda: tl(tokens.repeat(n_circuits, 1), stop_at_layer=n))
        fused = timed(lambda: tl(tokens), repeats=3)
    with sdpa_attention(tl):
        one, stacked = timed(lambda: gradient_pass(1), repeats=2), timed(lambda: gradient_pass(5), repeats=2)
    print(f"{'plain forward, fused attention':<34} {fused:8.2f} {fused / forward:9.2f}")
    print(f"floors: clean forward without unembedding {clean / forward:.2f}, one gradient pass {one / forward:.2f}, "
          f"5 stacked passes {stacked / forward:.2f}, the {n_circuits} circuits' rows in one forward {circuits / forward:.2f} "
          f"forwards; so EAP >= {(clean + one) / forward:.2f}, 5-step EAP-IG >= {(clean + stacked) / forward:.2f}, "
          f"the curve >= {circuits / forward:.2f} before any score product or correction")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--acdc-layers", type=int, default=2, help="0 skips ACDC")
    parser.add_argument("--activations", action="store_true", help="also EAP-IG-activations (61 x 5 gradient passes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from circuits.discovery.eap import eap_scores
    from circuits.discovery.circuit_run import circuit_metrics
    from circuits.discovery.faithfulness import FRACTIONS, top_edges
    from circuits.discovery.graph import build_graph
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
        scores[steps], _ = eap_scores(model, task, graph, steps=steps, batch_size=args.prompts,
                                     linearise="clean" if steps == 1 else "corrupted")  # the methods' defaults

    eap(1)  # first call: one-time set-up (vmap, allocator), as the forward above was warmed
    for label, steps in (("EAP (all edges)", 1), ("EAP-IG, 5 steps", 5)):
        t = timed(lambda: eap(steps), repeats=2)
        print(f"{label:<34} {t:8.2f} {t / forward:9.2f}")
    if args.activations:  # groups x steps gradient passes: minutes on a CPU
        t = timed(lambda: eap_scores(model, task, graph, steps=5, batch_size=args.prompts, interpolate="activations"))
        print(f"{'EAP-IG-activations, 5 steps':<34} {t:8.2f} {t / forward:9.2f}")
    group = model.n_heads // model.n_kv_heads
    keeps = torch.stack([torch.zeros_like(graph.valid)] +
                        [top_edges(graph, scores[5], int(f * graph.n_edges()), group) for f in FRACTIONS])
    t = timed(lambda: circuit_metrics(model, task, graph, keeps))
    print(f"{'faithfulness curve (10 + empty)':<34} {t:8.2f} {t / forward:9.2f}")

    floors(model, task, tokens, forward, len(FRACTIONS))

    if args.acdc_layers == 0:
        return
    from circuits.discovery.acdc import acdc, candidates
    from circuits.discovery.circuit_run import CircuitEvaluator
    from circuits.discovery.faithfulness import roc_auc

    first = model.n_layers - args.acdc_layers
    allowed = candidates(graph, model.n_layers, (first, model.n_layers - 1), heads_only=True)
    start = time.perf_counter()
    keep, _ = acdc(CircuitEvaluator(model, task, graph, "kl"), allowed, 0.01)
    t_acdc = time.perf_counter() - start
    t_eap = timed(lambda: eap(1))
    in_circuit = (keep & allowed)[allowed]
    auc = roc_auc(scores[1][allowed].abs(), in_circuit) if 0 < int(in_circuit.sum()) < len(in_circuit) else float("nan")
    print(f"ACDC (KL 0.01), heads of layers {first}-{model.n_layers - 1}: {int(allowed.sum())} candidate edges, "
          f"{int(in_circuit.sum())} kept, {t_acdc:.1f} s; EAP over the whole graph {t_eap:.1f} s "
          f"({t_acdc / t_eap:.0f}x faster); ROC AUC of EAP's ranking against ACDC's circuit {auc:.3f}")


if __name__ == "__main__":
    main()
