"""The searchable index of a living folder: FAISS segments over consecutive row ranges, minus deleted rows.

A build writes one segment of the configured kind; each append adds an exact flat one (so an append
costs its own rows, not the index, and needs no retraining); compaction and refresh rewrite them as one
segment of the configured kind. Each segment hides its deleted rows itself, so a deleted row can never be
returned, whatever k. `SegmentedIndex` sees its segments only through the `Segment` protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from attribindex.errors import AttribIndexError
from attribindex.index._approx import ApproximateIndex
from attribindex.index._blockwise import TorchFlatIndex
from attribindex.index._flat import FlatIndex, gpu_available
from attribindex.index._segment import Segment, best_k, check_k
from attribindex.index._store_flat import StoreAccess
from attribindex.store import SegmentRecord


def open_segment(
    root: Path, record: SegmentRecord, device: str = "auto", start: int = 0, store: StoreAccess | None = None
) -> Segment:
    """The segment `record` of a manifest, whose rows begin at global row `start`: an exact search over the row
    store (format 9, through `store`), an approximate FAISS index, or an exact flat FAISS file of an older index,
    searched by GPU faiss when installed, else by torch GEMMs in bfloat16 on a CUDA GPU (streamed from host memory
    if it does not fit), else by faiss on CPU (memory-mapped)."""
    path = root / record.file
    if record.from_store:
        if store is None:
            raise AttribIndexError(f"the segment over rows {start}.. searches the row store: open it with its store.")
        return store.open(root, record, start, device)  # "auto": the GPU when there is one
    if not record.exact:
        return ApproximateIndex.load(path, record.plan)
    if device != "cpu" and not gpu_available() and torch.cuda.is_available():
        return TorchFlatIndex.load(path, device="cuda")
    return FlatIndex.load(path, device=device)


class SegmentedIndex:
    """Top-k over several segments with deleted rows hidden; labels are global row positions.

    Bottom-k is the top-k of the negated queries: ``scores, rows = index.search(-queries, k)``, then ``-scores``.

    Example:
        >>> index = SegmentedIndex([FlatIndex.empty(2), FlatIndex.empty(2)], deleted=np.array([1]))  # doctest: +SKIP
        >>> scores, rows = index.search(queries, k=5)  # doctest: +SKIP
    """

    def __init__(self, segments: list[Segment], deleted: np.ndarray):
        self.segments = segments
        self.starts = np.cumsum([0] + [s.rows for s in segments])  # (S + 1,)
        self.deleted = np.asarray(deleted, dtype=np.int64)  # sorted global rows
        for segment, start, stop in zip(segments, self.starts, self.starts[1:]):
            segment.exclude(self.deleted[(self.deleted >= start) & (self.deleted < stop)] - start)

    @classmethod
    def load(
        cls,
        root: Path,
        records: Sequence[SegmentRecord],
        deleted: np.ndarray,
        device: str = "auto",
        store: StoreAccess | None = None,
    ) -> SegmentedIndex:
        """The segments of a manifest; `store` gives the segments over the row store their rows and W."""
        starts = np.cumsum([0] + [record.rows for record in records])
        return cls([open_segment(root, r, device, int(s), store) for r, s in zip(records, starts)], deleted)

    @property
    def rows(self) -> int:
        """Rows stored, deleted ones included."""
        return int(self.starts[-1])

    @property
    def live_rows(self) -> int:
        return self.rows - len(self.deleted)

    @property
    def exact(self) -> bool:
        """True when every segment returns exact candidates with exact scores."""
        return all(s.exact for s in self.segments)

    @property
    def description(self) -> str:
        """How the segments search, e.g. ``IVF1024,PQ32 nprobe=16 + 2 × flat``."""
        kinds = [s.description for s in self.segments]
        unique = list(dict.fromkeys(kinds))
        return " + ".join(k if kinds.count(k) == 1 else f"{kinds.count(k)} × {k}" for k in unique)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product over live rows: ((Q, k) scores descending, (Q, k) global rows, -1 past the end).

        Scores and membership are exact only when `exact`; otherwise they are candidates to re-rank.
        """
        check_k(k, self.live_rows, what="live rows")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        all_scores, all_rows = [], []
        for segment, start in zip(self.segments, self.starts):
            scores, rows = segment.candidates(queries, k)
            all_scores.append(scores)
            all_rows.append(np.where(rows >= 0, rows + start, -1))
        scores, rows = np.concatenate(all_scores, axis=1), np.concatenate(all_rows, axis=1)  # (Q, Σ k)
        return best_k(np.where(rows >= 0, scores, -np.inf), rows, k)  # (Q, k) each

    def configure(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Set the search effort of every segment that has one (IVF cells scanned, HNSW candidate list); None
        keeps the current value, and exact segments ignore both."""
        for segment in self.segments:
            segment.configure(nprobe=nprobe, ef_search=ef_search)
