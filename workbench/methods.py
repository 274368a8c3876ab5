"""The method registry: a name -> (function, parameter dataclass) mapping is the whole plugin system.

Methods live in `circuits` and `sae` (which import `workbench`, never the reverse) and register
with `@register(...)` when imported. `workbench` finds them through the `workbench.methods`
entry-point group declared in pyproject.toml, so the CLI, job files and the app can look any
method up by name without importing those packages by hand.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable

from workbench.errors import WorkbenchError
from workbench.params import parse_params


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., Any]
    params: type
    description: str
    version: int = 1
    uses_store: bool = False  # then fn(model, task, params, ctx) gets a `workbench.runner.RunContext`

    def parse(self, params: dict[str, Any] | None):
        return parse_params(self.params, params, f"method '{self.name}'")


_METHODS: dict[str, Method] = {}
_loaded = False


def register(name: str, params: type, description: str, version: int = 1, uses_store: bool = False):
    """Decorator: register `fn(model, task, params) -> Result` under `name`.

    Bump `version` when a change to the method changes its numbers: the store keys on it.
    `uses_store=True` is for methods that read other stored results or keep working files
    (activation caches, checkpoints): they are called as `fn(model, task, params, ctx)`.
    """

    def wrap(fn):
        if name in _METHODS and _METHODS[name].fn is not fn:
            raise RuntimeError(f"method '{name}' is registered twice")
        _METHODS[name] = Method(name, fn, params, description, version, uses_store)
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
