"""TorchFlatIndex equals FAISS IndexFlatIP whatever the tiling; excluded rows never come back; the score matrix
is never materialised (peak memory measured in a subprocess); read_flat_vectors reads what FAISS writes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from attribindex.errors import AttribIndexError
from attribindex.index import FlatIndexWriter, import_faiss
from attribindex.index._blockwise import TorchFlatIndex, read_flat_vectors, score_tile_shape

ROWS, DIM = 2000, 24
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((ROWS, DIM), dtype=np.float32), rng.standard_normal((300, DIM), dtype=np.float32)


def exact_scores(queries: np.ndarray, base: np.ndarray, excluded=()) -> np.ndarray:
    scores = queries.astype(np.float64) @ base.astype(np.float64).T  # (Q, N)
    scores[:, np.asarray(excluded, dtype=np.int64)] = -np.inf
    return scores


def brute_force(exact: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.argsort(-exact, axis=1, kind="stable")[:, :k]  # (Q, k)
    scores = np.take_along_axis(exact, rows, 1)
    return scores.astype(np.float32), np.where(np.isfinite(scores), rows, -1)


def assert_same_ranking(scores, rows, ref_scores, ref_rows, exact, tol=1e-5):
    """Scores to `tol`; rows equal wherever the true score is `tol` clear of both neighbours (ties may swap)."""
    count, k = ref_rows.shape
    assert scores.shape == rows.shape == (count, k)
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    np.testing.assert_allclose(scores, ref_scores, rtol=tol, atol=tol)  # -inf padding must line up too
    assert (scores[:, :-1] >= scores[:, 1:]).all(), "scores must be descending"
    np.testing.assert_array_equal(rows >= 0, ref_rows >= 0)
    ranked = -np.sort(-exact, axis=1)  # (Q, N)
    after = ranked[:, k : k + 1] if k < ranked.shape[1] else np.full((count, 1), -np.inf)
    padded = np.concatenate([np.full((count, 1), np.inf), ranked[:, :k], after], axis=1)  # (Q, k + 2)
    with np.errstate(invalid="ignore"):  # -inf - -inf in the padding: nan, i.e. tied
        untied = (padded[:, :-2] - padded[:, 1:-1] > tol) & (padded[:, 1:-1] - padded[:, 2:] > tol)
    np.testing.assert_array_equal(rows[untied], ref_rows[untied])
    valid = rows >= 0
    own = np.take_along_axis(exact, np.where(valid, rows, 0), 1)  # tied rows are still genuine: their own score
    np.testing.assert_allclose(scores[valid], own[valid], rtol=tol, atol=tol)
    for row in rows:
        assert len(set(row[row >= 0].tolist())) == int((row >= 0).sum()), "a row came back twice"


def test_read_flat_vectors_reads_writer_and_faiss_files(data, tmp_path):
    faiss = import_faiss()
    base = data[0]
    with FlatIndexWriter(tmp_path / "writer.faiss", dim=DIM) as writer:
        writer.add(base[:700])
        writer.add(base[700:])
    flat = faiss.IndexFlatIP(DIM)
    flat.add(base)
    faiss.write_index(flat, str(tmp_path / "faiss.faiss"))
    for name in ("writer.faiss", "faiss.faiss"):
        vectors = read_flat_vectors(tmp_path / name)
        assert isinstance(vectors, np.memmap) and vectors.dtype == np.float32
        np.testing.assert_array_equal(vectors, base)
    faiss.write_index(faiss.IndexFlatIP(DIM), str(tmp_path / "empty.faiss"))
    assert read_flat_vectors(tmp_path / "empty.faiss").shape == (0, DIM)


def test_read_flat_vectors_refuses_damaged_files(data, tmp_path):
    faiss = import_faiss()
    with FlatIndexWriter(tmp_path / "flat.faiss", dim=DIM) as writer:
        writer.add(data[0])
    whole = (tmp_path / "flat.faiss").read_bytes()
    (tmp_path / "truncated.faiss").write_bytes(whole[:-4])
    (tmp_path / "header.faiss").write_bytes(whole[:20])
    (tmp_path / "longer.faiss").write_bytes(whole + b"\0" * 4)
    l2 = faiss.IndexFlatL2(DIM)  # fourcc IxF2
    l2.add(data[0])
    faiss.write_index(l2, str(tmp_path / "l2.faiss"))
    for name in ("truncated", "header", "longer", "l2", "missing"):
        with pytest.raises(AttribIndexError, match="Rebuild the index") as error:
            read_flat_vectors(tmp_path / f"{name}.faiss")
        assert f"{name}.faiss" in str(error.value)


@pytest.mark.parametrize("max_score_bytes", [1024, 256 * 2**20], ids=["tiny-tiles", "default"])
@pytest.mark.parametrize("k", [1, 10, ROWS])
@pytest.mark.parametrize("count", [1, 7, 300])
def test_float32_equals_faiss(data, count, k, max_score_bytes):
    faiss = import_faiss()
    base, queries = data[0], data[1][:count]
    flat = faiss.IndexFlatIP(DIM)
    flat.add(base)
    ref_scores, ref_rows = flat.search(queries, k)
    index = TorchFlatIndex(base, max_score_bytes=max_score_bytes)
    query_tile, row_tile = index._tile_shape(count, k)
    if max_score_bytes == 1024:
        assert row_tile < ROWS  # several row blocks: the running top-k merge is exercised
    scores, rows = index.search(queries, k)
    assert_same_ranking(scores, rows, ref_scores, ref_rows, exact_scores(queries, base))


def test_converted_blocks_are_bounded_and_exact(data):
    """A float64 source is converted to float32 block by block: row blocks obey the budget, answers stay exact."""
    base, queries = data[0].astype(np.float64), data[1][:50]
    index = TorchFlatIndex(base, max_score_bytes=16384)
    assert index._store is None
    query_tile, row_tile = index._tile_shape(50, 10)
    assert row_tile * DIM * 4 <= 16384 and query_tile * row_tile * 4 <= 16384 and row_tile < ROWS
    exact = exact_scores(queries, base)
    assert_same_ranking(*index.search(queries, 10), *brute_force(exact, 10), exact)


@pytest.mark.parametrize("max_score_bytes", [1024, 256 * 2**20], ids=["tiny-tiles", "default"])
def test_excluded_rows_never_come_back(data, max_score_bytes):
    base, queries = data[0], data[1][:40]
    rng = np.random.default_rng(1)
    # block edges and both ends included; unsorted with duplicates, as a caller might pass them
    excluded = np.concatenate([rng.choice(ROWS, 300, replace=False), [0, 255, 256, 1023, ROWS - 1, 0]])
    gone = np.unique(excluded)
    live = ROWS - len(gone)
    index = TorchFlatIndex(base, max_score_bytes=max_score_bytes)
    exact = exact_scores(queries, base, gone)
    for k in (1, 10, live, live + 1, ROWS):
        scores, rows = index.search(queries, k, excluded=excluded)
        assert not np.isin(rows, gone).any()
        assert (rows == -1).sum(axis=1).tolist() == [max(0, k - live)] * len(queries)
        assert np.isneginf(scores[rows == -1]).all()
        assert_same_ranking(scores, rows, *brute_force(exact, k), exact)


def test_excluded_everything_and_out_of_range(data):
    base, queries = data[0][:50], data[1][:3]
    index = TorchFlatIndex(base)
    scores, rows = index.search(queries, 5, excluded=np.arange(50))
    assert (rows == -1).all() and np.isneginf(scores).all()
    for bad in ([-1], [50]):
        with pytest.raises(AttribIndexError, match="local positions"):
            index.search(queries, 5, excluded=np.array(bad))


def test_excluded_matches_faiss_id_selector(data):
    faiss = import_faiss()
    base, queries = data[0], data[1][:20]
    excluded = np.arange(3, ROWS, 7, dtype=np.int64)
    flat = faiss.IndexFlatIP(DIM)
    flat.add(base)
    keep = np.setdiff1d(np.arange(ROWS), excluded)
    params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(keep))
    ref_scores, ref_rows = flat.search(queries, 25, params=params)
    scores, rows = TorchFlatIndex(base, max_score_bytes=2048).search(queries, 25, excluded=excluded)
    assert_same_ranking(scores, rows, ref_scores, ref_rows, exact_scores(queries, base, excluded))


def test_bottom_k_is_top_k_of_the_negated_queries(data):
    base, queries = data[0], data[1][:5]
    exact = exact_scores(queries, base)
    scores, rows = TorchFlatIndex(base, max_score_bytes=1024).search(-queries, 10)
    scores = -scores
    np.testing.assert_array_equal(rows, np.argsort(exact, axis=1)[:, :10])
    np.testing.assert_allclose(scores, np.sort(exact, axis=1)[:, :10], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_scores_on_cpu_stay_close(data, dtype):
    """Observed on Gaussian data (D=24..256): recall@10 0.98-1.0; score error <= 0.5 % (bf16), 0.07 % (fp16) of top."""
    base, queries = data[0], data[1][:100]
    ref_scores, ref_rows = TorchFlatIndex(base).search(queries, 10)
    index = TorchFlatIndex(base, dtype=dtype, max_score_bytes=64 * 2**10)
    assert index._tile_shape(100, 10)[1] < ROWS  # converted blocks, several of them
    scores, rows = index.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), ref_rows.tolist())])
    assert recall >= 0.9
    error = np.abs(scores - ref_scores).max() / np.abs(ref_scores).max()
    assert error <= (1e-2 if dtype == torch.bfloat16 else 2e-3), error
    own = np.take_along_axis(exact_scores(queries, base), rows, 1)  # every row is scored as itself, roughly
    assert np.abs(scores - own).max() / np.abs(ref_scores).max() <= (1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_float16_overflow_is_reported_not_returned():
    base = np.full((10, 8), 300.0, dtype=np.float32)  # 300 * 300 * 8 = 720_000 > 65_504
    with pytest.raises(AttribIndexError, match="bfloat16"):
        TorchFlatIndex(base, dtype=torch.float16).search(base[:2], 3)


def test_load_reads_the_file_without_copying(data, tmp_path):
    base, queries = data
    with FlatIndexWriter(tmp_path / "flat.faiss", dim=DIM) as writer:
        writer.add(base)
    index = TorchFlatIndex.load(tmp_path / "flat.faiss", max_score_bytes=1024)
    assert (index.rows, index.dim, index.on_gpu, index.exact) == (ROWS, DIM, False, True)
    assert isinstance(index._source, np.memmap)
    scores, rows = index.search(queries, 10)
    expected_scores, expected_rows = TorchFlatIndex(base).search(queries, 10)
    assert_same_ranking(scores, rows, expected_scores, expected_rows, exact_scores(queries, base))


@pytest.mark.parametrize("k", [0, -1, ROWS + 1])
def test_bad_k_is_refused(data, k):
    with pytest.raises(AttribIndexError, match="k must be between 1"):
        TorchFlatIndex(data[0]).search(data[1], k)


def test_bad_queries_and_settings_are_refused(data):
    index = TorchFlatIndex(data[0])
    for queries in (data[1][:, :10], data[1][0]):
        with pytest.raises(AttribIndexError, match="queries must have shape"):
            index.search(queries, 3)
    assert index.search(data[1][:0], 3)[0].shape == (0, 3)
    with pytest.raises(AttribIndexError, match="dtype"):
        TorchFlatIndex(data[0], dtype=torch.int8)
    with pytest.raises(AttribIndexError, match="max_score_bytes"):
        TorchFlatIndex(data[0], max_score_bytes=8)
    with pytest.raises(AttribIndexError, match="2-D"):
        TorchFlatIndex(data[0][0])


def test_score_tile_shape_never_exceeds_the_budget():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        queries, rows = (int(x) for x in rng.integers(1, 10 ** rng.integers(1, 7, size=2), size=2))
        dim, element_bytes = int(rng.integers(1, 8193)), int(rng.choice([2, 4, 8]))
        budget = int(rng.integers(element_bytes, 2**30))
        block = int(rng.integers(1, 2**30)) if rng.random() < 0.5 else None
        query_tile, row_tile = score_tile_shape(queries, rows, dim, budget, element_bytes, max_block_bytes=block)
        assert 1 <= query_tile <= queries and 1 <= row_tile <= rows
        assert query_tile * row_tile * element_bytes <= budget
        if block is not None and row_tile > 1:
            assert row_tile * dim * element_bytes <= block
        for size, tile in ((queries, query_tile), (rows, row_tile)):  # the tile grid covers each axis exactly once
            assert sum(min(start + tile, size) - start for start in range(0, size, tile)) == size
    with pytest.raises(ValueError):
        score_tile_shape(10, 10, 4, max_score_bytes=3, element_bytes=4)


def test_merge_temporaries_shrink_the_query_tile_for_large_k(data):
    index = TorchFlatIndex(data[0], max_score_bytes=64 * 2**10)
    for k in (1, 10, 500, ROWS):
        query_tile, row_tile = index._tile_shape(300, k)
        assert query_tile * row_tile * 4 <= 64 * 2**10
        assert query_tile == 1 or query_tile * (k + min(k, row_tile)) * 36 <= 64 * 2**10


MEMORY_SCRIPT = """
import json, sys
import numpy as np
import torch
torch.set_num_threads(2)
from attribindex.index._blockwise import TorchFlatIndex

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

rng = np.random.default_rng(0)
base = rng.standard_normal((50_000, 64), dtype=np.float32)
queries = rng.standard_normal((4096, 64), dtype=np.float32)
index = TorchFlatIndex(base, max_score_bytes=int(sys.argv[1]))
tile = index._tile_shape(len(queries), 10)
# One GEMM and top-k of a tile's shape first, outputs kept: the BLAS's one-time workspace for that shape (3.3 MiB
# with MKL) is then not counted, and since nothing large is freed, glibc's mmap threshold stays put and the
# search's own tile is fresh pages that show in RSS (freeing a big warm-up output would let the tile reuse it).
warm = torch.mm(torch.from_numpy(queries[: tile[0]]), torch.from_numpy(base[: tile[1]]).T)
warm_top = torch.topk(warm, 10, dim=1)
index.search(queries[:2, :], 10)
try:
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to VmRSS: the peak below is the search's own
except OSError:
    pass  # then VmHWM - VmRSS is an upper bound (it may hold an earlier peak)
before = status("VmRSS")
scores, rows = index.search(queries, 10)
growth = status("VmHWM") - before
check = queries[:16].astype(np.float64) @ base.T.astype(np.float64)
json.dump({"growth": growth, "tile": list(tile), "rows": rows[:16].tolist(), "scores": scores[:16].tolist(),
           "ref_rows": np.argsort(-check, axis=1)[:, :10].tolist(),
           "ref_scores": (-np.sort(-check, axis=1)[:, :10]).tolist(), "shape": list(rows.shape)}, sys.stdout)
"""
SCORE_BUDGET = 8 * 2**20
NOT_SCORES = 2**20  # the running top-k (4096 x 10 x 12 bytes = 0.5 MiB), merge temporaries (0.2 MiB), small change


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_thousands_of_queries_never_materialise_the_score_matrix():
    """4096 x 50_000 float32 scores would be 800 MB; the search holds one 8 MiB score tile plus small change.

    Measured as the peak RSS growth of the search in a fresh subprocess (Linux VmHWM, reset just before it): RSS
    sees every allocation (torch's CPU allocator, numpy, the BLAS), which tracemalloc does not (it misses torch).
    Seen: 7.8-8.0 MiB, i.e. the tile; without the warm-up GEMM, 11.2-11.3 MiB (README's figure: + MKL workspace)."""
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MEMORY_SCRIPT), str(SCORE_BUDGET)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["shape"] == [4096, 10]
    assert result["tile"][0] * result["tile"][1] * 4 == SCORE_BUDGET  # (256, 8192): the budget is used, not less
    np.testing.assert_array_equal(result["rows"], result["ref_rows"])
    np.testing.assert_allclose(result["scores"], result["ref_scores"], rtol=1e-5, atol=1e-5)
    limit = SCORE_BUDGET + NOT_SCORES
    assert result["growth"] < limit, f"peak RSS grew by {result['growth'] / 2**20:.1f} MiB, over {limit / 2**20} MiB"


@pytest.mark.gpu
@needs_cuda
def test_cuda_bfloat16_agrees_with_cpu_float32(data):
    base, queries = data
    ref_scores, ref_rows = TorchFlatIndex(base).search(queries, 10)
    index = TorchFlatIndex(base, device="cuda")
    assert index.on_gpu and index.dtype == torch.bfloat16 and not index.streamed
    scores, rows = index.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), ref_rows.tolist())])
    assert recall >= 0.9
    assert np.abs(scores - ref_scores).max() <= 1e-2 * np.abs(ref_scores).max()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_streamed_agrees_with_resident(data, dtype):
    base, queries = data
    excluded = np.arange(0, ROWS, 5)
    resident = TorchFlatIndex(base, device="cuda", dtype=dtype, max_score_bytes=8192)
    streamed = TorchFlatIndex(base, device="cuda", dtype=dtype, max_score_bytes=8192, resident_bytes=0)
    host = torch.from_numpy(base).to(dtype).pin_memory()  # streamed straight from pinned memory, no staging
    pinned = TorchFlatIndex(host, device="cuda", dtype=dtype, max_score_bytes=8192, resident_bytes=0)
    assert streamed.streamed and pinned.streamed and not resident.streamed
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    ref_scores, ref_rows = resident.search(queries, 10, excluded=excluded)
    for other in (streamed, pinned):
        scores, rows = other.search(queries, 10, excluded=excluded)
        assert not np.isin(rows, excluded).any()
        np.testing.assert_allclose(scores, ref_scores, rtol=tol, atol=tol * np.abs(ref_scores).max())
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), ref_rows.tolist())])
        assert recall >= (0.99 if dtype == torch.float32 else 0.95)
