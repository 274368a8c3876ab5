"""What a unit of work is, as plain typed values: model spec + task spec + method + parsed params.

A `RunSpec` is parsed (and so validated) once, from a job file, the CLI, a notebook or the app.
It is serialisable: `RunSpec.from_json(spec.to_json()) == spec`, so executors ship specs, never
live models or tasks; the model and task are loaded where the unit runs (`workbench.runner`).
`Need` names another run a method reads (a stored SAE, stored scores) by its spec, relative to
the unit: its model is the unit's model, its task the unit's task unless it names one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.params import defaults, parse_params, to_dict

DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16")


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for. `prepend_bos=None` keeps the model's own convention."""

    name: str
    prepend_bos: bool | None = None
    dtype: str = "float32"
    device: str | None = None
    tf32: bool = False

    @classmethod
    def parse(cls, spec: "str | dict | ModelSpec") -> "ModelSpec":
        if isinstance(spec, ModelSpec):
            return spec
        if isinstance(spec, str):
            return cls(name=spec)
        if isinstance(spec, dict):
            unknown = set(spec) - {f.name for f in dataclasses.fields(cls)}
            if unknown or not isinstance(spec.get("name"), str):
                raise WorkbenchError(
                    f"model spec {spec} is invalid: it needs 'name' and may have 'prepend_bos', 'dtype', 'device', 'tf32'"
                    + (f" (unknown: {sorted(unknown)})" if unknown else "")
                )
            if spec.get("dtype", "float32") not in DTYPE_NAMES:
                raise WorkbenchError(f"unknown dtype '{spec['dtype']}'; choose one of {list(DTYPE_NAMES)}")
            if not isinstance(spec.get("tf32", False), bool) or (spec.get("tf32") and spec.get("dtype", "float32") != "float32"):
                raise WorkbenchError("tf32 = true switches float32 matrix products to TF32; give it only with dtype = \"float32\"")
            return cls(**spec)
        raise WorkbenchError(f"model spec {spec!r} is neither a name nor a table with 'name'")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "ModelSpec":
        return cls.parse(doc)


@dataclass(frozen=True)
class TaskSpec:
    """A task generator with its parsed parameters, or a JSONL prompt file (an absolute path)."""

    name: str | None = None
    params: Any = None
    file: str | None = None

    @classmethod
    def parse(cls, name: str | None = None, params: dict[str, Any] | None = None, file: str | None = None,
              base_dir: Path = Path(".")) -> "TaskSpec":
        from workbench.tasks import DEFAULT_TASK, TASKS

        if file is not None:
            if name is not None or params:
                raise WorkbenchError("give either a task name (with task_params) or a task_file, not both")
            if not isinstance(file, str):
                raise WorkbenchError("'task_file' must be a path")
            path = (base_dir / file).expanduser().resolve()
            if not path.is_file():
                raise WorkbenchError(f"task file {path} does not exist")
            return cls(file=str(path))
        name = DEFAULT_TASK if name is None else name
        if not isinstance(name, str) or name not in TASKS:
            raise WorkbenchError(f"unknown task {name!r}; choose one of {sorted(TASKS)} or give a task_file")
        return cls(name=name, params=parse_params(TASKS[name].params, params, f"task '{name}'"))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "params": to_dict(self.params) if self.params is not None else None, "file": self.file}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "TaskSpec":
        return cls.parse(doc.get("name"), doc.get("params"), doc.get("file"))

    def label(self) -> str:
        return self.name if self.file is None else f"file:{Path(self.file).name}"


@dataclass(frozen=True)
class Need:
    """A run this unit reads: method + params, on the unit's model and task unless `task` is given.

    In a job file: `sae = { method = "sae.train", task = "corpus", task_params = {...}, params = {...} }`."""

    method: str
    params: Any
    task: TaskSpec | None = None

    @classmethod
    def make(cls, method: str, params: dict[str, Any] | Any = None, task: TaskSpec | None = None) -> "Need":
        from workbench.methods import get_method

        return cls(method, get_method(method).parse(params), task)

    @classmethod
    def of(cls, spec: "RunSpec") -> "Need":
        """The run of `spec`, named as another run's need (its model is the reading run's)."""
        return cls(spec.method, spec.params, spec.task)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "Need":
        unknown = set(doc) - {"method", "params", "task", "task_params", "task_file"}
        if unknown or not isinstance(doc.get("method"), str):
            raise WorkbenchError(f"a run reference needs 'method' and may have 'params', 'task', 'task_params', "
                                 f"'task_file'{f' (unknown: {sorted(unknown)})' if unknown else ''}")
        task = None
        if any(k in doc for k in ("task", "task_params", "task_file")):
            task = TaskSpec.parse(doc.get("task"), doc.get("task_params"), doc.get("task_file"))
        return cls.make(doc["method"], doc.get("params"), task)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "params": to_dict(self.params)}
        if self.task is not None:
            out.update(task=self.task.name, task_params=to_dict(self.task.params) if self.task.params else {},
                       task_file=self.task.file)
        return out


@dataclass(frozen=True)
class RunSpec:
    model: ModelSpec
    task: TaskSpec
    method: str
    params: Any

    @classmethod
    def parse(cls, model: "str | dict | ModelSpec", method: str, params: dict[str, Any] | Any = None,
              task: str | None = None, task_params: dict[str, Any] | None = None, task_file: str | None = None,
              base_dir: Path = Path(".")) -> "RunSpec":
        """Validate everything that can be checked without loading a model."""
        from workbench.methods import get_method
        from workbench.models import check_model_spec

        if not isinstance(method, str):
            raise WorkbenchError("'method' must be a name")
        return cls(check_model_spec(model), TaskSpec.parse(task, task_params, task_file, base_dir), method,
                   get_method(method).parse(params))

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model.to_json(), "task": self.task.to_json(), "method": self.method, "params": to_dict(self.params)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "RunSpec":
        task = doc["task"]
        return cls.parse(doc["model"], doc["method"], doc.get("params"), task.get("name"), task.get("params"), task.get("file"))

    def label(self) -> str:
        from workbench.methods import get_method

        changed = _non_default(self.params, get_method(self.method).params)
        if self.task.params is not None:
            from workbench.tasks import TASKS

            changed = {**_non_default(self.task.params, TASKS[self.task.name].params), **changed}
        return f"{self.model.name} / {self.task.label()} / {self.method}" + (f" {changed}" if changed else "")


def _non_default(params, cls) -> dict[str, Any]:
    default = defaults(cls)
    return {k: v for k, v in to_dict(params).items() if default.get(k) != v}
