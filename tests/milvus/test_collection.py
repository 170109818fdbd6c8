"""The collection's record and the vectors it stores: the CountSketch is the documented linear map and keeps inner
products in expectation; the record reads back as written; a foreign collection is refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from attribindex import AttribIndexError
from attribindex.milvus import CollectionState, MilvusTarget
from attribindex.milvus._collection import count_sketch

STATE = CollectionState(
    index_id="ai-0123456789ab",
    version=3,
    rows=120,
    model_fingerprint="sha256:aa",
    projection_hash="sha256:bb",
    preconditioner_hash="sha256:cc",
    dim=6,
    normalization="dot",
    kind="HNSW",
    max_norm=2.5,
    augmented=True,
    sketch_dim=4,
    sketch_seed=7,
)
TARGET = MilvusTarget.parse("milvus://localhost:19530/wiki")


def test_the_sketch_is_the_documented_signed_hashing_matrix():
    x = np.random.default_rng(0).standard_normal((5, 10)).astype(np.float32)
    rng = np.random.default_rng([3, 10, 4])  # [seed, D, S], as the module docstring says
    buckets, signs = rng.integers(0, 4, 10), 2 * rng.integers(0, 2, 10) - 1
    matrix = np.zeros((10, 4), np.float32)  # (D, S): one signed 1 per row
    matrix[np.arange(10), buckets] = signs
    np.testing.assert_allclose(count_sketch(x, 4, seed=3), x @ matrix, rtol=1e-6, atol=1e-6)


def test_the_sketch_keeps_inner_products_in_expectation():
    x, y = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    pairs = [count_sketch(np.stack([x, y]), 16, seed) for seed in range(2000)]
    mean = np.mean([a @ b for a, b in pairs])
    spread = np.std([a @ b for a, b in pairs]) / np.sqrt(len(pairs))
    assert abs(mean - x @ y) < 4 * spread


def test_stored_vectors_and_queries_are_sketched_then_augmented_to_l2():
    rows = np.random.default_rng(2).standard_normal((3, 6)).astype(np.float32) * 0.5
    query = np.random.default_rng(3).standard_normal((1, 6)).astype(np.float32)
    stored, searched = STATE.vectors(rows), STATE.queries(query)
    assert stored.shape == (3, 5) and searched.shape == (1, 5) and searched[0, 4] == 0
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 2.5, rtol=1e-5)  # every row on the sphere of radius M
    distances = ((stored - searched) ** 2).sum(axis=1)
    inner = count_sketch(rows, 4, 7) @ count_sketch(query, 4, 7)[0]
    np.testing.assert_allclose(distances, (searched**2).sum() + 2.5**2 - 2 * inner, rtol=1e-5)


def test_the_record_reads_back_as_written_and_a_foreign_collection_is_refused():
    pushing = dataclasses.replace(STATE, pushing=4, rewrite=True, pushed_through=60)
    assert CollectionState.from_properties(pushing.properties() | {"other": "x"}, TARGET) == pushing
    with pytest.raises(AttribIndexError, match="was not made by attribindex push. Name another collection"):
        CollectionState.from_properties({"owner": "someone"}, TARGET)
    older = STATE.properties() | {"attribindex.format": "0"}
    with pytest.raises(AttribIndexError, match="another attribindex version .* --replace"):
        CollectionState.from_properties(older, TARGET)
