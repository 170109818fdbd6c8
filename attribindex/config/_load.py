"""Strict conversion between YAML/dicts and the typed config: unknown keys and bad values are refused."""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml

from attribindex._records import from_json, to_json
from attribindex.config._schema import BuildConfig
from attribindex.errors import AttribIndexError

T = TypeVar("T")

SPEED_SETTINGS = ("batch_size", "device")  # `extract` settings that change how fast rows come, never what they are
EXACT_RESOURCE_SETTINGS = ("memory_gb",)  # `exact` settings that bound the machine, never change the sums


def config_from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build config dataclass `cls` from a mapping (None = all defaults), refusing unknown keys with a
    did-you-mean hint and bad values with the place they are at.

    Example:
        >>> from attribindex.config import HessianConfig
        >>> config_from_dict(HessianConfig, {"kind": "identity"})
        HessianConfig(kind='identity', damping=0.1)
    """
    return from_json(cls, {} if data is None else data, where)


def config_to_dict(config: Any) -> dict[str, Any]:
    """The JSON/YAML-ready form of a config (nested dataclasses become dicts, tuples lists)."""
    return to_json(config)


def rows_settings(config: BuildConfig) -> dict[str, Any]:
    """The config as a dict without its speed and memory settings (batch size, device, exact.memory_gb): what
    decides the rows, so an interrupted build may resume, and shards from different machines merge, with others.

    Example:
        >>> "batch_size" in rows_settings(BuildConfig())["extract"]
        False
    """
    settings = config_to_dict(config)
    settings["extract"] = {k: v for k, v in settings["extract"].items() if k not in SPEED_SETTINGS}
    if "exact" in settings:
        settings["exact"] = {k: v for k, v in settings["exact"].items() if k not in EXACT_RESOURCE_SETTINGS}
    return settings


def _presets_dir() -> Path:
    """Where the YAML presets are: `attribindex/presets/` inside an installed wheel (pyproject.toml maps
    index_configs/ there at build time), else `index_configs/` of the source tree (an editable install)."""
    packaged = importlib.resources.files("attribindex") / "presets"
    if isinstance(packaged, Path) and packaged.is_dir():  # a wheel is always unpacked: a Path, never a zip
        return packaged
    return Path(__file__).resolve().parents[2] / "index_configs"


PRESETS_DIR = _presets_dir()


def preset_names() -> list[str]:
    """The names `load_config` accepts as presets, sorted.

    Example:
        >>> "tiny" in preset_names()
        True
    """
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")) if PRESETS_DIR.is_dir() else []


class _ConfigLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-8` (no dot) as a string; configs mean a number, as YAML 1.2 and JSON do."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_config(source: str | Path | None) -> BuildConfig:
    """Load a BuildConfig from a YAML file, a preset name (`index_configs/`, shipped in the package), or defaults
    (None). A file path wins over a preset of the same name.

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
        raise AttribIndexError(
            f"config {str(source)!r} is neither a YAML file nor a preset name. "
            f"Presets: {', '.join(preset_names()) or f'(none found in {PRESETS_DIR})'}."
        )
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:  # its own message spans lines (it quotes the text): keep the one-line cause
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise AttribIndexError(f"config {path} is not valid YAML: {problem}{where}. Fix the YAML there.") from None
    return config_from_dict(BuildConfig, data, where=path.name)
