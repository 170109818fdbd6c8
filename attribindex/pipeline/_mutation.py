"""A living index: every change (append, delete, compact, refresh) is one versioned, atomic mutation.

A mutation takes the index lock, writes new files under new names (`curvature.v3.safetensors`,
`index/segment.v3.faiss`, new chunk numbers), and commits by rewriting `manifest.json` (one rename)
with its version raised and an event logged. Files the new manifest no longer names are then
removed. A crash before the commit leaves the previous version whole; its leftovers are removed by
the next mutation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from attribindex.errors import resource_failures
from attribindex.hessian import CurvatureSums, Preconditioner, fit_preconditioner
from attribindex.pipeline._output import now
from attribindex.pipeline._write_segments import raw_blocks, sampled_raw_blocks, write_segment
from attribindex.store import (
    DriftRecord,
    IndexManifest,
    MutationEvent,
    RowStore,
    SegmentRecord,
    file_records,
    index_lock,
    layout,
    read_manifest,
    write_manifest,
)

_OUR_TOP_LEVEL = ("projections", "curvature", "preconditioner", "deleted", "append")  # name stems a mutation writes


class Mutation:
    """The next version of an index being prepared: `manifest` is replaced (never edited) as files are written,
    and `name` gives this version's file names."""

    def __init__(self, root: Path, manifest: IndexManifest):
        self.root = root
        self.manifest = manifest
        self.version = manifest.version + 1
        self.committed = False  # the new manifest is written: what is left is tidying up

    def name(self, base: str) -> str:
        return layout.versioned(base, self.version)

    def update(self, **changes: Any) -> None:
        """Replace top-level parts of the manifest, e.g. ``update(deleted=DeletedRecord(...))``."""
        self.manifest = dataclasses.replace(self.manifest, **changes)

    def update_hessian(self, **changes: Any) -> None:
        self.update(hessian=dataclasses.replace(self.manifest.hessian, **changes))

    def store(self) -> RowStore:
        manifest = self.manifest
        return RowStore(self.root, manifest.block_dims, manifest.store.dtype, manifest.store.chunks)

    def curvature(self) -> CurvatureSums:
        sums, _ = CurvatureSums.load(self.root / self.manifest.hessian.curvature_file)
        return sums

    def live_rows(self, sample: int | None = None) -> Callable[[], Iterator]:
        """The pass over the live (not deleted) stored rows that EK-FAC's eigenvalues need: all of them, or a
        seeded sample of at most `sample` rows (enough for a drift estimate, without reading the whole store)."""
        store, deleted = self.store(), self.manifest.deleted_rows(self.root)
        if sample is None or store.rows - len(deleted) <= sample:
            return lambda: raw_blocks(store, deleted)
        live = np.setdiff1d(np.arange(store.rows), deleted)  # (L,)
        chosen = np.sort(np.random.default_rng(0).choice(live, sample, replace=False))
        return lambda: sampled_raw_blocks(store, chosen)

    def preconditioner(self) -> Preconditioner:
        manifest = self.manifest
        return Preconditioner.load(self.root / manifest.hessian.file, manifest.module_names, manifest.block_dims)

    def drop_files(self, kind: str) -> None:
        """Forget the file records of `kind` (`curvature`, `deleted`, …), whatever their version."""
        files = {n: r for n, r in self.manifest.files.items() if "/" in n or n.split(".")[0] != kind}
        self.update(files=files)

    def replace_file(self, kind: str, new: str) -> None:
        """Point the manifest's `kind` file (e.g. the curvature) at the freshly written `new`."""
        self.drop_files(kind)
        self.update(files=self.manifest.files | file_records(self.root, [new]))

    def set_segments(self, segments: list[SegmentRecord]) -> None:
        """Make `segments` the searchable index; files not yet recorded are hashed now."""
        files = self.manifest.files
        names = [s.file for s in segments]
        kept = {name: files[name] for name in names if name in files}
        others = {n: r for n, r in files.items() if not n.startswith(f"{layout.INDEX_DIR}/")}
        new = file_records(self.root, [name for name in names if name not in kept])
        self.update(files=others | kept | new, index=dataclasses.replace(self.manifest.index, segments=tuple(segments)))

    def write_segment(self, store: RowStore, preconditioner: Preconditioner, progress: bool) -> SegmentRecord:
        """One segment of the index's configured kind over `store`, under this version's name; the operating
        point measured on the old segments no longer applies."""
        self.update(index=dataclasses.replace(self.manifest.index, operating_point=None))
        config = self.manifest.config.index
        return write_segment(
            self.root, store, preconditioner, config, self.manifest.normalization, progress, self.version
        )


@contextlib.contextmanager
def mutation(
    root: Path, keep_pending_append: bool = False, memory_fix: str = "close other programs"
) -> Iterator[Mutation]:
    """Lock the index, clear a crashed mutation's leftovers, and yield the next version to fill and `commit`.

    `keep_pending_append` spares an interrupted append's files, for an append that may resume it. Running out of
    disk space, permission or memory on the way is reported as a `ResourceError` saying what the same command
    does when run again (`memory_fix`: how this mutation can need less memory).
    """
    root = Path(root)
    version = read_manifest(root).version  # a clear error for a folder that is not a complete index, first
    change: Mutation | None = None

    def then() -> str:
        if change is not None and change.committed:
            return f"version {change.version} is committed, and the rerun tidies up what is left"
        if keep_pending_append:
            return f"it resumes from its last written chunk (until then the index is version {version}, unchanged)"
        return f"the index is still version {version}, unchanged"

    with resource_failures(root, then, memory_fix), index_lock(root):
        manifest = read_manifest(root)  # re-read under the lock
        version = manifest.version
        collect_garbage(root, manifest, keep_pending_append)
        change = Mutation(root, manifest)
        yield change


def commit(change: Mutation, event: type[MutationEvent], **details: Any) -> IndexManifest:
    """Write the new manifest with `event(**details)` logged (the commit point), then remove the files it no
    longer names."""
    logged = event(version=change.version, time=now(), **details)
    manifest = dataclasses.replace(
        change.manifest,
        format_version=layout.FORMAT_VERSION,
        version=change.version,
        log=change.manifest.log + (logged,),
    )
    write_manifest(change.root, manifest)
    change.committed = True
    collect_garbage(change.root, manifest)
    return manifest


def collect_garbage(root: Path, manifest: IndexManifest, keep_pending_append: bool = False) -> None:
    """Remove our files that the manifest does not name: leftovers of a crashed or superseded version
    (and of an interrupted append, unless `keep_pending_append`)."""
    keep = {name for name, _ in manifest.recorded_files()}
    if keep_pending_append:
        keep |= {layout.APPEND_CHECKPOINT, layout.APPEND_REQUEST}
        keep |= {
            f"{layout.ROWS_DIR}/{f.name}"
            for f in layout.chunk_files_from(root, manifest.store.next_chunk)
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


DRIFT_SAMPLE_ROWS = 20_000  # live rows EK-FAC's drift estimate re-corrects eigenvalues on, after an append or delete


def whitening_drift(
    preconditioner: Preconditioner, sums: CurvatureSums, damping: float, rows: Callable[[], Iterator] | None = None
) -> DriftRecord | None:
    """How far the whitening in use is from the one the current curvature sums imply:
    ‖W_now − W_used‖_F / ‖W_used‖_F per module, summarised as median and max. None for `identity`.
    EK-FAC's implied whitening needs its eigenvalue pass over live rows, `rows()`."""
    if preconditioner.kind == "identity":
        return None
    names, dims = preconditioner.names, preconditioner.dims
    implied = fit_preconditioner(preconditioner.kind, sums, names, dims, damping, rows)
    return drift_between(preconditioner, implied, sums.count)


def drift_between(used: Preconditioner, implied: Preconditioner, examples: int) -> DriftRecord:
    """The drift record (median and max relative change over modules) from `used` to `implied`."""
    changes = used.relative_change(implied)
    return DriftRecord(median=statistics.median(changes), max=max(changes), examples=examples)
