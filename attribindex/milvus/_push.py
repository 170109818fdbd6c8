"""`push_index`: make a Milvus collection hold an index's live, whitened rows, sending only what changed.

What a push sends is read off the manifest's log since the version the collection holds: appends become inserts,
deletes become deletes, and a compaction or refresh (rows renumbered, or every vector re-whitened) a rewrite. So is
a new collection, another kind, or appended rows longer than the augmentation's M allows.

Interrupted at any moment, a push run again ends where an uninterrupted one does. The collection's record says
which version it completely holds; a push first records the version it is writing, then, after each batch, the
row below which inserts are done. A rerun deletes any rows at or past that mark (a batch that went in before its
mark was written), inserts from it on, sends the deletes again (deleting a deleted row does nothing) and only then
records the new version. Until then a search sees the version before, or is refused when a rewrite is under way.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attribindex._progress import progress as progress_bar
from attribindex.errors import AttribIndexError
from attribindex.milvus._collection import (
    MAX_DIM,
    TEXT_LENGTH,
    CollectionState,
    MilvusKind,
    create_collection,
    milvus_kind,
    read_state,
    write_state,
)
from attribindex.milvus._target import MilvusTarget, connect, disconnect, milvus_errors
from attribindex.store import IndexManifest, RowStore, index_lock, read_manifest
from attribindex.store._log_records import CompactEvent, DeleteEvent, RefreshEvent

BATCH_BYTES = 16 * 2**20  # per insert: well under a Milvus server's 64 MB message limit
DELETE_BATCH = 16_384  # primary keys per delete call
NORM_BLOCK_ROWS = 4_096
# M = 1.25 × the largest norm: room for appended rows up to 25 % longer than any before, which would otherwise
# make every such append a rewrite (the augmentation needs ‖x‖ ≤ M)
NORM_HEADROOM = 1.25


@dataclass(frozen=True)
class PushSummary:
    """What a push did.

    Example:
        >>> print(push_index("my-index", "attributions.db").format())  # doctest: +SKIP
        pushed     ai-3f2c… v4 → attributions.db (HNSW): 2,000 rows inserted, 12 deleted, 31.2 s, 64 rows/s
    """

    uri: str
    index_id: str
    version: int
    kind: str
    action: str  # "unchanged", "incremental" or "rewrite"
    reason: str
    inserted: int
    deleted: int
    seconds: float

    def format(self) -> str:
        if self.action == "unchanged":
            return f"unchanged  {self.uri} already holds {self.index_id} v{self.version} ({self.kind})"
        rate = self.inserted / self.seconds if self.seconds > 0 else 0.0
        return (
            f"pushed     {self.index_id} v{self.version} → {self.uri} ({self.kind}, {self.action}: {self.reason}): "
            f"{self.inserted:,} rows inserted, {self.deleted:,} deleted, {self.seconds:.1f} s, {rate:,.0f} rows/s"
        )


@dataclass(frozen=True)
class _Plan:
    rewrite: bool
    reason: str
    insert_from: int  # live rows in [insert_from, manifest.rows) go in
    send_deletes: bool


def push_index(
    index_dir: str | Path,
    uri: str,
    *,
    kind: str | None = None,
    mips: str | None = None,
    replace: bool = False,
    token: str | None = None,
    batch_bytes: int = BATCH_BYTES,
    max_dim: int = MAX_DIM,
    progress: bool = True,
) -> PushSummary:
    """Make the collection at `uri` hold the index's live, whitened rows (see the module docstring).

    Args:
        uri: ``milvus://HOST:PORT/COLLECTION`` or ``PATH.db[#COLLECTION]`` (Milvus Lite).
        kind: the Milvus index type (FLAT, IVF_FLAT, IVF_SQ8, HNSW, DISKANN, GPU_CAGRA, GPU_BRUTE_FORCE); default:
            the collection's, or FLAT for a new one. Another kind than the collection's rewrites it.
        mips: ``auto``, ``augment`` or ``inner_product``: whether approximate kinds index the MIPS→L2 augmentation
            (`MilvusKind.augments`); default: the collection's, or ``auto``. A change rewrites the collection.
        replace: allow overwriting a collection that holds another index (or a newer version of this one).
        token: ``user:password`` or an API key (default: MILVUS_TOKEN, or MILVUS_USER / MILVUS_PASSWORD).
        max_dim: the most dims the server takes in a vector (its proxy.maxDimension); an index with more is pushed
            as a CountSketch of that many dims (see `attribindex.milvus._collection`).

    Example:
        >>> push_index("my-index", "milvus://10.0.0.5:19530/wiki", kind="HNSW")  # doctest: +SKIP
    """
    started = time.perf_counter()
    root = Path(index_dir)
    target = MilvusTarget.parse(uri)
    read_manifest(root)  # a folder that is not an index is refused before its lock file is made in it
    with index_lock(root):
        manifest = read_manifest(root)  # again, under the lock: no mutation runs until the push ends
        client = connect(target, token)
        try:
            state = read_state(client, target)
            chosen = milvus_kind(kind) if kind else (state.milvus_kind if state else milvus_kind("FLAT"))
            augment = chosen.augments(mips or "auto", manifest.normalization)
            if state is not None and mips is None and kind is None:
                augment = state.augmented  # a plain re-push keeps the collection's choice
            plan = _plan(manifest, state, chosen, augment, replace, target)
            writer = _Writer(client, target, root, manifest, batch_bytes, progress, max_dim)
            if not plan.rewrite and plan.insert_from < manifest.rows and augment:
                grown = writer.max_norm(plan.insert_from, state)
                if grown > state.max_norm:
                    plan = _Plan(True, f"appended rows' norms reach {grown:.4g} > M = {state.max_norm:.4g}", 0, False)
            if plan.rewrite:
                action, inserted, deleted = "rewrite", writer.rewrite(state, chosen, augment), 0
            elif plan.insert_from == manifest.rows and not plan.send_deletes and state.version == manifest.version:
                action, inserted, deleted = "unchanged", 0, 0
            else:
                action, (inserted, deleted) = "incremental", writer.update(state, plan)
        finally:
            disconnect(client, target)
    return PushSummary(
        uri=target.uri,
        index_id=manifest.index_id,
        version=manifest.version,
        kind=chosen.name,
        action=action,
        reason=plan.reason,
        inserted=inserted,
        deleted=deleted,
        seconds=time.perf_counter() - started,
    )


def _plan(
    manifest: IndexManifest,
    state: CollectionState | None,
    kind: MilvusKind,
    augment: bool,
    replace: bool,
    target: MilvusTarget,
) -> _Plan:
    """Rewrite, or insert from which row and whether to send deletes: from the collection's record and the log."""
    if state is None:
        return _Plan(True, "new collection", 0, False)
    if state.index_id != manifest.index_id and not replace:
        raise AttribIndexError(
            f"{target.uri} holds another index ({state.index_id}), not {manifest.index_id}. Push with --replace to "
            f"overwrite it, or name another collection."
        )
    if state.version > manifest.version and not replace:
        raise AttribIndexError(
            f"{target.uri} holds version {state.version} of {state.index_id}, newer than this copy of the index "
            f"(version {manifest.version}). Push the newer copy, or push with --replace to go back to this one."
        )
    reasons = [
        (replace and state.index_id != manifest.index_id, f"replacing {state.index_id}"),
        (replace and state.version > manifest.version, f"replacing newer version {state.version}"),
        (kind.name != state.kind, f"kind {state.kind} → {kind.name}"),
        (augment != state.augmented, "augmented" if augment else "no longer augmented"),
        (state.pushing and state.rewrite, "resuming an interrupted rewrite"),
        (state.normalization != manifest.normalization or state.dim != manifest.dim, "another normalization or dim"),
        (state.projection_hash != manifest.projection.hash, "another projection"),
        (state.model_fingerprint != manifest.model.fingerprint, "another model"),
        (state.preconditioner_hash != manifest.hessian.preconditioner_hash, "the Hessian was refreshed"),
    ]
    since = [event for event in manifest.log if getattr(event, "version", 0) > state.version]
    reasons += [(isinstance(e, (CompactEvent, RefreshEvent)), f"{e.event} in version {e.version}") for e in since]
    for applies, reason in reasons:
        if applies:
            return _Plan(True, reason, 0, False)
    insert_from = state.pushed_through if state.pushing else state.rows
    deleted_since = any(isinstance(event, DeleteEvent) for event in since)
    changes = [f"{manifest.rows - insert_from:,} new rows"] if insert_from < manifest.rows else []
    changes += ["deletes"] if deleted_since else []
    changes += ["resuming an interrupted push"] if state.pushing else []
    return _Plan(False, ", ".join(changes) or "nothing to send", insert_from, deleted_since or bool(state.pushing))


class _Writer:
    """Reads the index's rows and writes them, batch by batch, recording progress in the collection."""

    def __init__(self, client, target, root: Path, manifest: IndexManifest, batch_bytes, progress, max_dim):
        from attribindex.hessian import Preconditioner

        self.client, self.target, self.manifest, self.progress = client, target, manifest, progress
        self.store = RowStore(root, manifest.block_dims, manifest.store.dtype, manifest.store.chunks)
        self.preconditioner = Preconditioner.load(
            root / manifest.hessian.file, manifest.module_names, manifest.block_dims
        )
        self.deleted = manifest.deleted_rows(root)
        self.batch_rows = max(1, batch_bytes // (4 * (manifest.dim + 1) + 512))
        self.max_dim = max_dim

    def _live(self, start: int, stop: int) -> np.ndarray:
        rows = np.arange(start, stop, dtype=np.int64)
        return rows[~np.isin(rows, self.deleted)]

    def _vectors(self, rows: np.ndarray) -> np.ndarray:
        return self.preconditioner.index_vectors(self.store.raw_rows(rows), self.manifest.normalization)  # (n, D)

    def max_norm(self, start: int, collection: CollectionState) -> float:
        """The largest norm of what `collection` stores (before augmenting) among live rows from `start` on."""
        largest = 0.0
        total = self.manifest.rows - start
        with progress_bar(total=total, desc="norms", unit="row", enabled=self.progress and total > 0) as bar:
            for first in range(start, self.manifest.rows, NORM_BLOCK_ROWS):
                rows = self._live(first, min(first + NORM_BLOCK_ROWS, self.manifest.rows))
                if len(rows):
                    vectors = collection.sketched(self._vectors(rows))
                    largest = max(largest, float(np.sqrt(np.einsum("nd,nd->n", vectors, vectors).max())))
                bar.update(min(NORM_BLOCK_ROWS, self.manifest.rows - first))
        return largest

    def _record(self, **changes) -> CollectionState:
        manifest = self.manifest
        base = CollectionState(
            index_id=manifest.index_id,
            version=0,
            rows=0,
            model_fingerprint=manifest.model.fingerprint,
            projection_hash=manifest.projection.hash,
            preconditioner_hash=manifest.hessian.preconditioner_hash,
            dim=manifest.dim,
            normalization=manifest.normalization,
            kind="FLAT",
            max_norm=0.0,
        )
        return dataclasses.replace(base, **changes)

    def rewrite(self, state: CollectionState | None, kind: MilvusKind, augment: bool) -> int:
        """Start the collection over (or resume an interrupted rewrite to this version); the rows inserted."""
        version = self.manifest.version
        resuming = (
            state is not None
            and state.rewrite
            and state.pushing == version
            and state.kind == kind.name
            and state.augmented == augment
            and state.index_id == self.manifest.index_id
            and state.preconditioner_hash == self.manifest.hessian.preconditioner_hash
        )
        if resuming:
            writing = state
        else:
            sketch_dim = self.max_dim - augment if self.manifest.dim + augment > self.max_dim else 0
            nlist = kind.nlist(self.manifest.live_rows, lite=self.target.local)
            writing = self._record(
                kind=kind.name,
                nlist=nlist,
                sketch_dim=sketch_dim,
                sketch_seed=self.manifest.projection.seed,
                augmented=augment,
                pushing=version,
                rewrite=True,
            )
            if augment:
                writing = dataclasses.replace(writing, max_norm=self.max_norm(0, writing) * NORM_HEADROOM)
            with milvus_errors(self.target):
                if state is not None:
                    self.client.drop_collection(self.target.collection)
            create_collection(self.client, self.target, writing)
        inserted = self._insert(writing)
        self._commit(writing)
        return inserted

    def update(self, state: CollectionState, plan: _Plan) -> tuple[int, int]:
        writing = dataclasses.replace(state, pushing=self.manifest.version, pushed_through=plan.insert_from)
        write_state(self.client, self.target, writing)
        inserted = self._insert(writing)
        deleted = self._delete() if plan.send_deletes else 0
        self._commit(writing)
        return inserted, deleted

    def _insert(self, writing: CollectionState) -> int:
        """Insert live rows from `writing.pushed_through` on, recording the mark after each batch."""
        start, stop = writing.pushed_through, self.manifest.rows
        with milvus_errors(self.target):
            self.client.delete(self.target.collection, filter=f"row >= {start}")  # a batch whose mark was not written
        inserted = 0
        with progress_bar(total=stop - start, desc="push", unit="row", enabled=self.progress) as bar:
            for first in range(start, stop, self.batch_rows):
                last = min(first + self.batch_rows, stop)
                rows = self._live(first, last)
                if len(rows):
                    vectors = writing.vectors(self._vectors(rows))  # (n, D or D + 1)
                    documents = self.store.documents(rows.tolist())
                    batch = [
                        {"row": int(row), "id": _label(doc.id), "source": _label(doc.source), "vector": v}
                        for row, doc, v in zip(rows, documents, vectors)
                    ]
                    with milvus_errors(self.target):
                        self.client.insert(self.target.collection, batch)
                    inserted += len(rows)
                writing = dataclasses.replace(writing, pushed_through=last)
                write_state(self.client, self.target, writing)
                bar.update(last - first)
        return inserted

    def _delete(self) -> int:
        """Delete every deleted row, again: deleting a row the collection does not hold does nothing."""
        rows = self.deleted
        with milvus_errors(self.target):
            for first in range(0, len(rows), DELETE_BATCH):
                self.client.delete(self.target.collection, ids=rows[first : first + DELETE_BATCH].tolist())
        return len(rows)

    def _commit(self, writing: CollectionState) -> None:
        manifest = self.manifest
        done = dataclasses.replace(
            writing, version=manifest.version, rows=manifest.rows, pushing=0, rewrite=False, pushed_through=0
        )
        write_state(self.client, self.target, done)


def _label(text: str) -> str:
    """`text` cut to what a VARCHAR field holds (TEXT_LENGTH bytes of UTF-8, not characters)."""
    encoded = text.encode("utf-8")
    return text if len(encoded) <= TEXT_LENGTH else encoded[:TEXT_LENGTH].decode("utf-8", errors="ignore")
