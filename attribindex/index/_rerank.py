"""Exact re-ranking: candidates from an approximate search, re-scored from the exact vectors.

Memory: queries are taken in tiles so that the gathered candidate vectors (tile × C × D float32) stay
under `max_bytes`; nothing of size Q × N is ever formed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from attribindex.index._segment import best_k

RERANK_BLOCK_BYTES = 64 * 2**20


def rerank(
    queries: np.ndarray,
    candidates: np.ndarray,
    vectors_of: Callable[[np.ndarray], np.ndarray],
    k: int,
    max_bytes: int = RERANK_BLOCK_BYTES,
) -> tuple[np.ndarray, np.ndarray]:
    """The top-k of each query's candidates by exact inner product.

    Args:
        queries: (Q, D) float32 query vectors.
        candidates: (Q, C) int64 row positions, -1 for none.
        vectors_of: exact (n, D) float32 vectors of sorted unique row positions (n,).
        k: results per query (≤ C).

    Returns ((Q, k) exact scores descending, (Q, k) rows, -1 and -inf where fewer than k candidates exist).

    Example:
        >>> vectors = np.eye(3, dtype=np.float32)
        >>> scores, rows = rerank(np.array([[0, 2, 1]], np.float32), np.array([[0, 1, 2]]), lambda r: vectors[r], k=2)
        >>> rows.tolist(), scores.tolist()
        ([[1, 2]], [[2.0, 1.0]])
    """
    queries = np.asarray(queries, dtype=np.float32)  # (Q, D)
    count, width = candidates.shape
    tile = max(1, max_bytes // max(1, width * queries.shape[1] * 4))
    scores = np.full((count, width), -np.inf, dtype=np.float32)  # (Q, C)
    for first in range(0, count, tile):
        rows = candidates[first : first + tile]  # (t, C)
        unique = np.unique(rows[rows >= 0])
        if not len(unique):
            continue
        vectors = np.asarray(vectors_of(unique), dtype=np.float32)  # (u, D)
        gathered = vectors[np.searchsorted(unique, np.maximum(rows, 0))]  # (t, C, D)
        exact = np.einsum("td,tcd->tc", queries[first : first + tile], gathered)  # (t, C)
        scores[first : first + tile] = np.where(rows >= 0, exact, -np.inf)
    top_scores, top_rows = best_k(scores, candidates, k)  # (Q, k) each
    return top_scores, np.where(np.isfinite(top_scores), top_rows, -1)
