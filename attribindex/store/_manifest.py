"""The JSON manifest of an index folder: what built it, what it holds, and checksums (docs/format.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from attribindex.errors import AttribIndexError
from attribindex.store import _layout as layout


def read_manifest(root: Path) -> dict[str, Any]:
    """Load and check the manifest of a complete index folder.

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
    if manifest.get("format") != layout.FORMAT_NAME:
        raise AttribIndexError(f"{path} is not an attribindex manifest (format={manifest.get('format')!r}).")
    version = manifest.get("format_version")
    if version != layout.FORMAT_VERSION:
        raise AttribIndexError(
            f"{root} uses index format version {version}; this attribindex reads version {layout.FORMAT_VERSION}. "
            f"Install the attribindex version that built it, or rebuild."
        )
    return manifest
