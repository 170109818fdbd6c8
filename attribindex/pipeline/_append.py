"""Appending documents to an index with its own model, projection and (frozen) preconditioner.

The new rows get new chunks and one new FAISS segment, so an append costs its own rows, not the
index. Their curvature is added to the sums; `attribindex info` shows how far the whitening in use
has drifted from what the sums now imply, and `attribindex refresh` re-whitens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from attribindex._records import to_json
from attribindex.data import Corpus, Document, open_corpus
from attribindex.errors import AttribIndexError
from attribindex.pipeline._exact import ExactFactors
from attribindex.pipeline._extract import Checkpoint, extract, read_checkpoint
from attribindex.pipeline._mutation import (
    DRIFT_SAMPLE_ROWS,
    Mutation,
    collect_garbage,
    commit,
    mutation,
    whitening_drift,
)
from attribindex.pipeline._write_segments import write_store_segment
from attribindex.query import AttributionIndex
from attribindex.store import (
    AppendEvent,
    AppendRequest,
    DriftRecord,
    IndexManifest,
    RowStore,
    layout,
    write_json,
)


@dataclass(frozen=True)
class AppendSummary:
    """What an append changed.

    Example:
        >>> print(append_documents("my-index", "new.jsonl", id_field="id").format())  # doctest: +SKIP
    """

    out: Path
    version: int
    added: int  # rows added, including those an interrupted run of the same append had written
    resumed: int
    duplicates_skipped: int
    empty_skipped: int
    live_rows: int
    seconds: float
    drift: DriftRecord | None
    appended_before: int | None = None  # the version that already appended the same documents: nothing was done

    def format(self) -> str:
        if self.appended_before is not None:
            return (
                f"already appended as version {self.appended_before}; nothing to do ({self.out} is at version "
                f"{self.version}, {self.live_rows:,} live rows)"
            )
        lines = [
            f"appended   {self.added:,} rows to {self.out} (now version {self.version}, {self.live_rows:,} live rows)"
            + (f"; {self.resumed:,} of them from the interrupted run, resumed" if self.resumed else ""),
            f"skipped    {self.duplicates_skipped:,} already indexed, {self.empty_skipped:,} empty",
            f"time       {self.seconds:.1f} s",
        ]
        if self.drift is not None:
            lines.append(
                f"whitening  drift {self.drift.median:.2%} median, {self.drift.max:.2%} max over modules "
                f"(`attribindex refresh` re-whitens)"
            )
        return "\n".join(lines)


class _NewDocuments:
    """A corpus without the documents already in the index (positions kept, so progress stays truthful)."""

    def __init__(self, corpus: Corpus, skip: set[int]):
        self.corpus, self.skip = corpus, skip
        self.description, self.start = corpus.description, 0

    def known_length(self) -> int | None:
        return self.corpus.known_length()

    def numbered(self, first: int = 0) -> Iterator[tuple[int, Document]]:
        return ((p, doc) for p, doc in self.corpus.numbered(first) if p not in self.skip)


def _pending_append(root: Path, pending: dict, first_chunk: int) -> Checkpoint | None:
    """The checkpoint of an interrupted append of the same documents onto the same version, to resume;
    anything else an interrupted append left is discarded."""
    try:
        same = json.loads((root / layout.APPEND_REQUEST).read_text(encoding="utf-8")) == pending
        return read_checkpoint(root, layout.APPEND_CHECKPOINT, first_chunk) if same else _discard(root, first_chunk)
    except (OSError, ValueError, AttribIndexError):  # no, unreadable or damaged leftovers: start afresh
        return _discard(root, first_chunk)


def _discard(root: Path, first_chunk: int) -> None:
    (root / layout.APPEND_CHECKPOINT).unlink(missing_ok=True)
    for file in layout.chunk_files_from(root, first_chunk):
        file.unlink()


def append_documents(
    index_dir: str | Path,
    data: str | Path | Corpus,
    *,
    text_field: str = "text",
    id_field: str | None = None,
    split: str = "train",
    limit: int | None = None,
    skip_empty: bool = False,
    skip_duplicates: bool = False,
    model: str | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> AppendSummary:
    """Add documents to an index under new stable ids, searchable as soon as this returns.

    Args:
        data: as for `build_index`. Ids must be new: a document whose id is already in the index is an
            error, or left out with `skip_duplicates` (without an id field, the id is the text's hash, so
            a text already indexed counts as a duplicate).
        model: a copy of the index's model elsewhere; its fingerprint must match the manifest's.

    An interrupted append resumes when run again. Run again after it committed (the same documents, by content,
    and the same options, as its logged `request`), it finds the append in the index's log and changes nothing.

    Example:
        >>> from attribindex import append_documents
        >>> append_documents("my-index", "new-crawl.jsonl", id_field="id", skip_duplicates=True)  # doctest: +SKIP
    """
    started = time.perf_counter()
    root = Path(index_dir)
    corpus = data if isinstance(data, Corpus) else open_corpus(data, text_field, id_field, split, limit)
    memory_fix = "pass a smaller `batch_size` or close other programs"
    with mutation(root, keep_pending_append=True, memory_fix=memory_fix) as change:
        manifest = change.manifest
        if manifest.ensemble is not None:
            raise AttribIndexError(
                f"{root} is an ensemble over {len(manifest.ensemble.checkpoints)} checkpoints; appending to one is not "
                "supported yet. Build the ensemble again over the larger corpus."
            )
        positions, content = _read_ids_and_content(corpus)
        request = AppendRequest(
            content=content,
            text_field=corpus.text_field,
            id_field=corpus.id_field,
            limit=corpus.limit,
            skip_empty=skip_empty,
            skip_duplicates=skip_duplicates,
        )
        done = committed_append(manifest, request)
        if done is not None:  # a rerun of an append that committed (its process may have died just after)
            collect_garbage(root, manifest)  # what that process had no time to remove: the index as it left it
            return AppendSummary(
                out=root,
                version=manifest.version,
                added=0,
                resumed=0,
                duplicates_skipped=0,
                empty_skipped=0,
                live_rows=manifest.live_rows,
                seconds=time.perf_counter() - started,
                drift=manifest.hessian.drift,
                appended_before=done.version,
            )
        index = AttributionIndex.open(root, model=model, device=manifest.config.extract.device)
        duplicates = _duplicates(positions, corpus.description, index, skip_duplicates)
        pending = {"base_version": manifest.version} | to_json(request)
        first_chunk = manifest.store.next_chunk
        resume = _pending_append(root, pending, first_chunk)
        write_json(root / layout.APPEND_REQUEST, pending)
        store = manifest.config.store
        extraction = extract(
            _NewDocuments(corpus, set(duplicates)),
            index.extractor,
            root,
            store,
            batch_size or manifest.config.extract.batch_size,
            skip_empty,
            resume,
            progress,
            manifest.hessian.kind,
            label="append",
            checkpoint=layout.APPEND_CHECKPOINT,
            first_chunk=first_chunk,
            exact=(
                ExactFactors(index.extractor, manifest.config.exact, corpus.whole_length)
                if manifest.config.exact.enabled
                else None
            ),
        )
        state = extraction.state
        drift = _add_rows(change, index, extraction.curvature, state.chunks, progress)
        committed = commit(
            change,
            AppendEvent,
            rows=state.rows,
            data=corpus.description,
            duplicates_skipped=len(duplicates),
            empty_skipped=state.skipped,
            tokens=state.tokens,
            request=request,
        )
    return AppendSummary(
        out=root,
        version=committed.version,
        added=state.rows,
        resumed=extraction.resumed_rows,
        duplicates_skipped=len(duplicates),
        empty_skipped=state.skipped,
        live_rows=committed.live_rows,
        seconds=time.perf_counter() - started,
        drift=drift,
    )


def _read_ids_and_content(corpus: Corpus) -> tuple[dict[str, int], str]:
    """{id: corpus position} of every document, and the content hash of the documents as read: ``sha256:`` + hex
    over one JSON line ``[id, source, text]`` per document, in order (what decides the rows an append writes)."""
    positions, digest = {}, hashlib.sha256()
    for position, doc in corpus.numbered():
        positions[doc.id] = position
        digest.update((json.dumps([doc.id, doc.source, doc.text], ensure_ascii=False) + "\n").encode("utf-8"))
    return positions, "sha256:" + digest.hexdigest()


def committed_append(manifest: IndexManifest, request: AppendRequest) -> AppendEvent | None:
    """The append that made the index's current version, if it appended the same documents with the same options:
    run again after its commit, an append has nothing left to do. An older append of the same documents does not
    count: what came after it (a delete of its rows, say) may call for appending them again.

    Example:
        >>> committed_append(read_manifest(Path("my-index")), request).version  # doctest: +SKIP
        2
    """
    last = manifest.log[-1] if manifest.log else None
    return last if isinstance(last, AppendEvent) and last.request == request else None


def _duplicates(
    positions: dict[str, int], description: str, index: AttributionIndex, skip_duplicates: bool
) -> dict[int, str]:
    """{corpus position: id} of the documents already in the index (live: a deleted id may come back, as when a
    document is updated by a delete and an append), in corpus order; refused unless skipped."""
    deleted = set(index.manifest.deleted_rows(index.root).tolist())
    indexed = [doc_id for doc_id, row in index.store.find_rows(positions).items() if row not in deleted]
    duplicates = dict(sorted({positions[doc_id]: doc_id for doc_id in indexed}.items()))
    if duplicates and not skip_duplicates:
        first = next(iter(duplicates.values()))
        raise AttribIndexError(
            f"{len(duplicates)} documents of {description} are already in the index (first: id {first!r}). "
            f"Pass `skip_duplicates=True` to leave them out, or delete the indexed ones first."
        )
    if len(duplicates) == len(positions):
        raise AttribIndexError(f"all {len(positions)} documents of {description} are already in the index.")
    return duplicates


def _add_rows(change: Mutation, index: AttributionIndex, curvature, chunks, progress: bool) -> DriftRecord | None:
    """Record freshly written chunks in `change`: one exact segment over them, whitened with the frozen
    preconditioner (nothing to retrain), and their curvature added to the sums. Returns the whitening's drift."""
    root, manifest = change.root, change.manifest
    new_rows = RowStore(root, manifest.block_dims, manifest.store.dtype, chunks)
    segment = write_store_segment(root, new_rows, index.preconditioner, progress, change.name(layout.APPENDED_NORMS))
    sums = change.curvature()
    sums.merge(curvature)
    curvature_file = change.name(layout.CURVATURE)
    sums.save(root / curvature_file)
    change.update(
        store=dataclasses.replace(manifest.store, chunks=manifest.store.chunks + tuple(chunks)),
        rows=manifest.rows + new_rows.rows,
    )
    drift = whitening_drift(index.preconditioner, sums, manifest.hessian.damping, change.live_rows(DRIFT_SAMPLE_ROWS))
    change.set_segments([*manifest.index.segments, segment])
    change.replace_file("curvature", curvature_file)
    change.update_hessian(examples=sums.count, curvature_file=curvature_file, drift=drift)
    return drift
