"""Integrity of an index or shard folder: every file the manifest lists, against its recorded size and sha256."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from attribindex.errors import AttribIndexError
from attribindex.store._atomic import file_sha256
from attribindex.store._manifest_records import FileRecord, Manifest


def file_problem(root: Path, name: str, record: FileRecord, content: bool = True) -> str | None:
    """What is wrong with `root/name` compared with its manifest record {sha256, bytes}; None when it is intact.

    `content=False` checks existence and size only (cheap enough for every open of a large index).
    """
    path = root / name
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != record.bytes:
        return f"{size:,} bytes, the manifest records {record.bytes:,}"
    if content and file_sha256(path) != record.sha256:
        return "contents differ from the recorded sha256"
    return None


def check_file(root: Path, name: str, record: FileRecord, content: bool = True) -> None:
    problem = file_problem(root, name, record, content)
    if problem is not None:
        raise AttribIndexError(
            f"index file {root / name} is damaged ({problem}). Restore it from a copy, or rebuild; "
            f"`attribindex verify {root}` lists every damaged file."
        )


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of `verify_files`: how many files and bytes were checked, and what is damaged.

    Example:
        >>> report = verify_files(Path("my-index"), read_manifest(Path("my-index"), kind="any"))  # doctest: +SKIP
        >>> report.ok, report.damaged  # doctest: +SKIP
        (True, [])
    """

    files: int
    bytes: int
    damaged: list[tuple[str, str]]  # (relative path, problem)

    @property
    def ok(self) -> bool:
        return not self.damaged


def verify_files(root: Path, manifest: Manifest, progress=None) -> VerifyReport:
    """Re-hash every recorded file. `progress`, if given, is called with the bytes of each file checked."""
    damaged, files, total = [], 0, 0
    for name, record in manifest.recorded_files():
        problem = file_problem(root, name, record)
        if problem is not None:
            damaged.append((name, problem))
        files += 1
        total += record.bytes
        if progress is not None:
            progress(record.bytes)
    return VerifyReport(files, total, damaged)
