"""The interface every index segment implements, and the checks and merges the segment classes share.

A segment is one searchable file over consecutive rows of a living index: `FlatIndex` (FAISS
`IndexFlatIP`), `TorchFlatIndex` (torch GEMMs over the same file) or `ApproximateIndex` (IVF, PQ, HNSW,
16-bit flat). `SegmentedIndex` talks to its segments through `Segment` only, so a new kind needs no
change there. Rows are segment-local positions; -1 and -inf fill a result where fewer rows remain.

This module imports only numpy (tools/gpu_exact_search.py loads `_blockwise.py` without the package).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from attribindex.errors import AttribIndexError


@runtime_checkable
class Segment(Protocol):
    """One index segment: exact or approximate top-k by inner product over its rows, minus hidden ones.

    Example:
        >>> segment: Segment = FlatIndex.empty(dim=2)  # doctest: +SKIP
        >>> segment.add(np.eye(2, dtype=np.float32))  # doctest: +SKIP
        >>> segment.exclude(np.array([0]))  # a deleted row: never returned again  # doctest: +SKIP
        >>> segment.candidates(np.array([[1.0, 0.5]], dtype=np.float32), k=5)  # doctest: +SKIP
        (array([[0.5]], dtype=float32), array([[1]]))
        >>> segment.configure(nprobe=16)  # the search effort; exact segments ignore it  # doctest: +SKIP
    """

    @property
    def rows(self) -> int:
        """Rows stored, hidden ones included."""
        ...

    @property
    def dim(self) -> int:
        """Dimension of the vectors (and queries) searched, e.g. 4096."""
        ...

    @property
    def exact(self) -> bool:
        """True when candidates and their scores are exact (float32 flat); else they are to be re-ranked."""
        ...

    @property
    def description(self) -> str:
        """How this segment searches, e.g. ``flat`` or ``IVF1024,PQ64 nprobe=16``."""
        ...

    def exclude(self, local_rows: np.ndarray) -> None:
        """Hide these local rows (int64, each in [0, rows)) from every later search: a living index's deleted rows.

        Replaces what an earlier call hid.
        """
        ...

    def candidates(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-min(k, rows) of (Q, D) float32 queries over the rows not hidden, for a merge across segments.

        Returns ((Q, k') scores descending, (Q, k') int64 local rows), -1 and -inf where fewer rows remain.
        Unlike `search`, any k >= 1 is accepted.
        """
        ...

    def search(self, queries: np.ndarray, k: int, excluded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product over the rows neither hidden by `exclude` nor in `excluded` (local rows).

        Returns ((Q, k) scores descending, (Q, k) int64 local rows), -1 and -inf where fewer rows remain.
        Refuses k outside [1, rows]. Bottom-k is the top-k of the negated queries, scores negated back:
        ``scores, rows = segment.search(-queries, k); scores = -scores``.
        """
        ...

    def configure(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Set the search effort: IVF cells scanned, HNSW candidate list. None keeps the current value;
        a setting the segment's kind does not have is ignored (exact segments ignore both)."""
        ...


def check_k(k: int, rows: int, what: str = "rows") -> None:
    """Refuse k outside [1, rows]; `what` names the rows in the message (e.g. "live rows").

    Example:
        >>> check_k(0, 10)
        Traceback (most recent call last):
        attribindex.errors.AttribIndexError: k must be between 1 and the number of rows (10), got 0.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 or k > rows:
        raise AttribIndexError(f"k must be between 1 and the number of {what} ({rows}), got {k}.")


def checked_local_rows(excluded: np.ndarray | None, rows: int) -> np.ndarray:
    """`excluded` as sorted unique int64 positions, each checked to lie in [0, rows); None is no rows.

    Example:
        >>> checked_local_rows(np.array([3, 1, 3]), rows=5).tolist()
        [1, 3]
    """
    if excluded is None:
        return np.zeros(0, dtype=np.int64)
    excluded = np.unique(np.asarray(excluded, dtype=np.int64))  # (x,) sorted, so a block finds its own by bisection
    if len(excluded) and (excluded[0] < 0 or excluded[-1] >= rows):
        raise AttribIndexError(
            f"excluded rows must be local positions in [0, {rows}), got {excluded[0]}..{excluded[-1]}. "
            f"Subtract the segment's first global row."
        )
    return excluded


def skipped_rows(hidden: np.ndarray, excluded: np.ndarray | None, rows: int) -> np.ndarray:
    """The sorted local rows one search skips: those `exclude` hid plus the call's own `excluded` (checked).

    Example:
        >>> skipped_rows(np.array([4]), np.array([1, 4]), rows=5).tolist()
        [1, 4]
    """
    return hidden if excluded is None else np.union1d(hidden, checked_local_rows(excluded, rows))


def best_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each query's (score, row) pairs, descending; ties keep their order.

    Example:
        >>> best_k(np.array([[1.0, 3.0, 2.0]]), np.array([[7, 8, 9]]), 2)
        (array([[3., 2.]]), array([[8, 9]]))
    """
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (Q, k)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)
