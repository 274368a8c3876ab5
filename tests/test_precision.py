"""bfloat16 and float16 models run every method, with metrics and reductions in float32: their
results stay within a stated distance of the same model's float32 results.

Measured on the LayerNorm toy below (2 layers with MLPs, 4 heads, LayerNorm; induction prompts whose clean -
corrupted logit difference is only 0.10, which magnifies rounding in normalised effects): head
patching max |diff| 0.046 (bf16) and 0.008 (fp16) with the same top heads; DLA max |diff| 0.0008 /
0.0003 (Spearman 0.997 / 1.0); attribution patching Spearman 1.0 for both. On the embedded model
(16 IOI prompts, logit difference 5.39 in float32, 5.38 in bf16): DLA per head max |diff| 0.014,
the same top 5 heads, Spearman 0.9994; attribution patching Spearman 0.997 (the slow test). The
other methods are bounded on a rotary toy further down, each bound next to what it measured."""

import copy
import tempfile

import pytest
import torch
from scipy.stats import spearmanr

from conftest import make_toy_tl
from workbench.models import from_hooked_transformer
from workbench.runner import run_method
from workbench.store import Store
from workbench.tasks import build_task

DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def models():
    tl = make_toy_tl(n_layers=2, n_heads=4, d_head=8, seed=1, attn_only=False, normalization_type="LN")
    return {dtype: in_precision(tl, dtype, "toy") for dtype in [torch.float32, *DTYPES]}


def results(model, method, params=None):
    task = build_task(model, "induction", {"n_prompts": 16, "seq_len": 8})
    return run_method(model, task, method, params or {}, Store(tempfile.mkdtemp()))


def per_head(result, metric):
    rows = result.metric(metric)
    if "prompt" in rows:
        rows = rows[rows["prompt"].isna()]
    return torch.tensor(rows.sort_values(["layer", "head"])["value"].to_numpy(), dtype=torch.float64)


def top(values, k=3):
    return set(values.abs().topk(k).indices.tolist())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_low_precision_patching_and_dla_stay_close_to_float32(models, dtype):
    full, low = models[torch.float32], models[dtype]
    a, b = per_head(results(full, "patching.attn_head"), "patch_logit_diff"), per_head(results(low, "patching.attn_head"), "patch_logit_diff")
    assert (a - b).abs().max() < (0.06 if dtype == torch.bfloat16 else 0.015) and top(a) == top(b)
    a, b = per_head(results(full, "attribution.dla"), "dla"), per_head(results(low, "attribution.dla"), "dla")
    assert (a - b).abs().max() < 0.002 and spearmanr(a, b).statistic > 0.99


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_low_precision_gradient_methods_rank_as_float32_does(models, dtype):
    full, low = models[torch.float32], models[dtype]
    a, b = per_head(results(full, "patching.attribution"), "atp_logit_diff"), per_head(results(low, "patching.attribution"), "atp_logit_diff")
    assert spearmanr(a, b).statistic > 0.98
    eap_full, eap_low = results(full, "discovery.eap"), results(low, "discovery.eap")
    a = torch.tensor(eap_full.metric("eap").sort_values(["src", "dst", "dst_input"])["value"].to_numpy())
    b = torch.tensor(eap_low.metric("eap").sort_values(["src", "dst", "dst_input"])["value"].to_numpy())
    assert spearmanr(a, b).statistic > 0.98


@pytest.mark.slow
def test_embedded_model_in_bfloat16_matches_float32_on_ioi(smollm2):
    from workbench.models import load_model

    low = load_model({"name": "smollm2-135m", "dtype": "bfloat16"})
    assert low.tl.cfg.dtype == torch.bfloat16 and low.identity.key() != smollm2.identity.key()

    def both(method, params=None):
        task = lambda m: build_task(m, "ioi", {"n_prompts": 16})
        return (run_method(m, task(m), method, params or {}, Store(tempfile.mkdtemp())) for m in (smollm2, low))

    full, half = both("logit_diff")
    assert half.value("logit_diff_clean_mean") == pytest.approx(full.value("logit_diff_clean_mean"), rel=0.05)
    dla_full, dla_half = (per_head(r, "dla") for r in both("attribution.dla"))
    gap = full.value("logit_diff_clean_mean")
    assert (dla_full - dla_half).abs().max() < 0.02 * abs(gap) and len(top(dla_full, 5) & top(dla_half, 5)) >= 4
    atp_full, atp_half = (per_head(r, "atp_logit_diff") for r in both("patching.attribution"))
    assert spearmanr(atp_full, atp_half).statistic > 0.99


# Every other method, on a toy shaped like the embedded model (RMS norms, rotary positions, grouped
# keys and values, GELU MLPs), each result against the same model's float32 one. Bounds are
# about twice what was measured in bf16 / fp16 (in brackets); normalised effects divide by a clean -
# corrupted gap of 0.21, which magnifies rounding about fivefold against the embedded model's 5.4.
PATHS_Q = {"receivers": ["L1H0", "L1H1"], "receiver_input": "q"}
CLOSE = [  # method, params, metric, bound on max |low - float32| for bf16, fp16
    ("patching.resid", {}, "patch_logit_diff", 0.025, 0.003),  # 0.0105 / 0.0010
    ("patching.attn_out", {}, "patch_logit_diff", 0.015, 0.003),  # 0.0070 / 0.0014
    ("patching.mlp_out", {}, "patch_logit_diff", 0.025, 0.002),  # 0.0121 / 0.0007
    ("patching.attn_head", {"activation": "pattern"}, "patch_logit_diff", 0.02, 0.003),  # 0.0092 / 0.0013
    ("patching.attn_head", {"by_position": True}, "patch_logit_diff", 0.04, 0.003),  # 0.0210 / 0.0014
    ("patching.path", PATHS_Q, "path_patch_logit_diff", 0.02, 0.003),  # 0.0085 / 0.0011
    ("patching.path", {"receivers": ["L1H2"], "receiver_input": "v"}, "path_patch_logit_diff", 0.012, 0.002),  # 0.0056 / 0.0010
    ("heads.ablation", {}, "ablation_effect", 0.02, 0.003),  # 0.0098 / 0.0012
    ("attribution.head_sources", {}, "dla_by_source", 0.005, 5e-4),  # 0.0023 / 0.0002
    ("attribution.logit_lens", {}, "logit_lens_logit_diff", 0.03, 0.006),  # 0.0157 / 0.0030
    ("attribution.logit_lens", {}, "logit_lens_answer_prob", 7e-4, 3e-4),  # 0.0003 / 0.0001
    ("heads.detect", {}, "induction_score", 1e-4, 1e-5),  # 3.0e-5 / 2.7e-6
    ("heads.detect", {}, "previous_token_score", 2e-4, 4e-5),  # 6.2e-5 / 1.5e-5
    ("heads.sinks", {}, "sink_alpha", 3e-4, 5e-5),  # 1.2e-4 / 2.2e-5
    ("heads.distance", {}, "attn_distance_mean", 3e-3, 2e-4),  # 0.0013 / 0.0001
    ("attention.patterns", {}, "attn_entropy", 1.5e-3, 2e-4),  # 0.0006 / 0.0001
    ("discovery.eap_ig", {}, "eap_ig", 0.015, 0.003),  # 0.0066 / 0.0011
    ("discovery.eap_ig_activations", {"steps": 2}, "eap_ig_activations", 0.01, 0.003),  # 0.0047 / 0.0012
    ("discovery.nodes", {}, "node_edge", 0.04, 0.003),  # 0.0191 / 0.0015
    ("circuit.faithfulness", {}, "faithfulness", 0.02, 0.002),  # 0.0085 / 0.0009
    ("circuit.faithfulness", {}, "cpr", 0.008, 0.001),  # 0.0036 / 0.0005
]
SAE = {"layer": 1, "expansion_factor": 4, "n_tokens": 40_000, "batch_size": 256, "lr": 1e-3, "sparsity_coefficient": 1.0, "eval_prompts": 8}


def rotary_toy():
    return make_toy_tl(n_layers=2, n_heads=4, d_head=8, seed=1, attn_only=False, normalization_type="RMS",
                       n_key_value_heads=2, positional_embedding_type="rotary", rotary_dim=8)


def in_precision(tl, dtype, name):
    if dtype != torch.float32:
        tl = copy.deepcopy(tl).to(dtype)
        tl.cfg.dtype = dtype
    return from_hooked_transformer(tl, f"{name}-{str(dtype).removeprefix('torch.')}")


class Precisions:
    """The rotary toy in each precision, each with its own store, so a method computed for one
    test (or one that another reads, as faithfulness reads its discovery) is computed once."""

    def __init__(self, root):
        tl = rotary_toy()
        self.models = {d: in_precision(tl, d, "rotary-toy") for d in [torch.float32, *DTYPES]}
        self.stores = {d: Store(root / str(d)) for d in self.models}

    def task(self, dtype, **params):
        return build_task(self.models[dtype], "induction", {"n_prompts": 16, "seq_len": 8, **params})

    def run(self, dtype, method, params, task=None):
        return run_method(self.models[dtype], task or self.task(dtype), method, params, self.stores[dtype])

    def values(self, dtype, method, params, metric):
        """One metric's values indexed by everything else that names a row, float32's order."""
        rows = self.run(dtype, method, params).metric(metric)
        keys = [c for c in rows.columns if c != "value" and rows[c].notna().any()]
        return rows.set_index(keys)["value"].sort_index()


@pytest.fixture(scope="module")
def precisions(tmp_path_factory):
    return Precisions(tmp_path_factory.mktemp("precisions"))


def case_id(case) -> str:
    method, params, metric = case[:3]
    named = [f"{k}={'+'.join(v) if isinstance(v, list) else v}" for k, v in params.items()]
    return "-".join([method, *named, metric])


@pytest.mark.parametrize("method, params, metric, bf16, fp16", CLOSE, ids=[case_id(c) for c in CLOSE])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_method_stays_within_its_bound_of_float32(precisions, dtype, method, params, metric, bf16, fp16):
    full = precisions.values(torch.float32, method, params, metric)
    low = precisions.values(dtype, method, params, metric)
    assert low.index.equals(full.index) and full.abs().max() > 0
    assert (low - full).abs().max() < (bf16 if dtype == torch.bfloat16 else fp16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_discovery_in_low_precision_keeps_rankings_circuits_and_codes(precisions, dtype):
    for method, params in [("discovery.eap_ig", {}), ("discovery.eap_ig_activations", {"steps": 2})]:
        full, low = (precisions.values(d, method, params, method.removeprefix("discovery.")) for d in (torch.float32, dtype))
        assert spearmanr(full, low).statistic > 0.999  # measured 0.9998-1.0
        assert set(full.abs().nlargest(5).index) == set(low.abs().nlargest(5).index)
    acdc = {"threshold": 0.01}
    full, low = (precisions.values(d, "discovery.acdc", acdc, "acdc_in_circuit") for d in (torch.float32, dtype))
    assert 0 < full.sum() < len(full) and low.equals(full)  # the same edges kept, and some pruned
    codes = {"n_features": 32, "steps": 100}
    full, low = (precisions.values(d, "discovery.discrete_sae", codes, "discrete_sae_score") for d in (torch.float32, dtype))
    assert full.max() > full.min() and (full - low).abs().max() <= 1 and full.idxmax() == low.idxmax()  # one head one code apart in bf16


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_an_sae_trained_in_low_precision_reconstructs_as_well_and_one_sae_reads_alike(precisions, dtype, tmp_path):
    from sae.saes import load_sae

    corpus = {d: precisions.task(d, n_prompts=64, seq_len=20) for d in (torch.float32, dtype)}
    trained = {d: precisions.run(d, "sae.train", SAE, corpus[d]) for d in corpus}
    assert trained[torch.float32].value("sae_explained_variance") > 0.6  # it learned something (0.70)
    # measured bf16 / fp16: 1e-5 / 4e-5, 2e-4 / 2e-4, 1e-5 / 1e-5, 0.3% / 0.01% of the L0
    for metric, bound in [("sae_mse", 2e-4), ("sae_explained_variance", 1e-3), ("kl_sae", 1e-4)]:
        assert abs(trained[dtype].value(metric) - trained[torch.float32].value(metric)) < bound
    assert trained[dtype].value("sae_l0") == pytest.approx(trained[torch.float32].value("sae_l0"), rel=0.01)
    # the float32 model's SAE, loaded beside the low-precision model: what it reads differs only by rounding
    load_sae(trained[torch.float32]).save_model(tmp_path / "sae")
    loaded = {"method": "sae.load", "params": {"path": str(tmp_path / "sae")}}
    acts = {d: precisions.run(d, "sae.activations", {"sae": loaded}, corpus[d]).metric("feature_activation") for d in corpus}
    full, low = (a.set_index(["prompt", "position", "feature"])["value"] for a in (acts[torch.float32], acts[dtype]))
    both = full.index.intersection(low.index)
    # features active in one and not the other sit at the ReLU's edge: 0.4% / 0.07% of them; values
    # within 1.1% / 0.08% of the largest, direct feature attribution per head 0.7% / 0.08%
    assert len(both) > 0.98 * max(len(full), len(low))
    assert (full[both] - low[both]).abs().max() < 0.025 * full.abs().max()
    dfa = {d: precisions.values(d, "sae.dfa", {"sae": loaded, "n_features": 5}, "dfa_head") for d in corpus}
    both = dfa[torch.float32].index.intersection(dfa[dtype].index)
    assert len(both) > 0.95 * len(dfa[torch.float32])
    assert (dfa[torch.float32][both] - dfa[dtype][both]).abs().max() < 0.015 * dfa[torch.float32].abs().max()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_retrieval_scores_and_masking_are_unchanged_in_low_precision(dtype, tmp_path):
    from toy_circuits import make_induction_toy, needle_task

    wired = make_induction_toy()

    def run(d, method, params):
        return run_method(in_precision(wired, d, "wired"), needle_task(), method, params, Store(tmp_path / str(d)))

    for method, params, metric in [("retrieval.score", {"max_new_tokens": 6}, "retrieval_score"),
                                   ("retrieval.masking", {"ks": [1], "n_random": 2, "max_new_tokens": 6}, "needle_accuracy")]:
        full, low = (run(d, method, params).metric(metric)["value"].tolist() for d in (torch.float32, dtype))
        assert low == full and len(set(full)) > 1  # the copying head scores 1, the others 0; masking it breaks retrieval
