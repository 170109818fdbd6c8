"""The searchable index of a living folder: flat segments over consecutive row ranges, minus deleted rows.

A build writes one segment; each append adds one (so an append costs its own rows, not the index);
compaction and refresh rewrite them as one. Deleted rows are excluded inside FAISS with a bitmap
selector on CPU (about 3 % slower than an unfiltered scan) and by over-fetching on GPU, so a deleted
row can never be returned, whatever k.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attribindex.errors import AttribIndexError
from attribindex.index._flat import GPU_MAX_K, FlatIndex, import_faiss


class SegmentedIndex:
    """Exact top-k over several FlatIndex segments with tombstoned rows; labels are global row positions.

    Example:
        >>> index = SegmentedIndex([FlatIndex.empty(2), FlatIndex.empty(2)], deleted=np.array([1]))  # doctest: +SKIP
        >>> scores, rows = index.search(queries, k=5)  # doctest: +SKIP
    """

    def __init__(self, segments: list[FlatIndex], deleted: np.ndarray):
        self.segments = segments
        self.starts = np.cumsum([0] + [s.rows for s in segments])  # (S + 1,)
        self.deleted = np.asarray(deleted, dtype=np.int64)  # sorted global rows
        self._filters = [self._filter(i) for i in range(len(segments))]

    @classmethod
    def load(cls, root: Path, files: list[str], deleted: np.ndarray, device: str = "auto") -> SegmentedIndex:
        return cls([FlatIndex.load(root / name, device=device) for name in files], deleted)

    @property
    def rows(self) -> int:
        """Rows stored, deleted ones included."""
        return int(self.starts[-1])

    @property
    def live_rows(self) -> int:
        return self.rows - len(self.deleted)

    def _filter(self, i: int):
        """(FAISS search parameters excluding the segment's deleted rows, their count); (None, 0) when none."""
        start, stop = self.starts[i], self.starts[i + 1]
        local = self.deleted[(self.deleted >= start) & (self.deleted < stop)] - start
        if len(local) == 0:
            return None, 0
        if self.segments[i].on_gpu:
            return None, len(local)  # GPU faiss takes no selector: over-fetch and drop instead
        faiss = import_faiss()
        alive = np.ones(stop - start, dtype=bool)
        alive[local] = False
        bitmap = np.packbits(alive, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(alive), faiss.swig_ptr(bitmap))
        params = faiss.SearchParameters(sel=selector)
        params.keep_alive = (bitmap, selector)  # FAISS holds raw pointers to both
        return params, len(local)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product over live rows: ((Q, k) scores descending, (Q, k) global rows, -1 past the end)."""
        if k < 1 or k > self.live_rows:
            raise AttribIndexError(f"k must be between 1 and the number of live rows ({self.live_rows}), got {k}.")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        all_scores, all_rows = [], []
        for segment, start, (params, dropped) in zip(self.segments, self.starts, self._filters):
            want = min(k + (dropped if params is None else 0), segment.rows)
            if segment.on_gpu and want > GPU_MAX_K:
                raise AttribIndexError(
                    f"GPU faiss returns at most {GPU_MAX_K} results per query; k plus the {dropped} deleted rows of a "
                    f"segment exceeds that. Compact the index (`attribindex compact`) or use a smaller k."
                )
            scores, rows = segment.raw_search(queries, want, params)
            rows = np.where(rows >= 0, rows + start, -1)
            if dropped and params is None:
                gone = np.isin(rows, self.deleted)
                scores, rows = np.where(gone, -np.inf, scores), np.where(gone, -1, rows)
            all_scores.append(scores)
            all_rows.append(rows)
        scores, rows = np.concatenate(all_scores, axis=1), np.concatenate(all_rows, axis=1)  # (Q, Σ want)
        scores = np.where(rows >= 0, scores, -np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)

    def search_bottom(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Bottom-k by inner product: ((Q, k) scores ascending, (Q, k) global rows)."""
        scores, rows = self.search(-np.asarray(queries, dtype=np.float32), k)
        return -scores, rows
