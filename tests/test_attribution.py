import pytest
import torch

from conftest import make_toy_tl
from circuits.heads.attribution import dla_components, head_source_attribution
from workbench.errors import WorkbenchError
from workbench.models import from_hooked_transformer
from workbench.runner import run_method
from workbench.tasks import build_task


def assert_decomposition_adds_up(model, task, tol):
    frame, _ = dla_components(model, task, batch_size=3)
    parts = frame[frame["component"] != "model"].groupby("prompt")["value"].sum()
    actual = frame[frame["component"] == "model"].set_index("prompt")["value"]
    assert (parts - actual).abs().max() < tol
    return frame


@pytest.mark.parametrize("attn_only", [True, False])
def test_dla_adds_up_on_toy_models_with_unfolded_layernorm(attn_only):
    model = from_hooked_transformer(make_toy_tl(seed=7, attn_only=attn_only, d_mlp=None if attn_only else 64), "toy")
    assert model.cfg.normalization_type == "LN"
    task = build_task(model, "induction", {"n_prompts": 5, "seq_len": 6})
    frame = assert_decomposition_adds_up(model, task, 1e-4)
    assert ("mlp" in set(frame["component"])) is not attn_only


def test_dla_adds_up_on_the_embedded_model_with_mixed_lengths(smollm2):
    task = build_task(smollm2, "factual", {"n_prompts": 7})
    assert len({len(c) for c in task.clean}) > 1
    assert_decomposition_adds_up(smollm2, task, 1e-3)


def test_head_dla_equals_transformerlens_reference(smollm2):
    task = build_task(smollm2, "induction", {"n_prompts": 4, "seq_len": 8})
    _, heads = dla_components(smollm2, task)
    tokens, _ = task.tokens()
    with torch.no_grad():
        _, cache = smollm2.tl.run_with_cache(tokens)
        stack = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True).cpu()  # [layer*head, batch, d_model]
        W_U = smollm2.tl.W_U.cpu()
        dirs = (W_U[:, task.answer_ids()] - W_U[:, task.wrong_ids()]).T
        ref = torch.einsum("cbd,bd->bc", stack, dirs).reshape(len(task), smollm2.n_layers, smollm2.n_heads)
    assert torch.allclose(heads, ref, atol=1e-4)


def test_source_attribution_sums_to_the_head_dla(smollm2):
    task = build_task(smollm2, "ioi", {"n_prompts": 4})
    _, heads = dla_components(smollm2, task)
    chosen = [(23, 3), (5, 0)]
    src = head_source_attribution(smollm2, task, chosen)
    for (layer, h), total in src.groupby(["layer", "head"]):
        by_prompt = total.groupby("prompt")["value"].sum().to_numpy()
        assert by_prompt == pytest.approx(heads[:, layer, h].numpy(), abs=1e-4)
    assert set(src["src_position"]) == set(range(max(len(c) for c in task.clean)))


def test_logit_lens_matches_stopping_the_model_early(smollm2, store):
    task = build_task(smollm2, "ioi", {"n_prompts": 3})
    result = run_method(smollm2, task, "attribution.logit_lens", {}, store)
    lens = result.metric("logit_lens_logit_diff")
    lens = lens[lens["prompt"].isna()].set_index(["layer", "hook"])["value"]
    last_layer = smollm2.n_layers - 1
    assert lens.index.get_level_values("layer").max() == last_layer  # no layer number past the model's last
    tokens, lengths = task.tokens()
    tl = smollm2.tl
    with torch.no_grad():
        for layer, hook in ((0, "resid_pre"), (12, "resid_pre"), (last_layer, "resid_post")):
            resid = tl(tokens, stop_at_layer=layer) if hook == "resid_pre" else None
            logits = tl.unembed(tl.ln_final(resid)) if resid is not None else tl(tokens)
            last = logits[torch.arange(len(task)), lengths - 1]
            diff = (last[torch.arange(len(task)), task.answer_ids()] - last[torch.arange(len(task)), task.wrong_ids()]).mean()
            assert lens[(layer, hook)] == pytest.approx(diff.item(), abs=1e-3)
    assert result.tensors["top_tokens"].shape == (smollm2.n_layers + 1, 3, 5)


def test_dla_method_stores_means_and_names_heads_in_range(smollm2, store):
    task = build_task(smollm2, "ioi", {"n_prompts": 4})
    result = run_method(smollm2, task, "attribution.dla", {}, store)
    heads = result.scores[(result.scores["component"] == "head") & result.scores["prompt"].isna()]
    assert len(heads) == smollm2.n_layers * smollm2.n_heads
    with pytest.raises(WorkbenchError, match="outside the model"):
        run_method(smollm2, task, "attribution.head_sources", {"heads": ["L30H0"]}, store)
    with pytest.raises(WorkbenchError, match="not a head name"):
        run_method(smollm2, task, "attribution.head_sources", {"heads": ["5.3"]}, store)


def test_source_attribution_runs_on_a_float64_model_and_sums_to_the_head_dla(toy_dir, store):
    """float64 is an accepted dtype: the float64 final norm and float32 answer directions meet in one product."""
    from workbench.models import load_model

    model = load_model({"name": str(toy_dir), "dtype": "float64"})
    assert next(model.tl.parameters()).dtype == torch.float64
    task = build_task(model, "induction", {"n_prompts": 4, "seq_len": 6})
    frame = run_method(model, task, "attribution.head_sources", {"heads": ["L1H0", "L1H1"]}, store).metric("dla_by_source")
    _, heads = dla_components(model, task)
    for (layer, h), part in frame.groupby(["layer", "head"]):
        assert part.groupby("prompt")["value"].sum().to_numpy() == pytest.approx(heads[:, layer, h].numpy(), abs=1e-4)
    assert frame["value"].abs().max() > 1e-3
