"""Deleting documents by id, compacting them away, and re-whitening with the current curvature (refresh).

Delete hides rows at once (every search excludes them inside FAISS) and takes their gradients out of
the curvature sums; their bytes stay on disk until `compact_index` rewrites the store without them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attribindex.errors import AttribIndexError
from attribindex.hessian import fit_preconditioner
from attribindex.pipeline._mutation import (
    DRIFT_SAMPLE_ROWS,
    Mutation,
    commit,
    drift_between,
    mutation,
    whitening_drift,
)
from attribindex.store import (
    ChunkWriter,
    CompactEvent,
    DeletedRecord,
    DeleteEvent,
    DriftRecord,
    IndexManifest,
    OperatingPoint,
    OperatingPointEvent,
    RefreshEvent,
    RowStore,
    atomic_open,
    layout,
)


@dataclass(frozen=True)
class EditSummary:
    """What a delete, compact or refresh changed; `version` is None when nothing needed changing.

    Example:
        >>> print(delete_ids("my-index", ["doc-17", "doc-99"]).format())  # doctest: +SKIP
    """

    out: Path
    action: str
    version: int | None
    rows: int  # rows deleted, removed from storage, or re-whitened
    live_rows: int
    seconds: float
    unknown_ids: tuple[str, ...] = ()
    already_deleted: int = 0
    bytes_freed: int = 0
    drift_before: DriftRecord | None = None
    nothing_to_do: str = ""  # why the index was already as this change would leave it

    def format(self) -> str:
        if self.nothing_to_do:
            return f"{'unchanged':<10} {self.out} ({self.live_rows:,} live rows): {self.nothing_to_do}; nothing to do"
        state = f"now version {self.version}" if self.version else "nothing changed"
        lines = [f"{self.action:<10} {self.rows:,} rows in {self.out} ({state}, {self.live_rows:,} live rows)"]
        if self.already_deleted:
            lines.append(f"already    {self.already_deleted:,} of the ids were deleted before")
        if self.unknown_ids:
            shown = ", ".join(repr(i) for i in self.unknown_ids[:5]) + (" …" if len(self.unknown_ids) > 5 else "")
            lines.append(f"unknown    {len(self.unknown_ids):,} ids are not in the index: {shown}")
        if self.bytes_freed:
            lines.append(f"freed      {self.bytes_freed / 2**20:.1f} MiB")
        if self.drift_before:
            lines.append(f"drift      was {self.drift_before.median:.2%} median, {self.drift_before.max:.2%} max")
        lines.append(f"time       {self.seconds:.1f} s")
        return "\n".join(lines)


def _save_rows(change: Mutation, rows: np.ndarray) -> str:
    name = change.name(layout.DELETED)
    with atomic_open(change.root / name) as handle:
        np.save(handle, rows.astype(np.int64))
    return name


def delete_ids(index_dir: str | Path, ids: Iterable[str]) -> EditSummary:
    """Hide documents from every result from now on (durable), and take them out of the curvature sums.

    Unknown ids are reported, not fatal. Their text stays on disk until `compact_index`.

    Example:
        >>> from attribindex import delete_ids
        >>> delete_ids("my-index", ["doc-17"]).unknown_ids  # doctest: +SKIP
        ()
    """
    started = time.perf_counter()
    root = Path(index_dir)
    with mutation(root) as change:
        manifest = change.manifest
        store = change.store()
        requested = list(dict.fromkeys(str(i) for i in ids))
        row_of = store.find_rows(requested)
        before = manifest.deleted_rows(root)
        deleted_before = set(before.tolist())
        rows, unknown, already = [], [], 0
        for doc_id in requested:
            row = row_of.get(doc_id)
            if row is None:
                unknown.append(doc_id)
            elif row in deleted_before:
                already += 1
            else:
                rows.append(row)
        if not rows:
            seconds = time.perf_counter() - started
            return EditSummary(root, "deleted", None, 0, manifest.live_rows, seconds, tuple(unknown), already)
        if len(before) + len(rows) == manifest.rows:
            raise AttribIndexError(f"deleting these ids would leave {root} with no rows. Build a new index instead.")
        new = np.array(sorted(rows), dtype=np.int64)
        sums = change.curvature()
        sums.remove(dict(zip(manifest.module_names, store.raw_rows(new).split(manifest.block_dims, dim=1))))
        curvature = change.name(layout.CURVATURE)
        sums.save(root / curvature)
        deleted = _save_rows(change, np.union1d(before, new))
        change.update(deleted=DeletedRecord(file=deleted, rows=len(before) + len(new)))
        change.replace_file("deleted", deleted)
        change.replace_file("curvature", curvature)
        drift = whitening_drift(
            change.preconditioner(), sums, manifest.hessian.damping, change.live_rows(DRIFT_SAMPLE_ROWS)
        )
        change.update_hessian(
            examples=sums.count, curvature_file=curvature, drift=drift, retained_deleted=sums.retained_deleted
        )
        committed = commit(change, DeleteEvent, rows=len(new), unknown_ids=len(unknown))
    seconds = time.perf_counter() - started
    return EditSummary(
        root, "deleted", committed.version, len(new), committed.live_rows, seconds, tuple(unknown), already
    )


def compact_index(index_dir: str | Path, progress: bool = True) -> EditSummary:
    """Rewrite the store and the FAISS index without deleted rows, reclaiming their space.

    Atomic: until the new manifest is written the old version is intact; a crash leaves the old index.
    Row positions change; ids do not.

    Example:
        >>> from attribindex import compact_index
        >>> print(compact_index("my-index").format())  # doctest: +SKIP
    """
    started = time.perf_counter()
    root = Path(index_dir)
    with mutation(root) as change:
        manifest = change.manifest
        gone = manifest.deleted_rows(root)
        if len(gone) == 0:
            return EditSummary(root, "compacted", None, 0, manifest.live_rows, time.perf_counter() - started)
        bytes_before = _bytes(manifest)
        config = manifest.config.store
        dims = manifest.block_dims
        writer = ChunkWriter(root, dims, config.dtype, config.chunk_rows, first_chunk=manifest.store.next_chunk)
        chunks = []
        for start, stored, scales, documents in change.store().iter_encoded():
            keep = np.flatnonzero(~np.isin(np.arange(start, start + len(documents)), gone))
            first = 0
            while first < len(keep):  # copied bit for bit: no decode / re-encode
                part = keep[first : first + writer.room]
                record = writer.add_encoded(stored[part], scales[part], [documents[i] for i in part])
                chunks += [record] if record else []
                first += len(part)
        chunks += [last] if (last := writer.close()) else []
        live = manifest.live_rows
        store = RowStore(root, dims, config.dtype, chunks)
        segment = change.write_segment(store, change.preconditioner(), progress)
        change.update(
            store=dataclasses.replace(manifest.store, chunks=tuple(chunks)),
            rows=live,
            deleted=DeletedRecord(file=None, rows=0),
        )
        change.set_segments([segment])
        change.drop_files("deleted")
        committed = commit(change, CompactEvent, rows_removed=len(gone), rows=live)
    return EditSummary(
        root,
        "compacted",
        committed.version,
        len(gone),
        live,
        time.perf_counter() - started,
        bytes_freed=bytes_before - _bytes(committed),
    )


def _bytes(manifest: IndexManifest) -> int:
    return sum(record.bytes for _, record in manifest.recorded_files())


def refresh_index(index_dir: str | Path, progress: bool = True) -> EditSummary:
    """Re-whiten every stored row with the preconditioner the current curvature sums imply (after appends
    and deletes), without running the model. Query vectors from before are refused afterwards. When the
    whitening in use already is that one (nothing changed since the build or the last refresh), no version is
    written.

    Example:
        >>> from attribindex import refresh_index
        >>> print(refresh_index("my-index").format())  # doctest: +SKIP
    """
    started = time.perf_counter()
    root = Path(index_dir)
    with mutation(root) as change:
        manifest = change.manifest
        hessian = manifest.hessian
        if hessian.kind == "identity":
            raise AttribIndexError(f"{root} uses the identity Hessian: there is no whitening to refresh.")
        sums = change.curvature()
        preconditioner = fit_preconditioner(
            hessian.kind, sums, manifest.module_names, manifest.block_dims, hessian.damping, change.live_rows()
        )
        if preconditioner.hash() == hessian.preconditioner_hash:  # e.g. a rerun of a refresh that committed
            why = f"its whitening (version {manifest.version}) already is the one its curvature sums give"
            seconds = time.perf_counter() - started
            return EditSummary(root, "refreshed", None, 0, manifest.live_rows, seconds, nothing_to_do=why)
        drift = drift_between(change.preconditioner(), preconditioner, sums.count)
        name = change.name(layout.PRECONDITIONER)
        preconditioner.save(root / name)
        segment = change.write_segment(change.store(), preconditioner, progress)
        change.set_segments([segment])
        change.replace_file("preconditioner", name)
        change.update_hessian(
            file=name,
            preconditioner_hash=preconditioner.hash(),
            modules=dict(preconditioner.stats),
            drift=DriftRecord(median=0.0, max=0.0, examples=sums.count),
        )
        committed = commit(change, RefreshEvent, rows=manifest.rows, drift_before=drift)
    return EditSummary(
        root,
        "refreshed",
        committed.version,
        manifest.rows,
        committed.live_rows,
        time.perf_counter() - started,
        drift_before=drift,
    )


def set_operating_point(index_dir: str | Path, point: OperatingPoint, measured_version: int) -> int:
    """Record the search setting `eval recall` chose (e.g. ``nprobe=16`` at recall 0.97) in the manifest, as a
    mutation: searches use it from then on. Refused when the index changed after the measurement.

    Returns the new index version.

    Example:
        >>> set_operating_point("my-index", report.operating_point(), index.version)  # doctest: +SKIP
    """
    root = Path(index_dir)
    with mutation(root) as change:
        if change.version - 1 != measured_version:
            raise AttribIndexError(
                f"{root} changed (version {change.version - 1}) after recall was measured on version "
                f"{measured_version}. Measure recall again."
            )
        change.update(index=dataclasses.replace(change.manifest.index, operating_point=point))
        committed = commit(
            change, OperatingPointEvent, nprobe=point.nprobe, ef_search=point.ef_search, recall=point.recall, k=point.k
        )
        return committed.version
