"""Exact patching equals TransformerLens's own reference functions; identities that must hold."""

import pandas as pd
import pytest
import torch
import transformer_lens.patching as P

from conftest import make_toy_tl
from workbench.fast_forward.own_hooks import own_hooks
from circuits.patching.engine import PatchIndex, PatchingRun, head_indices, layer_pos_indices
from workbench.errors import WorkbenchError
from workbench.models import from_hooked_transformer
from workbench.runner import run_method
from workbench.tasks import build_task


@pytest.fixture(scope="module")
def toy_mlp():
    return from_hooked_transformer(make_toy_tl(seed=1, attn_only=False, d_mlp=64), "toy-mlp")


def tl_metric(run, task):
    rows = torch.arange(len(task))

    def metric(logits):
        last = logits[rows, run.final_idx]
        return (last[rows, task.answer_ids()] - last[rows, task.wrong_ids()]).mean()

    return metric


def counting_forwards(model, fn):
    """`fn()` and the number of forwards it ran (calls reaching the last layer's output)."""
    calls = []
    with own_hooks(model.tl, [(f"blocks.{model.n_layers - 1}.hook_resid_post", lambda act, hook: calls.append(1))]):
        return fn(), len(calls)


CASES = [  # activation, reference function, by_position, axis order of the reference -> ours
    ("resid_pre", P.get_act_patch_resid_pre, True, None),
    ("resid_mid", P.get_act_patch_resid_mid, True, None),
    ("attn_out", P.get_act_patch_attn_out, True, None),
    ("mlp_out", P.get_act_patch_mlp_out, True, None),
    ("z", P.get_act_patch_attn_head_out_all_pos, False, None),
    ("z", P.get_act_patch_attn_head_out_by_pos, True, (0, 2, 1)),
    ("q", P.get_act_patch_attn_head_q_all_pos, False, None),
    ("q", P.get_act_patch_attn_head_q_by_pos, True, (0, 2, 1)),
    ("k", P.get_act_patch_attn_head_k_by_pos, True, (0, 2, 1)),
    ("v", P.get_act_patch_attn_head_v_all_pos, False, None),
    ("v", P.get_act_patch_attn_head_v_by_pos, True, (0, 2, 1)),
    ("pattern", P.get_act_patch_attn_head_pattern_all_pos, False, None),
    ("pattern", P.get_act_patch_attn_head_pattern_by_pos, True, None),
]


@pytest.mark.parametrize("merge", [False, True], ids=["group-per-forward", "groups-share-forwards"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("activation, reference, by_position, order", CASES, ids=[f"{c[0]}-{c[1].__name__ if hasattr(c[1], '__name__') else i}" for i, c in enumerate(CASES)])
def test_equals_transformerlens_on_a_toy_model(toy_mlp, activation, reference, by_position, order, direction, merge):
    task = build_task(toy_mlp, "induction", {"n_prompts": 4, "seq_len": 6})
    run = PatchingRun(toy_mlp, task, "logit_diff", direction, (activation,))
    n_pos = run.clean_tokens.shape[1]
    if activation in ("resid_pre", "resid_mid", "attn_out", "mlp_out"):
        indices = layer_pos_indices(toy_mlp, n_pos, by_position)
    else:
        indices = head_indices(toy_mlp, activation, n_pos, by_position)
    # small chunks: several per layer; shared, forwards of up to 1,000 tokens hold several layers and positions
    ours, n_forwards = counting_forwards(toy_mlp, lambda: run.run(activation, indices, chunk_tokens=1000 if merge else 64,
                                                                  progress=False, merge=merge))
    groups = len({(idx.layer, idx.pos or 0) for idx in indices})
    assert n_forwards < groups if merge else n_forwards >= groups
    base_tokens = run.corrupt_tokens if direction == "denoise" else run.clean_tokens
    ref = reference(toy_mlp.tl, base_tokens, run.source_cache, tl_metric(run, task))
    ref = (ref.permute(*order) if order else ref).reshape(-1).cpu()
    assert torch.allclose(ours, ref, atol=1e-4)


def test_grouped_query_keys_and_values_equal_transformerlens_on_the_embedded_model(smollm2):
    task = build_task(smollm2, "ioi", {"n_prompts": 3, "templates": ["When {A} and {B} went to the {PLACE}, {S} gave a {OBJECT} to"]})
    run = PatchingRun(smollm2, task, activations=("k", "v", "z"))
    n = run.clean_tokens.shape[1]
    for activation, ref_fn, rows in [
        ("k", P.get_act_patch_attn_head_k_by_pos, [(layer, p, h) for layer in (2, 21) for p in (1, 9, n - 1) for h in range(3)]),
        ("v", P.get_act_patch_attn_head_v_by_pos, [(layer, p, h) for layer in (2, 21) for p in (1, 9, n - 1) for h in range(3)]),
        ("z", P.get_act_patch_attn_head_out_by_pos, [(23, p, h) for p in (0, 5, n - 1) for h in (0, 3, 8)]),
    ]:
        index_df = pd.DataFrame(rows, columns=["layer", "pos", "head"])
        ref = P.generic_activation_patch(smollm2.tl, run.corrupt_tokens, run.clean_cache, tl_metric(run, task),
                                         patch_setter=ref_fn.keywords["patch_setter"], activation_name=activation,
                                         index_df=index_df)
        ours = run.run(activation, [PatchIndex(*r) for r in rows], progress=False)
        assert torch.allclose(ours, ref.cpu(), atol=1e-4), activation


def assert_whole_residual_restores(model, task, store, metric):
    result = run_method(model, task, "patching.resid", {"metric": metric, "by_position": False}, store)
    values = result.metric(f"patch_{metric}")["value"]
    assert len(values) == model.n_layers
    assert values.to_numpy() == pytest.approx(1.0, abs=1e-3)
    noised = run_method(model, task, "patching.resid", {"metric": metric, "by_position": False, "direction": "noise"}, store)
    assert noised.metric(f"patch_{metric}")["value"].to_numpy() == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("metric", ["logit_diff", "prob", "logprob", "kl"])
def test_patching_the_whole_residual_restores_the_clean_metric(toy_mlp, store, metric):
    assert_whole_residual_restores(toy_mlp, build_task(toy_mlp, "induction", {"n_prompts": 4, "seq_len": 6}), store, metric)


def test_patching_the_whole_residual_restores_the_clean_metric_on_the_embedded_model(smollm2, store):
    assert_whole_residual_restores(smollm2, build_task(smollm2, "ioi", {"n_prompts": 3}), store, "logit_diff")


def test_mixed_length_prompts_patch_per_position(smollm2):
    """Prompts of different lengths: a patch past a prompt's end leaves that prompt unchanged."""
    task = build_task(smollm2, "factual", {"n_prompts": 4})
    lengths = sorted({len(c) for c in task.clean})
    assert len(lengths) > 1
    run = PatchingRun(smollm2, task, activations=("resid_pre",))
    whole = run.run("resid_pre", [PatchIndex(layer, None) for layer in (0, 10)], progress=False)
    assert run.baselines.normalise(whole).numpy() == pytest.approx(1.0, abs=1e-3)
    # patching every position one at a time at layer 0 must, position by position, match a full forward
    pos = lengths[0] - 1
    ours = run.run("resid_pre", [PatchIndex(0, pos)], progress=False)
    tokens = run.corrupt_tokens.clone()
    tokens[:, pos] = run.clean_tokens[:, pos]
    with torch.no_grad():
        logits = smollm2.tl(tokens)
    rows = torch.arange(len(task))
    last = logits[rows, run.final_idx]
    expected = (last[rows, task.answer_ids()] - last[rows, task.wrong_ids()]).mean()
    assert ours.item() == pytest.approx(expected.item(), abs=1e-4)
    # patches of two layers and of positions on both sides of a prompt's end, sharing forwards
    indices = [PatchIndex(layer, p) for layer in (0, 20) for p in sorted({0, pos, lengths[0], lengths[-1] - 1})]
    alone, n_alone = counting_forwards(smollm2, lambda: run.run("resid_pre", indices, progress=False, merge=False))
    shared, n_shared = counting_forwards(smollm2, lambda: run.run("resid_pre", indices, progress=False, merge=True))
    default, n_default = counting_forwards(smollm2, lambda: run.run("resid_pre", indices, progress=False))
    assert n_alone == len(indices) and n_shared == 1
    # by default groups share forwards on a GPU only (on the CPU arithmetic outweighs a forward's fixed cost)
    assert n_default == n_alone if torch.device(smollm2.device).type == "cpu" else n_default <= n_alone
    assert torch.allclose(default, alone, atol=1e-4)
    assert torch.allclose(shared, alone, atol=1e-4)


def test_head_sweep_method_frame_and_bad_input(smollm2, store, toy):
    task = build_task(smollm2, "ioi", {"n_prompts": 2})
    result = run_method(smollm2, task, "patching.attn_head", {"heads": ["L23H3", "L5H0"]}, store)
    rows = result.metric("patch_logit_diff")
    assert list(zip(rows["layer"], rows["head"])) == [(23, 3), (5, 0)]
    kv = run_method(smollm2, task, "patching.attn_head", {"activation": "k", "heads": ["L3H2"]}, store)
    assert set(kv.scores["head_kind"]) == {"kv"}
    with pytest.raises(WorkbenchError, match="outside the model"):
        run_method(smollm2, task, "patching.attn_head", {"activation": "v", "heads": ["L3H5"]}, store)  # 3 KV heads
    with pytest.raises(WorkbenchError, match="should be one of .logit_diff., .prob."):
        run_method(smollm2, task, "patching.resid", {"metric": "accuracy"}, store)
    toy_task = build_task(toy, "induction", {"n_prompts": 2, "seq_len": 4})
    with pytest.raises(WorkbenchError, match="attention-only"):
        run_method(toy, toy_task, "patching.mlp_out", {}, store)
    assert store.catalog(status="failed").empty


def gqa_toy_and_twin():
    """A rotary toy with 4 query heads sharing 2 key/value heads, and its multi-head twin (keys and
    values repeated per query head): the same function, where each query head owns its key/value."""
    from transformer_lens import HookedTransformer

    gqa = make_toy_tl(seed=9, n_key_value_heads=2, positional_embedding_type="rotary", rotary_dim=8)
    twin = HookedTransformer(gqa.cfg.__class__(**{**gqa.cfg.to_dict(), "n_key_value_heads": None}))
    state = {}
    for k, v in gqa.state_dict().items():
        if k.split(".")[-1] in ("_W_K", "_W_V", "_b_K", "_b_V"):
            k, v = k.replace("._", "."), v.repeat_interleave(2, dim=0)
        state[k] = v
    twin.load_state_dict(state, strict=False)
    return from_hooked_transformer(gqa, "gqa"), from_hooked_transformer(twin.eval(), "twin")


@pytest.mark.parametrize("by_position", [False, True])
def test_per_query_head_keys_and_values_equal_the_multi_head_twin(by_position):
    gqa, twin = gqa_toy_and_twin()
    task = build_task(gqa, "induction", {"n_prompts": 3, "seq_len": 6})
    tokens, _ = task.tokens()
    with torch.no_grad():
        assert torch.allclose(gqa.tl(tokens), twin.tl(tokens), atol=1e-5)
    for per_query, plain in (("k_per_query", "k"), ("v_per_query", "v")):
        ours = PatchingRun(gqa, task, activations=(per_query,))
        ref = PatchingRun(twin, task, activations=(plain,))
        n_pos = ours.clean_tokens.shape[1]
        got = ours.run(per_query, head_indices(gqa, per_query, n_pos, by_position), progress=False)
        want = ref.run(plain, head_indices(twin, plain, n_pos, by_position), progress=False)
        assert torch.allclose(got, want, atol=1e-5), per_query
    # and the grouped k patch is not the per-query one: it moves every head of the group
    grouped = PatchingRun(gqa, task, activations=("k",)).run("k", [PatchIndex(1, None, 0)], progress=False)
    single = PatchingRun(gqa, task, activations=("k_per_query",)).run("k_per_query", [PatchIndex(1, None, 0)], progress=False)
    assert not torch.allclose(grouped, single, atol=1e-4)
