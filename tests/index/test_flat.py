"""FlatIndex top-k / bottom-k equal a brute-force numpy ranking; save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest

from attribindex.errors import AttribIndexError
from attribindex.index import FlatIndex


@pytest.fixture()
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((500, 24)).astype(np.float32), rng.standard_normal((7, 24)).astype(np.float32)


def test_top_and_bottom_k_equal_brute_force(data, tmp_path):
    base, queries = data
    index = FlatIndex.empty(24)
    index.add(base[:200])
    index.add(base[200:])
    index.save(tmp_path / "flat.faiss")
    index = FlatIndex.load(tmp_path / "flat.faiss", device="cpu")
    exact = queries @ base.T  # (7, 500)
    scores, rows = index.search(queries, 10)
    np.testing.assert_array_equal(rows, np.argsort(-exact, axis=1)[:, :10])
    np.testing.assert_allclose(scores, np.take_along_axis(exact, rows, 1), rtol=1e-5)
    low_scores, low_rows = index.search_bottom(queries, 5)
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
