"""Atomic file writes: write to a temporary name beside the target, fsync, then rename over it; safetensors
files written byte-reproducibly."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


@functools.cache
def _umask() -> int:
    """This process's umask (read once: setting it back at once is the only way to read it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
        # safetensors writes through a temporary of its own, made owner-only (0600): an index built by one user
        # must stay readable by those who query it, as every other file of it is (the mode `open` gives)
        os.chmod(tmp, 0o666 & ~_umask())
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


def save_safetensors(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """`write_safetensors` atomically: to a temporary name, then renamed over `path`.

    Example:
        >>> save_safetensors({"w": torch.ones(2)}, Path("sums.safetensors"), {"count": "3"})  # doctest: +SKIP
    """
    with atomic_path(Path(path)) as tmp:
        write_safetensors(tensors, tmp, metadata)


def write_safetensors(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file` with the header's metadata in sorted key order.

    safetensors keeps the metadata in a Rust HashMap, whose iteration order is seeded per process: equal
    tensors and metadata written by two processes (an uninterrupted build and a resumed one) came out
    with different bytes. Sorting the keys makes a file a function of its contents.
    """
    from safetensors.torch import save_file  # torch is imported only by writers of tensors

    save_file(tensors, str(path), metadata=metadata)
    _sort_metadata(Path(path))


def _sort_metadata(path: Path) -> None:
    """Rewrite the header of safetensors file `path` with `__metadata__` first and its keys sorted; tensor
    entries keep their order (safetensors sorts them already; the data offsets follow it)."""
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        if "__metadata__" not in header:
            return
        ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items()))} | header
        # Compact and unescaped non-ASCII, as safetensors (serde_json) writes it: the same length, re-padded
        # with spaces (which the format allows) to keep the data 8-byte aligned where it was.
        encoded = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(encoded) <= length:
            handle.seek(8)
            handle.write(encoded.ljust(length, b" "))
            return
        data_start = 8 + length
    # Longer than the original header (an escaping difference; not seen in practice): the data moves.
    encoded = encoded.ljust(-(-len(encoded) // 8) * 8, b" ")
    moved = path.with_name(path.name + ".sorted")
    with open(path, "rb") as source, open(moved, "wb") as target:
        target.write(struct.pack("<Q", len(encoded)) + encoded)
        source.seek(data_start)
        shutil.copyfileobj(source, target)
    moved.replace(path)
