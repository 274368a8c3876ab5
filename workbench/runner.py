"""Run a method through the store: the one path every entry point (CLI, notebooks, app) uses.

`run(spec)` takes a serialisable `RunSpec` and loads its model and task in this process (cached
per process, so a worker serving many units loads a model once). `run_method(model, task, ...)`
is the same for objects a notebook already holds. Either way the method's `needs` are resolved
first (from the store, computed when missing) and their keys are folded into the run's key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from workbench import __version__
from workbench.methods import Method, Outputs, get_method
from workbench.params import to_dict
from workbench.result import SCHEMA_VERSION, SCORE_COLUMNS, Result
from workbench.store import Store, content_key


@dataclass(frozen=True)
class RunContext:
    """What a method gets besides (model, task, params): the store its result goes to, the result's
    key (for working files of that run, e.g. checkpoints) and the results of its `needs`."""

    store: Store
    key: str
    inputs: dict[str, Result] = field(default_factory=dict)


_MODELS: dict[Any, Any] = {}
_TASKS: dict[str, Any] = {}


def load_unit(spec) -> tuple[Any, Any]:
    """The model and task of a `RunSpec`, loaded once per process."""
    from workbench.models import load_model

    if spec.model not in _MODELS:
        _MODELS[spec.model] = load_model(spec.model)
    model = _MODELS[spec.model]
    return model, task_for(model, spec.task)


def task_for(model, task_spec) -> Any:
    """A `TaskSpec` built and validated for `model` (cached per process)."""
    from workbench.tasks import build_task

    key = json.dumps([model.identity.key(), task_spec.to_json()], sort_keys=True)
    if key not in _TASKS:
        if task_spec.file is not None:
            _TASKS[key] = build_task(model, task_file=task_spec.file)
        else:
            _TASKS[key] = build_task(model, task_spec.name, task_spec.params)
    return _TASKS[key]


def unload_other_models(spec) -> None:
    """Drop every cached model but `spec`'s (and their tasks): a worker holds one model at a time."""
    others = [m for m in _MODELS if m != spec.model]
    for model_spec in others:
        del _MODELS[model_spec]
    if others:
        _TASKS.clear()  # tasks hold tokenizations of their model; the kept model's rebuild cheaply


def weights_loaded(spec) -> bool:
    """Whether this process holds `spec`'s model with its weights read (workers report model loads with it)."""
    model = _MODELS.get(spec.model)
    return model is not None and model.loaded


def plan(spec) -> list[tuple[str, dict[str, Any]]]:
    """`(key, key content)` of every run `run(spec)` reads or writes: its needs (depth first), then
    the unit itself, last. Loads the model lazily (no weights), so a driver can tell what is stored."""
    model, task = load_unit(spec)
    return plan_method(model, task, spec.method, spec.params)


def plan_method(model, task, method: str, params: dict[str, Any] | Any = None) -> list[tuple[str, dict[str, Any]]]:
    m = get_method(method)
    parsed = m.parse(params)
    entries: list[tuple[str, dict[str, Any]]] = []
    need_keys = {}
    for name, need in m.needs(parsed).items():
        sub = plan_method(model, task if need.task is None else task_for(model, need.task), need.method, need.params)
        entries += [e for e in sub if e[0] not in {k for k, _ in entries}]
        need_keys[name] = sub[-1][0]
    content = run_key_content(model, task, m, parsed, need_keys)
    return entries + [(content_key(content), content)]


def run(spec, store: Store | None = None) -> Result:
    """The stored result of a `RunSpec`, computing and storing it (and what it needs) if new."""
    model, task = load_unit(spec)
    return run_method(model, task, spec.method, spec.params, store)


def run_key_content(model, task, method: Method, params, needs: dict[str, str]) -> dict[str, Any]:
    """The store key's content: everything that determines the result."""
    return {
        "model": model.identity.key(),
        "task": task.spec(),
        "method": method.name,
        "method_version": method.version,
        "params": to_dict(params),
        "needs": needs,
        "schema": SCHEMA_VERSION,
    }


def run_method(model, task, method: str, params: dict[str, Any] | Any = None, store: Store | None = None) -> Result:
    """The stored result of `method` on (model, task, params), computing and storing it if new."""
    m = get_method(method)
    parsed = m.parse(params)
    store = store if store is not None else Store()
    inputs = {name: run_method(model, task if need.task is None else task_for(model, need.task), need.method,
                               need.params, store)
              for name, need in m.needs(parsed).items()}
    spec = run_key_content(model, task, m, parsed, {name: r.meta["key"] for name, r in inputs.items()})

    def compute() -> Result:
        with model.precision():
            result = m.fn(model, task, parsed, RunContext(store, content_key(spec), inputs))
        check_outputs(m.name, result, m.outputs(parsed))
        result.meta.update(workbench_version=__version__, device=str(model.device),
                           model_shape={"n_layers": model.n_layers, "n_heads": model.n_heads, "n_kv_heads": model.n_kv_heads,
                                        "d_model": model.d_model, "attn_only": bool(model.cfg.attn_only)})
        return result

    return store.get_or_compute(spec, compute)


def check_outputs(name: str, result: Result, outputs: Outputs) -> None:
    """A method's rows must be what it declares: known metrics, each filling exactly its index
    among the schema's columns and its declared extra columns (a method bug otherwise)."""
    frame = result.scores
    undeclared = sorted(set(frame["metric"]) - {m.name for m in outputs.metrics})
    if undeclared:
        raise RuntimeError(f"method '{name}' wrote undeclared metric(s) {undeclared}")
    for metric in outputs.metrics:
        rows = frame[frame["metric"] == metric.name]
        if rows.empty:
            continue
        if set(rows["component"]) - set(metric.components):
            raise RuntimeError(f"method '{name}' metric '{metric.name}' has components {sorted(set(rows['component']))}, "
                               f"declared {metric.components}")
        for col in metric.index:
            if col not in rows or rows[col].isna().all():
                raise RuntimeError(f"method '{name}' metric '{metric.name}' leaves its index column '{col}' empty")
        for col in SCORE_COLUMNS[1:4]:
            if col not in metric.index and rows[col].notna().any():
                raise RuntimeError(f"method '{name}' metric '{metric.name}' fills '{col}', which it does not declare")
    missing = sorted(set(result.tensors) - set(outputs.tensors))
    if missing:
        raise RuntimeError(f"method '{name}' wrote undeclared tensor(s) {missing}")
