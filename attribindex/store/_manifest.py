"""The JSON manifest of an index folder: what built it, what it holds, and checksums (docs/format.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from attribindex.errors import AttribIndexError
from attribindex.store import _layout as layout


def read_manifest(root: Path, kind: str = "index") -> dict[str, Any]:
    """Load and check the manifest of a complete index (`kind="index"`), shard (`"shard"`) or either (`"any"`).

    Example:
        >>> read_manifest(Path("demo-index"))["rows"]  # doctest: +SKIP
        1200
    """
    path = root / layout.MANIFEST
    if not path.is_file():
        if (root / layout.BUILD_MARKER).exists():
            raise AttribIndexError(
                f"{root} holds an incomplete build (it was interrupted or is still running). "
                f"Run the build again with --overwrite to start over."
            )
        raise AttribIndexError(
            f"{root} is not an attribindex index (no {layout.MANIFEST}). Build one with `attribindex build`."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AttribIndexError(f"{path} is damaged ({err}). Rebuild the index.") from None
    found = manifest.get("format")
    if found not in (layout.FORMAT_NAME, layout.SHARD_FORMAT_NAME):
        raise AttribIndexError(f"{path} is not an attribindex manifest (format={found!r}).")
    if kind == "index" and found == layout.SHARD_FORMAT_NAME:
        shard = manifest.get("shard", {})
        raise AttribIndexError(
            f"{root} is shard {shard.get('index')} of {shard.get('count')} of a sharded build, not a searchable index. "
            f"Merge all the shards first: `attribindex merge SHARD_DIR... --out INDEX_DIR`."
        )
    if kind == "shard" and found != layout.SHARD_FORMAT_NAME:
        raise AttribIndexError(
            f"{root} is a finished index, not a shard. `attribindex merge` takes the folders built with "
            f"--num-shards N --shard-index I."
        )
    version = manifest.get("format_version")
    if version not in layout.READABLE_VERSIONS:
        readable = " and ".join(map(str, layout.READABLE_VERSIONS))
        raise AttribIndexError(
            f"{root} uses index format version {version}; this attribindex reads versions {readable}. "
            f"Install the attribindex version that built it, or rebuild."
        )
    return _upgraded(manifest) if found == layout.FORMAT_NAME else manifest


def _upgraded(manifest: dict[str, Any]) -> dict[str, Any]:
    """A version-1 index, seen as version 2: one segment, nothing deleted, never mutated."""
    if manifest["format_version"] == 1:
        manifest["format_version"] = 2
        manifest["version"] = 1
        manifest["index"]["segments"] = [{"file": manifest["index"].pop("file"), "rows": manifest["rows"]}]
        manifest["deleted"] = {"file": None, "rows": 0}
    return manifest
