"""Parameters of tasks and methods are plain frozen dataclasses, parsed here from JSON/TOML dicts.

Unknown names, wrong types and values outside a `Literal` are refused here; ranges are refused by
each dataclass's `__post_init__` (raising `WorkbenchError`). So everything a job file alone shows
to be wrong fails when the file is read, before any model loads. List values become tuples, so a
parsed dataclass is hashable and a JSON round trip (`to_dict` then `parse_params`) gives an equal one.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from workbench.errors import WorkbenchError


def parse_params(cls, params: dict[str, Any] | None, owner: str):
    """Build a parameter dataclass from a plain dict, refusing unknown names, wrong types and bad values."""
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        if not isinstance(params, cls):
            raise WorkbenchError(f"{owner} takes {cls.__name__}, not {type(params).__name__}")
        return params
    if params is not None and not isinstance(params, dict):
        raise WorkbenchError(f"{owner} parameters must be a table of name = value, not {params!r}")
    params = dict(params or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise WorkbenchError(f"{owner} has no parameter(s) {unknown}; it takes {sorted(names)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in params]
    if required:
        raise WorkbenchError(f"{owner} needs parameter(s) {required}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in params.items():
        try:
            values[key] = _convert(value, hints[key])
        except _Mismatch:
            raise WorkbenchError(f"{owner} parameter '{key}' = {value!r} should be {_type_name(hints[key])}") from None
    try:
        return cls(**values)
    except WorkbenchError as e:
        raise WorkbenchError(f"{owner}: {e}") from None


class _Mismatch(Exception):
    pass


def _convert(value, hint):
    """`value` as an instance of `hint` (lists to tuples, tables to nested parameter types), or _Mismatch."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _convert(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(hint)):
            return value
        raise _Mismatch
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(hint) or (typing.Any,)
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return tuple(_convert(v, inner) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return value
    if hint is typing.Any:
        return value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if isinstance(hint, type) and hasattr(hint, "from_json"):  # a nested spec, e.g. a run this one reads
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return hint.from_json(value)
        raise _Mismatch
    if isinstance(value, hint):
        return value
    raise _Mismatch


def _type_name(hint) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hasattr(hint, "from_json"):
        return f"a table ({hint.__doc__.splitlines()[0] if hint.__doc__ else hint.__name__})"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def choices(cls, name: str) -> tuple | None:
    """The allowed values of a `Literal` parameter (for forms), else None."""
    hint = typing.get_type_hints(cls)[name]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


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
    return {f.name: json_ready(getattr(params, f.name)) for f in dataclasses.fields(params)}


def json_ready(value):
    if hasattr(value, "to_json"):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def defaults(cls) -> dict[str, Any]:
    """Each field's default, JSON-ready, read off the dataclass (a class with a required value,
    such as path patching's receivers, cannot be built empty)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = json_ready(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = json_ready(f.default_factory())
    return out


def require(ok: bool, message: str) -> None:
    """For `__post_init__` range checks: refuse with one clear message."""
    if not ok:
        raise WorkbenchError(message)
