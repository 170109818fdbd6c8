"""Chunked row storage: raw projected gradients, scales, ids and texts, written while streaming.

Rows are grouped in chunks of at most `chunk_rows`; each chunk's files are written atomically when
the chunk is full, so peak memory is one chunk whatever the corpus size. Row r of the index is row
r - start of the chunk that holds it; external ids live in the docs file, apart from row positions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from attribindex.data import Document
from attribindex.store import _layout as layout
from attribindex.store._atomic import atomic_open
from attribindex.store._codec import decode, encode, numpy_store_dtype
from attribindex.store._manifest_records import ChunkRecord, file_record
from attribindex.store._verify import check_file


def id_hashes(ids: list[str]) -> np.ndarray:
    """(n,) uint64: the first 8 bytes of sha256(id), little-endian."""
    return np.array(
        [int.from_bytes(hashlib.sha256(i.encode("utf-8")).digest()[:8], "little") for i in ids], dtype=np.uint64
    )


class ChunkWriter:
    """Buffers rows and writes them chunk by chunk.

    The caller adds at most `room` rows at a time, so it knows exactly which rows each written chunk
    holds (a build commits its resume checkpoint at every chunk).

    Example:
        >>> writer = ChunkWriter(Path("idx"), block_dims=[16, 16], dtype="float16", chunk_rows=4096)  # doctest: +SKIP
        >>> record = writer.add(vectors, documents)  # the chunk record when this add filled a chunk  # doctest: +SKIP
        >>> last = writer.close()  # the record of the last, partial chunk (or None)  # doctest: +SKIP
    """

    def __init__(self, root: Path, block_dims: list[int], dtype: str, chunk_rows: int, first_chunk: int = 0):
        self.root = root
        self.block_dims = block_dims
        self.dtype = dtype
        self.chunk_rows = chunk_rows
        self._next_chunk = first_chunk
        self._stored: list[np.ndarray] = []
        self._scales: list[np.ndarray] = []
        self._docs: list[Document] = []

    @property
    def room(self) -> int:
        """Rows that can be added before the current chunk is full."""
        return self.chunk_rows - len(self._docs)

    def add(self, vectors: torch.Tensor, documents: list[Document]) -> ChunkRecord | None:
        """Buffer (B, D) raw vectors with their documents (B <= room); write the chunk when it is full."""
        stored, scales = encode(vectors, self.block_dims, self.dtype)
        return self.add_encoded(stored, scales, documents)

    def add_encoded(self, stored: np.ndarray, scales: np.ndarray, documents: list[Document]) -> ChunkRecord | None:
        """`add` for rows already in store encoding (compaction copies them bit for bit)."""
        if len(documents) > self.room:
            raise ValueError(f"{len(documents)} rows do not fit in the {self.room} rows left in this chunk")
        self._stored.append(stored)
        self._scales.append(scales)
        self._docs.extend(documents)
        return self.flush() if self.room == 0 else None

    def flush(self) -> ChunkRecord:
        """Write the buffered rows as one chunk (atomically, file by file) and return its record."""
        name = layout.chunk_name(self._next_chunk)
        grads = np.concatenate(self._stored).astype(numpy_store_dtype(self.dtype), copy=False)
        scales = np.concatenate(self._scales).astype(np.float32, copy=False)
        lines = [
            (json.dumps({"id": d.id, "source": d.source, "text": d.text}, ensure_ascii=False) + "\n").encode("utf-8")
            for d in self._docs
        ]
        offsets = np.zeros(len(lines) + 1, dtype=np.int64)
        np.cumsum([len(line) for line in lines], out=offsets[1:])
        payloads = {
            layout.CHUNK_GRADS: lambda h: np.save(h, grads),
            layout.CHUNK_SCALES: lambda h: np.save(h, scales),
            layout.CHUNK_DOCS: lambda h: h.writelines(lines),
            layout.CHUNK_DOC_OFFSETS: lambda h: np.save(h, offsets),
            layout.CHUNK_ID_HASHES: lambda h: np.save(h, id_hashes([d.id for d in self._docs])),
        }
        files = {}
        for suffix, write in payloads.items():
            path = self.root / layout.chunk_file(name, suffix)
            with atomic_open(path) as handle:
                write(handle)
            files[suffix] = file_record(path)
        record = ChunkRecord(name=name, rows=len(self._docs), files=files)
        self._next_chunk += 1
        self._stored, self._scales, self._docs = [], [], []
        return record

    def close(self) -> ChunkRecord | None:
        """Write the last, partial chunk; its record, or None when no rows were buffered."""
        return self.flush() if self._docs else None


class RowStore:
    """Read access to the rows of a complete index: memory-mapped gradients and texts by row.

    Example:
        >>> store = RowStore(Path("idx"), manifest.block_dims, manifest.store.dtype, manifest.store.chunks)  # doctest: +SKIP
        >>> for start, raw in store.iter_raw():  # (n, D) float32 blocks, in row order  # doctest: +SKIP
        ...     ...
        >>> store.documents([0, 5])[0].id  # doctest: +SKIP
    """

    def __init__(self, root: Path, block_dims: list[int], dtype: str, chunks: Sequence[ChunkRecord]):
        self.root = root
        self.block_dims = block_dims
        self.dtype = dtype
        self.chunks = chunks
        self.starts = np.cumsum([0] + [c.rows for c in chunks])  # (num_chunks + 1,)
        for chunk in chunks:
            for name, record in chunk.paths():  # what was recorded: older chunks have no ids.npy
                check_file(root, name, record, content=False)
        self._offsets: dict[str, np.ndarray] = {}

    @property
    def rows(self) -> int:
        return int(self.starts[-1])

    def iter_raw(self, max_bytes: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (first row, (n, D) float32 raw gradients) in row order: whole chunks, or blocks of at most
        `max_bytes` of float32 (at least one row) so memory does not depend on the chunk size."""
        dim = sum(self.block_dims)
        for start, chunk in zip(self.starts, self.chunks):
            name = chunk.name
            stored = np.load(self.root / layout.chunk_file(name, layout.CHUNK_GRADS), mmap_mode="r")
            scales = np.load(self.root / layout.chunk_file(name, layout.CHUNK_SCALES))
            step = len(stored) if max_bytes is None else max(1, max_bytes // (4 * dim))
            for first in range(0, len(stored), step):
                block = slice(first, first + step)
                yield int(start) + first, decode(stored[block], scales[block], self.block_dims, self.dtype)

    def iter_encoded(self) -> Iterator[tuple[int, np.ndarray, np.ndarray, list[Document]]]:
        """Yield (first row, stored values, scales, documents) chunk by chunk, as written (no decoding)."""
        for c, (start, chunk) in enumerate(zip(self.starts, self.chunks)):
            name = chunk.name
            stored = np.load(self.root / layout.chunk_file(name, layout.CHUNK_GRADS), mmap_mode="r")
            scales = np.load(self.root / layout.chunk_file(name, layout.CHUNK_SCALES))
            yield int(start), stored, scales, self.documents(range(int(start), int(self.starts[c + 1])))

    def raw_rows(self, rows: np.ndarray) -> torch.Tensor:
        """(len(rows), D) float32 raw gradients of the given global rows (sorted ascending)."""
        out = []
        for c, chunk in enumerate(self.chunks):
            start, stop = int(self.starts[c]), int(self.starts[c + 1])
            local = rows[(rows >= start) & (rows < stop)] - start
            if len(local):
                stored = np.load(self.root / layout.chunk_file(chunk.name, layout.CHUNK_GRADS), mmap_mode="r")
                scales = np.load(self.root / layout.chunk_file(chunk.name, layout.CHUNK_SCALES))
                out.append(decode(stored[local], scales[local], self.block_dims, self.dtype))
        return torch.cat(out) if out else torch.zeros(0, sum(self.block_dims))

    def find_rows(self, ids: Iterable[str]) -> dict[str, int]:
        """{id: global row} for those of `ids` the store holds. Reads 8 bytes per row (the id hashes) and
        then only the matching documents, to rule out hash collisions."""
        wanted = set(ids)
        keys = np.unique(id_hashes(sorted(wanted)))
        found: dict[str, int] = {}
        for c, chunk in enumerate(self.chunks):
            start, stop = int(self.starts[c]), int(self.starts[c + 1])
            if layout.CHUNK_ID_HASHES in chunk.files:
                hashes = np.load(self.root / layout.chunk_file(chunk.name, layout.CHUNK_ID_HASHES))
            else:  # written before id hashes existed
                hashes = id_hashes([d.id for d in self.documents(range(start, stop))])
            hits = start + np.flatnonzero(np.isin(hashes, keys))
            for row, doc in zip(hits.tolist(), self.documents(hits.tolist())):
                if doc.id in wanted:
                    found[doc.id] = row
        return found

    def documents(self, rows) -> list[Document]:
        """The documents at the given global row positions.

        A chunk's text files are checked against their checksums the first time they are read (a few ms per
        chunk), so a damaged file fails clearly instead of returning the wrong text or id.
        """
        out = []
        with contextlib.ExitStack() as files:
            handles: dict[str, BinaryIO] = {}  # one open docs file per chunk for the whole call
            for row in rows:
                c = int(np.searchsorted(self.starts, row, side="right")) - 1
                name = self.chunks[c].name
                if name not in self._offsets:
                    for suffix in (layout.CHUNK_DOCS, layout.CHUNK_DOC_OFFSETS):
                        check_file(self.root, layout.chunk_file(name, suffix), self.chunks[c].files[suffix])
                    self._offsets[name] = np.load(self.root / layout.chunk_file(name, layout.CHUNK_DOC_OFFSETS))
                if name not in handles:
                    handles[name] = files.enter_context(
                        open(self.root / layout.chunk_file(name, layout.CHUNK_DOCS), "rb")
                    )
                offsets, handle = self._offsets[name], handles[name]
                local = row - int(self.starts[c])
                handle.seek(int(offsets[local]))
                record = json.loads(handle.read(int(offsets[local + 1] - offsets[local])))
                out.append(Document(id=record["id"], text=record["text"], source=record["source"]))
        return out
