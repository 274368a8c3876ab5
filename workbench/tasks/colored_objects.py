"""Colored objects (the BIG-bench task Merullo et al. compare IOI with): "On the table there is a
red pen, a blue cup and a green book. The color of the cup is" -> " blue".

Like IOI, the answer is a word copied from the context by attending to the right one of several
candidates. The corrupted prompt asks about another object of the same sentence, so it is the
same length and its answer (the wrong answer here) is that object's color. Colors and objects are
kept only when they are one token (with a leading space) for the model's tokenizer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from workbench.errors import WorkbenchError
from workbench.params import require
from workbench.tasks.base import Task, pad_id

COLORS = ("red", "blue", "green", "yellow", "black", "white", "pink", "orange", "purple", "brown", "gray")
OBJECTS = ("pen", "cup", "book", "ball", "hat", "key", "box", "shoe", "phone", "bag", "lamp", "clock", "plate", "chair")
TEMPLATE = "On the table there is a {c0} {o0}, a {c1} {o1} and a {c2} {o2}. The color of the {q} is"


@dataclass(frozen=True)
class ColoredObjectsParams:
    n_prompts: int = 16
    seed: int = 0

    def __post_init__(self):
        require(self.n_prompts >= 1, f"n_prompts = {self.n_prompts} must be at least 1")


def _single(model, words) -> list[str]:
    return [w for w in words if len(model.to_tokens(" " + w, prepend_bos=False)) == 1]


def build_colored_objects(model, p: ColoredObjectsParams) -> Task:
    colors, objects = _single(model, COLORS), _single(model, OBJECTS)
    if len(colors) < 3 or len(objects) < 3:
        raise WorkbenchError(f"model '{model.name}' has too few single-token colors or objects for this task")
    rng = random.Random(p.seed)
    clean, corrupted, answers, wrongs, rows = [], [], [], [], []
    for _ in range(p.n_prompts):
        cs, os_ = rng.sample(colors, 3), rng.sample(objects, 3)
        asked, other = rng.sample(range(3), 2)
        fill = {f"c{i}": cs[i] for i in range(3)} | {f"o{i}": os_[i] for i in range(3)}
        clean_text, corrupt_text = TEMPLATE.format(q=os_[asked], **fill), TEMPLATE.format(q=os_[other], **fill)
        clean.append(model.to_tokens(clean_text))
        corrupted.append(model.to_tokens(corrupt_text))
        answers.append(model.single_token(" " + cs[asked]))
        wrongs.append(model.single_token(" " + cs[other]))
        rows.append(dict(clean=clean_text, corrupted=corrupt_text, answer=" " + cs[asked], wrong=" " + cs[other]))
    return Task("colored_objects", {}, clean, corrupted, answers, wrongs, rows, pad_id(model))
