import json

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.metrics import logit_diff
from workbench.tasks import TASKS, build_task
from workbench.tasks.ioi import single_token_names


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_generator_gives_valid_equal_length_pairs(smollm2, name):
    params = {"context_lengths": [200], "depths": [0.5]} if name == "needle" else {}
    task = build_task(smollm2, name, params)
    assert len(task) > 0
    for c, k, a, w in zip(task.clean, task.corrupted, task.answers, task.wrongs):
        assert len(c) == len(k) and c != k
        assert 0 <= a < smollm2.d_vocab and 0 <= w < smollm2.d_vocab and a != w


def test_generators_are_seeded(smollm2):
    a = build_task(smollm2, "ioi", {"seed": 1})
    assert build_task(smollm2, "ioi", {"seed": 1}).fingerprint() == a.fingerprint()
    assert build_task(smollm2, "ioi", {"seed": 2}).fingerprint() != a.fingerprint()


def test_ioi_structure(smollm2):
    task = build_task(smollm2, "ioi", {"n_prompts": 12})
    names = set(single_token_names(smollm2))
    for row in task.rows:
        io, s = row["answer"].strip(), row["wrong"].strip()
        words = row["clean"].replace(",", " ").replace(".", " ").split()
        assert words.count(io) == 1 and words.count(s) == 2
        used = [w for w in row["corrupted"].replace(",", " ").replace(".", " ").split() if w in names]
        assert len(used) == 3 and len(set(used)) == 3 and io not in used and s not in used


def test_induction_structure(smollm2):
    task = build_task(smollm2, "induction", {"n_prompts": 4, "seq_len": 10})
    for c, k, a in zip(task.clean, task.corrupted, task.answers):
        first, second = c[:10], c[10:]
        assert second == first[:-1] and a == first[-1]
        assert k[10:] == second and not set(k[:10]) & set(first)


def test_factual_answers_are_the_attributes(smollm2):
    task = build_task(smollm2, "factual", {"relations": ["capital"]})
    rows = {r["clean"]: r for r in task.rows}
    france = rows["The capital of France is"]
    i = task.rows.index(france)
    assert smollm2.decode([task.answers[i]]) == " Paris"
    assert smollm2.decode([task.wrongs[i]]) == france["wrong"]


def test_needle_is_where_the_row_says_and_only_in_clean(smollm2):
    task = build_task(smollm2, "needle", {"context_lengths": [300, 600], "depths": [0.0, 0.5, 1.0], "needles": [1]})
    assert len(task) == 6
    for c, k, row in zip(task.clean, task.corrupted, task.rows):
        assert len(c) == row["context_length"]
        span = smollm2.decode(c[row["needle_start"] : row["needle_end"]])
        assert "smoked paprika" in span
        assert "smoked paprika" not in smollm2.decode(k)
        assert abs(row["actual_depth"] - row["depth"]) < 0.25


def test_chat_formatted_needle_span_covers_exactly_the_needle_tokens(smollm2):
    from workbench.tasks.needle import NEEDLES

    task = build_task(smollm2, "needle", {"context_lengths": [300], "depths": [0.0, 0.5, 1.0], "needles": [3, 7]})
    reference = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    reference = list(reference if isinstance(reference, list) else reference["input_ids"])
    hello = smollm2.to_tokens("hello", prepend_bos=False)
    head, tail = reference[: reference.index(hello[0])], reference[reference.index(hello[0]) + len(hello):]
    for c, k, row in zip(task.clean, task.corrupted, task.rows):
        assert row["prompt_format"] == "chat" and len(c) == len(k) == row["context_length"]
        assert c[: len(head)] == head and c[-len(tail):] == tail  # the user turn of the model's own template
        needle_ids = smollm2.to_tokens(" " + NEEDLES[row["needle"]][0], prepend_bos=False)
        assert c[row["needle_start"] : row["needle_end"]] == needle_ids
        assert c[: row["needle_start"]] == k[: row["needle_start"]] and c[row["needle_end"]:] == k[row["needle_end"]:]
        assert NEEDLES[row["needle"]][2] not in smollm2.decode(k)
        inside = c[len(head): -len(tail)]
        assert not set(inside) & set(smollm2.tokenizer.all_special_ids)  # no end token closes the turn early
    plain = build_task(smollm2, "needle", {"context_lengths": [300], "depths": [0.5], "needles": [3], "prompt_format": "plain"})
    assert plain.clean[0][: len(head)] != head and plain.rows[0]["prompt_format"] == "plain"
    assert plain.fingerprint() != task.fingerprint()


def test_jsonl_task_with_mixed_lengths_reads_each_prompt_at_its_last_token(smollm2, tmp_path):
    rows = [
        {"clean": "The capital of France is", "corrupted": "The capital of Italy is", "answer": " Paris", "wrong": " Rome"},
        {"clean": "When Mary and John went to the store, John gave a drink to",
         "corrupted": "When Alice and Bob went to the store, Carl gave a drink to", "answer": " Mary", "wrong": " John"},
    ]
    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    task = build_task(smollm2, task_file=str(f))
    tokens, lengths = task.tokens()
    with torch.no_grad():
        padded = logit_diff(smollm2.tl(tokens), lengths, task.answer_ids(), task.wrong_ids())
        for i, c in enumerate(task.clean):
            alone = smollm2.tl(torch.tensor([c]))[0, -1]
            assert padded[i].item() == pytest.approx((alone[task.answers[i]] - alone[task.wrongs[i]]).item(), abs=1e-4)


def test_token_id_rows_for_models_without_tokenizer(toy, tmp_path):
    f = tmp_path / "ids.jsonl"
    f.write_text(json.dumps({"clean": [1, 2, 3, 4], "corrupted": [5, 6, 7, 8], "answer": 9, "wrong": 10}) + "\n")
    task = build_task(toy, task_file=str(f))
    assert task.clean == [[1, 2, 3, 4]] and task.answers == [9]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"clean": "The capital of France is", "corrupted": "The capital of the United Kingdom is", "answer": " Paris", "wrong": " London"},
         r"line 1: clean prompt is 5 tokens but corrupted is [6-9]"),
        ({"clean": "The capital of France is", "corrupted": "The capital of Italy is", "answer": " Parisienne fries", "wrong": " Rome"},
         "answers must be a single token"),
        ({"clean": "The capital of France is", "corrupted": "The capital of Italy is", "answer": " Paris"}, "lacks \\['wrong'\\]"),
    ],
)
def test_bad_rows_are_refused_naming_the_row(smollm2, tmp_path, row, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(row) + "\n")
    with pytest.raises(WorkbenchError, match=message):
        build_task(smollm2, task_file=str(f))


def test_context_longer_than_the_model_is_refused(toy, tmp_path):
    f = tmp_path / "long.jsonl"
    f.write_text(json.dumps({"clean": [1] * 65, "corrupted": [2] * 65, "answer": 3, "wrong": 4}) + "\n")
    with pytest.raises(WorkbenchError, match="longer than the model's context of 64"):
        build_task(toy, task_file=str(f))


def test_empty_task_and_unknown_names_are_refused(smollm2, tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n")
    with pytest.raises(WorkbenchError, match="has no prompts"):
        build_task(smollm2, task_file=str(f))
    with pytest.raises(WorkbenchError, match="unknown task 'nope'"):
        build_task(smollm2, "nope")
    with pytest.raises(WorkbenchError, match="has no parameter\\(s\\) \\['n_prompt'\\]"):
        build_task(smollm2, "ioi", {"n_prompt": 3})
    with pytest.raises(WorkbenchError, match="should be int"):
        build_task(smollm2, "ioi", {"n_prompts": "many"})
