"""Retrieval-head scoring and the masking check: a hand-wired copying head scores 1 and the others
0; the KV-cache decode reads the same attention argmax as a full forward; bad input is refused."""

import tempfile

import pytest
import torch

from conftest import make_toy_tl
from toy_circuits import make_induction_toy, needle_task
from workbench.device_memory import peak_tensor_bytes
from workbench.errors import WorkbenchError
from workbench.models import from_hooked_transformer
from workbench.runner import run_method
from workbench.store import Store
from workbench.tasks import build_task
from workbench.tasks.base import Task
from circuits.heads.retrieval import (MaskingParams, RetrievalParams, bootstrap_interval, decode_masked, greedy_generate, head_mask, mask_hooks, needle_tests,
                                outcomes, rouge1_recall, selection)
from workbench.spec import Need, TaskSpec


def run(method, model, task, **params):
    """Through the runner, into a fresh store (masking resolves the scores it needs there)."""
    return run_method(model, task, method, params, Store(tempfile.mkdtemp()))


@pytest.fixture(scope="module")
def wired():
    return from_hooked_transformer(make_induction_toy(), "wired-induction")


def test_the_wired_copying_head_scores_one_and_every_other_head_zero(wired):
    task = needle_task()
    result = run("retrieval.score", wired, task, max_new_tokens=6)
    scores = result.metric("retrieval_score").set_index(["layer", "head"])["value"]
    assert scores[(1, 0)] == pytest.approx(1.0)
    assert scores.drop((1, 0)).abs().max() == 0.0
    assert result.value("needle_accuracy") == 1.0
    assert result.value("retrieval_head_share") == 0.25 and result.value("retrieval_zero_share") == 0.75
    assert result.tensors["copy_scores"].shape == (3, 2, 2)


def test_copies_are_counted_without_deduplication_as_the_reference_does(wired):
    """Decoding past the needle copies the haystack that follows it: outside the span, not counted;
    so the score stays 1 however long we decode."""
    task = needle_task(seeds=(4,))
    result = run("retrieval.score", wired, task, max_new_tokens=12)
    assert result.metric("retrieval_score").set_index(["layer", "head"])["value"][(1, 0)] == pytest.approx(1.0)


@pytest.mark.parametrize("shape", ["standard-layernorm", "rotary-gqa-rms"])
@pytest.mark.parametrize("path", ["fused", "fused-prefill-in-chunks-of-16", "pattern-hooked"])
def test_decode_argmax_equals_the_full_forward_pattern_argmax(path, shape, monkeypatch):
    """Fused attention reads the argmax off each step's scores; with a pattern hook present every
    layer runs TransformerLens's attention and the argmax comes off the pattern. Both equal the
    argmax of the full forward's pattern, and the continuation is the same."""
    if path == "fused-prefill-in-chunks-of-16":  # the smallest budget: the 40-token prompt is read 16 queries at a time
        monkeypatch.setattr("circuits.heads.retrieval.PREFILL_BYTES", 1)
    extra = (dict(normalization_type="LN") if shape == "standard-layernorm" else
             dict(normalization_type="RMS", n_key_value_heads=2, positional_embedding_type="rotary", rotary_dim=8))
    tl = make_toy_tl(n_layers=2, seed=7, attn_only=False, **extra)
    model = from_hooked_transformer(tl, "toy")
    prompt = torch.randint(0, 50, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    seen = []
    hooks = [("blocks.0.attn.hook_pattern", lambda act, hook: seen.append(act.shape[-1]))] if path == "pattern-hooked" else []
    gen = greedy_generate(model, prompt, 8, track_argmax=True, hooks=hooks)
    assert len(gen.tokens) == 8
    assert seen == ([] if path != "pattern-hooked" else list(range(40, 48)))  # TransformerLens's attention ran at every step
    full = torch.tensor([prompt + gen.tokens])
    with torch.no_grad():
        logits, cache = tl.run_with_cache(full)
    assert logits[0, len(prompt) - 1 : -1].argmax(-1).tolist() == gen.tokens  # the same greedy continuation
    for step in range(8):
        q = len(prompt) - 1 + step
        expected = torch.stack([cache["pattern", layer][0, :, q].argmax(-1) for layer in range(2)]).cpu()
        assert torch.equal(gen.argmax[step], expected)


@pytest.mark.parametrize("budget_kib", [256, 64])
def test_a_long_prompt_is_read_within_the_prefill_budget(budget_kib, monkeypatch):
    """Decoding after a 1,000-token prompt holds the KV storage (keys, values and rotated keys for
    1,002 positions) plus at most twice the prefill budget, counted over every tensor alive (on CUDA
    also a layer's keys and values copied once per head, for a kernel that does not take them
    grouped); read in one chunk, the same prompt holds more than four budgets beside the storage.
    Same tokens and argmax rows either way."""
    tl = make_toy_tl(n_layers=2, seed=7, attn_only=False, n_ctx=1024, normalization_type="RMS", n_key_value_heads=2,
                     positional_embedding_type="rotary", rotary_dim=8)
    model, cfg = from_hooked_transformer(tl, "toy"), tl.cfg
    prompt = torch.randint(0, 50, (1000,), generator=torch.Generator().manual_seed(3)).tolist()
    storage = cfg.n_layers * 3 * 1002 * cfg.n_key_value_heads * cfg.d_head * 4
    budget = budget_kib * 2**10
    whole, whole_peak = peak_tensor_bytes(lambda: greedy_generate(model, prompt, 2, track_argmax=True))
    monkeypatch.setattr("circuits.heads.retrieval.PREFILL_BYTES", budget)
    chunked, peak = peak_tensor_bytes(lambda: greedy_generate(model, prompt, 2, track_argmax=True))
    expanded = 2 * cfg.n_heads * 1002 * cfg.d_head * 4 if torch.device(cfg.device).type == "cuda" else 0
    assert peak - storage - expanded <= 2 * budget < 4 * 256 * 2**10 < whole_peak - storage
    assert chunked.tokens == whole.tokens and torch.equal(chunked.argmax, whole.argmax)


def test_masking_the_copying_head_breaks_retrieval_and_masking_the_idle_head_does_not(wired):
    task = needle_task()
    params = RetrievalParams(max_new_tokens=6)
    tests = needle_tests(wired, task, 6)
    for mask in ("query", "zero", "mean"):
        means = {f"blocks.{layer}.attn.hook_z": torch.zeros(2, wired.d_head) for layer in range(2)} if mask == "mean" else None
        hits, _ = outcomes(wired, tests, params, head_mask(wired, [[(1, 0)], [(1, 1)], [], [(0, 1), (1, 1)]]), mask, means)
        assert hits == [[False] * 3, [True] * 3, [True] * 3, [True] * 3]
    result = run("retrieval.masking", wired, task, max_new_tokens=6, ks=[1], n_random=2)
    frame = result.metric("needle_accuracy")
    assert frame[frame["masked"] == "none"]["value"].item() == 1.0
    top = frame[frame["masked"] == "retrieval"]
    assert top["value"].item() == 0.0 and top["heads"].item() == ["L1H0"]
    assert {h for heads in frame[frame["masked"] == "random"]["heads"] for h in heads} <= {"L0H0", "L0H1", "L1H1"}
    curve = result.metric("masking_curve").set_index("masked")["value"]
    assert curve["none"] == 1.0 and curve["retrieval"] == 0.0 and curve["random"] == 1.0
    assert torch.equal(result.tensors["hits"].bool(), torch.tensor([[1, 1, 1], [0, 0, 0], [1, 1, 1], [1, 1, 1]]).bool())
    assert result.meta["baseline_accuracy"] == 1.0 and result.meta["answered_unmasked"] == 3
    assert result.meta["selection"] == "same tests" and result.meta["warnings"] == []
    assert len(result.meta["responses"]["retrieval 1"]) == 3


def test_masking_from_a_baseline_below_the_floor_is_refused_and_nothing_is_stored(wired, tmp_path):
    task, store = needle_task(seeds=(0, 1, 2, 3)), Store(tmp_path / "s")
    run_method(wired, task, "retrieval.score", {"max_new_tokens": 6}, store)
    for row in task.rows[1:]:  # three of four spans point at haystack the model never reproduces
        row["needle_start"], row["needle_end"] = 1, 4
    broken = Task("toy-needle-broken", {}, task.clean, task.corrupted, task.answers, task.wrongs, task.rows)
    with pytest.raises(WorkbenchError, match=r"answers 1 of 4 needle tests \(accuracy 0.25\), below min_baseline = 0.5"):
        run_method(wired, broken, "retrieval.masking", {"max_new_tokens": 6, "ks": [1]}, store)
    assert set(store.catalog()["method"]) == {"retrieval.score"}
    with pytest.warns(UserWarning, match="answered only 1 of 4"):
        low = run_method(wired, broken, "retrieval.masking", {"max_new_tokens": 6, "ks": [1], "min_baseline": 0.2}, store)
    frame = low.metric("needle_accuracy")
    assert low.meta["warnings"] and frame[frame["masked"] == "none"]["value"].item() == 0.25


def test_scoring_warns_when_fewer_than_half_the_tests_count(wired):
    task = needle_task(seeds=(0, 1, 2))
    for row in task.rows[1:]:
        row["needle_start"], row["needle_end"] = 1, 4
    with pytest.warns(UserWarning, match="answered only 1 of 3"):
        result = run("retrieval.score", wired, task, max_new_tokens=6)
    assert result.meta["counted_tests"] == 1 and result.meta["warnings"]


def test_bootstrap_interval_brackets_the_mean_as_the_normal_approximation_does():
    assert bootstrap_interval(torch.ones(30)) == (1.0, 1.0)
    half = torch.tensor([1, 0] * 50).bool()
    lo, hi = bootstrap_interval(half)
    assert lo == pytest.approx(0.5 - 1.96 * 0.05, abs=0.02) and hi == pytest.approx(0.5 + 1.96 * 0.05, abs=0.02)
    draws = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]]).bool()  # per-test means over draws: 1, .5, .5, 0
    lo, hi = bootstrap_interval(draws)
    assert 0 <= lo < 0.5 < hi <= 1


def test_selection_says_whether_the_heads_were_chosen_on_other_needles():
    needle = lambda needles: TaskSpec.parse("needle", {"needles": needles})
    scores = lambda needles: Need("retrieval.score", RetrievalParams(), needle(needles))
    masked = Task("needle", {"needles": [5, 6]}, [], [], [], [], [])
    assert selection(MaskingParams(), masked) == "same tests"
    assert selection(MaskingParams(scores=scores([0, 1])), masked) == "held-out needles"
    assert selection(MaskingParams(scores=scores([1, 5])), masked) == "overlapping needles"
    assert selection(MaskingParams(scores=scores(None)), masked) == "overlapping needles"
    with pytest.raises(WorkbenchError, match="scores must name a retrieval.score run"):
        MaskingParams(scores=Need("heads.detect", None))


def test_masking_reads_the_stored_scores_it_needs(wired, tmp_path):
    task, store = needle_task(), Store(tmp_path / "s")
    scores = run_method(wired, task, "retrieval.score", {"max_new_tokens": 6}, store)
    masked = run_method(wired, task, "retrieval.masking", {"max_new_tokens": 6, "ks": [1], "n_random": 1}, store)
    assert masked.meta["scores_run"] == scores.run_id and masked.meta["spec"]["needs"] == {"scores": scores.meta["key"]}
    assert len(store.catalog()) == 2  # the scores were read, not computed again
    other = run_method(wired, task, "retrieval.masking", {"max_new_tokens": 5, "ks": [1], "n_random": 1}, store)
    assert other.meta["scores_run"] != scores.run_id  # other scoring parameters: other scores, other key


def test_masked_rows_decoded_as_one_batch_answer_as_each_mask_decoded_alone():
    """Batching the head sets of a test must not change any row's answer: on a random model (whose
    answers depend on every head) each row of a batch equals greedy decoding with its mask alone."""
    tl = make_toy_tl(n_layers=2, n_heads=4, seed=3, attn_only=False, normalization_type="LN")
    model = from_hooked_transformer(tl, "toy")
    prompt = torch.randint(0, 50, (24,)).tolist()
    test = needle_tests(model, Task("t", {}, [prompt], [prompt], [0], [1], [dict(needle_start=5, needle_end=9)]), 10)[0]
    sets = [[], [(0, 1)], [(1, 0), (1, 3)], [(0, 0), (0, 2), (1, 1)]]

    def answered(tokens):  # a row leaves the batch once its response reaches the ROUGE threshold
        return next((tokens[: i + 1] for i in range(len(tokens)) if test.recall(model, tokens[: i + 1]) > 0.5), tokens)

    for mask in ("query", "zero"):
        batched = decode_masked(model, test, head_mask(model, sets), mask, None, RetrievalParams(max_new_tokens=10))
        alone = [answered(greedy_generate(model, prompt, 10, hooks=mask_hooks(model, head_mask(model, [heads]), mask)).tokens)
                 for heads in sets]
        assert batched == alone
        assert len({tuple(t) for t in batched}) > 1  # the masks do change the answers


def test_rouge1_recall_counts_shared_words_with_multiplicity():
    assert rouge1_recall(["a", "b", "b"], ["b", "x", "a"]) == pytest.approx(2 / 3)
    assert rouge1_recall(["a"], []) == 0.0


def test_a_needle_the_model_never_retrieves_is_an_error_not_a_zero_score(wired):
    task = needle_task()
    # point the needle span at the haystack before it: the model never reproduces it
    for row in task.rows:
        row["needle_start"], row["needle_end"] = 1, 4
    with pytest.raises(WorkbenchError, match="retrieved the needle in none"):
        run("retrieval.score", wired, task, max_new_tokens=6)


def test_bad_retrieval_input_is_refused(wired, smollm2):
    with pytest.raises(WorkbenchError, match="needs a needle task"):
        run("retrieval.score", wired, build_task(wired, "induction", {"n_prompts": 2, "seq_len": 5}))
    with pytest.raises(WorkbenchError, match="exceeds the model's context"):
        run("retrieval.score", wired, needle_task(), max_new_tokens=40)
    with pytest.raises(WorkbenchError, match="too short for needle"):
        build_task(smollm2, "needle", {"context_lengths": [16]})
    with pytest.raises(WorkbenchError, match="longer than the model's context"):
        build_task(smollm2, "needle", {"context_lengths": [9000], "needles": [0], "depths": [0.5]})
    with pytest.raises(WorkbenchError, match="has no chat template; use prompt_format"):
        build_task(wired, "needle", {"prompt_format": "chat"})
    with pytest.raises(WorkbenchError, match="must be head counts"):
        run("retrieval.masking", wired, needle_task(), ks=[0])


def test_a_jsonl_task_with_needle_spans_scores_as_the_needle_task_does(wired, tmp_path):
    """The refusal above offers a JSONL task whose rows give needle_start/needle_end: such a file
    scores exactly as the same prompts built in memory; a half-given or out-of-range span is
    refused when the file is read."""
    import json

    task = needle_task()
    path = tmp_path / "needles.jsonl"
    path.write_text("".join(json.dumps({"clean": c, "corrupted": c, "answer": a, "wrong": w} | r) + "\n"
                            for c, a, w, r in zip(task.clean, task.answers, task.wrongs, task.rows)))
    from_file = run("retrieval.score", wired, build_task(wired, task_file=str(path)), max_new_tokens=6)
    in_memory = run("retrieval.score", wired, task, max_new_tokens=6)
    scores = from_file.metric("retrieval_score").set_index(["layer", "head"])["value"]
    assert scores.to_dict() == in_memory.metric("retrieval_score").set_index(["layer", "head"])["value"].to_dict()
    assert scores[(1, 0)] == pytest.approx(1.0)
    row = {"clean": task.clean[0], "corrupted": task.clean[0], "answer": 1, "wrong": 0}
    for extra, message in [({"needle_start": 3}, "needle_start alone"),
                           ({"needle_start": 3, "needle_end": len(task.clean[0]) + 1}, "must be token positions"),
                           ({"answer_text": "x"}, "needs a needle span")]:
        path.write_text(json.dumps(row | extra) + "\n")
        with pytest.raises(WorkbenchError, match=message):
            build_task(wired, task_file=str(path))
