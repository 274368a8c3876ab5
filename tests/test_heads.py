"""Head detectors, attention sinks, distance profiles and ablation importance: against
TransformerLens's head detector, direct computations from cached patterns, plain hook
references, and a hand-wired model whose previous-token and induction heads are known."""

import tempfile

import pytest
import torch
from transformer_lens.head_detector import (
    compute_head_attention_similarity_score,
    detect_head,
    get_duplicate_token_head_detection_pattern,
    get_induction_head_detection_pattern,
    get_previous_token_head_detection_pattern,
)

from conftest import make_toy_tl
from toy_circuits import make_induction_toy
from workbench.device_memory import peak_tensor_bytes
from workbench.errors import WorkbenchError
from workbench.runner import run_method
from workbench.store import Store
from workbench.models import from_hooked_transformer
from workbench.tasks import build_task
from workbench.tasks.base import Task

TL_PATTERNS = {"previous_token": get_previous_token_head_detection_pattern,
               "duplicate_token": get_duplicate_token_head_detection_pattern,
               "induction": get_induction_head_detection_pattern}


def run(method, model, task, **params):
    """Through the runner, into a fresh store."""
    return run_method(model, task, method, params, Store(tempfile.mkdtemp()))


def head_grid(result, metric, model):
    rows = result.metric(metric).sort_values(["layer", "head"])
    return torch.tensor(rows["value"].to_numpy(), dtype=torch.float64).view(model.n_layers, model.n_heads)


def mixed_task(seed=0, lengths=(9, 14, 6, 14), vocab=50):
    """Prompts of different lengths with repeated tokens (so duplicate/induction patterns are non-empty)."""
    g = torch.Generator().manual_seed(seed)
    clean = []
    for n in lengths:
        half = torch.randint(0, vocab, ((n + 1) // 2,), generator=g).tolist()
        clean.append((half + half)[:n])
    return Task("mixed", {}, clean, [list(reversed(c)) for c in clean], [1] * len(clean), [2] * len(clean))


@pytest.fixture(scope="module")
def random_toy():
    return from_hooked_transformer(make_toy_tl(n_layers=2, seed=11, attn_only=False), "toy-mlp")


@pytest.fixture(scope="module")
def soft_capped_toy():
    """Scores soft-capped: a configuration fused attention does not cover, so TransformerLens's own
    whole pattern is read."""
    return from_hooked_transformer(make_toy_tl(n_layers=2, seed=12, attn_only=False, attn_scores_soft_cap=5.0), "toy-capped")


@pytest.fixture(scope="module")
def wired():
    return from_hooked_transformer(make_induction_toy(), "wired-induction")


@pytest.fixture(params=["whole", "query-by-query"])
def query_blocks(request, monkeypatch):
    """Patterns read whole or one query row at a time (the smallest budget): results must agree."""
    if request.param == "query-by-query":
        monkeypatch.setattr("workbench.fast_forward.attention_pass.PATTERN_BYTES", 1)
    return request.param


@pytest.mark.parametrize("exclude_bos,exclude_current", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("toy", ["random_toy", "soft_capped_toy"])
def test_detectors_equal_transformerlens_per_prompt_mean(toy, exclude_bos, exclude_current, query_blocks, request):
    task, model = mixed_task(), request.getfixturevalue(toy)
    result = run("heads.detect", model, task, exclude_bos=exclude_bos, exclude_current_token=exclude_current, batch_size=3)
    tl = model.tl
    for name, det_fn in TL_PATTERNS.items():
        expected = torch.zeros(tl.cfg.n_layers, tl.cfg.n_heads, dtype=torch.float64)
        for prompt in task.clean:
            tokens = torch.tensor([prompt])  # the reference's detection patterns are built on the CPU
            _, cache = tl.run_with_cache(tokens, remove_batch_dim=True)
            cache = cache.to("cpu")
            det = det_fn(tokens)
            for layer in range(tl.cfg.n_layers):
                for h in range(tl.cfg.n_heads):
                    expected[layer, h] += compute_head_attention_similarity_score(
                        cache["pattern", layer][h], det, exclude_bos=exclude_bos,
                        exclude_current_token=exclude_current, error_measure="mul")
        expected /= len(task)
        assert torch.allclose(head_grid(result, f"{name}_score", model), expected, atol=1e-5), name


def test_detectors_equal_detect_head_on_the_embedded_model(smollm2):
    text = "The cat sat on the mat. The cat sat on the mat. The cat sat on the mat."
    tokens = smollm2.to_tokens(text)
    task = Task("text", {}, [tokens], [tokens], [0], [1])
    result = run("heads.detect", smollm2, task)
    for name in TL_PATTERNS:
        expected = detect_head(smollm2.tl, text, f"{name}_head").double().cpu()
        assert torch.allclose(head_grid(result, f"{name}_score", smollm2), expected, atol=1e-4), name


def test_hand_wired_previous_token_and_induction_heads_are_found(wired):
    task = build_task(wired, "induction", {"n_prompts": 8, "seq_len": 15})
    result = run("heads.detect", wired, task)
    prev = head_grid(result, "previous_token_score", wired)
    induction = head_grid(result, "induction_score", wired)
    assert prev.argmax().item() == 0 and prev[0, 0] > 0.9  # L0H0
    assert induction.argmax().item() == 2  # L1H0
    # half the queries lie in the repeat, and there it attends to the induction target
    assert induction[1, 0] > 0.45 and induction[1, 0] > 3 * induction[1, 1]
    # the behavioural score: the repeat is predicted, the random first copy is not
    first, repeat = result.value("induction_loss_first"), result.value("induction_loss_repeat")
    assert first > 5 and repeat < 0.2 * first


def direct_alpha(model, task):
    """alpha[layer, head, k] from cached patterns, one prompt at a time, by definition."""
    tl = model.tl
    n_pos = max(len(c) for c in task.clean)
    sums = torch.zeros(model.n_layers, model.n_heads, n_pos, dtype=torch.float64)
    counts = torch.zeros(n_pos)
    for prompt in task.clean:
        n = len(prompt)
        _, cache = tl.run_with_cache(torch.tensor([prompt]))
        counts[:n] += 1
        for layer in range(model.n_layers):
            pattern = cache["pattern", layer][0].double().cpu()  # [head, q, k]
            for k in range(n):
                sums[layer, :, k] += pattern[:, k:, k].mean(-1)
    return sums / counts.clamp(min=1)


def test_sink_alpha_and_rate_equal_a_direct_computation(random_toy, query_blocks):
    task = mixed_task(seed=2)
    result = run("heads.sinks", random_toy, task, threshold=0.3, min_occurrences=1, batch_size=2)
    alpha = direct_alpha(random_toy, task)
    assert torch.allclose(result.tensors["alpha"].double(), alpha, atol=1e-5)
    first = head_grid(result, "sink_alpha", random_toy)
    assert torch.allclose(first, alpha[:, :, 0], atol=1e-5)
    assert result.value("sink_rate") == pytest.approx((alpha[:, :, 0] > 0.3).double().mean().item())
    later = result.metric("later_sink_alpha").sort_values(["layer", "head"])
    horizon = min(len(c) for c in task.clean) // 2
    assert torch.allclose(torch.tensor(later["value"].to_numpy()), alpha[:, :, 1:horizon].max(-1).values.flatten(), atol=1e-5)
    # a token's sink ratio: attention its occurrences (after the first position) receive, over what
    # uniform attention gives them (1 / (q + 1) from each query q that sees them), mean over heads
    ratios: dict[int, list[float]] = {}
    for prompt in task.clean:
        n = len(prompt)
        _, cache = random_toy.tl.run_with_cache(torch.tensor([prompt]))
        weight = torch.arange(1, n + 1, dtype=torch.float64)[:, None]  # q + 1
        for k in range(1, n):
            got = sum((cache["pattern", layer][0].double().cpu()[:, k:, k] * weight[k:, 0]).sum(-1).mean() / (n - k)
                      for layer in range(random_toy.n_layers)) / random_toy.n_layers
            ratios.setdefault(prompt[k], []).append(float(got))
    tokens = result.metric("token_sink_ratio")
    assert len(tokens) == 10
    for token, value in zip(tokens["token_id"], tokens["value"]):
        assert value == pytest.approx(sum(ratios[token]) / len(ratios[token]), abs=1e-5)


def test_sinks_on_the_wired_model_find_uniform_heads_sink_to_the_first_token(wired):
    task = build_task(wired, "induction", {"n_prompts": 4, "seq_len": 15})
    result = run("heads.sinks", wired, task)
    alpha = head_grid(result, "sink_alpha", wired)
    # a uniform head gives token 0 the mean of 1/(q+1): exactly sink_ratio 1
    ratio = head_grid(result, "sink_ratio", wired)
    assert ratio[0, 1] == pytest.approx(1.0, abs=1e-5) and ratio[1, 1] == pytest.approx(1.0, abs=1e-5)
    # the previous-token head sends token 0 only the attention of queries 0 and 1: alpha = 2 / 29
    assert alpha[0, 0].item() == pytest.approx(2 / 29, abs=1e-4)
    assert result.value("sink_rate") == 0.0


def test_distance_profile_equals_direct_computation_and_finds_the_previous_token_head(random_toy, wired, query_blocks):
    task = mixed_task(seed=3)
    result = run("heads.distance", random_toy, task, batch_size=3)
    tl = random_toy.tl
    mean = torch.zeros(random_toy.n_layers, random_toy.n_heads, dtype=torch.float64)
    sq = torch.zeros_like(mean)
    hist = torch.zeros(random_toy.n_layers, random_toy.n_heads, len(result.meta["distance_bins"]), dtype=torch.float64)
    n_queries = 0
    for prompt in task.clean:
        n = len(prompt)
        n_queries += n
        _, cache = tl.run_with_cache(torch.tensor([prompt]))
        d = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).clamp(min=0)
        bins = [0] + [int(x).bit_length() for x in range(1, n)]  # 0 | 1 | 2-3 | 4-7 | ...
        for layer in range(random_toy.n_layers):
            p = cache["pattern", layer][0].double().cpu()
            mean[layer] += (p * d).sum((-2, -1))
            sq[layer] += (p * d**2).sum((-2, -1))
            for q in range(n):
                for k in range(q + 1):
                    hist[layer, :, bins[q - k]] += p[:, q, k]
    mean /= n_queries
    std = (sq / n_queries - mean**2).sqrt()
    assert torch.allclose(head_grid(result, "attn_distance_mean", random_toy), mean, atol=1e-6)
    assert torch.allclose(head_grid(result, "attn_distance_std", random_toy), std, atol=1e-6)
    # a bin sums up to a dozen pattern entries a query: float32 scores computed in another order (CUDA's
    # products) move it by a few 1e-6
    assert torch.allclose(result.tensors["distance_hist"].double(), hist / n_queries, atol=1e-5)

    wired_task = build_task(wired, "induction", {"n_prompts": 4, "seq_len": 15})
    profile = run("heads.distance", wired, wired_task)
    prev_mean = head_grid(profile, "attn_distance_mean", wired)[0, 0].item()
    assert prev_mean == pytest.approx(1.0, abs=0.05)  # every query but the first attends one back
    assert profile.tensors["distance_hist"][0, 0, 1] > 0.95  # the "1" bin


@pytest.mark.parametrize("method", ["heads.detect", "heads.sinks", "heads.distance"])
def test_a_long_prompt_never_holds_a_layers_whole_pattern(method, monkeypatch):
    """1,000 tokens, 4 heads: one layer's [head, query, key] pattern is 16 MB in float32. Read in
    blocks within a 1 MiB budget, each method's peak tensor memory stays under a quarter of that,
    where reading each layer whole exceeds it; the results agree."""
    model = from_hooked_transformer(make_toy_tl(n_layers=2, seed=5, attn_only=False, n_ctx=1024), "toy-long")
    half = torch.randint(0, 50, (500,), generator=torch.Generator().manual_seed(1)).tolist()
    task = Task("long", {}, [half + half], [half + half], [1], [2])
    whole, whole_peak = peak_tensor_bytes(lambda: run(method, model, task))
    monkeypatch.setattr("workbench.fast_forward.attention_pass.PATTERN_BYTES", 2**20)
    blocks, peak = peak_tensor_bytes(lambda: run(method, model, task))
    pattern = model.n_heads * 1000 * 1000 * 4
    assert peak < pattern / 4 and whole_peak > pattern
    values = lambda result: torch.tensor(result.scores["value"].to_numpy())
    assert torch.allclose(values(blocks), values(whole), atol=1e-6)


@pytest.mark.parametrize("ablation", ["zero", "mean", "resample"])
def test_ablation_equals_a_plain_hooked_forward(random_toy, ablation):
    task = build_task(random_toy, "induction", {"n_prompts": 6, "seq_len": 8})
    result = run("heads.ablation", random_toy, task, ablation=ablation, heads=["L0H1", "L1H3"])
    tl = random_toy.tl
    clean, lengths = task.tokens("clean")
    corrupt, _ = task.tokens("corrupted")
    answers, wrongs = task.answer_ids(), task.wrong_ids()
    rows = torch.arange(len(task))
    with torch.no_grad():
        _, ccache = tl.run_with_cache(corrupt)
        _, kcache = tl.run_with_cache(clean)
        for layer, head in [(0, 1), (1, 3)]:
            name = f"blocks.{layer}.attn.hook_z"
            if ablation == "zero":
                value = torch.zeros_like(kcache[name][:, :, head])
            elif ablation == "mean":
                value = kcache[name][:, :, head].mean((0, 1)).expand_as(kcache[name][:, :, head])
            else:
                value = ccache[name][:, :, head]

            def hook(z, hook, head=head, value=value):
                z[:, :, head] = value
                return z

            logits = tl.run_with_hooks(clean, fwd_hooks=[(name, hook)])[rows, lengths - 1]
            expected = (logits[rows, answers] - logits[rows, wrongs]).mean().item()
            got = result.metric("ablation_logit_diff")
            got = got[(got["layer"] == layer) & (got["head"] == head)]["value"].item()
            assert got == pytest.approx(expected, abs=1e-4)


def test_bad_head_score_parameters_are_refused(random_toy):
    task = mixed_task()
    with pytest.raises(WorkbenchError, match="should be one of 'zero', 'mean', 'resample'"):
        run("heads.ablation", random_toy, task, ablation="shuffle")
    with pytest.raises(WorkbenchError, match="threshold"):
        run("heads.sinks", random_toy, task, threshold=3)
    with pytest.raises(WorkbenchError, match="outside the model"):
        run("heads.ablation", random_toy, task, heads=["L9H0"])
