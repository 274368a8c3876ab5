"""Reciprocal actions, a second task of IOI's structure: "Yesterday Mary met John at the park.
Today John met" -> " Mary". Two names, the second mention repeats one (here the object, in IOI the
subject), and the answer is the other: a name copied from the context while the repeated one is
suppressed. Corrupted prompts are ABC-style as in IOI (three other names, nothing repeats);
answers stay the clean ones. Names are single tokens, so clean and corrupted have equal length.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from workbench.errors import WorkbenchError
from workbench.params import require
from workbench.tasks.base import Task, pad_id
from workbench.tasks.ioi import PLACES, single_token_names

TEMPLATES = (
    "Yesterday {A} met {B} at the {PLACE}. Today {B} met",
    "In the morning {A} called {B} from the {PLACE}. In the evening {B} called",
    "First {A} saw {B} at the {PLACE}, and then {B} saw",
)


@dataclass(frozen=True)
class ReciprocalParams:
    n_prompts: int = 16
    seed: int = 0

    def __post_init__(self):
        require(self.n_prompts >= 1, f"n_prompts = {self.n_prompts} must be at least 1")


def build_reciprocal(model, p: ReciprocalParams) -> Task:
    names = single_token_names(model)
    if len(names) < 5:
        raise WorkbenchError(f"model '{model.name}' has only {len(names)} single-token names; the task needs 5")
    rng = random.Random(p.seed)
    clean, corrupted, answers, wrongs, rows = [], [], [], [], []
    for _ in range(p.n_prompts):
        template, place = rng.choice(TEMPLATES), rng.choice(PLACES)
        a, b, x, y, z = rng.sample(names, 5)
        clean_text = template.format(A=a, B=b, PLACE=place)
        corrupt_text = template.replace("{B}", "{C}", 1).format(A=x, B=z, C=y, PLACE=place)
        clean.append(model.to_tokens(clean_text))
        corrupted.append(model.to_tokens(corrupt_text))
        answers.append(model.single_token(" " + a))
        wrongs.append(model.single_token(" " + b))
        rows.append(dict(clean=clean_text, corrupted=corrupt_text, answer=" " + a, wrong=" " + b,
                         template=TEMPLATES.index(template)))
    return Task("reciprocal", {}, clean, corrupted, answers, wrongs, rows, pad_id(model))
