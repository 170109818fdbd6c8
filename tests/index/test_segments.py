"""SegmentedIndex over mixed segments: exact flat (FAISS), torch blockwise and approximate, with deleted rows."""

from __future__ import annotations

import numpy as np
import torch

from attribindex.index import FlatIndex, SegmentedIndex, TorchFlatIndex, rerank


def test_mixed_segments_with_rerank_equal_brute_force():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((900, 24)).astype(np.float32)  # rows 0–399 torch bf16, 400–899 faiss
    queries = rng.standard_normal((64, 24)).astype(np.float32)
    deleted = np.sort(rng.choice(900, size=60, replace=False))
    flat = FlatIndex.empty(24)
    flat.add(vectors[400:])
    index = SegmentedIndex([TorchFlatIndex(vectors[:400], dtype=torch.bfloat16), flat], deleted)
    assert not index.exact and index.live_rows == 840  # bf16 scores are rounded: candidates, not answers
    assert index.description == "flat torch bfloat16 on cpu + flat"

    scores = queries @ vectors.T  # (Q, N) brute force
    scores[:, deleted] = -np.inf
    truth = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    _, candidates = index.search(queries, 40)
    assert not np.isin(candidates, deleted).any()
    found_scores, found = rerank(queries, candidates, lambda rows: vectors[rows], 10)
    assert (found == truth).all()
    np.testing.assert_allclose(found_scores, np.take_along_axis(scores, truth, axis=1), rtol=1e-5)

    exact = SegmentedIndex([TorchFlatIndex(vectors[:400]), flat], deleted)  # float32: exact without re-ranking
    assert exact.exact
    _, bottom = exact.search(-queries, 5)  # bottom-k: top-k of -q
    lowest = np.argsort(np.where(np.isinf(scores), np.inf, scores), axis=1, kind="stable")[:, :5]
    assert (bottom == lowest).all()
