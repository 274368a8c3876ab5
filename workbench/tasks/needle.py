"""Needle in a haystack (as in Wu et al. 2024): a needle sentence inserted at a sentence boundary
at a chosen depth of a haystack of a chosen token length, then a question about it.

One prompt per (needle, context length, depth). The answer token is the first token of the
needle's answer; the wrong token is the first answer token of another needle. The corrupted
prompt is the same haystack with the needle's tokens replaced by as many further haystack
tokens, so it has the same length and no needle. Each row records the needle's token span
(`needle_start`, `needle_end`, end exclusive), which retrieval scoring reads.

`prompt_format`: an instruct model answers a bare prompt with its end token at once, so by
default (`auto`) the haystack and question are the user turn of the model's own chat template,
with the generation prompt added, as the paper's reference code formats instruct models; `plain`
is the bare text. The prompt is assembled at the token level (template prefix + haystack + needle
+ question + template suffix), so the needle span is exact in either format. Inside a user turn
the corpus's document separators (the end token) would close the turn, so there they become a
blank line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
    ("The key to the garden shed is hidden under the third flowerpot.",
     "Where is the key to the garden shed hidden?", "under the third flowerpot"),
    ("The name of the captain's parrot is Admiral Pickles.",
     "What is the name of the captain's parrot?", "Admiral Pickles"),
    ("The train to the mountain village leaves every morning at seven fifteen.",
     "When does the train to the mountain village leave?", "every morning at seven fifteen"),
    ("The museum's most famous painting shows a green horse jumping over the moon.",
     "What does the museum's most famous painting show?", "a green horse jumping over the moon"),
    ("The winner of the village baking contest made lemon cake with lavender icing.",
     "What did the winner of the village baking contest make?", "lemon cake with lavender icing"),
    ("The professor keeps her spare glasses in a red tin on the top shelf.",
     "Where does the professor keep her spare glasses?", "in a red tin on the top shelf"),
    ("The lost hiker survived by drinking melted snow and eating wild berries.",
     "How did the lost hiker survive?", "by drinking melted snow and eating wild berries"),
)
QUESTION_FORMAT = "\n\nAnswer the question using the text above.\nQuestion: {question}\nAnswer:"
_SLOT = "\x00NEEDLE-TASK-CONTENT\x00"


@dataclass
class NeedleParams:
    context_lengths: list[int] = (256, 512)
    depths: list[float] = (0.0, 0.5, 1.0)
    needles: list[int] | None = None
    corpus: str = DEFAULT_CORPUS
    prompt_format: Literal["auto", "chat", "plain"] = "auto"


def _sentence_ends(model, tokens: list[int]) -> list[int]:
    """Positions i where a sentence ends right before token i (0 and len count as boundaries)."""
    strs = model.to_str_tokens(tokens)
    return [0] + [i + 1 for i, s in enumerate(strs) if s.rstrip().endswith((".", "!", "?"))] + [len(tokens)]


def has_chat_template(model) -> bool:
    return model.tokenizer is not None and bool(getattr(model.tokenizer, "chat_template", None))


def chat_frame(model) -> tuple[list[int], list[int]]:
    """Token ids before and after the user turn's content in the model's chat template (with the
    generation prompt), so content tokens can be placed between them unchanged."""
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": _SLOT}], tokenize=False,
                                               add_generation_prompt=True)
    before, after = text.split(_SLOT)
    return model.to_tokens(before, prepend_bos=False), model.to_tokens(after, prepend_bos=False)


def resolve_format(model, prompt_format: str) -> str:
    if prompt_format == "plain":
        return "plain"
    if has_chat_template(model):
        return "chat"
    if prompt_format == "chat":
        raise WorkbenchError(f"model '{model.name}' has no chat template; use prompt_format = \"plain\" (or \"auto\")")
    return "plain"


def build_needle(model, p: NeedleParams) -> Task:
    idx = list(p.needles) if p.needles is not None else list(range(len(NEEDLES)))
    if any(not 0 <= i < len(NEEDLES) for i in idx):
        raise WorkbenchError(f"needle indices must be in 0..{len(NEEDLES) - 1}")
    if any(not 0.0 <= d <= 1.0 for d in p.depths):
        raise WorkbenchError("needle depths must lie in [0, 1] (0 = start of the haystack, 1 = end)")
    fmt = resolve_format(model, p.prompt_format)
    longest = max(p.context_lengths)
    hay = corpus_tokens(model, p.corpus, n_tokens=longest + 64)
    if fmt == "chat":
        head, tail = chat_frame(model)
        blank = model.to_tokens("\n\n", prepend_bos=False)
        specials = set(model.tokenizer.all_special_ids)
        hay = [t for tok in hay for t in (blank if tok in specials else [tok])][: longest + 64]
        answer_prefix = ""  # the answer opens the assistant turn
    else:
        head, tail = model.to_tokens(""), []
        answer_prefix = " "
    first_tokens = [model.to_tokens(answer_prefix + a, prepend_bos=False)[0] for _, _, a in NEEDLES]
    clean, corrupted, answers, wrongs, rows = [], [], [], [], []
    for n in idx:
        needle, question, answer = NEEDLES[n]
        needle_ids = model.to_tokens(" " + needle, prepend_bos=False)
        q_ids = model.to_tokens(QUESTION_FORMAT.format(question=question), prepend_bos=False) + tail
        for length in p.context_lengths:
            budget = length - len(head) - len(needle_ids) - len(q_ids)
            if budget < 1:
                raise WorkbenchError(f"context length {length} is too short for needle {n}; use at least {length - budget + 1}")
            base = hay[:budget]
            filler = hay[budget : budget + len(needle_ids)]
            ends = _sentence_ends(model, base)
            for depth in p.depths:
                at = min(ends, key=lambda e: abs(e - depth * budget))
                start = len(head) + at
                clean.append(head + base[:at] + needle_ids + base[at:] + q_ids)
                corrupted.append(head + base[:at] + filler + base[at:] + q_ids)
                answers.append(first_tokens[n])
                wrongs.append(first_tokens[(n + 1) % len(NEEDLES)])
                rows.append(dict(needle=n, context_length=length, depth=depth, actual_depth=at / budget,
                                 needle_start=start, needle_end=start + len(needle_ids),
                                 question=question, answer_text=answer, prompt_format=fmt))
    return Task("needle", {}, clean, corrupted, answers, wrongs, rows, pad_id(model))
