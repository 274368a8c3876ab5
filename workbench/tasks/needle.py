"""Needle in a haystack (as in Wu et al. 2024): a needle sentence inserted at a sentence boundary
at a chosen depth of a haystack of a chosen token length, then a question about it.

One prompt per (needle, context length, depth). The answer token is the first token of the
needle's answer; the wrong token is the first answer token of another needle. The corrupted
prompt is the same haystack with the needle's tokens replaced by as many further haystack
tokens, so it has the same length and no needle. Each row records the needle's token span
(`needle_start`, `needle_end`, end exclusive), which retrieval scoring reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.corpus import DEFAULT_CORPUS, corpus_tokens
from workbench.errors import WorkbenchError
from workbench.tasks.base import Task, pad_id

NEEDLES = (
    ("The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
     "What is the best thing to do in San Francisco?", "eat a sandwich and sit in Dolores Park on a sunny day"),
    ("The secret ingredient in grandmother's soup is a spoonful of smoked paprika.",
     "What is the secret ingredient in grandmother's soup?", "a spoonful of smoked paprika"),
    ("The password to the old lighthouse is blue harbor seventeen.",
     "What is the password to the old lighthouse?", "blue harbor seventeen"),
)
QUESTION_FORMAT = "\n\nAnswer the question using the text above.\nQuestion: {question}\nAnswer:"


@dataclass
class NeedleParams:
    context_lengths: list[int] = (256, 512)
    depths: list[float] = (0.0, 0.5, 1.0)
    needles: list[int] | None = None
    corpus: str = DEFAULT_CORPUS


def _sentence_ends(model, tokens: list[int]) -> list[int]:
    """Positions i where a sentence ends right before token i (0 and len count as boundaries)."""
    strs = model.to_str_tokens(tokens)
    return [0] + [i + 1 for i, s in enumerate(strs) if s.rstrip().endswith((".", "!", "?"))] + [len(tokens)]


def build_needle(model, p: NeedleParams) -> Task:
    idx = list(p.needles) if p.needles is not None else list(range(len(NEEDLES)))
    if any(not 0 <= i < len(NEEDLES) for i in idx):
        raise WorkbenchError(f"needle indices must be in 0..{len(NEEDLES) - 1}")
    if any(not 0.0 <= d <= 1.0 for d in p.depths):
        raise WorkbenchError("needle depths must lie in [0, 1] (0 = start of the haystack, 1 = end)")
    bos = model.to_tokens("")
    longest = max(p.context_lengths)
    hay = corpus_tokens(model, p.corpus, n_tokens=longest + 64)
    first_tokens = [model.to_tokens(" " + a, prepend_bos=False)[0] for _, _, a in NEEDLES]
    clean, corrupted, answers, wrongs, rows = [], [], [], [], []
    for n in idx:
        needle, question, answer = NEEDLES[n]
        needle_ids = model.to_tokens(" " + needle, prepend_bos=False)
        q_ids = model.to_tokens(QUESTION_FORMAT.format(question=question), prepend_bos=False)
        for length in p.context_lengths:
            budget = length - len(bos) - len(needle_ids) - len(q_ids)
            if budget < 1:
                raise WorkbenchError(f"context length {length} is too short for needle {n}; use at least {length - budget + 1}")
            base = hay[:budget]
            filler = hay[budget : budget + len(needle_ids)]
            ends = _sentence_ends(model, base)
            for depth in p.depths:
                at = min(ends, key=lambda e: abs(e - depth * budget))
                start = len(bos) + at
                clean.append(bos + base[:at] + needle_ids + base[at:] + q_ids)
                corrupted.append(bos + base[:at] + filler + base[at:] + q_ids)
                answers.append(first_tokens[n])
                wrongs.append(first_tokens[(n + 1) % len(NEEDLES)])
                rows.append(dict(needle=n, context_length=length, depth=depth, actual_depth=at / budget,
                                 needle_start=start, needle_end=start + len(needle_ids),
                                 question=question, answer_text=answer))
    return Task("needle", {}, clean, corrupted, answers, wrongs, rows, pad_id(model))
