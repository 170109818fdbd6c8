"""Reading and writing `manifest.json` (and a running build's `building.json` marker).

`read_manifest` is the one reader: it parses, checks and upgrades older format versions to the current one;
`write_manifest` is the one writer, and `manifest_json` the bytes it writes (so a plan can size a manifest before
any build). They stay in one module: the reader's promise that a manifest read and written again is the same bytes
is a promise about both. The records themselves are in `attribindex.store._manifest_records`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, overload

from attribindex._records import from_json, to_json
from attribindex.config import BuildConfig
from attribindex.errors import AttribIndexError
from attribindex.store import _layout as layout
from attribindex.store._atomic import atomic_open, write_json
from attribindex.store._log_records import BuildMarker
from attribindex.store._manifest_records import IndexManifest, Manifest, ShardManifest


def with_index_id(manifest: Manifest) -> Manifest:
    """`manifest` with its `index_id`: ``ai-`` + 12 hex digits of a sha256 over the projection, Hessian and chunk
    records, so identical builds get identical ids."""
    hessian = to_json(manifest.hessian) if isinstance(manifest, IndexManifest) else None
    content = json.dumps([to_json(manifest.projection), hessian, to_json(manifest.store.chunks)], sort_keys=True)
    return dataclasses.replace(manifest, index_id="ai-" + hashlib.sha256(content.encode()).hexdigest()[:12])


def manifest_json(manifest: Manifest) -> bytes:
    """The bytes `write_manifest` writes for `manifest`: its records as indented JSON (as `write_json` writes)."""
    return (json.dumps(to_json(manifest), indent=2) + "\n").encode("utf-8")


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Write `root/manifest.json` atomically: the commit point of a build, merge or mutation."""
    with atomic_open(root / layout.MANIFEST) as handle:
        handle.write(manifest_json(manifest))


def read_marker(root: Path) -> BuildMarker | None:
    """The `building.json` of an interrupted build in `root`; None when there is none or it is unreadable."""
    try:
        data = json.loads((root / layout.BUILD_MARKER).read_text(encoding="utf-8"))
        return from_json(BuildMarker, data, layout.BUILD_MARKER)
    except (OSError, ValueError, AttribIndexError):
        return None


def write_marker(root: Path, marker: BuildMarker) -> None:
    write_json(root / layout.BUILD_MARKER, to_json(marker))


@overload
def read_manifest(root: Path, kind: Literal["index"] = "index") -> IndexManifest: ...
@overload
def read_manifest(root: Path, kind: Literal["shard"]) -> ShardManifest: ...
@overload
def read_manifest(root: Path, kind: Literal["any"]) -> Manifest: ...


def read_manifest(root: Path, kind: str = "index") -> Manifest:
    """Load, check and upgrade the manifest of a complete index (`kind="index"`), shard (`"shard"`) or either
    (`"any"`).

    Example:
        >>> read_manifest(Path("demo-index")).rows  # doctest: +SKIP
        1200
    """
    root = Path(root)
    path = root / layout.MANIFEST
    if not path.is_file():
        if (root / layout.BUILD_MARKER).exists():
            raise AttribIndexError(
                f"{root} holds an incomplete build (it was interrupted or is still running). "
                f"Run the same build again to resume it, or rebuild with overwrite=True to start over."
            )
        raise AttribIndexError(f"{root} is not an attribindex index (no {layout.MANIFEST}). Build one first.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AttribIndexError(f"{path} is damaged ({err}). Rebuild the index.") from None
    found = data.get("format") if isinstance(data, dict) else None
    if found not in (layout.FORMAT_NAME, layout.SHARD_FORMAT_NAME):
        raise AttribIndexError(f"{path} is not an attribindex manifest (format={found!r}).")
    if kind == "index" and found == layout.SHARD_FORMAT_NAME:
        shard = data.get("shard", {})
        raise AttribIndexError(
            f"{root} is shard {shard.get('index')} of {shard.get('count')} of a sharded build, not a searchable index. "
            f"Merge all the shards into one index first (`merge_shards`)."
        )
    if kind == "shard" and found != layout.SHARD_FORMAT_NAME:
        raise AttribIndexError(
            f"{root} is a finished index, not a shard. Only the folders of a sharded build (one shard each) merge."
        )
    version = data.get("format_version")
    if version not in layout.READABLE_VERSIONS:
        readable = ", ".join(map(str, layout.READABLE_VERSIONS))
        raise AttribIndexError(
            f"{root} uses index format version {version}; this attribindex reads versions {readable}. "
            f"Install the attribindex version that built it, or rebuild."
        )
    return dataclasses.replace(parse_manifest(upgraded(data), str(path)), read_from_version=version)


def parse_manifest(data: dict[str, Any], where: str = layout.MANIFEST) -> Manifest:
    """The typed manifest of current-format JSON data; a damaged or hand-edited one is refused, saying where."""
    cls = ShardManifest if data.get("format") == layout.SHARD_FORMAT_NAME else IndexManifest
    try:
        return from_json(cls, data, "manifest")
    except AttribIndexError as err:
        raise AttribIndexError(f"{where} is damaged or was edited by hand ({err}). Rebuild the index.") from None


def upgraded(data: dict[str, Any]) -> dict[str, Any]:
    """Manifest data of any readable version, as the current version says it (a mutation then writes it so).

    1 → 2: one segment, nothing deleted, never mutated. 2 → 3: no operating point; the index's `metric` (always
    inner product) is dropped. Before 6: no bias captured, the head excluded by name only. Before 10: the exact
    section's factors over every example. Any older version:
    config keys added since then at their defaults. Identity
    indexes no longer record a `null` drift.
    """
    data = json.loads(json.dumps(data))  # a copy to edit
    if data["format_version"] < 6:
        # Before 6 no bias was captured and the head was left out by name pattern only: say so explicitly,
        # or the current defaults would describe these rows wrongly.
        data["config"]["projection"] |= {"include_head": True, "bias": False}
    if data["format_version"] < 10 and "exact" in data["config"]:
        data["config"]["exact"].setdefault("factor_sample", None)  # before 10 the factors summed every example
    if data["format_version"] < layout.FORMAT_VERSION:
        data["config"] = to_json(from_json(BuildConfig, data["config"], "manifest.config"))
    if data["format"] == layout.FORMAT_NAME:
        index = data["index"]
        if data["format_version"] == 1:
            data["version"] = 1
            index["segments"] = [{"file": index.pop("file"), "rows": data["rows"]}]
            data["deleted"] = {"file": None, "rows": 0}
        index.pop("metric", None)
        index.setdefault("operating_point", None)
        if data["hessian"].get("drift", 0) is None:
            del data["hessian"]["drift"]
    data["format_version"] = layout.FORMAT_VERSION
    return data
