"""Run a registered method on a model and task through the store (the one path every entry point uses)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workbench import __version__
from workbench.methods import get_method
from workbench.params import to_dict
from workbench.result import SCHEMA_VERSION, Result
from workbench.store import Store, content_key


@dataclass(frozen=True)
class RunContext:
    """What a `uses_store` method gets besides (model, task, params): the store its result goes to
    and the result's key (for working files that belong to that run, e.g. training checkpoints)."""

    store: Store
    key: str


def run_spec(model, task, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The store key's content: everything that determines the result."""
    m = get_method(method)
    return {
        "model": model.identity.key(),
        "task": task.spec(),
        "method": m.name,
        "method_version": m.version,
        "params": to_dict(m.parse(params)),
        "schema": SCHEMA_VERSION,
    }


def run_method(model, task, method: str, params: dict[str, Any] | None = None, store: Store | None = None) -> Result:
    """The stored result of `method` on (model, task, params), computing and storing it if new."""
    m = get_method(method)
    parsed = m.parse(params)
    spec = run_spec(model, task, method, params)
    store = store if store is not None else Store()

    def compute() -> Result:
        args = (RunContext(store, content_key(spec)),) if m.uses_store else ()
        result = m.fn(model, task, parsed, *args)
        result.meta.update(workbench_version=__version__, device=str(model.device),
                           model_shape={"n_layers": model.n_layers, "n_heads": model.n_heads, "n_kv_heads": model.n_kv_heads})
        return result

    return store.get_or_compute(spec, compute)
