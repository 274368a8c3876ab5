"""User prompt sets from a JSONL file: one row per line,
`{"clean": ..., "corrupted": ..., "answer": ..., "wrong": ...}`.

Text rows are tokenized by the model; for models without a tokenizer `clean`/`corrupted` are
lists of token ids and `answer`/`wrong` token ids. Prompts may differ in length across rows.

A row may also mark a needle for retrieval scoring: `needle_start` and `needle_end` (token
positions in the clean prompt as the model tokenizes it, BOS included where it prepends one; end
exclusive), and optionally `answer_text`, the words a retrieved needle is scored against.
"""

from __future__ import annotations

import json
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.tasks.base import Task, pad_id

FIELDS = ("clean", "corrupted", "answer", "wrong")
NEEDLE = ("needle_start", "needle_end")


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
        kept = {k: row[k] for k in FIELDS if isinstance(row[k], str)}
        rows.append(kept | _needle(row, len(clean[-1]), path, n))
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


def _needle(row: dict, length: int, path, n) -> dict:
    """The row's needle span (and answer text), checked against its clean prompt's `length` tokens."""
    given = [k for k in NEEDLE if k in row]
    if not given:
        if "answer_text" in row:
            raise WorkbenchError(f"{path} line {n}: 'answer_text' needs a needle span; add needle_start and needle_end")
        return {}
    if len(given) == 1:
        raise WorkbenchError(f"{path} line {n} gives {given[0]} alone; a needle needs both needle_start and needle_end")
    start, end = row["needle_start"], row["needle_end"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)) or not 0 <= start < end <= length:
        raise WorkbenchError(f"{path} line {n}: needle span [{start}, {end}) must be token positions with "
                             f"0 <= needle_start < needle_end <= {length}, the clean prompt's length")
    out = {"needle_start": start, "needle_end": end}
    if "answer_text" in row:
        if not isinstance(row["answer_text"], str) or not row["answer_text"].strip():
            raise WorkbenchError(f"{path} line {n}: 'answer_text' must be non-empty text")
        out["answer_text"] = row["answer_text"]
    return out
