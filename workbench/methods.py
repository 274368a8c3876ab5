"""The method registry: each method is one function plus a declaration of what it takes, reads and writes.

Methods live in `circuits` and `sae` (which import `workbench`, never the reverse) and register
with `@register(...)` when imported; `workbench` finds them through the `workbench.methods`
entry-point group in pyproject.toml. Every method is called the same way,
`fn(model, task, params, ctx)`, where `ctx` (`workbench.runner.RunContext`) holds the store, the
result's key, the results of its `needs` and a progress callback.

A declaration is what lets the CLI, the store and the app treat methods alike, never by name:
- `params`: a frozen dataclass; choices are `Literal`s, ranges are checked in `__post_init__`;
- `outputs(params)`: the metrics it writes (name, meaning, component, the index columns it fills,
  its role), its tensors with their dims, and whether the run holds an artifact (an SAE);
- `needs(params)`: the other runs it reads, as `Need` specs; the runner resolves them from the
  store (computing them when missing) and folds their keys into this run's key;
- `task`, `task_params`: its natural task, on which its defaults work (forms and docs start there).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Literal

from workbench.errors import WorkbenchError
from workbench.params import parse_params

EDGE_INDEX = ("src", "dst", "dst_input")  # node names (workbench.nodes) and the destination's input
HEAD = ("layer", "head")
Role = Literal["score", "effect", "raw", "summary", "detail"]


@dataclass(frozen=True)
class Metric:
    """One metric a method writes.

    `index`: the columns besides component/metric/value that its rows fill (every other index
    column is empty). Roles: `score` a per-component value to map and rank; `effect` a causal
    effect on the task's metric (normalised: 0 = corrupted, 1 = clean), what circuits are built
    from; `raw` the unnormalised twin of an effect; `summary` a scalar of the whole run; `detail`
    rows per prompt, position or feature that views of their own draw.
    """

    name: str
    meaning: str
    component: str | tuple[str, ...] = "head"  # several for decompositions (DLA's embed, heads, MLPs, biases)
    index: tuple[str, ...] = HEAD
    role: Role = "score"

    @property
    def components(self) -> tuple[str, ...]:
        return (self.component,) if isinstance(self.component, str) else self.component

    @property
    def per_head(self) -> bool:
        """One value per (layer, head): what the head atlas maps and the head page ranks."""
        return "head" in self.components and set(self.index) == {"layer", "head"} and self.role in ("score", "effect")


@dataclass(frozen=True)
class Outputs:
    metrics: tuple[Metric, ...]
    tensors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    artifact: str | None = None  # "sae": the run holds an SAE that other runs read

    def metric(self, name: str) -> Metric | None:
        return next((m for m in self.metrics if m.name == name), None)


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., Any]
    params: type
    description: str
    outputs: Callable[[Any], Outputs]
    needs: Callable[[Any], dict[str, Any]]
    version: int = 1
    task: str = "ioi"
    task_params: dict[str, Any] = field(default_factory=dict)

    def parse(self, params: dict[str, Any] | Any = None):
        return parse_params(self.params, params, f"method '{self.name}'")

    def declared(self, params: Any = None) -> Outputs:
        return self.outputs(self.parse(params))


_METHODS: dict[str, Method] = {}
_loaded = False


def register(name: str, params: type, description: str, outputs: Outputs | Callable[[Any], Outputs],
             needs: Callable[[Any], dict[str, Any]] | None = None, version: int = 1, task: str = "ioi",
             task_params: dict[str, Any] | None = None):
    """Decorator: register `fn(model, task, params, ctx) -> Result` under `name`.

    Bump `version` when a change to the method changes its numbers: the store keys on it.
    """

    def wrap(fn):
        if name in _METHODS and _METHODS[name].fn is not fn:
            raise RuntimeError(f"method '{name}' is registered twice")
        outs = outputs if callable(outputs) else (lambda _p, o=outputs: o)
        _METHODS[name] = Method(name, fn, params, description, outs, needs or (lambda _p: {}), version, task,
                                task_params or {})
        return fn

    return wrap


def _load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    for ep in entry_points(group="workbench.methods"):
        importlib.import_module(ep.value)
    _loaded = True


def all_methods() -> dict[str, Method]:
    _load_plugins()
    return dict(sorted(_METHODS.items()))


def get_method(name: str) -> Method:
    methods = all_methods()
    if name not in methods:
        raise WorkbenchError(f"unknown method '{name}'; `workbench methods` lists them ({', '.join(methods)})")
    return methods[name]
