"""Strict conversion between JSON-like data and typed, frozen dataclasses: the build config and the manifest.

`from_json` refuses unknown keys (with a did-you-mean hint), missing keys, and values of the wrong type,
naming where; `to_json` writes fields in declaration order, so a record read and written again gives the
same JSON. A field's metadata may rename its key (`json_key("class")`), leave it out while it holds
its default (`omitted_when_default()`), for keys the format writes only when they say something, or keep it
off the JSON altogether (`not_stored()`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from attribindex.errors import AttribIndexError

T = TypeVar("T")

_KEY = "attribindex.json_key"
_OMIT_DEFAULT = "attribindex.omit_default"
_NOT_STORED = "attribindex.not_stored"


def json_key(name: str, **field_options) -> Any:
    """A dataclass field stored under another JSON key (e.g. ``class``, a Python keyword)."""
    return dataclasses.field(metadata={_KEY: name}, **field_options)


def omitted_when_default(default: Any = None) -> Any:
    """A dataclass field whose key is written only when its value differs from `default`."""
    return dataclasses.field(default=default, metadata={_OMIT_DEFAULT: True})


def not_stored(default: Any) -> Any:
    """A dataclass field that is no key at all: set by the reader (e.g. what it upgraded from), never written,
    and left out of comparisons."""
    return dataclasses.field(default=default, compare=False, metadata={_NOT_STORED: True})


@functools.cache
def _fields(cls: type) -> tuple[tuple[dataclasses.Field, str, Any], ...]:
    """(field, JSON key, resolved annotation) for each field of dataclass `cls`, in order."""
    hints = typing.get_type_hints(cls)
    stored = [f for f in dataclasses.fields(cls) if not f.metadata.get(_NOT_STORED)]
    return tuple((f, f.metadata.get(_KEY, f.name), hints[f.name]) for f in stored)


_PLURALS = {str: "strings", int: "integers", float: "numbers"}


def _fail(where: str, expected: str, value: Any) -> typing.NoReturn:
    raise AttribIndexError(f"{where}: expected {expected}, got {value!r}.")


def _union(value: Any, options: tuple, where: str) -> Any:
    if value is None and type(None) in options:
        return None
    options = tuple(a for a in options if a is not type(None))
    if len(options) == 1:
        return _convert(value, options[0], where)
    problems = []
    for option in options:  # records told apart by their Literal-typed keys (e.g. a log event's "event")
        try:
            return _convert(value, option, where)
        except AttribIndexError as err:
            problems.append(str(err))
    raise AttribIndexError(f"{where}: matches none of the known forms ({'; '.join(problems)}).")


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """`value` checked against `annotation` and converted to it (lists → tuples, mappings → records)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise AttribIndexError(f"{where}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}.")
        return value
    if origin in (typing.Union, types.UnionType):
        return _union(value, args, where)
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            _fail(where, f"a list of {_PLURALS.get(args[0], 'values')}", value)
        if origin is tuple and args[-1] is not Ellipsis:  # fixed length, one annotation per item
            if len(value) != len(args):
                _fail(where, f"a list of {len(args)} values", value)
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        items = [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            _fail(where, "a mapping", value)
        return {k: _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if annotation is bool:
        return value if isinstance(value, bool) else _fail(where, "true or false", value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(where, "a number", value)
        return float(value)
    if annotation is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _fail(where, "an integer", value)
    if annotation is str:
        return value if isinstance(value, str) else _fail(where, "a string", value)
    if dataclasses.is_dataclass(annotation):
        return from_json(annotation, value, where)
    raise TypeError(f"unsupported record annotation {annotation!r} at {where}")


def from_json(cls: type[T], data: Any, where: str) -> T:
    """Dataclass `cls` from a JSON-like mapping: every key known, every required key present, every value typed.

    Example:
        >>> from attribindex.config import HessianConfig
        >>> from_json(HessianConfig, {"kind": "identity"}, "hessian")
        HessianConfig(kind='identity', damping=0.1)
    """
    if not isinstance(data, Mapping):
        _fail(where, "a mapping of keys to values", data)
    fields = _fields(cls)
    by_key = {key: (f, annotation) for f, key, annotation in fields}
    kwargs = {}
    for key, value in data.items():
        if key not in by_key:
            close = difflib.get_close_matches(str(key), list(by_key), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise AttribIndexError(f"{where}: unknown key {key!r}.{hint} Valid keys: {', '.join(by_key)}.")
        f, annotation = by_key[key]
        kwargs[f.name] = _convert(value, annotation, f"{where}.{key}")
    required = [(f, key) for f, key, _ in fields if f.default is f.default_factory is dataclasses.MISSING]
    missing = [key for f, key in required if f.name not in kwargs]
    if missing:
        raise AttribIndexError(f"{where}: missing key {missing[0]!r}.")
    try:
        return cls(**kwargs)
    except AttribIndexError as err:
        raise AttribIndexError(f"{where}: {err}") from None


def to_json(value: Any) -> Any:
    """The JSON-ready form of a record (or of a value inside one): dicts, lists and plain scalars.

    Example:
        >>> from attribindex.config import HessianConfig
        >>> to_json(HessianConfig(kind="ekfac"))
        {'kind': 'ekfac', 'damping': 0.1}
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f, key, _ in _fields(type(value)):
            item = getattr(value, f.name)
            if f.metadata.get(_OMIT_DEFAULT) and item == f.default:
                continue
            out[key] = to_json(item)
        return out
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, Mapping):
        return {k: to_json(v) for k, v in value.items()}
    return value


def first_difference(recorded: Any, current: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """(key path, recorded value, current value) where two JSON-like values first differ; None when equal.

    Example:
        >>> first_difference({"a": {"b": 1}}, {"a": {"b": 2}})
        ('a.b', 1, 2)
    """
    if isinstance(recorded, dict) and isinstance(current, dict):
        for key in list(recorded) + [k for k in current if k not in recorded]:
            found = first_difference(recorded.get(key), current.get(key), f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    return None if recorded == current else (path, recorded, current)
