"""Strict conversion between YAML/dicts and the typed config: unknown keys and bad values are refused."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from attribindex.config._schema import BuildConfig
from attribindex.errors import AttribIndexError

T = TypeVar("T")


def _check_value(value: Any, annotation: Any, where: str) -> Any:
    """Validate `value` against a (simple) type annotation; return it converted (list → tuple)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise AttribIndexError(f"{where}: {value!r} is not allowed; choose one of {choices}.")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_value(value, inner, where)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise AttribIndexError(f"{where}: expected a list of strings, got {value!r}.")
        return tuple(_check_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AttribIndexError(f"{where}: expected a number, got {value!r}.")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise AttribIndexError(f"{where}: expected an integer, got {value!r}.")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise AttribIndexError(f"{where}: expected a string, got {value!r}.")
        return value
    if dataclasses.is_dataclass(annotation):
        return config_from_dict(annotation, value, where)
    raise TypeError(f"unsupported config annotation {annotation!r} at {where}")


def config_from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass `cls` from a mapping, refusing unknown keys with a did-you-mean hint.

    Example:
        >>> from attribindex.config import HessianConfig
        >>> config_from_dict(HessianConfig, {"kind": "identity"})
        HessianConfig(kind='identity', damping=0.1)
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise AttribIndexError(f"{where}: expected a mapping of keys to values, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise AttribIndexError(f"{where}: unknown key {key!r}.{hint} Valid keys: {', '.join(names)}.")
        kwargs[key] = _check_value(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except AttribIndexError as err:
        raise AttribIndexError(f"{where}: {err}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """The JSON/YAML-ready form of a config (nested dataclasses become dicts, tuples lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


PRESETS_DIR = Path(__file__).resolve().parents[2] / "index_configs"


def load_config(source: str | Path | None) -> BuildConfig:
    """Load a BuildConfig from a YAML file, a preset name from `index_configs/`, or defaults (None).

    Example:
        >>> load_config("tiny").projection.rank_in
        4
    """
    if source is None:
        return BuildConfig()
    path = Path(source)
    if not path.exists() and (PRESETS_DIR / f"{source}.yaml").exists():
        path = PRESETS_DIR / f"{source}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")) if PRESETS_DIR.is_dir() else []
        raise AttribIndexError(
            f"config {str(source)!r} is neither a YAML file nor a preset name. "
            f"Presets: {', '.join(presets) or '(none found)'}."
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise AttribIndexError(f"config {path} is not valid YAML: {err}") from None
    return config_from_dict(BuildConfig, data, where=path.name)
