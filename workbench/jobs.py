"""Batch jobs: a TOML file of runs, expanded to a grid and parsed into `RunSpec`s, then run through the store.

    [[run]]
    model = "smollm2-135m"              # or a list of models
    task = "ioi"                        # or task_file = "prompts.jsonl"
    task_params = { n_prompts = [8, 16], seed = 0 }
    method = "logit_diff"
    params = { batch_size = 16 }

A list value anywhere in a run expands to the grid (the cartesian product). A parameter that
itself takes a list (e.g. needle `context_lengths`) takes a flat list as its value; give a list
of lists to sweep it. Every run is parsed, and so checked, when the file is read, so a bad job
file writes nothing; runs already in the store are not computed again (a killed job resumes).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
import tomllib
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from workbench.errors import WorkbenchError
from workbench.job_record import JobRecord
from workbench.methods import get_method
from workbench.models import DEFAULT_MODEL
from workbench.params import list_valued
from workbench.progress import reporting
from workbench.spec import RunSpec
from workbench.tasks import DEFAULT_TASK, TASKS

RUN_KEYS = {"model", "task", "task_file", "task_params", "method", "params"}
EXECUTORS = ("local", "ray")


@dataclass
class RunOutcome:
    """What became of one unit: `done` (computed now), `skipped` (already stored) or `failed`."""

    spec: RunSpec
    state: str
    run_id: str | None = None
    message: str | None = None
    user_error: bool = True  # a failure the user can fix (bad parameters for the model), not a crash

    @property
    def cached(self) -> bool:
        return self.state == "skipped"


@dataclass(frozen=True)
class RayOptions:
    """How `--executor ray` reaches Ray: `address` None starts a local instance on 127.0.0.1."""

    address: str | None = None
    max_retries: int = 3
    shared_store: bool = False  # workers write to the store themselves (it is on a path every node mounts)
    dashboard: bool = False
    worker_cpus: int = 1  # CPUs (and torch threads) each worker asks Ray for


@dataclass
class JobOutcome:
    job_id: str
    outcomes: list[RunOutcome]


def load_job(path: str | Path) -> list[RunSpec]:
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"job file {path} does not exist")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise WorkbenchError(f"job file {path} is not UTF-8 text; a job file is TOML (see README for the format)") from None
    except tomllib.TOMLDecodeError as e:
        raise WorkbenchError(f"job file {path} is not valid TOML ({e}); see README for the format") from None
    return parse_job(doc, base_dir=path.parent, source=str(path))


def parse_job(doc: dict[str, Any], base_dir: Path = Path("."), source: str = "job") -> list[RunSpec]:
    """Expand and parse every run of a job document (as parsed from TOML)."""
    unknown = set(doc) - {"run"}
    if unknown:
        raise WorkbenchError(f"{source}: unknown top-level key(s) {sorted(unknown)}; runs go in [[run]] tables")
    tables = doc.get("run")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise WorkbenchError(f"{source}: no runs; add at least one [[run]] table with a method")
    return [run for i, table in enumerate(tables) for run in _expand(table, i, base_dir, source)]


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
        method, task = combo["method"], combo.get("task")
        try:
            method_cls = get_method(method).params if isinstance(method, str) else None
        except WorkbenchError as e:
            raise WorkbenchError(f"{where}: {e}") from None
        task_name = task if task is not None else (DEFAULT_TASK if "task_file" not in combo else None)
        task_cls = TASKS[task_name].params if isinstance(task_name, str) and task_name in TASKS else None
        for tp in _grid(table.get("task_params", {}), lambda k: task_cls is not None and list_valued(task_cls, k)):
            for mp in _grid(table.get("params", {}), lambda k: method_cls is not None and list_valued(method_cls, k)):
                try:
                    yield RunSpec.parse(combo.get("model", DEFAULT_MODEL), method, mp, task, tp or None,
                                        combo.get("task_file"), base_dir)
                except WorkbenchError as e:
                    label = f"{combo.get('model', DEFAULT_MODEL)} / {task_name or combo.get('task_file')} / {method}"
                    raise WorkbenchError(f"{where} ({label}): {e}") from None


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


def prepare(specs: list[RunSpec]) -> None:
    """Load every unit's model and task in this process (cached) and validate the task against the
    model, so a task the model cannot run fails before anything is written. Model weights load lazily."""
    from workbench.runner import load_unit

    for spec in specs:
        try:
            load_unit(spec)
        except WorkbenchError as e:
            raise WorkbenchError(f"{spec.label()}: {e}") from None


def execute(specs: list[RunSpec], store, executor: str = "local", *, source: str = "job", text: str = "",
            listener=None, ray: RayOptions = RayOptions()) -> JobOutcome:
    """Run every unit through the store (stored ones are skipped), recording the job in the store.

    `listener(record)` is called with the job record's data after every change (progress display).
    A unit that fails does not stop the others; its outcome carries the message."""
    if executor not in EXECUTORS:
        raise WorkbenchError(f"unknown executor '{executor}'; available: {', '.join(EXECUTORS)}")
    if executor == "local":
        prepare(specs)  # a task the model cannot run is refused before anything is written
    with _session(executor, ray):
        record = JobRecord.start(store, specs, source, text, executor, ray.address if executor == "ray" else None)
        record.listener = listener
        try:
            if executor == "local":
                _run_local(specs, store, record)
            else:
                from workbench.ray_executor import run_on_ray

                run_on_ray(specs, store, record, ray)
        except BaseException as e:
            record.abort(e)
            raise
        record.finish()
    return JobOutcome(record.job_id, [RunOutcome(spec, u["state"], u["run_id"], u["message"], u.get("user_error", True))
                                      for spec, u in zip(specs, record.data["units"])])


def _session(executor: str, ray: RayOptions):
    if executor != "ray":
        return contextlib.nullcontext()
    from workbench.ray_executor import ray_session

    return ray_session(ray)


def _run_local(specs: list[RunSpec], store, record: JobRecord) -> None:
    """One unit after another in this process; a unit's progress bars report into the record."""
    from workbench.runner import run

    for i, spec in enumerate(specs):
        record.update(i, state="running", started=time.time(), node=socket.gethostname(), pid=os.getpid(),
                      attempts=1)
        try:
            with reporting(lambda desc, n, total, i=i: record.update(i, progress={"desc": desc, "n": n, "total": total})):
                result = run(spec, store)
        except WorkbenchError as e:
            record.update(i, state="failed", message=str(e), user_error=True, finished=time.time())
            continue
        except Exception as e:
            record.update(i, state="failed", message=f"{type(e).__name__}: {e}", user_error=False,
                          traceback=traceback.format_exc(), finished=time.time())
            continue
        record.update(i, state="skipped" if result.meta.get("cached") else "done", run_id=result.run_id,
                      finished=time.time())
