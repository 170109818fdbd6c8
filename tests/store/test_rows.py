"""Store round trip: encoding survives tiny gradients; chunks, ids and texts come back exactly."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from attribindex.data import Document
from attribindex.errors import AttribIndexError
from attribindex.store import ChunkWriter, RowStore, decode, encode, layout


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_encode_decode_keeps_tiny_gradients(dtype):
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(8, 12, generator=gen) * 1e-8  # fp16 alone would flush most of these to zero
    vectors[3] = 0.0
    stored, scales = encode(vectors, [4, 8], dtype)
    back = decode(stored, scales, [4, 8], dtype)
    tolerance = {"float16": 1e-3, "bfloat16": 8e-3, "float32": 1e-7}[dtype]
    assert torch.allclose(back, vectors, rtol=0, atol=tolerance * 1e-8 * 4)
    assert back[3].abs().sum() == 0
    assert (back[vectors != 0] != 0).all()


def test_plain_fp16_would_underflow():
    """The reason for scales: the same values cast straight to fp16 are mostly zero."""
    vectors = torch.randn(100, 50) * 1e-8
    assert (vectors.to(torch.float16) == 0).float().mean() > 0.5


def _write(writer: ChunkWriter, vectors: torch.Tensor, docs: list[Document], step: int) -> list[dict]:
    """Add rows in pieces of at most `step` that never cross a chunk boundary, as the build does."""
    chunks, start = [], 0
    while start < len(docs):
        take = min(step, writer.room, len(docs) - start)
        record = writer.add(vectors[start : start + take], docs[start : start + take])
        chunks += [record] if record else []
        start += take
    return chunks + ([last] if (last := writer.close()) else [])


def test_chunk_writer_and_row_store_round_trip(tmp_path):
    docs = [Document(id=f"d{i}", text=f"text ü {i}\nline two", source=f"src:{i}") for i in range(23)]
    vectors = torch.randn(23, 6)
    writer = ChunkWriter(tmp_path, [2, 4], "float32", chunk_rows=10)
    chunks = _write(writer, vectors, docs, step=7)
    assert [c.rows for c in chunks] == [10, 10, 3]
    store = RowStore(tmp_path, [2, 4], "float32", chunks)
    assert store.rows == 23
    got = torch.cat([raw for _, raw in store.iter_raw()])
    assert torch.equal(got, vectors)
    assert store.documents([22, 0, 10]) == [docs[22], docs[0], docs[10]]


def test_a_chunk_never_receives_more_rows_than_it_has_room_for(tmp_path):
    writer = ChunkWriter(tmp_path, [3], "float32", chunk_rows=4)
    writer.add(torch.randn(3, 3), [Document(str(i), "t", "s") for i in range(3)])
    assert writer.room == 1
    with pytest.raises(ValueError, match="do not fit"):
        writer.add(torch.randn(2, 3), [Document(str(i), "t", "s") for i in range(3, 5)])


def test_damaged_chunk_file_is_reported(tmp_path):
    docs = [Document(str(i), "t", "s") for i in range(4)]
    chunks = _write(ChunkWriter(tmp_path, [3], "float16", chunk_rows=4), torch.randn(4, 3), docs, step=4)
    path = tmp_path / layout.chunk_file(chunks[0].name, layout.CHUNK_GRADS)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(AttribIndexError, match="damaged"):
        RowStore(tmp_path, [3], "float16", chunks)


def test_texts_damaged_in_place_fail_on_first_read_instead_of_returning_wrong_ids(tmp_path):
    docs = [Document(f"id-{i}", "some text", "s") for i in range(4)]
    chunks = _write(ChunkWriter(tmp_path, [3], "float32", chunk_rows=4), torch.randn(4, 3), docs, step=4)
    path = tmp_path / layout.chunk_file(chunks[0].name, layout.CHUNK_DOCS)
    path.write_bytes(path.read_bytes().replace(b"id-2", b"id-7"))  # same size: only the checksum can tell
    store = RowStore(tmp_path, [3], "float32", chunks)
    with pytest.raises(AttribIndexError, match="contents differ from the recorded sha256"):
        store.documents([0])


def test_chunk_files_are_plain_numpy(tmp_path):
    writer = ChunkWriter(tmp_path, [3], "bfloat16", chunk_rows=4)
    writer.add(torch.randn(2, 3), [Document(str(i), "t", "s") for i in range(2)])
    chunk = writer.close()
    grads = np.load(tmp_path / layout.chunk_file(chunk.name, layout.CHUNK_GRADS))
    assert grads.dtype == np.uint16 and grads.shape == (2, 3)
    assert not any(p.name.startswith(".") for p in (tmp_path / layout.ROWS_DIR).iterdir())  # no temp files left


def test_find_rows_reads_id_hashes_and_falls_back_to_texts_for_older_chunks(tmp_path):
    docs = [Document(id=f"doc-{i}", text=f"text {i}", source="s") for i in range(23)]
    chunks = _write(ChunkWriter(tmp_path, [2, 4], "float32", chunk_rows=10), torch.randn(23, 6), docs, step=10)
    assert all(layout.CHUNK_ID_HASHES in c.files for c in chunks)
    store = RowStore(tmp_path, [2, 4], "float32", chunks)
    assert store.find_rows(["doc-21", "nope", "doc-0", "doc-10"]) == {"doc-21": 21, "doc-0": 0, "doc-10": 10}

    older = [replace(c, files={k: v for k, v in c.files.items() if k != layout.CHUNK_ID_HASHES}) for c in chunks]
    for chunk in chunks:
        (tmp_path / layout.chunk_file(chunk.name, layout.CHUNK_ID_HASHES)).unlink()
    assert RowStore(tmp_path, [2, 4], "float32", older).find_rows(["doc-13", "doc-22"]) == {"doc-13": 13, "doc-22": 22}
