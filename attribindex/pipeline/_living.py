"""A living index: every change (append, delete, compact, refresh) is one versioned, atomic mutation.

A mutation takes the index lock, writes new files under new names (`curvature.v3.safetensors`,
`index/segment.v3.faiss`, new chunk numbers), and commits by rewriting `manifest.json` (one rename)
with its version raised and an event logged. Files the new manifest no longer names are then
removed. A crash before the commit leaves the previous version whole; its leftovers are removed by
the next mutation.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import fcntl
import shutil
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attribindex.config import IndexConfig, config_from_dict
from attribindex.errors import AttribIndexError
from attribindex.hessian import CurvatureSums, Preconditioner, fit_preconditioner
from attribindex.pipeline._finish import WHITEN_BLOCK_BYTES, file_records, raw_blocks, write_segment
from attribindex.store import RowStore, layout, read_manifest, write_json

_OUR_TOP_LEVEL = ("projections", "curvature", "preconditioner", "deleted", "append")  # name stems a mutation writes


@dataclass
class Mutation:
    """The manifest being changed; `name` gives this version's file names."""

    root: Path
    manifest: dict  # a deep copy of the committed manifest, edited in place
    version: int

    def name(self, base: str) -> str:
        return layout.versioned(base, self.version)

    @property
    def names(self) -> list[str]:
        return [m["name"] for m in self.manifest["modules"]]

    @property
    def dims(self) -> list[int]:
        return [m["dim"] for m in self.manifest["modules"]]

    def store(self) -> RowStore:
        manifest = self.manifest
        return RowStore(self.root, self.dims, manifest["store"]["dtype"], manifest["store"]["chunks"])

    def curvature(self) -> CurvatureSums:
        sums, _ = CurvatureSums.load(self.root / self.manifest["hessian"]["curvature_file"])
        return sums

    def live_rows(self, sample: int | None = None) -> Callable[[], Iterator]:
        """The pass over the live (not deleted) stored rows that EK-FAC's eigenvalues need: all of them, or a
        seeded sample of at most `sample` rows (enough for a drift estimate, without reading the whole store)."""
        store, deleted = self.store(), deleted_rows(self.root, self.manifest)
        if sample is None or store.rows - len(deleted) <= sample:
            return lambda: raw_blocks(store, deleted)
        live = np.setdiff1d(np.arange(store.rows), deleted)  # (L,)
        chosen = np.sort(np.random.default_rng(0).choice(live, sample, replace=False))
        block = max(1, WHITEN_BLOCK_BYTES // (4 * sum(store.block_dims)))
        return lambda: (store.raw_rows(chosen[i : i + block]) for i in range(0, len(chosen), block))

    def preconditioner(self) -> Preconditioner:
        return Preconditioner.load(self.root / self.manifest["hessian"]["file"], self.names, self.dims)

    def drop_files(self, kind: str) -> None:
        """Forget the file records of `kind` (`curvature`, `deleted`, …), whatever their version."""
        for old in [n for n in self.manifest["files"] if "/" not in n and n.split(".")[0] == kind]:
            del self.manifest["files"][old]

    def replace_file(self, kind: str, new: str) -> None:
        """Point the manifest's `kind` file (e.g. the curvature) at the freshly written `new`."""
        self.drop_files(kind)
        self.manifest["files"] |= file_records(self.root, [new])

    def set_segments(self, segments: list[dict]) -> None:
        """Make `segments` (manifest records) the searchable index; files not yet recorded are hashed now."""
        files = self.manifest["files"]
        names = [s["file"] for s in segments]
        kept = {name: files[name] for name in names if name in files}
        for old in [n for n in files if n.startswith(f"{layout.INDEX_DIR}/")]:
            del files[old]
        files |= kept | file_records(self.root, [name for name in names if name not in kept])
        self.manifest["index"]["segments"] = segments

    def write_segment(self, store: RowStore, preconditioner: Preconditioner, progress: bool) -> dict:
        """One segment of the index's configured kind over `store`, under this version's name; the operating
        point measured on the old segments no longer applies."""
        config = config_from_dict(IndexConfig, self.manifest["config"]["index"])
        self.manifest["index"]["operating_point"] = None
        return write_segment(
            self.root, store, preconditioner, config, self.manifest["normalization"], progress, self.version
        )

    def next_chunk(self) -> int:
        return next_chunk_number(self.manifest)


def next_chunk_number(manifest: dict) -> int:
    """The number a new chunk gets: one past the highest the manifest names (numbers are never reused)."""
    return max((int(c["name"]) for c in manifest["store"]["chunks"]), default=-1) + 1


@contextlib.contextmanager
def mutation(root: Path, keep_pending_append: bool = False) -> Iterator[Mutation]:
    """Lock the index, clear a crashed mutation's leftovers, and yield the next version to fill and `commit`.

    `keep_pending_append` spares an interrupted append's files, for an append that may resume it.
    """
    root = Path(root)
    read_manifest(root)  # a clear error for a folder that is not a complete index, before anything is created
    with open(root / layout.LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AttribIndexError(
                f"another attribindex process is changing {root} right now. Wait for it to finish, then retry."
            ) from None
        manifest = read_manifest(root)  # re-read under the lock
        collect_garbage(root, manifest, keep_pending_append)
        yield Mutation(root, copy.deepcopy(manifest), manifest["version"] + 1)


def commit(change: Mutation, event: dict) -> dict:
    """Write the new manifest (the commit point), then remove the files it no longer names."""
    manifest = change.manifest
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    manifest["format_version"] = layout.FORMAT_VERSION
    manifest["version"] = change.version
    manifest["log"].append({"version": change.version, "time": now} | event)
    write_json(change.root / layout.MANIFEST, manifest)
    collect_garbage(change.root, manifest)
    return manifest


def collect_garbage(root: Path, manifest: dict, keep_pending_append: bool = False) -> None:
    """Remove our files that the manifest does not name: leftovers of a crashed or superseded version
    (and of an interrupted append, unless `keep_pending_append`)."""
    keep = {name for chunk in manifest["store"]["chunks"] for name in _chunk_files(chunk)} | set(manifest["files"])
    if keep_pending_append:
        keep |= {layout.APPEND_CHECKPOINT, layout.APPEND_REQUEST}
        keep |= {
            f"{layout.ROWS_DIR}/{f.name}"
            for f in layout.chunk_files_from(root, next_chunk_number(manifest))
            if not layout.is_temporary(f.name)
        }
    for folder in (layout.ROWS_DIR, layout.INDEX_DIR):
        if (root / folder).is_dir():
            for file in (root / folder).iterdir():
                if f"{folder}/{file.name}" not in keep:
                    shutil.rmtree(file) if file.is_dir() else file.unlink()
    for file in root.iterdir():
        ours = file.name.split(".")[0] in _OUR_TOP_LEVEL or layout.is_temporary(file.name)
        if file.is_file() and ours and file.name not in keep:
            file.unlink()


def _chunk_files(chunk: dict) -> list[str]:
    return [layout.chunk_file(chunk["name"], suffix) for suffix in chunk["files"]]


def deleted_rows(root: Path, manifest: dict) -> np.ndarray:
    """Sorted int64 global rows deleted so far."""
    file = manifest["deleted"]["file"]
    return np.load(root / file) if file else np.zeros(0, dtype=np.int64)


DRIFT_SAMPLE_ROWS = 20_000  # live rows EK-FAC's drift estimate re-corrects eigenvalues on, after an append or delete


def whitening_drift(
    preconditioner: Preconditioner, sums: CurvatureSums, damping: float, rows: Callable[[], Iterator] | None = None
) -> dict | None:
    """How far the whitening in use is from the one the current curvature sums imply:
    ‖W_now − W_used‖_F / ‖W_used‖_F per module, summarised as median and max. None for `identity`.
    EK-FAC's implied whitening needs its eigenvalue pass over live rows, `rows()`."""
    if preconditioner.kind == "identity":
        return None
    names, dims = preconditioner.names, preconditioner.dims
    implied = fit_preconditioner(preconditioner.kind, sums, names, dims, damping, rows)
    return drift_between(preconditioner, implied, sums.count)


def drift_between(used: Preconditioner, implied: Preconditioner, examples: int) -> dict:
    """The drift record (median and max relative change over modules) from `used` to `implied`."""
    changes = used.relative_change(implied)
    return {"median": statistics.median(changes), "max": max(changes), "examples": examples}
