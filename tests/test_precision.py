"""bfloat16 and float16 models run every method, with metrics and reductions in float32: their
results stay within a stated distance of the same model's float32 results.

Measured on the toy below (2 layers with MLPs, 4 heads, LayerNorm; induction prompts whose clean -
corrupted logit difference is only 0.10, which magnifies rounding in normalised effects): head
patching max |diff| 0.046 (bf16) and 0.008 (fp16) with the same top heads; DLA max |diff| 0.0008 /
0.0003 (Spearman 0.997 / 1.0); attribution patching Spearman 1.0 for both. On the embedded model
(16 IOI prompts, logit difference 5.39 in float32, 5.38 in bf16): DLA per head max |diff| 0.014,
the same top 5 heads, Spearman 0.9994; attribution patching Spearman 0.997 (the slow test at the end)."""

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
    out = {torch.float32: from_hooked_transformer(tl, "toy")}
    for dtype in DTYPES:
        low = copy.deepcopy(tl).to(dtype)
        low.cfg.dtype = dtype
        out[dtype] = from_hooked_transformer(low, f"toy-{dtype}")
    return out


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
