"""Batch jobs: a TOML file of runs, expanded to a grid, validated whole, then run through the store.

    [[run]]
    model = "smollm2-135m"              # or a list of models
    task = "ioi"                        # or task_file = "prompts.jsonl"
    task_params = { n_prompts = [8, 16], seed = 0 }
    method = "logit_diff"
    params = { batch_size = 16 }

A list value anywhere in a run expands to the grid (the cartesian product). A parameter that
itself takes a list (e.g. needle `context_lengths`) takes a flat list as its value; give a list
of lists to sweep it. Every run is checked before any is computed, so a bad job file writes
nothing; runs already in the store are not computed again (a killed job resumes).
"""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from workbench.errors import WorkbenchError
from workbench.methods import get_method
from workbench.models import DEFAULT_MODEL, ModelSpec, check_model_spec
from workbench.params import list_valued, parse_params
from workbench.tasks import DEFAULT_TASK, TASKS

RUN_KEYS = {"model", "task", "task_file", "task_params", "method", "params"}
EXECUTORS = ("local",)


@dataclass(frozen=True)
class RunSpec:
    model: ModelSpec
    method: str
    task: str | None = None
    task_file: str | None = None
    task_params: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        what = self.task or f"file:{Path(self.task_file).name}"
        extra = {**self.task_params, **self.params}
        return f"{self.model.name} / {what} / {self.method}" + (f" {extra}" if extra else "")


@dataclass
class RunOutcome:
    spec: RunSpec
    run_id: str
    cached: bool


def load_job(path: str | Path) -> list[RunSpec]:
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"job file {path} does not exist")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise WorkbenchError(f"job file {path} is not valid TOML ({e}); see README for the format") from None
    return parse_job(doc, base_dir=path.parent, source=str(path))


def parse_job(doc: dict[str, Any], base_dir: Path = Path("."), source: str = "job") -> list[RunSpec]:
    """Expand and validate every run of a job document (as parsed from TOML)."""
    unknown = set(doc) - {"run"}
    if unknown:
        raise WorkbenchError(f"{source}: unknown top-level key(s) {sorted(unknown)}; runs go in [[run]] tables")
    tables = doc.get("run")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise WorkbenchError(f"{source}: no runs; add at least one [[run]] table with a method")
    runs = [run for i, table in enumerate(tables) for run in _expand(table, i, base_dir, source)]
    for run in runs:
        _check(run, source)
    return runs


def _expand(table: dict[str, Any], index: int, base_dir: Path, source: str) -> Iterator[RunSpec]:
    where = f"{source} run {index + 1}"
    unknown = set(table) - RUN_KEYS
    if unknown:
        raise WorkbenchError(f"{where}: unknown key(s) {sorted(unknown)}; a run takes {sorted(RUN_KEYS)}")
    if "method" not in table:
        raise WorkbenchError(f"{where}: missing 'method' (`workbench methods` lists them)")
    for key in ("task_params", "params"):
        if not isinstance(table.get(key, {}), dict):
            raise WorkbenchError(f"{where}: '{key}' must be a table, e.g. {key} = {{ seed = 0 }}")
    for combo in _grid({k: table[k] for k in ("model", "task", "task_file", "method") if k in table}, lambda k: False):
        method = combo["method"]
        if not isinstance(method, str):
            raise WorkbenchError(f"{where}: 'method' must be a name")
        task = combo.get("task", DEFAULT_TASK if "task_file" not in combo else None)
        task_cls = TASKS[task].params if isinstance(task, str) and task in TASKS else None
        method_cls = get_method(method).params
        for tp in _grid(table.get("task_params", {}), lambda k: task_cls is not None and list_valued(task_cls, k)):
            for mp in _grid(table.get("params", {}), lambda k: list_valued(method_cls, k)):
                task_file = combo.get("task_file")
                if task_file is not None:
                    if not isinstance(task_file, str):
                        raise WorkbenchError(f"{where}: 'task_file' must be a path")
                    task_file = str((base_dir / task_file).resolve())
                if task is not None and not isinstance(task, str):
                    raise WorkbenchError(f"{where}: 'task' must be a name")
                yield RunSpec(
                    model=ModelSpec.parse(combo.get("model", DEFAULT_MODEL)),
                    method=method, task=(task or DEFAULT_TASK) if task_file is None else None, task_file=task_file,
                    task_params=tp, params=mp,
                )


def _grid(values: dict[str, Any], takes_list) -> Iterator[dict[str, Any]]:
    """Cartesian product over list values; a list-typed parameter sweeps only a list of lists."""
    axes = []
    for key, value in values.items():
        if isinstance(value, list) and (not takes_list(key) or (value and all(isinstance(v, list) for v in value))):
            if not value:
                raise WorkbenchError(f"'{key}' is an empty list: nothing to run")
            axes.append([(key, v) for v in value])
        else:
            axes.append([(key, value)])
    for combo in itertools.product(*axes):
        yield dict(combo)


def _check(run: RunSpec, source: str) -> None:
    """Everything that can be checked without loading a model: names, parameters, files."""
    where = f"{source} ({run.label()})"
    try:
        check_model_spec(run.model)
        method = get_method(run.method)
        method.parse(run.params)
        if run.task_file is not None:
            if run.task_params:
                raise WorkbenchError("task_params do not apply to a task_file")
            if not Path(run.task_file).is_file():
                raise WorkbenchError(f"task file {run.task_file} does not exist")
        else:
            name = run.task
            if name not in TASKS:
                raise WorkbenchError(f"unknown task '{name}'; choose one of {sorted(TASKS)} or give a task_file")
            parse_params(TASKS[name].params, run.task_params, f"task '{name}'")
    except WorkbenchError as e:
        raise WorkbenchError(f"{where}: {e}") from None


@dataclass
class PlannedRun:
    spec: RunSpec
    model: Any
    task: Any


def plan(runs: list[RunSpec]) -> list[PlannedRun]:
    """Every run's model and validated task, before anything is computed.

    Cached models load their weights lazily, so this is cheap; it makes a bad prompt file or
    model anywhere in a job fail before any result is written.
    """
    from workbench.models import load_model
    from workbench.tasks import build_task

    models: dict[ModelSpec, Any] = {}
    planned = []
    for run in runs:
        if run.model not in models:
            models[run.model] = load_model(run.model)
        model = models[run.model]
        if run.task_file is not None:
            task = build_task(model, task_file=run.task_file)
        else:
            task = build_task(model, run.task, run.task_params)
        planned.append(PlannedRun(run, model, task))
    return planned


def execute(planned: list[PlannedRun], store, executor: str = "local", progress=None) -> list[RunOutcome]:
    """Run planned runs through the store (stored ones are read back). `progress(i, n, label)` reports."""
    if executor not in EXECUTORS:
        raise WorkbenchError(f"unknown executor '{executor}'; available: {', '.join(EXECUTORS)}")
    from workbench.runner import run_method

    outcomes: list[RunOutcome] = []
    for n, p in enumerate(planned):
        if progress:
            progress(n, len(planned), p.spec.label())
        result = run_method(p.model, p.task, p.spec.method, p.spec.params, store)
        outcomes.append(RunOutcome(p.spec, result.run_id, bool(result.meta.get("cached"))))
    if progress:
        progress(len(planned), len(planned), "done")
    return outcomes
