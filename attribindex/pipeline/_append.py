"""Appending documents to an index with its own model, projection and (frozen) preconditioner.

The new rows get new chunks and one new FAISS segment, so an append costs its own rows, not the
index. Their curvature is added to the sums; `attribindex info` shows how far the whitening in use
has drifted from what the sums now imply, and `attribindex refresh` re-whitens.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from attribindex.data import Corpus, Document, open_corpus
from attribindex.errors import AttribIndexError
from attribindex.pipeline._exact import ExactFactors
from attribindex.pipeline._extract import Checkpoint, extract, read_checkpoint
from attribindex.pipeline._mutation import DRIFT_SAMPLE_ROWS, Mutation, commit, mutation, whitening_drift
from attribindex.pipeline._write_segments import write_flat_segment
from attribindex.query import AttributionIndex
from attribindex.store import AppendEvent, DriftRecord, RowStore, layout, write_json


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

    def format(self) -> str:
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


def _pending_append(root: Path, request: dict, first_chunk: int) -> Checkpoint | None:
    """The checkpoint of an interrupted append of the same documents onto the same version, to resume;
    anything else an interrupted append left is discarded."""
    try:
        same = json.loads((root / layout.APPEND_REQUEST).read_text(encoding="utf-8")) == request
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

    Example:
        >>> from attribindex import append_documents
        >>> append_documents("my-index", "new-crawl.jsonl", id_field="id", skip_duplicates=True)  # doctest: +SKIP
    """
    started = time.perf_counter()
    root = Path(index_dir)
    corpus = data if isinstance(data, Corpus) else open_corpus(data, text_field, id_field, split, limit)
    with mutation(root, keep_pending_append=True) as change:
        manifest = change.manifest
        if manifest.ensemble is not None:
            raise AttribIndexError(
                f"{root} is an ensemble over {len(manifest.ensemble.checkpoints)} checkpoints; appending to one is not "
                "supported yet. Build the ensemble again over the larger corpus."
            )
        index = AttributionIndex.open(root, model=model, device=manifest.config.extract.device)
        duplicates = _duplicates(corpus, index, skip_duplicates)
        request = _append_request(corpus, skip_empty, skip_duplicates, manifest.version)
        first_chunk = manifest.store.next_chunk
        resume = _pending_append(root, request, first_chunk)
        write_json(root / layout.APPEND_REQUEST, request)
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
            exact=ExactFactors(index.extractor, manifest.config.exact) if manifest.config.exact.enabled else None,
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


def _append_request(corpus: Corpus, skip_empty: bool, skip_duplicates: bool, base_version: int) -> dict:
    """What decides an append's rows (`append.request.json`): the same append on the same version resumes."""
    return {
        "data": corpus.description,
        "text_field": corpus.text_field,
        "id_field": corpus.id_field,
        "limit": corpus.limit,
        "skip_empty": skip_empty,
        "skip_duplicates": skip_duplicates,
        "base_version": base_version,
    }


def _duplicates(corpus: Corpus, index: AttributionIndex, skip_duplicates: bool) -> dict[int, str]:
    """{corpus position: id} of the documents already in the index, in corpus order; refused unless skipped."""
    positions = {doc.id: position for position, doc in corpus.numbered()}
    duplicates = dict(sorted({positions[doc_id]: doc_id for doc_id in index.store.find_rows(positions)}.items()))
    if duplicates and not skip_duplicates:
        first = next(iter(duplicates.values()))
        raise AttribIndexError(
            f"{len(duplicates)} documents of {corpus.description} are already in the index (first: id {first!r}). "
            f"Pass `skip_duplicates=True` to leave them out, or delete the indexed ones first."
        )
    if len(duplicates) == len(positions):
        raise AttribIndexError(f"all {len(positions)} documents of {corpus.description} are already in the index.")
    return duplicates


def _add_rows(change: Mutation, index: AttributionIndex, curvature, chunks, progress: bool) -> DriftRecord | None:
    """Record freshly written chunks in `change`: one exact flat segment over them, whitened with the frozen
    preconditioner (nothing to retrain), and their curvature added to the sums. Returns the whitening's drift."""
    root, manifest = change.root, change.manifest
    new_rows = RowStore(root, manifest.block_dims, manifest.store.dtype, chunks)
    name = change.name(layout.APPENDED_SEGMENT)
    segment = write_flat_segment(root, new_rows, index.preconditioner, manifest.normalization, progress, name)
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
