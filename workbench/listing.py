"""What `workbench methods` and `workbench tasks` print. Building it imports every method module
(and so torch, seconds); the lines are kept in the model cache keyed on the size and mtime of every
source file of `workbench` and the method plugins, so a listing answers at once until a source changes."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from importlib.metadata import entry_points
from pathlib import Path

from workbench import __version__
from workbench.atomic import write_file_atomic
from workbench.paths import cache_dir


def _fingerprint() -> str:
    packages = ["workbench"] + [ep.value for ep in entry_points(group="workbench.methods")]
    h = hashlib.sha256(__version__.encode())
    for name in packages:
        spec = importlib.util.find_spec(name)
        for root in (spec.submodule_search_locations or []) if spec else []:
            for f in sorted(Path(root).rglob("*.py")):
                st = f.stat()
                h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _fields(cls) -> str:
    from workbench.params import defaults

    found = defaults(cls)
    return ", ".join(f"{f.name}={found[f.name]!r}" if f.name in found else f"{f.name} (required)"
                     for f in dataclasses.fields(cls))


def _build() -> dict[str, list[str]]:
    from workbench.methods import all_methods
    from workbench.tasks import TASKS

    methods = []
    for name, m in all_methods().items():
        task = m.task + (f" {m.task_params}" if m.task_params else "")
        methods.append(f"{name}  {m.description}  [natural task: {task}]  ({_fields(m.params)})")
    tasks = [f"{name}  {gen.description}  ({_fields(gen.params)})" for name, gen in TASKS.items()]
    tasks.append('task_file=FILE.jsonl  your own rows {"clean", "corrupted", "answer", "wrong"}')
    return {"methods": methods, "tasks": tasks}


def listing(kind: str) -> list[str]:
    """The lines of `kind` ("methods" or "tasks")."""
    path = cache_dir() / "listings" / f"{_fingerprint()}.json"
    try:
        return json.loads(path.read_text())[kind]
    except (OSError, ValueError, KeyError):
        built = _build()
        try:
            write_file_atomic(path, json.dumps(built))
        except OSError:  # a read-only cache only makes the next listing slow
            pass
        return built[kind]
