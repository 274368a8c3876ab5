import numpy as np
import pytest

from conftest import make_toy_tl
from circuits.attribution_patching import attribution_patch
from circuits.patching import PatchingRun, head_indices, layer_pos_indices
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
