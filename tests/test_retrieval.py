"""Retrieval-head scoring and the masking check: a hand-wired copying head scores 1 and the others
0; the KV-cache decode reads the same attention argmax as a full forward; bad input is refused."""

import tempfile

import pytest
import torch

from conftest import make_toy_tl
from toy_circuits import make_induction_toy, needle_prompt
from workbench.errors import WorkbenchError
from workbench.models import from_hooked_transformer
from workbench.runner import run_method
from workbench.store import Store
from workbench.tasks import build_task
from workbench.tasks.base import Task
from circuits.retrieval import accuracy, greedy_generate, mask_hooks, needle_tests, rouge1_recall, RetrievalParams


def run(method, model, task, **params):
    """Through the runner, into a fresh store (masking resolves the scores it needs there)."""
    return run_method(model, task, method, params, Store(tempfile.mkdtemp()))


@pytest.fixture(scope="module")
def wired():
    return from_hooked_transformer(make_induction_toy(), "wired-induction")


def needle_task(seeds=(0, 1, 2)):
    clean, rows = [], []
    for s in seeds:
        prompt, start, end = needle_prompt(seed=s)
        clean.append(prompt)
        rows.append(dict(needle_start=start, needle_end=end))
    return Task("toy-needle", {}, clean, [list(c) for c in clean], [c[-1] for c in clean], [0] * len(clean), rows)


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


def test_decode_argmax_equals_the_full_forward_pattern_argmax():
    tl = make_toy_tl(n_layers=2, seed=7, attn_only=False, normalization_type="LN")
    model = from_hooked_transformer(tl, "toy")
    prompt = torch.randint(0, 50, (20,)).tolist()
    gen = greedy_generate(model, prompt, 8, track_argmax=True)
    assert len(gen.tokens) == 8
    full = torch.tensor([prompt + gen.tokens])
    with torch.no_grad():
        logits, cache = tl.run_with_cache(full)
    assert logits[0, len(prompt) - 1 : -1].argmax(-1).tolist() == gen.tokens  # the same greedy continuation
    for step in range(8):
        q = len(prompt) - 1 + step
        expected = torch.stack([cache["pattern", layer][0, :, q].argmax(-1) for layer in range(2)])
        assert torch.equal(gen.argmax[step], expected)


def test_masking_the_copying_head_breaks_retrieval_and_masking_the_idle_head_does_not(wired):
    task = needle_task()
    params = RetrievalParams(max_new_tokens=6)
    tests = needle_tests(wired, task, 6)
    for mask in ("query", "zero", "mean"):
        means = {f"blocks.{layer}.attn.hook_z": torch.zeros(2, wired.d_head) for layer in range(2)} if mask == "mean" else None
        assert accuracy(wired, tests, params, mask_hooks(wired, [(1, 0)], mask, means), "") == 0.0
        assert accuracy(wired, tests, params, mask_hooks(wired, [(1, 1)], mask, means), "") == 1.0
    result = run("retrieval.masking", wired, task, max_new_tokens=6, ks=[1], n_random=2)
    frame = result.metric("needle_accuracy")
    assert frame[frame["masked"] == "none"]["value"].item() == 1.0
    top = frame[frame["masked"] == "retrieval"]
    assert top["value"].item() == 0.0 and top["heads"].item() == ["L1H0"]
    assert {h for heads in frame[frame["masked"] == "random"]["heads"] for h in heads} <= {"L0H0", "L0H1", "L1H1"}


def test_masking_reads_the_stored_scores_it_needs(wired, tmp_path):
    task, store = needle_task(), Store(tmp_path / "s")
    scores = run_method(wired, task, "retrieval.score", {"max_new_tokens": 6}, store)
    masked = run_method(wired, task, "retrieval.masking", {"max_new_tokens": 6, "ks": [1], "n_random": 1}, store)
    assert masked.meta["scores_run"] == scores.run_id and masked.meta["spec"]["needs"] == {"scores": scores.meta["key"]}
    assert len(store.catalog()) == 2  # the scores were read, not computed again
    other = run_method(wired, task, "retrieval.masking", {"max_new_tokens": 5, "ks": [1], "n_random": 1}, store)
    assert other.meta["scores_run"] != scores.run_id  # other scoring parameters: other scores, other key


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
    with pytest.raises(WorkbenchError, match="must be head counts"):
        run("retrieval.masking", wired, needle_task(), ks=[0])
