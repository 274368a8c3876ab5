"""Circuit discovery on models whose circuits are known by construction, and the identities that
must hold: EAP node sums equal attribution patching, EAP equals exact edge patching where the model
is linear, keeping every edge gives the clean run and keeping none the ablated one. Circuit runs
circuit by circuit against an independent reference are in test_circuit_runs.py."""

import pytest
import torch

from circuits.patching.attribution_patching import attribution_patch
from circuits.discovery.eap import eap_scores
from circuits.discovery.circuit_run import circuit_metrics
from circuits.discovery.faithfulness import prune, top_edges
from circuits.discovery.graph import build_graph, source_hooks, source_outputs
from circuit_reference import split_inputs
from conftest import make_toy_tl
from toy_circuits import make_induction_toy
from workbench.errors import WorkbenchError
from workbench.models import from_hooked_transformer
from workbench.runner import run_method
from workbench.tasks import build_task

PLANTED = {("embed", "L0H0", "v"), ("L0H0", "L1H0", "k"), ("embed", "L1H0", "v"), ("L1H0", "logits", "logits")}


@pytest.fixture(scope="module")
def planted():
    model = from_hooked_transformer(make_induction_toy(decoy=True), "planted-induction")
    return model, build_task(model, "induction", {"n_prompts": 8, "seq_len": 8})


def ranked(graph, scores):
    src, dst, dst_input = graph.edge_names()
    values = scores[graph.valid]
    order = values.abs().argsort(descending=True)
    return [(src[i], dst[i], dst_input[i]) for i in order.tolist()], values


@pytest.mark.parametrize("steps, interpolate, linearise", [(1, "inputs", "clean"), (1, "inputs", "corrupted"),
                                                            (5, "inputs", "corrupted"), (3, "activations", "clean")])
def test_eap_and_eap_ig_rank_the_planted_edges_first_and_ignore_the_decoy(planted, steps, interpolate, linearise):
    model, task = planted
    graph = build_graph(model)
    scores, _ = eap_scores(model, task, graph, steps=steps, batch_size=3, interpolate=interpolate, linearise=linearise)
    order, values = ranked(graph, scores)
    assert set(order[: len(PLANTED)]) == PLANTED  # precision and recall 1 at the planted circuit's size
    decoy = [i for i, s in enumerate(graph.edge_names()[0]) if s == "L1H1"]
    assert values[decoy].abs().max() < 1e-6
    names = set(source_hooks(model))
    _, cache = model.tl.run_with_cache(task.tokens()[0], names_filter=lambda n: n in names)
    written = source_outputs(model, graph, cache)[:, :, graph.sources.index("L1H1")].norm(dim=-1).max()
    assert written > 10  # the decoy does write large activations; they just never reach the logits


def test_the_planted_circuit_is_faithful_and_the_curve_ends_where_it_must(planted):
    model, task = planted
    graph = build_graph(model)
    src, dst, dst_input = graph.edge_names()
    keep = torch.zeros_like(graph.valid)
    keep[graph.valid] = torch.tensor([e in PLANTED for e in zip(src, dst, dst_input)])
    assert torch.equal(prune(graph, keep, 1), keep)  # a connected circuit: nothing to prune
    none, full, circuit = circuit_metrics(model, task, graph, torch.stack([torch.zeros_like(keep), graph.valid, keep])).tolist()
    clean = run_method(model, task, "logit_diff", {}, _store())
    assert full == pytest.approx(clean.value("logit_diff_clean_mean"), abs=1e-4)
    assert none == pytest.approx(clean.value("logit_diff_corrupted_mean"), abs=1e-4)
    assert (circuit - none) / (full - none) == pytest.approx(1.0, abs=1e-3)


def _store():
    import tempfile

    from workbench.store import Store

    return Store(tempfile.mkdtemp())


@pytest.mark.parametrize("kind", ["layernorm-mlp", "gqa-rotary-rms"])
def test_eap_node_sums_equal_attribution_patching_and_the_empty_and_full_circuits_are_exact(kind):
    extra = (dict(attn_only=False) if kind == "layernorm-mlp" else
             dict(attn_only=False, n_key_value_heads=2, positional_embedding_type="rotary", rotary_dim=8, normalization_type="RMS"))
    model = from_hooked_transformer(make_toy_tl(seed=3, **extra), kind)
    task = build_task(model, "induction", {"n_prompts": 6, "seq_len": 5})
    graph = build_graph(model)
    # attribution patching takes the gradient on the corrupted run
    scores, baselines = eap_scores(model, task, graph, batch_size=4, linearise="corrupted")
    atp, clean, corrupted = attribution_patch(model, task, ("z", "mlp_out"))
    sums = scores.sum(1)
    heads = torch.tensor([graph.sources.index(f"L{lyr}H{h}") for lyr in range(model.n_layers) for h in range(model.n_heads)])
    assert torch.allclose(sums[heads].view(model.n_layers, model.n_heads), atp["z"], atol=1e-5)
    mlps = torch.tensor([graph.sources.index(f"MLP{lyr}") for lyr in range(model.n_layers)])
    assert torch.allclose(sums[mlps], atp["mlp_out"], atol=1e-5)
    assert (baselines.clean, baselines.corrupted) == pytest.approx((clean, corrupted), abs=1e-5)
    for ablation in ("corrupted", "mean", "zero"):
        none, full = circuit_metrics(model, task, graph, torch.stack([torch.zeros_like(graph.valid), graph.valid]),
                                     ablation=ablation).tolist()
        assert full == pytest.approx(clean, abs=1e-4)
        if ablation == "corrupted":
            assert none == pytest.approx(corrupted, abs=1e-4)


@pytest.mark.parametrize("interpolate, steps, norm, stacked, linearise", [
    ("inputs", 3, "RMSPre", True, "corrupted"), ("inputs", 3, "RMSPre", True, "clean"), ("inputs", 3, "RMSPre", False, "clean"),
    ("activations", 2, "RMSPre", True, "clean"), ("activations", 2, "RMSPre", False, "corrupted"),
    ("activations", 2, "RMSPre", True, "corrupted"), ("inputs", 2, "LNPre", True, "corrupted"),
    ("inputs", 1, "LN", True, "clean"), ("inputs", 1, "LN", True, "corrupted")])
def test_eap_ig_equals_the_definition_with_gradients_read_by_autograd(interpolate, steps, norm, stacked, linearise,
                                                                      monkeypatch):
    """EAP-IG (inputs) and EAP-IG-activations against their definition computed the slow way: every
    target's input is a TransformerLens split q/k/v (or MLP) input whose gradient autograd reads,
    one interpolated run per group and alpha (corrupted + alpha (clean - corrupted), alpha = k /
    steps, k = 0 ... steps - 1 linearised at the corrupted end, 1 ... steps at the clean end, on
    that end's prompts), and edge score = source difference . mean gradient, over the gap. Under every norm the
    graph's gradients pass through: weightless RMS and LayerNorm in closed form, LayerNorm with
    weights through autograd. Passes run stacked in one forward and backward, or (memory budget
    below one pass) one at a time."""
    if not stacked:
        monkeypatch.setattr("circuits.discovery.eap.BACKWARD_BYTES", 1)
    model = from_hooked_transformer(make_toy_tl(seed=6, n_layers=3, attn_only=False, n_key_value_heads=2,
                                                positional_embedding_type="rotary", rotary_dim=8,
                                                normalization_type=norm), "ig-definition")
    task = build_task(model, "induction", {"n_prompts": 5, "seq_len": 5})
    graph, tl = build_graph(model), model.tl
    clean, lengths = task.tokens("clean")
    corrupt, _ = task.tokens("corrupted")
    rows = torch.arange(len(task))
    embed = "blocks.0.hook_resid_pre"
    groups = [embed] + ([g for layer in range(model.n_layers) for g in (f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out")]
                        if interpolate == "activations" else [])
    names = set(source_hooks(model)) | set(groups)
    with torch.no_grad():
        clean_logits, clean_cache = tl.run_with_cache(clean, names_filter=lambda n: n in names)
        corrupt_logits, corrupt_cache = tl.run_with_cache(corrupt, names_filter=lambda n: n in names)
    diff = source_outputs(model, graph, clean_cache) - source_outputs(model, graph, corrupt_cache)

    def logit_diff(logits):
        last = logits[rows, lengths - 1]
        return last[rows, task.answer_ids()] - last[rows, task.wrong_ids()]

    gap = (logit_diff(clean_logits) - logit_diff(corrupt_logits)).mean()
    grads = {t: 0 for t in range(len(graph.targets))}
    passes = [(g, (k + (linearise == "clean")) / steps) for g in groups for k in range(steps)]
    base = clean if linearise == "clean" else corrupt
    for group, alpha in passes:
        seen = {}

        def fix(act, hook, group=group, alpha=alpha):
            if hook.name == group:
                act = corrupt_cache[group] + alpha * (clean_cache[group] - corrupt_cache[group])
            return act.detach().requires_grad_(True) if hook.name == embed else act

        def keep(act, hook):
            act.retain_grad()
            seen[hook.name] = act

        hooks = [(g, fix) for g in groups] + [(h, keep) for h in {t.hook for t in graph.targets}]
        with split_inputs(tl):
            logit_diff(tl.run_with_hooks(base, fwd_hooks=hooks)).sum().backward()
        for t, target in enumerate(graph.targets):
            g = seen[target.hook].grad  # None where a fixed group cuts every path to the metric
            if g is not None:
                grads[t] = grads[t] + (g if target.index is None else g[:, :, target.index])
    expected = torch.zeros(len(graph.sources), len(graph.targets))
    for s, t in torch.nonzero(graph.valid).tolist():
        expected[s, t] = (diff[:, :, s] * grads[t]).sum() / len(passes) / len(task) / gap
    scores, _ = eap_scores(model, task, graph, steps=steps, batch_size=3, interpolate=interpolate, linearise=linearise)
    assert expected.abs().max() > 1e-2  # the scores are not all zero
    assert torch.allclose(scores, expected, atol=1e-5)


@pytest.mark.parametrize("linearise", ["clean", "corrupted"])
def test_eap_equals_exact_edge_patching_where_the_model_is_linear(linearise):
    """Attention-only, no norms: the logits are linear in the final residual, so an edge into the
    logits has an exact effect equal to its EAP score, wherever the gradient is taken."""
    model = from_hooked_transformer(make_toy_tl(seed=4, normalization_type=None), "linear-readout")
    task = build_task(model, "induction", {"n_prompts": 5, "seq_len": 4})
    graph = build_graph(model)
    scores, baselines = eap_scores(model, task, graph, batch_size=2, linearise=linearise)
    names = set(source_hooks(model))
    clean, lengths = task.tokens("clean")
    corrupt, _ = task.tokens("corrupted")
    tl = model.tl
    _, clean_cache = tl.run_with_cache(clean, names_filter=lambda n: n in names)
    _, corrupt_cache = tl.run_with_cache(corrupt, names_filter=lambda n: n in names)
    diff = source_outputs(model, graph, clean_cache) - source_outputs(model, graph, corrupt_cache)
    logits_target = len(graph.targets) - 1
    rows = torch.arange(len(task))
    for s, name in enumerate(graph.sources):
        def patch(resid, hook, s=s):
            return resid + diff[:, :, s]

        logits = tl.run_with_hooks(corrupt, fwd_hooks=[(f"blocks.{model.n_layers - 1}.hook_resid_post", patch)])
        last = logits[rows, lengths - 1]
        value = (last[rows, task.answer_ids()] - last[rows, task.wrong_ids()]).mean().item()
        exact = (value - baselines.corrupted) / (baselines.clean - baselines.corrupted)
        assert scores[s, logits_target].item() == pytest.approx(exact, abs=1e-4), name


def test_top_edges_keep_the_largest_scores_and_prune_dangling_ones(planted):
    model, _ = planted
    graph = build_graph(model)
    scores = torch.zeros(graph.valid.shape)
    s, t = graph.sources.index("L0H1"), [i for i, x in enumerate(graph.targets) if (x.node, x.input) == ("L1H0", "k")][0]
    scores[s, t] = 5.0  # L0H1 -> L1H0.k: nothing reaches L0H1, so the edge is dangling
    logits = len(graph.targets) - 1
    scores[graph.sources.index("L1H0"), logits] = 3.0
    scores[0, [i for i, x in enumerate(graph.targets) if (x.node, x.input) == ("L1H0", "v")][0]] = 2.0
    keep = top_edges(graph, scores, 3, 1)
    kept = {(graph.sources[a], graph.targets[b].node, graph.targets[b].input) for a, b in torch.nonzero(keep).tolist()}
    assert kept == {("L1H0", "logits", "logits"), ("embed", "L1H0", "v")}
    # ranked by |score| a large negative edge comes first; ranked by signed score, last
    scores[0, [i for i, x in enumerate(graph.targets) if (x.node, x.input) == ("L1H0", "v")][0]] = -10.0
    scores[0, [i for i, x in enumerate(graph.targets) if (x.node, x.input) == ("L1H0", "q")][0]] = 1.0
    for absolute, into_l1h0 in ((True, "v"), (False, "q")):
        keep = top_edges(graph, scores, 3, 1, absolute=absolute)
        kept = {(graph.sources[a], graph.targets[b].node, graph.targets[b].input) for a, b in torch.nonzero(keep).tolist()}
        assert kept == {("L1H0", "logits", "logits"), ("embed", "L1H0", into_l1h0)}


def test_faithfulness_method_reads_the_stored_discovery_and_beats_random(planted):
    model, task = planted
    store = _store()
    found = run_method(model, task, "discovery.eap_ig", {"steps": 3}, store)
    result = run_method(model, task, "circuit.faithfulness",
                        {"discovery": {"method": "discovery.eap_ig", "params": {"steps": 3}}}, store)
    assert result.meta["discovery_run"] == found.run_id and len(store.catalog()) == 2
    cpr = result.metric("cpr").set_index("ranking")["value"]
    cmd = result.metric("cmd").set_index("ranking")["value"]
    for ranking in ("absolute", "signed"):
        assert cpr[ranking] > cpr["random"] and cmd[ranking] < cmd["random"]
    curve = result.metric("faithfulness")
    assert curve[curve["fraction"] == 1.0]["value"].tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    # sizes are int(fraction x edges), as MIB counts them: under 1/N of the edges keeps none, faithfulness 0
    n_edges = result.meta["n_edges"]
    assert 0.001 * n_edges < 1 and (curve[curve["fraction"] == 0.001][["edges", "value"]] == 0).all().all()
    with pytest.raises(WorkbenchError, match="scores no edges"):
        run_method(model, task, "circuit.faithfulness", {"discovery": {"method": "logit_diff"}}, store)
    with pytest.raises(WorkbenchError, match="fractions"):
        run_method(model, task, "circuit.faithfulness", {"fractions": [0.5, 0.1]}, store)


def test_a_discovery_run_exports_as_an_mib_circuit(planted, tmp_path):
    import json
    import subprocess

    from conftest import WORKBENCH
    from workbench.mib import mib_circuit
    from workbench.store import Store

    model, task = planted
    store = Store(tmp_path / "s")
    found = run_method(model, task, "discovery.eap", {}, store)
    out = tmp_path / "circuit.json"
    proc = subprocess.run([WORKBENCH, "export", found.run_id, "--format", "mib-json", "--out", str(out), "--store",
                           str(store.root)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    edges = found.metric("eap")
    assert len(doc["edges"]) == len(edges) and doc["cfg"]["n_heads"] == 2
    for (src, dst, x), name in (((("L0H0", "L1H0", "k")), "a0.h0->a1.h0<k>"), (("embed", "L0H0", "v"), "input->a0.h0<v>"),
                                (("L1H0", "logits", "logits"), "a1.h0->logits")):
        stored = edges[(edges["src"] == src) & (edges["dst"] == dst) & (edges["dst_input"] == x)]["value"].item()
        assert doc["edges"][name]["score"] == pytest.approx(stored)
    # under grouped-query attention a key/value head's edge is written for each query head of its group
    gqa = mib_circuit([{"src": "embed", "dst": "L0KV1", "dst_input": "k", "value": 0.5}],
                      {"n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "d_model": 8})
    assert set(gqa["edges"]) == {"input->a0.h2<k>", "input->a0.h3<k>"}


@pytest.mark.parametrize("metric, threshold", [("kl", 1e-3), ("logit_diff", 0.05)])
def test_acdc_recovers_exactly_the_planted_circuit(planted, metric, threshold):
    model, task = planted
    result = run_method(model, task, "discovery.acdc", {"metric": metric, "threshold": threshold}, _store())
    rows = result.metric("acdc_in_circuit")
    kept = {(r.src, r.dst, r.dst_input) for r in rows.itertuples() if r.value == 1}
    assert kept == PLANTED
    scores = result.metric("acdc").set_index(["src", "dst", "dst_input"])["value"]
    assert min(scores[e] for e in PLANTED) >= threshold > max(v for e, v in scores.items() if e not in PLANTED)


def test_acdc_on_a_restricted_graph_tests_only_its_edges(planted):
    model, task = planted
    result = run_method(model, task, "discovery.acdc", {"metric": "kl", "threshold": 1e-3, "layers": [1, 1]}, _store())
    tested = result.metric("acdc_in_circuit")
    graph = build_graph(model)
    layer_one = {graph.sources.index(f"L1H{h}") for h in range(2)}
    assert set(tested["src"]) <= {"L1H0", "L1H1"} and len(tested) == sum(
        1 for s, t in torch.nonzero(graph.valid).tolist() if s in layer_one)  # layer-1 heads into the logits
    with pytest.raises(WorkbenchError, match="not a layer range"):
        run_method(model, task, "discovery.acdc", {"layers": [1, 5]}, _store())
    with pytest.raises(WorkbenchError, match="threshold = 0"):
        run_method(model, task, "discovery.acdc", {"threshold": 0.0}, _store())


def test_rankings_are_scored_against_a_reference_circuit(planted):
    model, task = planted
    store = _store()
    reference = ["embed->L0H0.v", "L0H0->L1H0.k", "embed->L1H0.v", "L1H0->logits"]
    found = run_method(model, task, "circuit.compare", {"reference": reference}, store)
    for metric in ("edge_roc_auc", "edge_precision", "edge_recall", "node_roc_auc", "node_precision"):
        assert found.value(metric) == pytest.approx(1.0), metric
    assert found.value("edge_reference_size") == 4 and found.value("node_reference_size") == 2  # L0H0, L1H0
    acdc = {"method": "discovery.acdc", "params": {"metric": "kl", "threshold": 1e-3}}
    against_acdc = run_method(model, task, "circuit.compare", {"reference_run": acdc}, store)
    assert against_acdc.value("edge_roc_auc") == pytest.approx(1.0)
    # a reversed ranking scores 0: the AUC is the chance a reference edge outranks another
    from circuits.discovery.faithfulness import roc_auc

    assert roc_auc(torch.tensor([0.1, 0.2, 0.9, 0.8]), torch.tensor([True, True, False, False])) == 0.0
    assert roc_auc(torch.tensor([1.0, 1.0]), torch.tensor([True, False])) == 0.5
    with pytest.raises(WorkbenchError, match="not in this model's graph"):
        run_method(model, task, "circuit.compare", {"reference": ["L5H0->logits"]}, store)
    with pytest.raises(WorkbenchError, match="is not an edge"):
        run_method(model, task, "circuit.compare", {"reference": ["L0H0=>L1H0"]}, store)
    with pytest.raises(WorkbenchError, match="either as reference"):
        run_method(model, task, "circuit.compare", {}, store)


def test_overlap_between_tasks_counts_shared_edges_and_heads(planted):
    model, task = planted
    store = _store()
    same = {"method": "discovery.eap", "task": "induction", "task_params": {"n_prompts": 8, "seq_len": 8}}
    other = {"method": "discovery.eap", "task": "induction", "task_params": {"n_prompts": 8, "seq_len": 6, "seed": 3}}
    itself = run_method(model, task, "circuit.overlap", {"discovery": {"method": "discovery.eap"}, "other": same,
                                                         "fraction": 0.15}, store)
    assert itself.value("edge_jaccard") == 1.0 and itself.value("head_jaccard") == 1.0  # a task against itself
    assert set(itself.meta["heads_this"]) == {"L0H0", "L1H0"}  # the planted circuit's heads, not the decoy
    shifted = run_method(model, task, "circuit.overlap", {"discovery": {"method": "discovery.eap"}, "other": other,
                                                          "fraction": 0.15}, store)
    assert shifted.value("head_shared_of_this") == 1.0  # the same mechanism serves both prompt sets
    with pytest.raises(WorkbenchError, match="other must name its task"):
        run_method(model, task, "circuit.overlap", {"other": {"method": "discovery.eap"}}, store)


def test_node_circuits_from_head_patching_rank_edges_among_the_top_nodes(planted):
    model, task = planted
    store = _store()
    result = run_method(model, task, "discovery.nodes", {}, store)  # reads (computing) patching.attn_head
    rows = result.metric("node_edge")
    patch = run_method(model, task, "patching.attn_head", {}, store).metric("patch_logit_diff").set_index(["layer", "head"])["value"]
    assert patch[(1, 0)] > 0.5 and abs(patch[(1, 1)]) < 1e-6  # the induction head matters, the decoy not at all
    ranked = rows.reindex(rows["value"].abs().sort_values(ascending=False).index)
    top_nodes = {"embed", "logits", "L0H0", "L1H0"}
    n_inside = sum(1 for r in rows.itertuples() if {r.src, r.dst} <= top_nodes)
    assert all({r.src, r.dst} <= top_nodes for r in ranked.head(n_inside).itertuples())
    curve = run_method(model, task, "circuit.faithfulness", {"discovery": {"method": "discovery.nodes"}}, store)
    cpr = curve.metric("cpr").set_index("ranking")["value"]
    assert cpr["absolute"] > cpr["random"] and cpr["signed"] > cpr["random"]


def test_discrete_sae_codes_score_heads_that_separate_positives_from_negatives(planted):
    from circuits.discovery.discrete_sae import code_scores, pair_scores, train_codes

    assert code_scores(torch.tensor([[1, 2, 2, 3]]), torch.tensor([[2, 4, -1]])).tolist() == [2.0]  # codes 1 and 3
    # each head alone: every positive code also occurs on a negative; together (0,0) and (1,1) never do;
    # (0,0) twice counts once; a third head with no code (-1) on the last positive adds nothing there
    positive = torch.tensor([[0, 1, 0, 1], [0, 1, 0, 1], [0, 0, 0, -1]])
    negative = torch.tensor([[0, 1], [1, 0], [0, 1]])
    assert code_scores(positive, negative).tolist() == [0.0, 0.0, 0.0]
    pairs = pair_scores(positive, negative)
    assert pairs[0, 1] == pairs[1, 0] == 2  # joint codes (0,0) and (1,1)
    assert pairs[0, 2] == 1  # (1,0) is new; (0,0) occurs on a negative, (1,-1) is no code
    assert pairs[0, 0] == 0  # a head with itself is the head alone
    gen = torch.Generator().manual_seed(0)
    same = torch.randn(12, 4, generator=gen)
    separated = torch.cat([torch.randn(12, 4, generator=gen) + 6, torch.randn(12, 4, generator=gen) - 6])
    codes = train_codes(torch.stack([torch.cat([same, same]), separated]), n_features=16, steps=300, l1=1e-3, lr=1e-2, seed=0)
    scores = code_scores(codes[:, :12], codes[:, 12:])
    assert scores[0] == 0  # identical vectors on both sides: every positive code also occurs on a negative
    assert scores[1] >= 1  # separated clusters: positives have codes of their own
    model, task = planted
    result = run_method(model, task, "discovery.discrete_sae", {"n_features": 32, "steps": 200}, _store())
    per_head = result.metric("discrete_sae_score").set_index(["layer", "head"])["value"]
    assert per_head[(0, 1)] == 0  # a head with no output has one code everywhere
    assert result.value("positive_prompts") == len(task)  # the wired model answers every clean prompt
    pair_rows = result.metric("discrete_sae_pair_score")
    assert ((pair_rows["value"] > 0) & (pair_rows["src"] != pair_rows["dst"])).all()
    curve = run_method(model, task, "circuit.faithfulness",
                       {"discovery": {"method": "discovery.nodes", "params": {"scores": {
                           "method": "discovery.discrete_sae", "params": {"n_features": 32, "steps": 200}}}}}, _store())
    assert len(curve.metric("faithfulness")) == 30  # its node circuits are evaluated like any ranking (3 x 10 fractions)


def test_acdc_from_a_job_file_on_the_toy_loaded_from_disk_keeps_exactly_the_planted_circuit(tmp_path):
    """The path users take: the hand-built toy saved as a model directory, `workbench run` on a job
    file, the kept edges read back from the store (loaded with joint q/k/v weights, where the edges
    into queries, keys and values were once ignored)."""
    import subprocess

    from conftest import WORKBENCH
    from workbench.models import save_tl_dir
    from workbench.store import Store

    save_tl_dir(make_induction_toy(decoy=True), tmp_path / "toy")
    job = tmp_path / "acdc.toml"
    job.write_text(f"""
[[run]]
model = "{tmp_path / 'toy'}"
task = "induction"
task_params = {{ n_prompts = 8, seq_len = 8 }}
method = "discovery.acdc"
params = {{ metric = "kl", threshold = 1e-3 }}
""")
    proc = subprocess.run([WORKBENCH, "run", str(job), "--store", str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = Store(tmp_path / "store").get(proc.stdout.split()[0]).metric("acdc_in_circuit")
    assert {(r.src, r.dst, r.dst_input) for r in rows.itertuples() if r.value == 1} == PLANTED
