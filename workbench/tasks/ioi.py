"""Indirect object identification (Wang et al. 2022): "When Mary and John went to the store, John
gave a drink to" -> " Mary" (the indirect object) rather than " John" (the subject).

Corrupted prompts are the ABC variant: the same sentence with the three name slots filled by
three other names, so no name repeats and the IO/S information is gone; answers stay the clean
IO (correct) and S (wrong). Names are kept only when they are one token (with a leading space)
for the model's tokenizer, so clean and corrupted prompts have equal length by construction.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from workbench.errors import WorkbenchError
from workbench.tasks.base import Task, pad_id

# {A} and {B} are the first two names, {S} the repeated subject; IO is whichever of A, B is not S.
TEMPLATES = (
    "When {A} and {B} went to the {PLACE}, {S} gave a {OBJECT} to",
    "When {A} and {B} got a {OBJECT} at the {PLACE}, {S} decided to give it to",
    "After {A} and {B} went to the {PLACE}, {S} gave a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE}, {S} gave a {OBJECT} to",
    "Then, {A} and {B} had a long argument, and afterwards {S} said to",
    "Friends {A} and {B} found a {OBJECT} at the {PLACE}. {S} gave it to",
    "The {PLACE} {A} and {B} went to had a {OBJECT}. {S} gave it to",
)
NAMES = (
    "Mary John Alice Bob Tom James Sarah David Michael Emma Anna Paul Kevin Laura Daniel Lisa Mark "
    "Peter Jessica Andrew Rachel Steven Karen Ryan Linda Brian Amy Jason Emily Jack George Kate "
    "Sam Lucy Adam Helen Chris Susan Eric Grace Frank Alex Ben Max Jane Dan Mike Joe Tim Henry"
).split()
PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "station", "park", "house")
OBJECTS = ("drink", "ring", "kiss", "bone", "basketball", "computer", "necklace", "snack", "bottle")


@dataclass
class IOIParams:
    n_prompts: int = 16
    seed: int = 0
    templates: list[str] | None = None


def single_token_names(model, candidates=NAMES) -> list[str]:
    return [n for n in candidates if len(model.to_tokens(" " + n, prepend_bos=False)) == 1]


def build_ioi(model, p: IOIParams) -> Task:
    templates = p.templates or list(TEMPLATES)
    for t in templates:
        missing = [slot for slot in ("{A}", "{B}", "{S}") if slot not in t]
        if missing:
            raise WorkbenchError(f"IOI template {t!r} lacks {missing}; templates use {{A}}, {{B}} and {{S}}")
    names = single_token_names(model)
    if len(names) < 5:
        raise WorkbenchError(f"model '{model.name}' has only {len(names)} single-token names; IOI needs 5")
    rng = random.Random(p.seed)
    clean, corrupted, answers, wrongs, rows = [], [], [], [], []
    for _ in range(p.n_prompts):
        template = rng.choice(templates)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        io, s, x, y, z = rng.sample(names, 5)
        a, b = (io, s) if rng.random() < 0.5 else (s, io)
        fill = dict(PLACE=place, OBJECT=obj)
        clean_text = template.format(A=a, B=b, S=s, **fill)
        corrupt_text = template.format(A=x, B=y, S=z, **fill)
        clean.append(model.to_tokens(clean_text))
        corrupted.append(model.to_tokens(corrupt_text))
        answers.append(model.single_token(" " + io))
        wrongs.append(model.single_token(" " + s))
        rows.append(dict(clean=clean_text, corrupted=corrupt_text, answer=" " + io, wrong=" " + s,
                         order="ABBA" if a == io else "BABA", template=templates.index(template)))
    return Task("ioi", {}, clean, corrupted, answers, wrongs, rows, pad_id(model))
