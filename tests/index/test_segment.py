"""Every segment kind implements `Segment`; hidden and excluded rows agree across `exclude`, `candidates` and
`search`; `configure` sets the search effort where there is one and is a no-op elsewhere."""

from __future__ import annotations

import numpy as np
import pytest

from attribindex.config import IndexConfig
from attribindex.errors import AttribIndexError
from attribindex.index import (
    ApproximateIndex,
    FlatIndex,
    Segment,
    SegmentedIndex,
    SegmentPlan,
    TorchFlatIndex,
    build_segment,
)

ROWS, DIM = 300, 16


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((ROWS, DIM), dtype=np.float32), rng.standard_normal((6, DIM), dtype=np.float32)


def approximate(tmp_path, vectors, **config) -> ApproximateIndex:
    plan = SegmentPlan.resolve(IndexConfig(**config), "dot", len(vectors), vectors.shape[1])
    record = build_segment(
        tmp_path / "segment.faiss", plan, len(vectors), lambda: iter([vectors]), lambda r: vectors[r], progress=False
    )
    return ApproximateIndex.load(tmp_path / "segment.faiss", record)


@pytest.fixture(params=["faiss", "torch", "ivf_flat"])
def segment(request, data, tmp_path) -> Segment:
    """One segment of each kind over the same rows; all three are exact here (ivf_flat scans every cell)."""
    if request.param == "faiss":
        flat = FlatIndex.empty(DIM)
        flat.add(data[0])
        return flat
    if request.param == "torch":
        return TorchFlatIndex(data[0])
    return approximate(tmp_path, data[0], kind="ivf_flat", mips="inner_product", nlist=4, nprobe=4)


def brute_force(vectors, queries, gone, k):
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T  # (Q, N)
    scores[:, gone] = -np.inf
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (Q, k)
    return np.where(np.isfinite(np.take_along_axis(scores, rows, 1)), rows, -1)


def test_every_segment_kind_is_a_segment(data, tmp_path):
    flat: Segment = FlatIndex.empty(DIM)
    torch_flat: Segment = TorchFlatIndex(data[0])
    ivf: Segment = approximate(tmp_path, data[0], kind="ivf_flat", nlist=4)
    for segment in (flat, torch_flat, ivf):
        assert isinstance(segment, Segment)
    assert not isinstance(np.zeros(3), Segment)


def test_hidden_and_excluded_rows_never_come_back(segment, data):
    vectors, queries = data
    hidden, excluded = np.arange(0, ROWS, 3), np.array([1, 2, 4, 5, 3])  # 3 is both
    segment.exclude(hidden)
    gone = np.union1d(hidden, excluded)
    for k in (1, 10, ROWS):
        scores, rows = segment.search(queries, k, excluded=excluded)
        assert rows.shape == scores.shape == (len(queries), k)
        np.testing.assert_array_equal(rows, brute_force(vectors, queries, gone, k))
        assert np.isneginf(scores[rows < 0]).all()
        _, rows = segment.search(queries, k)  # hidden rows only
        np.testing.assert_array_equal(rows, brute_force(vectors, queries, hidden, k))
    _, rows = segment.candidates(queries, 10 * ROWS)  # any k: clipped to the rows
    np.testing.assert_array_equal(rows, brute_force(vectors, queries, hidden, ROWS))
    segment.exclude(np.zeros(0, dtype=np.int64))  # replaces what was hidden
    np.testing.assert_array_equal(segment.candidates(queries, 5)[1], brute_force(vectors, queries, [], 5))


def test_bottom_k_is_top_k_of_negated_queries(segment, data):
    vectors, queries = data
    scores, rows = segment.search(-queries, 5)
    exact = queries.astype(np.float64) @ vectors.astype(np.float64).T  # (Q, N)
    np.testing.assert_array_equal(rows, np.argsort(exact, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(-scores, np.sort(exact, axis=1)[:, :5], rtol=1e-4, atol=1e-4)


def test_bad_k_and_rows_are_refused(segment, data):
    queries = data[1]
    for k in (0, ROWS + 1):
        with pytest.raises(AttribIndexError, match=f"k must be between 1 and the number of rows \\({ROWS}\\)"):
            segment.search(queries, k)
    for bad in ([-1], [ROWS]):
        with pytest.raises(AttribIndexError, match="local positions"):
            segment.exclude(np.array(bad))
        with pytest.raises(AttribIndexError, match="local positions"):
            segment.search(queries, 3, excluded=np.array(bad))


def test_configure_sets_the_effort_of_approximate_segments_only(data, tmp_path):
    vectors = data[0]
    ivf = approximate(tmp_path, vectors, kind="ivf_flat", nlist=4, nprobe=1)
    flat = FlatIndex.empty(DIM)
    flat.add(vectors)
    torch_flat = TorchFlatIndex(vectors)
    index = SegmentedIndex([ivf, flat, torch_flat], deleted=np.array([0, ROWS]))
    before = index.description
    assert before == "IVF4,Flat nprobe=1 + flat + flat torch float32 on cpu"
    index.configure(nprobe=64, ef_search=100)  # nprobe capped at nlist; IVF has no efSearch; exact ones ignore both
    assert (ivf.nprobe, ivf.ef_search) == (4, None)
    assert index.description == "IVF4,Flat nprobe=4 + flat + flat torch float32 on cpu"
    index.configure()  # None keeps the current effort
    assert ivf.nprobe == 4
    with pytest.raises(AttribIndexError, match="nprobe must be at least 1"):
        index.configure(nprobe=0)
    with pytest.raises(AttribIndexError, match="k must be between 1 and the number of live rows"):
        index.search(data[1], 3 * ROWS - 1)
