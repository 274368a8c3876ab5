"""Attention-output SAEs on a toy model's hook_z: the activation cache holds exactly hook_z and is
reused, trained SAEs beat predicting the mean, a killed run resumes to the same weights, head
attribution is a distribution over heads, the feature pass and direct feature attribution agree
with direct computations, pretrained SAELens SAEs load, bad input is refused without writing."""

import pytest
import torch

from conftest import make_toy_tl
from sae import activations, training
from sae.activations import batches, cache_activations, find_cache
from sae.families import classify, head_families
from sae.saes import head_attribution, load_sae
from workbench.errors import WorkbenchError
from workbench.jobs import parse_job
from workbench.models import from_hooked_transformer
from workbench.runner import run_method
from workbench.store import Store
from workbench.tasks import build_task

BASE = {"layer": 1, "expansion_factor": 4, "n_tokens": 40_000, "batch_size": 256, "lr": 1e-3, "eval_prompts": 8}
STANDARD = {"method": "sae.train", "params": {**BASE, "sparsity_coefficient": 1.0}}  # the SAE the analyses read, by spec


@pytest.fixture(scope="module")
def toy_and_task():
    # grouped-query attention with rotary positions, like the embedded model
    tl = make_toy_tl(seed=1, n_key_value_heads=2, positional_embedding_type="rotary", rotary_dim=8)
    toy = from_hooked_transformer(tl, "toy-sae")
    return toy, build_task(toy, "induction", {"n_prompts": 64, "seq_len": 20})


@pytest.fixture(scope="module")
def sae_store(tmp_path_factory):
    return Store(tmp_path_factory.mktemp("sae-store"))


@pytest.fixture(scope="module")
def standard(toy_and_task, sae_store):
    toy, task = toy_and_task
    return run_method(toy, task, "sae.train", {**BASE, "sparsity_coefficient": 1.0}, sae_store)


def hook_z(toy, tokens, layer=1):
    _, cache = toy.tl.run_with_cache(torch.tensor([tokens]))
    return cache[f"blocks.{layer}.attn.hook_z"][0].flatten(-2).cpu()  # [pos, head * d_head], beside the stored SAE


def test_the_activation_cache_holds_hook_z_in_shards_with_token_prompt_and_position(toy_and_task, tmp_path):
    toy, task = toy_and_task
    cache = cache_activations(Store(tmp_path), toy, task, 1, shard_tokens=500, progress=False)
    lengths = [len(p) for p in task.clean]
    assert cache.n_tokens == sum(lengths) and cache.d_in == toy.n_heads * toy.d_head and len(cache.shards) > 1
    data = cache.load()
    first = data["prompt"] == 3
    assert torch.allclose(data["z"][first], hook_z(toy, task.clean[3]), atol=1e-5)
    assert data["token"][first].tolist() == task.clean[3] and data["position"][first].tolist() == list(range(lengths[3]))
    assert find_cache(Store(tmp_path), toy, task, 1).key == cache.key
    other = build_task(toy, "induction", {"n_prompts": 64, "seq_len": 20, "seed": 1})
    assert find_cache(Store(tmp_path), toy, other, 1) is None  # other tokens, other key


def test_batches_draw_only_training_prompts_and_skipping_resumes_the_same_stream(toy_and_task, tmp_path):
    toy, task = toy_and_task
    cache = cache_activations(Store(tmp_path), toy, task, 1, shard_tokens=300, progress=False)
    data = cache.load()
    train = data["z"][data["prompt"] < 50]
    stream = batches(cache, 64, seed=3, prompts=range(50))
    drawn = torch.cat([next(stream) for _ in range(40)])  # more than one epoch
    assert all((train == row).all(-1).any() for row in drawn[:200])  # every row is a training row
    held_out = data["z"][data["prompt"] >= 50]
    only_held_out = held_out[[not (train == row).all(-1).any() for row in held_out]]  # (first tokens repeat across prompts)
    assert len(only_held_out) > 100 and not any((only_held_out == row).all(-1).any() for row in drawn)
    resumed = batches(cache, 64, seed=3, prompts=range(50), skip=25)
    assert torch.equal(torch.cat([next(resumed) for _ in range(15)]), drawn[25 * 64:])


def test_a_sweep_reuses_one_activation_cache(toy_and_task, sae_store, standard, monkeypatch):
    toy, task = toy_and_task
    monkeypatch.setattr(activations, "collect_z", lambda *a, **k: pytest.fail("the model ran again to cache activations"))
    bigger = run_method(toy, task, "sae.train", {**BASE, "sparsity_coefficient": 1.0, "expansion_factor": 8}, sae_store)
    assert bigger.meta["activation_cache"] == standard.meta["activation_cache"]
    assert bigger.tensors["W_dec"].shape[0] == 2 * standard.tensors["W_dec"].shape[0]


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_a_trained_sae_beats_the_mean_and_attributes_features_to_heads(toy_and_task, sae_store, standard, architecture):
    toy, task = toy_and_task
    extra = {"standard": {"sparsity_coefficient": 1.0}, "topk": {"k": 8}, "jumprelu": {"sparsity_coefficient": 0.01}}
    result = standard if architecture == "standard" else run_method(
        toy, task, "sae.train", {**BASE, "architecture": architecture, **extra[architecture]}, sae_store)
    assert result.meta["architecture"] == architecture
    # explained variance > 0 means lower error than always predicting the mean activation (held-out prompts)
    assert result.value("sae_explained_variance") > 0.5
    d_in = toy.n_heads * toy.d_head
    assert 0 < result.value("sae_l0") < 4 * d_in
    if architecture == "topk":
        assert result.value("sae_l0") <= 8
    attribution = result.tensors["head_attribution"]
    assert attribution.shape == (4 * d_in, toy.n_heads)
    assert torch.allclose(attribution.sum(-1), torch.ones(attribution.shape[0]), atol=1e-5)
    assert torch.allclose(attribution, head_attribution(result.tensors["W_dec"], toy.n_heads))
    ce = {m: result.value(m) for m in ("ce_clean", "ce_sae", "ce_zero_ablation", "ce_loss_recovered")}
    assert ce["ce_loss_recovered"] == pytest.approx((ce["ce_zero_ablation"] - ce["ce_sae"]) / (ce["ce_zero_ablation"] - ce["ce_clean"]))
    # the stored SAE comes back through SAELens and reconstructs held-out hook_z as evaluated
    sae = load_sae(result)
    z = hook_z(toy, task.clean[-1])
    assert sae.cfg.metadata.hook_name == "blocks.1.attn.hook_z"
    assert ((sae.decode(sae.encode(z)) - z) ** 2).sum() < ((z - z.mean(0)) ** 2).sum()


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_weights(toy_and_task, tmp_path, monkeypatch):
    toy, task = toy_and_task
    params = {**BASE, "sparsity_coefficient": 1.0, "n_tokens": 20_480, "n_checkpoints": 3}
    clean = run_method(toy, task, "sae.train", params, Store(tmp_path / "a"))
    assert clean.meta["resumed_from_checkpoint"] is False

    store = Store(tmp_path / "b")
    original = training.save_checkpoint

    def save_then_die(trainer, store, key):
        original(trainer, store, key)
        raise KeyboardInterrupt  # the process is killed right after the first checkpoint

    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_method(toy, task, "sae.train", params, store)
    assert store.catalog(status="done").empty  # nothing half-trained was stored
    assert len(list((store.root / "checkpoints").rglob("state.json"))) == 1
    monkeypatch.setattr(training, "save_checkpoint", original)
    resumed = run_method(toy, task, "sae.train", params, store)
    assert resumed.meta["resumed_from_checkpoint"] is True
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.allclose(resumed.tensors[name], clean.tensors[name], atol=1e-6), name
    assert not any((store.root / "checkpoints").rglob("state.json"))  # cleaned up once stored


def test_head_attribution_of_a_feature_living_in_one_head_is_one_hot():
    w_dec = torch.zeros(2, 3 * 4)
    w_dec[0, 4:8] = torch.randn(4)  # head 1 only
    w_dec[1] = 1.0  # spread evenly
    a = head_attribution(w_dec, 3)
    assert torch.allclose(a[0], torch.tensor([0.0, 1.0, 0.0])) and torch.allclose(a[1], torch.full((3,), 1 / 3))


def test_a_features_family_follows_where_its_head_reads_from():
    tokens = [5, 7, 9, 3, 1, 2, 4, 6, 8, 10, 11, 5]  # the last token (5) occurred at 0, so source 1 is the induction one
    at = lambda *mass: torch.tensor([mass[i] if i < len(mass) else 0.0 for i in range(len(tokens))])
    assert classify(at(0, 1.0), tokens)[0] == "induction"
    assert classify(at(*[0] * 10, 1.0), tokens)[:2] == ("local", 0.0)  # the previous token
    assert classify(at(0, 0, 0, 0, 1.0), tokens)[0] == "long_range"
    family, induction, local = classify(at(0, 1.0, 0, 0, 1.0, 0, 0, 0, 0, 0, 1.0), tokens)
    assert family == "mixed" and induction == pytest.approx(1 / 3) and local == pytest.approx(1 / 3)
    assert classify(-at(0, 1.0), tokens)[0] == "none"


def test_a_head_with_induction_and_long_range_features_is_polysemantic():
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    from toy_circuits import make_induction_toy

    model = from_hooked_transformer(make_induction_toy(), "wired")
    d_head = model.d_head
    sae = StandardSAE(StandardSAEConfig(d_in=2 * d_head, d_sae=2))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        sae.W_enc[:d_head] = 1.0  # both features read the induction head L1H0's whole output
        sae.W_dec[:, :d_head] = 1.0
    repeated, fresh = [3, 8, 12, 20, 30, 3], list(range(1, 21))  # L1H0 finds the earlier 3; on fresh tokens it finds nothing
    data = {"token": torch.tensor(repeated + fresh), "prompt": torch.tensor([0] * 6 + [1] * 20),
            "position": torch.tensor(list(range(6)) + list(range(20)))}
    example_rows = torch.tensor([[5], [25]])  # feature 0's top example: the repeat; feature 1's: the last fresh token
    attribution = head_attribution(sae.W_dec, 2)
    frame = head_families(sae, model, 1, data, example_rows, attribution, torch.ones(2, dtype=torch.bool))
    family = frame.dropna(subset=["family"]).drop_duplicates("feature").set_index("feature")["family"]
    assert family[0] == "induction" and family[1] == "long_range"
    per_head = {(r.head, r.metric): r.value for r in frame[frame["component"] == "head"].itertuples()}
    assert per_head[(0, "sae_head_families")] == 2 and per_head[(0, "sae_polysemantic")] == 1
    assert per_head[(1, "sae_head_features")] == 0 and per_head[(1, "sae_polysemantic")] == 0


def test_top_examples_histograms_and_logit_effects_match_a_direct_computation(toy_and_task, sae_store, standard):
    toy, task = toy_and_task
    sae = load_sae(standard)
    data = find_cache(sae_store, toy, task, 1).load(range(task_count := len(task) - 8))
    acts = sae.encode(data["z"]).detach()
    t = standard.tensors
    top = acts.topk(8, dim=0)
    assert torch.allclose(t["example_max"], top.values.T, atol=1e-5)
    frequency = standard.metric("feature_frequency").sort_values("feature")["value"].to_numpy()
    assert frequency == pytest.approx(((acts > 0).float().mean(0)).numpy(), abs=1e-6)
    assert torch.equal(t["activation_histogram"].sum(-1), (acts > 0).sum(0).float())
    # the example token sits at offset 12 of its window, with the feature's activation there
    f = int(t["example_max"][:, 0].argmax())
    prompt, position = int(t["example_prompt"][f, 0]), int(t["example_position"][f, 0])
    row = int(torch.nonzero((data["prompt"] == prompt) & (data["position"] == position))[0, 0])
    assert prompt < task_count and float(acts[row, f]) == pytest.approx(float(t["example_max"][f, 0]), abs=1e-5)
    assert t["example_acts"][f, 0, 12] == pytest.approx(float(t["example_max"][f, 0]), abs=1e-5)
    assert t["example_tokens"][f, 0].tolist()[: 12 + 1][-min(12, position) - 1:] == data["token"][row - min(12, position): row + 1].tolist()
    direction = torch.einsum("hd,hdm->m", sae.W_dec[f].view(toy.n_heads, toy.d_head), toy.tl.W_O[1].cpu())
    logits = (direction @ toy.tl.W_U.cpu()).detach()
    assert t["logit_top_ids"][f].tolist() == logits.topk(10).indices.tolist()
    assert torch.allclose(t["logit_bottom_values"][f], logits.topk(10, largest=False).values, atol=1e-5)


def test_feature_activations_on_prompts_equal_encoding_hook_z(toy_and_task, sae_store, standard):
    toy, task = toy_and_task
    result = run_method(toy, task, "sae.activations", {"sae": STANDARD}, sae_store)
    rows = result.scores[result.scores["prompt"] == 5]
    sae = load_sae(standard)
    acts = sae.encode(hook_z(toy, task.clean[5])).detach()
    assert len(rows) == int((acts > 0).sum())
    for r in rows.itertuples():
        assert r.value == pytest.approx(float(acts[r.position, r.feature]), abs=1e-5)


def test_direct_feature_attribution_sums_to_each_features_preactivation(toy_and_task, sae_store, standard):
    toy, task = toy_and_task
    result = run_method(toy, task, "sae.dfa", {"sae": STANDARD, "n_features": 5}, sae_store)
    s = result.scores
    key = ["prompt", "feature"]
    act = s[s.metric == "feature_activation"].set_index(key)["value"]
    pre = s[s.metric == "feature_preactivation"].set_index(key)["value"]
    # a ReLU SAE's active feature equals its pre-activation: the decomposition is exact
    assert len(act) > 0 and (act - pre.loc[act.index]).abs().max() < 1e-4
    per_head = s[s.metric == "dfa_head"].groupby(key + ["head"])["value"].sum()
    per_src = s[s.metric == "dfa"].groupby(key + ["head"])["value"].sum()
    assert (per_head - per_src.loc[per_head.index]).abs().max() < 1e-5
    sae = load_sae(standard)
    constant = (sae.b_enc - sae.b_dec @ sae.W_enc).detach()
    total = per_head.groupby(key).sum() + [float(constant[f]) for f in per_head.groupby(key).sum().index.get_level_values(1)]
    assert (total - pre.loc[total.index]).abs().max() < 1e-4
    one = run_method(toy, task, "sae.dfa", {"sae": STANDARD, "heads": ["L1H2"], "n_features": 5}, sae_store).scores
    assert set(one.dropna(subset=["head"])["head"]) == {2}


def test_a_pretrained_saelens_directory_loads_and_is_checked(toy_and_task, sae_store, standard, tmp_path):
    toy, task = toy_and_task
    sae = load_sae(standard)
    sae.save_model(tmp_path / "pretrained")
    loaded = run_method(toy, task, "sae.load", {"path": str(tmp_path / "pretrained")}, sae_store)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(loaded.tensors[name], standard.tensors[name])
    assert loaded.meta["layer"] == 1 and loaded.value("sae_l0") > 0
    sae.cfg.metadata.hook_name = "blocks.1.hook_resid_pre"
    sae.save_model(tmp_path / "resid")
    with pytest.raises(WorkbenchError, match="not an attention output"):
        run_method(toy, task, "sae.load", {"path": str(tmp_path / "resid")}, sae_store)
    narrow = from_hooked_transformer(make_toy_tl(seed=2, d_head=4), "toy-narrow")  # hook_z is 4 x 4 wide
    with pytest.raises(WorkbenchError, match="d_in is 32"):
        run_method(narrow, build_task(narrow, "induction", {"n_prompts": 4}), "sae.load",
                   {"path": str(tmp_path / "pretrained")}, sae_store)
    with pytest.raises(WorkbenchError, match="could not load SAE"):
        run_method(toy, task, "sae.load", {"release": "no-such-release", "sae_id": "x"}, sae_store)


def test_bad_sae_input_is_refused_and_writes_nothing(toy_and_task, tmp_path, standard):
    toy, task = toy_and_task
    store = Store(tmp_path / "empty")
    bad = [({"layer": 5}, "outside the model"), ({"architecture": "gated"}, "should be one of 'standard', 'topk', 'jumprelu'"),
           ({"architecture": "topk", "sparsity_coefficient": 1.0}, "set sparsity with k"),
           ({"k": 8}, "k applies to topk"), ({"eval_prompts": 64}, "eval_prompts"), ({"batch_size": 4096, "n_tokens": 8192}, "too small")]
    for params, message in bad:
        with pytest.raises(WorkbenchError, match=message):
            run_method(toy, task, "sae.train", {**BASE, **params}, store)
    with pytest.raises(WorkbenchError, match="holds no SAE"):
        run_method(toy, task, "sae.dfa", {"sae": {"method": "logit_diff"}}, store)
    # parameter-only mistakes fail when a job file is read, before any run of it computes
    job = {"run": [{"model": "smollm2-135m", "task": "corpus", "method": "sae.train", "params": {"k": 8}}]}
    with pytest.raises(WorkbenchError, match="k applies to topk"):
        parse_job(job)
    assert not store.root.exists() or (store.catalog().empty and not (store.root / "activations").exists())


def test_the_sae_is_named_by_spec_and_read_from_the_store(toy_and_task, sae_store, standard):
    toy, task = toy_and_task
    result = run_method(toy, task, "sae.dfa", {"sae": STANDARD, "n_features": 5}, sae_store)
    assert result.meta["sae_run"] == standard.run_id  # the stored SAE, not a new one
    assert result.meta["spec"]["needs"] == {"sae": standard.meta["key"]}  # its key is part of this run's key
    for bad, message in (({"method": "logit_diff"}, "holds no SAE"), ("0123abcd", "should be a table"),
                         ({"method": "sae.train", "params": {"k": 8}}, "k applies to topk")):
        with pytest.raises(WorkbenchError, match=message):
            run_method(toy, task, "sae.dfa", {"sae": bad}, sae_store)
    with pytest.raises(WorkbenchError, match="L1H0..L1H3"):
        run_method(toy, task, "sae.dfa", {"sae": STANDARD, "heads": ["L0H1"]}, sae_store)
