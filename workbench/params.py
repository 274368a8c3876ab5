"""Parameters of tasks and methods are plain dataclasses: parsed from JSON/TOML dicts here, with
unknown names and wrong types refused (no option silently does nothing)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from workbench.errors import WorkbenchError


def parse_params(cls, params: dict[str, Any] | None, owner: str):
    """Build a parameter dataclass from a plain dict, refusing unknown names and wrong types."""
    params = dict(params or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise WorkbenchError(f"{owner} has no parameter(s) {unknown}; it takes {sorted(names)}")
    hints = typing.get_type_hints(cls)
    for key, value in params.items():
        if not _type_ok(value, hints[key]):
            raise WorkbenchError(f"{owner} parameter '{key}' = {value!r} should be {_type_name(hints[key])}")
    return cls(**params)


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(hint) or (typing.Any,)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, inner) for v in value)
    if hint is typing.Any:
        return True
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def list_valued(cls, name: str) -> bool:
    """Whether parameter `name` of `cls` takes a list itself (then only a list of lists is a grid)."""
    hints = typing.get_type_hints(cls)
    if name not in hints:
        return False
    hint = hints[name]
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return any(typing.get_origin(a) in (list, tuple) or a in (list, tuple) for a in args)


def to_dict(params) -> dict[str, Any]:
    """A params dataclass as a JSON-ready dict (tuples become lists) for keys and metadata."""
    return json_ready(dataclasses.asdict(params))


def json_ready(value):
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value
