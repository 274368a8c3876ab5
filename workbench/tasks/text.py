"""Next-token prediction on windows of a corpus: clean = a window, answer = the token that
follows it; corrupted = another window of the same length, wrong = the token that follows that.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from workbench.corpus import DEFAULT_CORPUS, corpus_tokens
from workbench.tasks.base import Task, pad_id


@dataclass
class TextParams:
    corpus: str = DEFAULT_CORPUS
    n_prompts: int = 16
    seq_len: int = 64
    seed: int = 0


def build_text(model, p: TextParams) -> Task:
    n_windows = 2 * p.n_prompts
    stream = corpus_tokens(model, p.corpus, n_tokens=n_windows * (p.seq_len + 1))
    windows = [stream[i * (p.seq_len + 1) : (i + 1) * (p.seq_len + 1)] for i in range(n_windows)]
    random.Random(p.seed).shuffle(windows)
    bos = model.to_tokens("") if model.tokenizer is not None else []
    clean, corrupted = windows[: p.n_prompts], windows[p.n_prompts :]
    return Task(
        "corpus", {},
        [bos + w[:-1] for w in clean], [bos + w[:-1] for w in corrupted],
        [w[-1] for w in clean], [w[-1] for w in corrupted],
        [], pad_id(model),
    )
