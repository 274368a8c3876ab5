"""Path patching against a plain reference: full forwards, one sender at a time, TransformerLens hooks."""

import pytest
import torch

from conftest import make_toy_tl
from circuits.patching.path_patching import PathPatchingRun
from workbench.errors import WorkbenchError
from workbench.models import from_hooked_transformer
from workbench.runner import run_method
from workbench.tasks import build_task


def reference(model, run, sender, receivers, x):
    tl, n_layers = model.tl, model.n_layers
    group = model.n_heads // model.n_kv_heads if x in ("k", "v") else 1
    layers = sorted({layer for layer, _ in receivers})
    recorded = {}

    def freeze(act, hook):
        new = run.corrupt_cache[hook.name].clone()
        if hook.layer() == sender[0]:
            new[:, :, sender[1]] = run.clean_cache[hook.name][:, :, sender[1]]
        return new

    def record(act, hook):
        recorded[hook.layer()] = act.clone()

    with torch.no_grad():
        tl.run_with_hooks(run.corrupt_tokens, fwd_hooks=[(f"blocks.{l}.attn.hook_z", freeze) for l in range(n_layers)]
                          + [(f"blocks.{l}.attn.hook_{x}", record) for l in layers])

        def patch(act, hook):
            for layer, head in receivers:
                if layer == hook.layer():
                    act[:, :, head // group] = recorded[layer][:, :, head // group]
            return act

        logits = tl.run_with_hooks(run.corrupt_tokens, fwd_hooks=[(f"blocks.{l}.attn.hook_{x}", patch) for l in layers])
    rows = torch.arange(len(run.task))
    last = logits[rows, run.final_idx]
    return (last[rows, run.task.answer_ids()] - last[rows, run.task.wrong_ids()]).mean().item()


@pytest.mark.parametrize("x", ["q", "k", "v"])
def test_equals_the_reference_on_a_toy_model(x):
    model = from_hooked_transformer(make_toy_tl(n_layers=3, seed=5, attn_only=False, d_mlp=32), "toy3")
    task = build_task(model, "induction", {"n_prompts": 4, "seq_len": 6})
    run = PathPatchingRun(model, task)
    senders = [(0, 0), (0, 3), (1, 2)]
    receivers = [(2, 1), (2, 3)]
    ours = run.run_paths(senders, receivers, x)
    expected = [reference(model, run, s, receivers, x) for s in senders]
    assert ours.tolist() == pytest.approx(expected, abs=1e-5)


def test_equals_the_reference_on_the_embedded_model_with_grouped_keys(smollm2):
    task = build_task(smollm2, "ioi", {"n_prompts": 3})
    run = PathPatchingRun(smollm2, task)
    senders = [(10, 2), (20, 7)]
    for x, receivers in (("q", [(23, 3)]), ("k", [(23, 3), (24, 4)])):
        ours = run.run_paths(senders, receivers, x)
        expected = [reference(smollm2, run, s, receivers, x) for s in senders]
        assert ours.tolist() == pytest.approx(expected, abs=1e-4)


def test_path_method_writes_one_edge_per_sender_and_receiver(toy, store):
    task = build_task(toy, "induction", {"n_prompts": 3, "seq_len": 5})
    result = run_method(toy, task, "patching.path", {"receivers": ["L1H0", "L1H2"], "receiver_input": "v"}, store)
    rows = result.metric("path_patch_logit_diff")
    assert list(zip(rows["src"], rows["dst"])) == [(f"L0H{h}", r) for r in ("L1H0", "L1H2") for h in range(toy.n_heads)]
    assert set(rows["dst_input"]) == {"v"}
    run = PathPatchingRun(toy, task, "logit_diff")
    for r, receiver in ((0, "L1H0"), (2, "L1H2")):  # each edge is the path through that receiver alone
        alone = run.baselines.normalise(run.run_paths([(0, h) for h in range(toy.n_heads)], [(1, r)], "v"))
        assert rows[rows["dst"] == receiver]["value"].tolist() == pytest.approx(alone.tolist(), abs=1e-6)
    with pytest.raises(WorkbenchError, match="no sender comes before receiver L0H1"):
        run_method(toy, task, "patching.path", {"receivers": ["L0H1"], "senders": ["L1H0"]}, store)
    with pytest.raises(WorkbenchError, match="needs parameter"):
        run_method(toy, task, "patching.path", {}, store)
    with pytest.raises(WorkbenchError, match="receiver_input"):
        run_method(toy, task, "patching.path", {"receivers": ["L1H0"], "receiver_input": "z"}, store)
