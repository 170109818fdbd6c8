"""Atomic file writes: write to a temporary name beside the target, fsync, then rename over it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces `target` atomically, on failure it is removed.

    Example:
        >>> with atomic_path(Path("out.faiss")) as tmp:  # doctest: +SKIP
        ...     faiss.write_index(index, str(tmp))  # a writer that wants a path; numpy.save needs atomic_open
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(target: Path) -> Iterator[BinaryIO]:
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        yield handle


def write_json(target: Path, data: Any) -> None:
    with atomic_open(target) as handle:
        handle.write((json.dumps(data, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()
