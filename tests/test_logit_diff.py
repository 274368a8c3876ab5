import pytest
import torch

from workbench.runner import run_method
from workbench.tasks import build_task


def manual_logit_diffs(model, seqs, answers, wrongs):
    out = []
    with torch.no_grad():
        for s, a, w in zip(seqs, answers, wrongs):
            last = model.tl(torch.tensor([s]))[0, -1]
            out.append((last[a] - last[w]).item())
    return out


def test_logit_diff_matches_one_prompt_at_a_time(toy, store):
    task = build_task(toy, "induction", {"n_prompts": 6, "seq_len": 7})
    result = run_method(toy, task, "logit_diff", {"batch_size": 4}, store)
    for which, seqs in (("clean", task.clean), ("corrupted", task.corrupted)):
        rows = result.metric(f"logit_diff_{which}").sort_values("prompt")
        expected = manual_logit_diffs(toy, seqs, task.answers, task.wrongs)
        assert rows["value"].tolist() == pytest.approx(expected, abs=1e-5)
        assert result.value(f"logit_diff_{which}_mean") == pytest.approx(sum(expected) / len(expected), abs=1e-5)


def test_logit_diff_is_stored_and_read_back(toy, store):
    task = build_task(toy, "induction", {"n_prompts": 3, "seq_len": 5})
    first = run_method(toy, task, "logit_diff", {}, store)
    again = run_method(toy, task, "logit_diff", {}, store)
    assert first.meta["cached"] is False and again.meta["cached"] is True
    assert again.run_id == first.run_id
    assert again.scores["value"].tolist() == pytest.approx(first.scores["value"].tolist())
    other = run_method(toy, task, "logit_diff", {"batch_size": 1}, store)
    assert other.run_id != first.run_id
    assert other.scores["value"].tolist() == pytest.approx(first.scores["value"].tolist(), abs=1e-5)


def test_embedded_model_prefers_the_indirect_object(smollm2, store):
    task = build_task(smollm2, "ioi", {"n_prompts": 8})
    result = run_method(smollm2, task, "logit_diff", {}, store)
    clean, corrupted = result.value("logit_diff_clean_mean"), result.value("logit_diff_corrupted_mean")
    assert clean > 3.0 and abs(corrupted) < 1.5
    assert (result.metric("logit_diff_clean")["value"] > 0).all()
