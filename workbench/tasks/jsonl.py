"""User prompt sets from a JSONL file: one row per line,
`{"clean": ..., "corrupted": ..., "answer": ..., "wrong": ...}`.

Text rows are tokenized by the model; for models without a tokenizer `clean`/`corrupted` are
lists of token ids and `answer`/`wrong` token ids. Prompts may differ in length across rows.
"""

from __future__ import annotations

import json
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.tasks.base import Task, pad_id

FIELDS = ("clean", "corrupted", "answer", "wrong")


def load_jsonl_task(model, path: str | Path) -> Task:
    path = Path(path).expanduser()
    if not path.is_file():
        raise WorkbenchError(f"task file {path} does not exist")
    clean, corrupted, answers, wrongs, rows = [], [], [], [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise WorkbenchError(f"{path} line {n} is not valid JSON ({e.msg})") from None
        missing = [f for f in FIELDS if not isinstance(row, dict) or f not in row]
        if missing:
            raise WorkbenchError(f"{path} line {n} lacks {missing}; each row needs {list(FIELDS)}")
        clean.append(_prompt(model, row["clean"], path, n, "clean"))
        corrupted.append(_prompt(model, row["corrupted"], path, n, "corrupted"))
        answers.append(_answer(model, row["answer"], path, n, "answer"))
        wrongs.append(_answer(model, row["wrong"], path, n, "wrong"))
        if len(clean[-1]) != len(corrupted[-1]):
            raise WorkbenchError(
                f"{path} line {n}: clean prompt is {len(clean[-1])} tokens but corrupted is {len(corrupted[-1])}; "
                "they must tokenize to the same length"
            )
        rows.append({k: row[k] for k in FIELDS if isinstance(row[k], str)})
    return Task(f"file:{path.name}", {"path": str(path.resolve())}, clean, corrupted, answers, wrongs, rows, pad_id(model))


def _prompt(model, value, path, n, field) -> list[int]:
    if isinstance(value, str):
        return model.to_tokens(value)
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return list(value)
    raise WorkbenchError(f"{path} line {n}: '{field}' must be text or a non-empty list of token ids")


def _answer(model, value, path, n, field) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return model.single_token(value)
        except WorkbenchError as e:
            raise WorkbenchError(f"{path} line {n} '{field}': {e}") from None
    raise WorkbenchError(f"{path} line {n}: '{field}' must be a single-token string or a token id")
