"""Attention-output SAE training (SAELens trainer) on a toy model's hook_z: it must reconstruct
better than predicting the mean, and head attribution must be a distribution over heads."""

import pytest
import torch

from conftest import make_toy_tl
from sae.training import collect_z, head_attribution
from workbench.errors import WorkbenchError
from workbench.methods import get_method
from workbench.models import from_hooked_transformer
from workbench.tasks import build_task


@pytest.fixture(scope="module")
def toy_and_task():
    toy = from_hooked_transformer(make_toy_tl(seed=1), "toy-sae")
    return toy, build_task(toy, "induction", {"n_prompts": 64, "seq_len": 20})


def train(toy, task, **params):
    m = get_method("sae.train")
    return m.fn(toy, task, m.parse({"layer": 1, "expansion_factor": 4, "n_tokens": 40_000, "batch_size": 256,
                                    "l1_coefficient": 1.0, "lr": 1e-3, **params}))


def test_hook_z_is_collected_with_heads_concatenated(toy_and_task):
    toy, task = toy_and_task
    acts = collect_z(toy, task, 1)
    assert acts.shape == (sum(len(c) for c in task.clean), toy.n_heads * toy.d_head)
    _, cache = toy.tl.run_with_cache(torch.tensor([task.clean[0]]))
    z = cache["blocks.1.attn.hook_z"][0]  # [pos, head, d_head]
    assert torch.allclose(acts[: len(task.clean[0])], z.flatten(-2), atol=1e-6)


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_a_trained_sae_beats_the_mean_and_attributes_features_to_heads(toy_and_task, architecture):
    toy, task = toy_and_task
    result = train(toy, task, architecture=architecture, k=8)
    # explained variance > 0 means lower error than always predicting the mean activation
    assert result.value("sae_explained_variance") > 0.5
    assert 0 < result.value("sae_l0") < 4 * toy.n_heads * toy.d_head
    attribution = result.tensors["head_attribution"]
    assert attribution.shape == (4 * toy.n_heads * toy.d_head, toy.n_heads)
    assert torch.allclose(attribution.sum(-1), torch.ones(attribution.shape[0]), atol=1e-5)
    assert torch.allclose(attribution, head_attribution(result.tensors["W_dec"], toy.n_heads))
    ce = {m: result.value(m) for m in ("ce_clean", "ce_sae", "ce_zero_ablation", "ce_loss_recovered")}
    assert ce["ce_loss_recovered"] == pytest.approx(
        (ce["ce_zero_ablation"] - ce["ce_sae"]) / (ce["ce_zero_ablation"] - ce["ce_clean"]))


def test_head_attribution_of_a_feature_living_in_one_head_is_one_hot():
    w_dec = torch.zeros(2, 3 * 4)
    w_dec[0, 4:8] = torch.randn(4)  # head 1 only
    w_dec[1] = 1.0  # spread evenly
    a = head_attribution(w_dec, 3)
    assert torch.allclose(a[0], torch.tensor([0.0, 1.0, 0.0])) and torch.allclose(a[1], torch.full((3,), 1 / 3))


def test_bad_sae_input_is_refused(toy_and_task):
    toy, task = toy_and_task
    with pytest.raises(WorkbenchError, match="outside the model"):
        train(toy, task, layer=5)
    with pytest.raises(WorkbenchError, match="unknown architecture"):
        train(toy, task, architecture="gated")
    small = build_task(toy, "induction", {"n_prompts": 2, "seq_len": 4})
    with pytest.raises(WorkbenchError, match="fewer than one batch"):
        train(toy, small)
