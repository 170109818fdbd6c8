"""The lock an index folder is changed under: one process at a time mutates an index (or pushes it to Milvus)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import filelock

from attribindex.errors import AttribIndexError
from attribindex.store import _layout as layout


@contextlib.contextmanager
def index_lock(root: Path) -> Iterator[None]:
    """Hold `root`'s lock for the block; a second process is refused at once, not queued.

    Example:
        >>> with index_lock(Path("my-index")):  # doctest: +SKIP
        ...     ...  # read the manifest again, then change the index
    """
    lock = filelock.FileLock(root / layout.LOCK, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise AttribIndexError(
            f"another attribindex process is changing {root} right now. Wait for it to finish, then retry."
        ) from None
    try:
        yield
    finally:
        lock.release()
