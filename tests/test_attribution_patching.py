import weakref

import numpy as np
import pytest
import torch

from conftest import make_toy_tl
from circuits.patching.attribution_patching import attribution_patch
from circuits.patching.engine import PatchingRun, head_indices, layer_pos_indices
from workbench.errors import WorkbenchError
from workbench.models import from_hooked_transformer
from workbench.runner import run_method
from workbench.tasks import build_task


@pytest.fixture(scope="module")
def linear_toy():
    """No layer norm, attention only: logits are exactly linear in the last layer's head outputs."""
    return from_hooked_transformer(make_toy_tl(seed=11, normalization_type=None), "linear-toy")


def exact(model, task, activation, by_position):
    run = PatchingRun(model, task, activations=(activation,))
    n_pos = run.clean_tokens.shape[1]
    if activation.startswith("resid"):
        indices = layer_pos_indices(model, n_pos, by_position)
    else:
        indices = head_indices(model, activation, n_pos, by_position)
    values = run.baselines.normalise(run.run(activation, indices, progress=False))
    if by_position and not activation.startswith("resid"):  # head sweeps run (layer, head, pos); estimates are (layer, pos, head)
        n_heads = len({i.head for i in indices})
        values = values.reshape(model.n_layers, n_heads, n_pos).transpose(1, 2)
    return values


@pytest.mark.parametrize("by_position", [False, True])
def test_equals_exact_patching_where_the_model_is_linear(linear_toy, by_position):
    task = build_task(linear_toy, "induction", {"n_prompts": 5, "seq_len": 6})
    est, _, _ = attribution_patch(linear_toy, task, ("z", "v"), by_position=by_position)
    ex = exact(linear_toy, task, "z", by_position).reshape(est["z"].shape)
    last = linear_toy.n_layers - 1
    assert (est["z"][last] - ex[last]).abs().max() < 1e-5  # linear: first order is exact
    assert (est["z"][0] - ex[0]).abs().max() > 1e-4  # earlier heads act through later attention: only approximate
    ex_v = exact(linear_toy, task, "v", by_position).reshape(est["v"].shape)
    assert (est["v"][last] - ex_v[last]).abs().max() < 1e-5  # z is linear in v given the pattern


def test_final_residual_estimate_restores_the_clean_metric(linear_toy):
    """Without a final norm the metric is linear in the final residual: the estimate is exactly 1."""
    task = build_task(linear_toy, "induction", {"n_prompts": 3, "seq_len": 5})
    est, clean, corrupt = attribution_patch(linear_toy, task, ("resid_post",))
    assert est["resid_post"][-1].item() == pytest.approx(1.0, abs=1e-4)
    assert clean != corrupt


def test_embedded_model_estimates_track_exact_head_patching(smollm2, store):
    task = build_task(smollm2, "ioi", {"n_prompts": 4})
    result = run_method(smollm2, task, "patching.attribution", {"activations": ["z"]}, store)
    est = result.scores.sort_values(["layer", "head"])["value"].to_numpy()
    assert len(est) == smollm2.n_layers * smollm2.n_heads
    top = run_method(smollm2, task, "patching.attn_head", {}, store).metric("patch_logit_diff")
    top = top.sort_values(["layer", "head"])["value"].to_numpy()
    corr = float(np.corrcoef(est, top)[0, 1])
    assert corr > 0.8


def test_bad_activation_names_are_refused(linear_toy):
    task = build_task(linear_toy, "induction", {"n_prompts": 2, "seq_len": 4})
    with pytest.raises(WorkbenchError, match="activations must be"):
        attribution_patch(linear_toy, task, ("zz",))
    with pytest.raises(WorkbenchError, match="attention-only"):
        attribution_patch(linear_toy, task, ("mlp_out",))


class Held:
    """The box autograd keeps until it frees a saved tensor."""

    def __init__(self, tensor):
        self.tensor = tensor


class SavedBytes:
    """Peak bytes of activations saved for a backward and not yet freed (weights not counted)."""

    def __init__(self, model):
        self.weights = {p.untyped_storage().data_ptr() for p in model.tl.parameters()}
        self.live = self.peak = 0

    def pack(self, t):
        held = Held(t)
        if t.untyped_storage().data_ptr() not in self.weights:
            n = t.untyped_storage().nbytes()
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(held, self.free, n)
        return held

    def free(self, n):
        self.live -= n


@pytest.mark.parametrize("patterns", [True, False], ids=["pattern-read", "fused-attention"])
@pytest.mark.parametrize("by_position", [False, True])
def test_chunks_and_layer_by_layer_backward_give_the_whole_backwards_estimate(by_position, patterns, monkeypatch):
    """Forced by a small memory budget, prompts in chunks of one and then one layer's graph at a
    time give the same estimates as one backward over every prompt, on a model with MLPs, RMS
    norms, rotary positions and grouped keys; the layer-at-a-time backward holds a fraction of the
    saved activations. With the pattern among the activations attention runs as TransformerLens's
    (its patterns saved); without, fused (none saved)."""
    import circuits.patching.attribution_patching as atp

    tl = make_toy_tl(n_layers=4, attn_only=False, normalization_type="RMS", positional_embedding_type="rotary",
                     rotary_dim=8, n_key_value_heads=2, seed=5)
    model = from_hooked_transformer(tl, "rotary-toy")
    task = build_task(model, "induction", {"n_prompts": 3, "seq_len": 24})
    acts = ("z", "v", "pattern", "resid_pre", "mlp_out") if patterns else ("z", "v", "resid_pre", "mlp_out")
    n_tokens = task.tokens("clean")[0].shape[1]
    per_layer = atp.backward_bytes_per_token(model.cfg, n_tokens, patterns) * n_tokens
    plans = {"whole": 3 * per_layer * model.n_layers, "chunks of one": per_layer * model.n_layers, "layers": per_layer}
    runs, peaks = {}, {}
    for label, budget in plans.items():
        monkeypatch.setattr(atp, "memory_budget", lambda device, cpu_bytes, share=0.5, budget=budget: budget)
        assert atp.backward_plan(model, n_tokens, patterns) == {"whole": (3, False), "chunks of one": (1, False), "layers": (1, True)}[label]
        saved = SavedBytes(model)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda held: held.tensor):
            runs[label] = attribution_patch(model, task, acts, by_position=by_position)
        peaks[label] = saved.peak
    est, clean, corrupt = runs["whole"]
    for label in ("chunks of one", "layers"):
        other, other_clean, other_corrupt = runs[label]
        assert other_clean == pytest.approx(clean, abs=1e-5) and other_corrupt == pytest.approx(corrupt, abs=1e-5)
        for a in acts:
            assert other[a].shape == est[a].shape
            assert torch.allclose(other[a], est[a], atol=1e-5), (label, a)
    assert est["z"].abs().max() > 1e-3  # the estimates are not all zero
    assert peaks["layers"] * 2 < peaks["chunks of one"] < peaks["whole"]
