"""Appending documents to an index with its own model, projection and (frozen) preconditioner.

The new rows get new chunks and one new FAISS segment, so an append costs its own rows, not the
index. Their curvature is added to the sums; `attribindex info` shows how far the whitening in use
has drifted from what the sums now imply, and `attribindex refresh` re-whitens.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from attribindex.config import StoreConfig, config_from_dict
from attribindex.data import Corpus, Document, open_corpus
from attribindex.errors import AttribIndexError
from attribindex.pipeline._extract import Checkpoint, extract, read_checkpoint
from attribindex.pipeline._finish import write_flat_index
from attribindex.pipeline._living import DRIFT_SAMPLE_ROWS, commit, mutation, whitening_drift
from attribindex.query import AttributionIndex
from attribindex.store import RowStore, layout, write_json


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
    drift: dict | None

    def format(self) -> str:
        lines = [
            f"appended   {self.added:,} rows to {self.out} (now version {self.version}, {self.live_rows:,} live rows)"
            + (f"; {self.resumed:,} of them from the interrupted run, resumed" if self.resumed else ""),
            f"skipped    {self.duplicates_skipped:,} already indexed, {self.empty_skipped:,} empty",
            f"time       {self.seconds:.1f} s",
        ]
        if self.drift is not None:
            lines.append(
                f"whitening  drift {self.drift['median']:.2%} median, {self.drift['max']:.2%} max over modules "
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
        config = manifest["config"]
        index = AttributionIndex.open(root, model=model, device=config["extract"]["device"])
        positions = {doc.id: position for position, doc in corpus.numbered()}
        total = len(positions)
        duplicates = {positions[doc_id]: doc_id for doc_id in index.store.find_rows(positions)}
        duplicates = dict(sorted(duplicates.items()))
        if duplicates and not skip_duplicates:
            first = next(iter(duplicates.values()))
            raise AttribIndexError(
                f"{len(duplicates)} documents of {corpus.description} are already in the index (first: id {first!r}). "
                f"Pass --skip-duplicates to leave them out, or delete the indexed ones first."
            )
        if len(duplicates) == total:
            raise AttribIndexError(f"all {total} documents of {corpus.description} are already in the index.")

        request = {
            "data": corpus.description,
            "text_field": corpus.text_field,
            "id_field": corpus.id_field,
            "limit": corpus.limit,
            "skip_empty": skip_empty,
            "skip_duplicates": skip_duplicates,
            "base_version": manifest["version"],
        }
        resume = _pending_append(root, request, change.next_chunk())
        write_json(root / layout.APPEND_REQUEST, request)
        store = config_from_dict(StoreConfig, config["store"])
        extraction = extract(
            _NewDocuments(corpus, set(duplicates)),
            index.extractor,
            root,
            store,
            batch_size or config["extract"]["batch_size"],
            skip_empty,
            resume,
            progress,
            manifest["hessian"]["kind"],
            label="append",
            checkpoint=layout.APPEND_CHECKPOINT,
            first_chunk=change.next_chunk(),
        )
        chunks = extraction.state.chunks
        added = sum(c["rows"] for c in chunks)
        new_rows = RowStore(root, change.dims, store.dtype, chunks)
        name = change.name(layout.APPENDED_SEGMENT)  # exact flat whatever the index kind: nothing to retrain
        segment = write_flat_index(root, new_rows, index.preconditioner, manifest["normalization"], progress, name)

        sums = change.curvature()
        sums.merge(extraction.curvature)
        curvature = change.name(layout.CURVATURE)
        sums.save(root / curvature)
        manifest["store"]["chunks"] += chunks
        manifest["rows"] += added
        drift = whitening_drift(
            index.preconditioner, sums, manifest["hessian"]["damping"], change.live_rows(DRIFT_SAMPLE_ROWS)
        )
        change.set_segments(manifest["index"]["segments"] + [segment])
        change.replace_file("curvature", curvature)
        manifest["hessian"] |= {"examples": sums.count, "curvature_file": curvature, "drift": drift}
        event = {
            "event": "append",
            "rows": added,
            "data": corpus.description,
            "duplicates_skipped": len(duplicates),
            "empty_skipped": extraction.state.skipped,
            "tokens": extraction.state.tokens,
        }
        committed = commit(change, event)
    return AppendSummary(
        out=root,
        version=committed["version"],
        added=added,
        resumed=extraction.resumed_rows,
        duplicates_skipped=len(duplicates),
        empty_skipped=extraction.state.skipped,
        live_rows=committed["rows"] - committed["deleted"]["rows"],
        seconds=time.perf_counter() - started,
        drift=drift,
    )
