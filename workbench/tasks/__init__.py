"""Named prompt-set generators (seeded) and user task files; `build_task` returns a validated Task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from workbench.errors import WorkbenchError
from workbench.params import parse_params, to_dict
from workbench.tasks.base import Task, validate
from workbench.tasks.colored_objects import ColoredObjectsParams, build_colored_objects
from workbench.tasks.factual import FactualParams, build_factual
from workbench.tasks.induction import InductionParams, build_induction
from workbench.tasks.ioi import IOIParams, build_ioi
from workbench.tasks.jsonl import load_jsonl_task
from workbench.tasks.needle import NeedleParams, build_needle
from workbench.tasks.reciprocal import ReciprocalParams, build_reciprocal
from workbench.tasks.text import TextParams, build_text


@dataclass(frozen=True)
class TaskGenerator:
    params: type
    build: Callable[[Any, Any], Task]
    description: str


TASKS: dict[str, TaskGenerator] = {
    "ioi": TaskGenerator(IOIParams, build_ioi, "indirect object identification, ABC-corrupted"),
    "induction": TaskGenerator(InductionParams, build_induction, "repeated random token sequences"),
    "factual": TaskGenerator(FactualParams, build_factual, "subject -> attribute facts, corrupted subjects"),
    "needle": TaskGenerator(NeedleParams, build_needle, "needle in a haystack over context lengths x depths"),
    "corpus": TaskGenerator(TextParams, build_text, "next-token prediction on windows of a text corpus"),
    "reciprocal": TaskGenerator(ReciprocalParams, build_reciprocal,
                                "IOI's structure in another sentence: A met B, then B met -> A (ABC-corrupted)"),
    "colored_objects": TaskGenerator(ColoredObjectsParams, build_colored_objects,
                                     "the color of one of three objects, corrupted by asking about another"),
}
DEFAULT_TASK = "ioi"


def build_task(model, name: str | None = None, params: dict[str, Any] | None = None, task_file: str | None = None) -> Task:
    """Build and validate a task for `model`: a generator by `name`, or a JSONL `task_file`."""
    if task_file is not None:
        if name is not None or params:
            raise WorkbenchError("give either a task name (with task_params) or a task_file, not both")
        return validate(load_jsonl_task(model, task_file), model)
    name = name or DEFAULT_TASK
    if name not in TASKS:
        raise WorkbenchError(f"unknown task '{name}'; choose one of {sorted(TASKS)} or give a task_file")
    gen = TASKS[name]
    parsed = parse_params(gen.params, params, f"task '{name}'")
    task = gen.build(model, parsed)
    task.params = to_dict(parsed)
    return validate(task, model)


__all__ = ["TASKS", "Task", "build_task", "validate", "DEFAULT_TASK"]
