"""Circuit runs against the independent reference of `circuit_reference`, circuit by circuit, on
models loaded the way users load them (`load_model` on a TransformerLens directory: placement,
linear layout, joint q/k/v and gate/in weights, so every fast path runs), and on the embedded model."""

import pytest
import torch

from circuit_reference import circuit_logit_diff
from circuits.discovery.circuit_run import circuit_metrics
from circuits.discovery.graph import build_graph
from conftest import make_toy_tl
from workbench.fast_forward.joint_weights import joint_weights
from workbench.models import load_model, save_tl_dir
from workbench.tasks import build_task

TOYS = {
    "layernorm": dict(normalization_type="LN"),
    "layernorm-pre": dict(normalization_type="LNPre"),
    "rms-rotary-gqa-gated": dict(normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8,
                                 n_key_value_heads=2, gated_mlp=True, act_fn="silu"),
}


@pytest.fixture(scope="module", params=list(TOYS))
def loaded(request, tmp_path_factory):
    """A random 3-layer toy with random biases and norm weights, saved and loaded with `load_model`."""
    tl = make_toy_tl(n_layers=3, seed=11, attn_only=False, initializer_range=0.5, **TOYS[request.param])
    with torch.no_grad():
        for name, param in tl.named_parameters():
            if name.split(".")[-1].lstrip("_") in ("b_O", "b_Q", "b_K", "b_V", "w", "b", "b_in", "b_out"):
                param.normal_(std=0.5)
    path = tmp_path_factory.mktemp("circuit-runs") / request.param
    save_tl_dir(tl, path)
    model = load_model(str(path))
    assert all(joint_weights(block.attn) is not None for block in model.tl.blocks)  # the path users take
    return request.param, model, build_task(model, "induction", {"n_prompts": 8, "seq_len": 6})


def named(graph, keep: torch.Tensor) -> set[tuple[str, str, str]]:
    src, dst, dst_input = graph.edge_names()
    return {edge for edge, k in zip(zip(src, dst, dst_input), keep[graph.valid].tolist()) if k}


def circuits(graph, seed: int = 0) -> list[torch.Tensor]:
    """From empty to full: random densities, MLPs fed or read by no kept edge, and the two minimal
    cases the joint-weight defect hid (one head's edge into the logits alone; every edge but one
    into a query)."""
    valid = graph.valid
    generator = torch.Generator().manual_seed(seed)
    random = [valid & (torch.rand(valid.shape, generator=generator) < p) for p in (0.0, 0.03, 0.3, 0.7, 0.97, 1.0)]
    into_mlps = torch.tensor([t.input == "mlp" for t in graph.targets])
    out_of_mlps = torch.tensor([s.startswith("MLP") for s in graph.sources])
    logits = len(graph.targets) - 1
    alone = torch.zeros_like(valid)
    alone[graph.sources.index("L1H0"), logits] = True
    but_one = valid.clone()
    but_one[0, next(i for i, t in enumerate(graph.targets) if (t.node, t.input) == ("L0H0", "q"))] = False
    return random + [valid & ~into_mlps[None, :], valid & out_of_mlps[:, None], valid & ~out_of_mlps[:, None], alone, but_one]


@pytest.mark.parametrize("ablation", ["corrupted", "mean", "zero"])
def test_circuit_runs_equal_the_hook_reference_on_loaded_models(loaded, ablation):
    kind, model, task = loaded
    graph = build_graph(model)
    keeps = torch.stack(circuits(graph))
    ours = circuit_metrics(model, task, graph, keeps, ablation=ablation).tolist()
    reference = [circuit_logit_diff(model, task, named(graph, keep), ablation) for keep in keeps]
    gap = reference[5] - reference[0]  # full - empty
    assert abs(gap) > 0.05, f"{kind}: the toy's circuits barely differ ({gap}); the comparison would be empty"
    assert [(a - b) / gap for a, b in zip(ours, reference)] == pytest.approx([0.0] * len(ours), abs=1e-5)
    if ablation == "corrupted":  # a head with every input ablated sends its corrupted output: the empty circuit's value
        assert reference[-2] == pytest.approx(reference[0], abs=1e-5 * abs(gap))
    assert abs(reference[-1] - reference[5]) > 1e-4 * abs(gap)  # the one edge into a query matters here


def test_circuit_runs_equal_the_hook_reference_on_the_embedded_model(smollm2):
    task = build_task(smollm2, "ioi", {"n_prompts": 4})
    graph = build_graph(smollm2)
    generator = torch.Generator().manual_seed(1)
    keeps = [torch.zeros_like(graph.valid), graph.valid] + [
        graph.valid & (torch.rand(graph.valid.shape, generator=generator) < p) for p in (0.002, 0.05, 0.95)]
    for ablation in ("corrupted", "mean", "zero"):
        ours = circuit_metrics(smollm2, task, graph, torch.stack(keeps), ablation=ablation).tolist()
        reference = [circuit_logit_diff(smollm2, task, named(graph, keep), ablation) for keep in keeps]
        gap = reference[1] - reference[0]
        assert abs(gap) > 0.5
        assert [(a - b) / gap for a, b in zip(ours, reference)] == pytest.approx([0.0] * len(ours), abs=1e-5), ablation
