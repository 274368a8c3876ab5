"""The task type: token-level clean/corrupted prompt pairs with answer and wrong-answer tokens.

Tasks are built against a model (tokenization is the model's), validated once, and
fingerprinted by their tokens so the store can key results on exactly the prompts used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from workbench.errors import WorkbenchError


@dataclass
class Task:
    """A prompt set. Row i: `clean[i]` and `corrupted[i]` (same length), `answers[i]` is the
    correct next token after the last clean token, `wrongs[i]` the competing one.

    Prompts in one task may differ in length; `tokens()` right-pads and returns each row's
    length so metrics read each prompt at its own last token.
    """

    name: str
    params: dict[str, Any]
    clean: list[list[int]]
    corrupted: list[list[int]]
    answers: list[int]
    wrongs: list[int]
    rows: list[dict[str, Any]] = field(default_factory=list)
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.clean)

    def tokens(self, which: str = "clean", device=None) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch"]]:
        """Right-padded token ids and per-row lengths for `which` in {clean, corrupted}."""
        seqs = {"clean": self.clean, "corrupted": self.corrupted}[which]
        lengths = torch.tensor([len(s) for s in seqs], device=device)
        out = torch.full((len(seqs), int(lengths.max())), self.pad_id, dtype=torch.long, device=device)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return out, lengths

    def answer_ids(self, device=None) -> Int[Tensor, "batch"]:
        return torch.tensor(self.answers, dtype=torch.long, device=device)

    def wrong_ids(self, device=None) -> Int[Tensor, "batch"]:
        return torch.tensor(self.wrongs, dtype=torch.long, device=device)

    def fingerprint(self) -> str:
        """sha256 of the tokens and answers: any change to the prompts changes it."""
        payload = json.dumps([self.clean, self.corrupted, self.answers, self.wrongs], separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()

    def spec(self) -> dict[str, Any]:
        """What the store keys on: the generator, its parameters and the exact tokens."""
        return {"name": self.name, "params": self.params, "fingerprint": self.fingerprint()}

    def frame(self) -> pd.DataFrame:
        """One row per prompt: lengths, answer ids and whatever text/metadata the builder kept."""
        base = pd.DataFrame(
            {
                "prompt": range(len(self)),
                "length": [len(s) for s in self.clean],
                "answer_id": self.answers,
                "wrong_id": self.wrongs,
            }
        )
        if self.rows:
            base = pd.concat([base, pd.DataFrame(self.rows)], axis=1)
        return base


def validate(task: Task, model) -> Task:
    """Refuse a task the model cannot run, naming the first offending row."""
    if len(task) == 0:
        raise WorkbenchError(f"task '{task.name}' has no prompts; add rows or change its parameters")
    n = len(task)
    if not (len(task.corrupted) == len(task.answers) == len(task.wrongs) == n):
        raise WorkbenchError(f"task '{task.name}' has unequal numbers of clean, corrupted and answer entries")
    for i, (c, k) in enumerate(zip(task.clean, task.corrupted)):
        if len(c) != len(k):
            raise WorkbenchError(
                f"task '{task.name}' row {i}: clean prompt is {len(c)} tokens but corrupted is {len(k)}; "
                "make them tokenize to the same length (e.g. swap names or subjects of equal token length)"
            )
        if len(c) == 0:
            raise WorkbenchError(f"task '{task.name}' row {i}: empty prompt")
        if len(c) > model.n_ctx:
            raise WorkbenchError(
                f"task '{task.name}' row {i}: prompt is {len(c)} tokens, longer than the model's context of {model.n_ctx}; shorten it"
            )
        bad = [t for t in (*c, *k, task.answers[i], task.wrongs[i]) if not 0 <= t < model.d_vocab]
        if bad:
            raise WorkbenchError(f"task '{task.name}' row {i}: token id {bad[0]} is outside the vocabulary (0..{model.d_vocab - 1})")
    return task


def pad_id(model) -> int:
    tok = model.tokenizer
    if tok is not None and tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    return 0
