"""Induction: a random token sequence followed by its repeat; the answer is the next token of the
repeat, which only an induction mechanism (look back to the earlier copy, copy what followed)
can predict.

Clean: [BOS] s_1..s_n s_1..s_{n-1} -> s_n. Corrupted: the first copy replaced by other random
tokens r_1..r_n, so the context is identical near the end but there is nothing to copy; the
wrong answer is r_n, a random token of the same kind.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from workbench.errors import WorkbenchError
from workbench.tasks.base import Task, pad_id


@dataclass
class InductionParams:
    n_prompts: int = 16
    seq_len: int = 20
    seed: int = 0


def ordinary_token_ids(model) -> list[int]:
    """Token ids safe to sample: not special tokens, and (with a tokenizer) that round-trip as text."""
    tok = model.tokenizer
    if tok is None:
        return list(range(model.d_vocab))
    special = set(tok.all_special_ids)
    return [i for i in range(min(model.d_vocab, len(tok))) if i not in special]


def build_induction(model, p: InductionParams) -> Task:
    if p.seq_len < 2:
        raise WorkbenchError("induction seq_len must be at least 2")
    vocab = ordinary_token_ids(model)
    rng = random.Random(p.seed)
    bos = model.to_tokens("")[:1] if model.tokenizer is not None and model.identity.prepend_bos else []
    clean, corrupted, answers, wrongs, rows = [], [], [], [], []
    for _ in range(p.n_prompts):
        seq = rng.sample(vocab, 2 * p.seq_len)
        s, r = seq[: p.seq_len], seq[p.seq_len :]
        clean.append(bos + s + s[:-1])
        corrupted.append(bos + r + s[:-1])
        answers.append(s[-1])
        wrongs.append(r[-1])
        rows.append(dict(first_copy_start=len(bos), repeat_start=len(bos) + p.seq_len))
    return Task("induction", {}, clean, corrupted, answers, wrongs, rows, pad_id(model))
