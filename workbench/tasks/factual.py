"""Factual recall: "The capital of France is" -> " Paris", corrupted by another subject of the
same relation with the same token length ("The capital of Italy is"), whose attribute is the
wrong answer (" Rome"). Facts whose answer is not one token for the model are dropped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from workbench.errors import WorkbenchError
from workbench.tasks.base import Task, pad_id

FACTS: dict[str, tuple[str, dict[str, str]]] = {
    "capital": ("The capital of {} is", {
        "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
        "Russia": "Moscow", "Egypt": "Cairo", "England": "London", "Greece": "Athens", "Canada": "Ottawa",
        "China": "Beijing", "Poland": "Warsaw", "Austria": "Vienna", "Portugal": "Lisbon", "Norway": "Oslo",
        "Sweden": "Stockholm", "Ireland": "Dublin", "Kenya": "Nairobi", "Peru": "Lima", "Cuba": "Havana",
    }),
    "language": ("The official language of {} is", {
        "France": "French", "Germany": "German", "Italy": "Italian", "Spain": "Spanish", "Japan": "Japanese",
        "Russia": "Russian", "China": "Chinese", "Greece": "Greek", "Poland": "Polish", "Sweden": "Swedish",
        "Portugal": "Portuguese", "Turkey": "Turkish", "Korea": "Korean", "Finland": "Finnish",
    }),
    "landmark_city": ("The {} is in the city of", {
        "Eiffel Tower": "Paris", "Colosseum": "Rome", "Brandenburg Gate": "Berlin", "Kremlin": "Moscow",
        "Acropolis": "Athens", "Sagrada Familia": "Barcelona", "Tower of London": "London", "Forbidden City": "Beijing",
    }),
}


@dataclass
class FactualParams:
    relations: list[str] | None = None
    n_prompts: int | None = None
    seed: int = 0


def build_factual(model, p: FactualParams) -> Task:
    relations = p.relations or list(FACTS)
    unknown = [r for r in relations if r not in FACTS]
    if unknown:
        raise WorkbenchError(f"unknown factual relation(s) {unknown}; choose from {sorted(FACTS)}")
    rng = random.Random(p.seed)
    clean, corrupted, answers, wrongs, rows = [], [], [], [], []
    for rel in relations:
        template, facts = FACTS[rel]
        usable = []
        for subject, attr in facts.items():
            ids = model.to_tokens(" " + attr, prepend_bos=False)
            if len(ids) == 1:
                usable.append((subject, attr, model.to_tokens(template.format(subject)), ids[0]))
        for subject, attr, toks, ans in usable:
            partners = [u for u in usable if len(u[2]) == len(toks) and u[1] != attr]
            if not partners:
                continue
            other, other_attr, other_toks, wrong = rng.choice(partners)
            clean.append(toks)
            corrupted.append(other_toks)
            answers.append(ans)
            wrongs.append(wrong)
            rows.append(dict(relation=rel, clean=template.format(subject), corrupted=template.format(other),
                             answer=" " + attr, wrong=" " + other_attr))
    order = list(range(len(clean)))
    rng.shuffle(order)
    order = order[: p.n_prompts] if p.n_prompts is not None else order
    pick = lambda xs: [xs[i] for i in order]  # noqa: E731
    return Task("factual", {}, pick(clean), pick(corrupted), pick(answers), pick(wrongs), pick(rows), pad_id(model))
