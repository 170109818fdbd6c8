"""FlatIndex top-k / bottom-k (top-k of the negated queries) equal a brute-force numpy ranking; save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest

from attribindex.errors import AttribIndexError
from attribindex.index import FlatIndex, FlatIndexWriter


@pytest.fixture()
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((500, 24)).astype(np.float32), rng.standard_normal((7, 24)).astype(np.float32)


def test_top_and_bottom_k_equal_brute_force(data, tmp_path):
    base, queries = data
    with FlatIndexWriter(tmp_path / "flat.faiss", dim=24) as writer:
        writer.add(base[:200])
        writer.add(base[200:])
    index = FlatIndex.load(tmp_path / "flat.faiss", device="cpu")
    exact = queries @ base.T  # (7, 500)
    scores, rows = index.search(queries, 10)
    np.testing.assert_array_equal(rows, np.argsort(-exact, axis=1)[:, :10])
    np.testing.assert_allclose(scores, np.take_along_axis(exact, rows, 1), rtol=1e-5)
    low_scores, low_rows = index.search(-queries, 5)  # bottom-k: top-k of -q, scores negated back
    low_scores = -low_scores
    np.testing.assert_array_equal(low_rows, np.argsort(exact, axis=1)[:, :5])
    np.testing.assert_allclose(low_scores, np.take_along_axis(exact, low_rows, 1), rtol=1e-5)
    assert (np.diff(low_scores, axis=1) >= 0).all()


@pytest.mark.parametrize("k", [0, -1, 501])
def test_bad_k_is_refused(data, k):
    index = FlatIndex.empty(24)
    index.add(data[0])
    with pytest.raises(AttribIndexError, match="k must be between 1"):
        index.search(data[1], k)


def test_damaged_index_file(tmp_path):
    (tmp_path / "flat.faiss").write_bytes(b"not an index")
    with pytest.raises(AttribIndexError, match="damaged"):
        FlatIndex.load(tmp_path / "flat.faiss", device="cpu")


@pytest.mark.parametrize("chunks", [[0], [1], [7, 0, 5], [200, 300]])
def test_streamed_file_equals_faiss_write_index(tmp_path, data, chunks):
    """The streaming writer produces byte-for-byte the file the installed faiss writes."""
    import faiss

    base = data[0]
    with FlatIndexWriter(tmp_path / "streamed.faiss", dim=24) as writer:
        start = 0
        for n in chunks:
            writer.add(base[start : start + n])
            start += n
    reference = faiss.IndexFlatIP(24)
    reference.add(base[:start])
    faiss.write_index(reference, str(tmp_path / "reference.faiss"))
    assert (tmp_path / "streamed.faiss").read_bytes() == (tmp_path / "reference.faiss").read_bytes()
    loaded = FlatIndex.load(tmp_path / "streamed.faiss", device="cpu")
    assert loaded.rows == start


def test_interrupted_stream_leaves_no_file(tmp_path, data):
    with pytest.raises(RuntimeError), FlatIndexWriter(tmp_path / "flat.faiss", dim=24) as writer:
        writer.add(data[0][:10])
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_two_faiss_builds_are_refused():
    from attribindex.index._flat import check_single_faiss

    check_single_faiss(["numpy", "faiss-cpu"])
    with pytest.raises(AttribIndexError, match="several faiss builds are installed .faiss-cpu, faiss-gpu-cu12."):
        check_single_faiss(["faiss-gpu-cu12", "faiss-cpu"])
