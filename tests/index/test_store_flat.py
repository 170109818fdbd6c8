"""Exact search over the row store (format 9) equals the flat search it replaces, a FAISS IndexFlatIP over the
whitened (in cosine mode unit-normalised) rows, and holds one block of the store in memory at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from attribindex import AttribIndexError, AttributionIndex, build_index
from attribindex.index import FlatIndex, StoreFlatIndex
from attribindex.store import layout, read_manifest
from tests.conftest import exact_config, with_store

# (mode, Hessian kind, store dtype): every whitening (dense, factored) and every stored encoding
CASES = [
    ("dot", "raw", "float16"),
    ("cosine", "kfac", "float16"),
    ("dot", "ekfac", "bfloat16"),
    ("cosine", "raw", "float32"),
]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(case) for case in CASES])
def index(request, tiny_models, corpus_file, tmp_path_factory) -> AttributionIndex:
    mode, kind, dtype = request.param
    config = with_store(exact_config(mode, kind), dtype=dtype, chunk_rows=7)  # 24 rows: chunks of 7, 7, 7, 3
    out = tmp_path_factory.mktemp("store-flat") / "idx"
    build_index(config, str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
    return AttributionIndex.open(out, load_model_now=False)


def whitened_flat(index: AttributionIndex) -> FlatIndex:
    """The exact segment of a version-8 index over the same rows: their whitened vectors in a FAISS flat index."""
    flat = FlatIndex.empty(index.manifest.dim)
    flat.add(index.exact_vectors(np.arange(index.manifest.rows)))
    return flat


def whitened_queries(index: AttributionIndex, count: int, seed: int) -> np.ndarray:
    """Query vectors as a search receives them: whitened, and unit-normalised in cosine mode."""
    queries = np.random.default_rng(seed).standard_normal((count, index.manifest.dim)).astype(np.float32)
    if index.mode == "cosine":
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return queries


def test_the_build_writes_an_exact_segment_over_the_store_and_no_whitened_copy(index):
    (segment,) = index.manifest.index.segments
    assert segment.from_store and segment.exact and segment.file == layout.STORE_NORMS
    assert isinstance(index.index.segments[0], StoreFlatIndex)
    norms = np.load(index.root / segment.file)
    assert norms.shape == (index.manifest.rows,) and norms.dtype == np.float32
    whitened = index.preconditioner.whiten(index.store.raw_rows(np.arange(index.manifest.rows)))
    np.testing.assert_allclose(norms, whitened.norm(dim=1).numpy(), rtol=1e-6)
    assert not list((index.root / layout.INDEX_DIR).glob("*.faiss"))


def test_top_and_bottom_k_equal_the_flat_search_with_deleted_rows_hidden(index):
    """All rows ranked, deleted ones hidden, by both: the same rows in the same order, scores to float32 round-off
    (the same stored values, summed in another order)."""
    flat, store = whitened_flat(index), index.index.segments[0]
    deleted = np.array([2, 9, 17])
    for segment in (flat, store):
        segment.exclude(deleted)
    queries = whitened_queries(index, 12, seed=0)
    for sign in (1, -1):  # top-k, and bottom-k as the top-k of the negated queries
        want_scores, want_rows = flat.search(sign * queries, 21)
        got_scores, got_rows = store.search(sign * queries, 21)
        np.testing.assert_array_equal(got_rows, want_rows)
        scale = np.abs(want_scores).max()
        np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-6 * scale)
        assert not set(got_rows.ravel()) & set(deleted)


def test_an_index_of_format_8_keeps_its_flat_file_and_gets_store_segments_from_its_mutations(
    tiny_models, corpus_file, corpus_records, tmp_path
):
    """An index whose exact segment is a whitened FAISS file (what attribindex wrote before format 9) searches as
    before; an append adds a segment over the store beside it, and both answer as one flat search would."""
    from attribindex import append_documents
    from attribindex.index import FlatIndexWriter
    from attribindex.store import file_sha256
    from attribindex.testing import write_jsonl

    out = tmp_path / "idx"
    first = write_jsonl(tmp_path / "first.jsonl", corpus_records[:16])
    build_index(exact_config("cosine"), str(tiny_models["gpt2"]), first, out, id_field="id", progress=False)
    opened = AttributionIndex.open(out, load_model_now=False)
    with FlatIndexWriter(out / layout.FLAT_INDEX, opened.manifest.dim) as writer:
        writer.add(opened.exact_vectors(np.arange(16)))
    on_disk = json.loads((out / layout.MANIFEST).read_text())
    (out / layout.STORE_NORMS).unlink()
    files = {n: r for n, r in on_disk["files"].items() if n != layout.STORE_NORMS}
    size = (out / layout.FLAT_INDEX).stat().st_size
    files[layout.FLAT_INDEX] = {"sha256": file_sha256(out / layout.FLAT_INDEX), "bytes": size}
    on_disk |= {"format_version": 8, "files": files}
    on_disk["index"]["segments"] = [{"file": layout.FLAT_INDEX, "rows": 16}]
    (out / layout.MANIFEST).write_text(json.dumps(on_disk))

    old = AttributionIndex.open(out, load_model_now=False)
    assert isinstance(old.index.segments[0], FlatIndex)
    append_documents(out, write_jsonl(tmp_path / "new.jsonl", corpus_records[16:]), id_field="id", progress=False)
    mixed = AttributionIndex.open(out, load_model_now=False)
    assert [type(s) for s in mixed.index.segments] == [FlatIndex, StoreFlatIndex]
    assert [s.from_store for s in read_manifest(out).index.segments] == [False, True]
    queries = whitened_queries(mixed, 6, seed=1)
    want_scores, want_rows = whitened_flat(mixed).search(queries, 24)
    got_scores, got_rows = mixed.index.search(queries, 24)
    np.testing.assert_array_equal(got_rows, want_rows)
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-6 * np.abs(want_scores).max())


MEMORY_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
import torch
torch.set_num_threads(2)
from attribindex.index import StoreFlatIndex
from attribindex._records import from_json
from attribindex.index._blockwise import search_tiles
from attribindex.store import ChunkRecord, RowStore

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

root, budget = Path(sys.argv[1]), int(sys.argv[2])
chunks = [from_json(ChunkRecord, c, "chunk") for c in json.loads((root / "chunks.json").read_text())]
store = RowStore(root, [32, 32], "float16", chunks)
queries = np.random.default_rng(1).standard_normal((1024, 64), dtype=np.float32)
segment = StoreFlatIndex(store, 0, store.rows, np.ones(store.rows, np.float32), lambda q: q, "dot", max_score_bytes=budget)
segment.search(queries, 10)  # one-time workspaces (BLAS buffers, thread pools) out of the way
try:
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS: the peak below is the search's own
except OSError:
    pass
before = status("VmRSS")
scores, rows = segment.search(queries, 10)
growth = status("VmHWM") - before
check = queries[:16].astype(np.float64) @ store.raw_rows(np.arange(store.rows)).double().numpy().T
tile = search_tiles(len(queries), store.rows, 64, 10, budget, 4, materialised=True)
json.dump({"growth": growth, "rows": rows[:16].tolist(), "ref_rows": np.argsort(-check, axis=1)[:, :10].tolist(),
           "tile": tile}, sys.stdout)
"""
BUDGET = 8 * 2**20


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_a_scan_holds_one_block_of_the_store_whatever_its_size(tmp_path):
    """1,024 queries over 200,000 stored rows in chunks of 50,000 (a store written here): the scores would
    be 819 MB, the decoded store 51 MB, the fp16 store 26 MB, one chunk 6 MB. A search in a fresh process holds one
    score tile (within the 8 MiB budget), one block as read and decoded, and the running top-k; the store's pages
    stay in the page cache, outside the resident set."""
    import torch

    from attribindex._records import to_json
    from attribindex.data import Document
    from attribindex.store import ChunkWriter

    writer, chunks, rng = ChunkWriter(tmp_path, [32, 32], "float16", chunk_rows=50_000), [], np.random.default_rng(0)
    for start in range(0, 200_000, 10_000):
        docs = [Document(id=str(i), text="", source="") for i in range(start, start + 10_000)]
        record = writer.add(torch.from_numpy(rng.standard_normal((10_000, 64), dtype=np.float32)), docs)
        chunks += [record] if record is not None else []
    (tmp_path / "chunks.json").write_text(json.dumps([to_json(c) for c in chunks]))
    # glibc then serves every allocation of 64 KiB or more with fresh pages and returns them when freed, so the peak
    # resident set is what the search holds at once, not what an earlier allocation left in the heap to reuse
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(64 * 2**10)}
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MEMORY_SCRIPT), str(tmp_path), str(BUDGET)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
        env=env,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    np.testing.assert_array_equal(result["rows"], result["ref_rows"])
    query_tile, row_tile = result["tile"]
    # the score tile; a block as read (float16) and decoded (float32), two of them as one block gives way to the
    # next; and 1 MiB of small change (the queries, the running top-k of 1,024 x 10 x 12 bytes, merge temporaries).
    # Seen: 13.5 MiB of this 15 MiB; reading each chunk whole instead of block by block: 19.5 MiB.
    limit = query_tile * row_tile * 4 + 2 * row_tile * 64 * (2 + 4) + 2**20
    assert result["growth"] < limit, (
        f"peak RSS grew by {result['growth'] / 2**20:.1f} MiB, over {limit / 2**20:.1f} MiB"
    )


def test_a_store_segment_refuses_queries_and_norms_that_do_not_fit(index):
    with pytest.raises(AttribIndexError, match=r"queries must have shape \(Q, "):
        index.index.segments[0].search(np.zeros((1, 3), np.float32), 1)
    with pytest.raises(AttribIndexError, match="norms file holds 23 rows but the manifest says 24"):
        StoreFlatIndex(index.store, 0, 24, np.ones(23, np.float32), lambda q: q, index.mode)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_a_store_segment_on_the_gpu_answers_as_on_the_cpu(index):
    """Blocks read on the host, decoded and scored in float32 on the GPU: the CPU's rows, scores to float32 round-off."""
    segment = index.index.segments[0]
    on_gpu = StoreFlatIndex(
        index.store,
        0,
        segment.rows,
        np.load(index.root / layout.STORE_NORMS),
        index.preconditioner.whiten,
        index.mode,
        device="cuda",
    )
    queries = whitened_queries(index, 8, seed=2)
    want_scores, want_rows = segment.search(queries, 24)
    got_scores, got_rows = on_gpu.search(queries, 24)
    np.testing.assert_array_equal(got_rows, want_rows)
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-6 * np.abs(want_scores).max())
