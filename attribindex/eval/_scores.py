"""Influence scores of every training example for a set of queries: the input of counterfactual metrics."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from attribindex.data import PromptCompletion
from attribindex.errors import AttribIndexError
from attribindex.query import AttributionIndex

SCORE_BLOCK_ROWS = 8192  # training rows re-whitened at a time


def training_scores(
    index: AttributionIndex, queries: Sequence[str | PromptCompletion], train_ids: Sequence[str]
) -> np.ndarray:
    """(Q, N) exact scores of each training example (by id, in the order given) for each query, as the index
    scores them (whitened, and normalised in cosine mode); positive = the example is a proponent.

    Example:
        >>> scores = training_scores(AttributionIndex.open("idx"), ["a query"], truth.train_ids)  # doctest: +SKIP
    """
    found = index.store.find_rows(train_ids)
    missing = [i for i in train_ids if i not in found]
    if missing:
        raise AttribIndexError(
            f"{len(missing)} of {len(train_ids)} training ids are not in {index.root} (first: {missing[0]!r}). "
            f"Build the index over the same training documents (with their ids) as the ground truth."
        )
    rows = np.array([found[i] for i in train_ids], dtype=np.int64)  # (N,)
    if np.isin(rows, index.index.deleted).any():
        raise AttribIndexError(
            f"some training ids were deleted from {index.root}; evaluate on an index that has them all."
        )
    vectors = index.query_vectors(list(queries)).vectors  # (Q, D)
    order = np.argsort(rows)  # the store reads rows in ascending order
    scores = np.empty((len(vectors), len(rows)), dtype=np.float64)  # (Q, N)
    for first in range(0, len(rows), SCORE_BLOCK_ROWS):
        block = order[first : first + SCORE_BLOCK_ROWS]
        scores[:, block] = vectors @ index.exact_vectors(rows[block]).T  # (Q, b)
    return scores
