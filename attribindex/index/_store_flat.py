"""Exact search over the row store itself: one copy of the vectors.

The whitening W of every module is symmetric, so the whitened inner product moves onto the query:
⟨W g_t, v⟩ = ⟨g_t, W v⟩. A query v (whitened, as every segment receives it) is preconditioned once into
q = W v, and each stored raw row g_t is scored as it is stored: its 16-bit values, times the per-row, per-module
scale the store keeps beside them. In cosine mode v is unit-normalised and each score is divided by the row's
whitened norm ‖W g_t‖, the one number per row this segment keeps in a file of its own (float32, 4 bytes per row).

So an exact index costs its fp16 store plus 4 bytes per row, where a whitened float32 FAISS copy cost twice the
store again. Scores are float32 and exact: they equal a flat search over the whitened rows up to float32
rounding (the same decoded values, summed in another order).

Memory, beyond what `blockwise_top_k` bounds: one decoded (row_tile, D) float32 block at a time (at most
`max_score_bytes`), read from the chunks' memory maps (page cache, which the kernel reclaims), plus the
per-chunk scales (M float32 per row) and the norms (4 bytes per row).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attribindex.errors import AttribIndexError
from attribindex.index._blockwise import blockwise_top_k, from_numpy, resolve_device, search_tiles
from attribindex.index._segment import check_k, checked_local_rows, skipped_rows
from attribindex.store import RowStore, SegmentRecord, layout

Precondition = Callable[[torch.Tensor], torch.Tensor]  # (Q, D) whitened queries → (Q, D) W-preconditioned ones


@dataclass(frozen=True)
class StoreAccess:
    """What a segment over the row store needs from its index: the store, W (symmetric: the preconditioner's
    `whiten`) and the score mode."""

    store: RowStore
    precondition: Precondition
    mode: str

    def open(self, root: Path, record: SegmentRecord, start: int, device: str = "cpu") -> StoreFlatIndex:
        """The segment `record`, whose rows begin at global row `start`.

        Example:
            >>> StoreAccess(store, preconditioner.whiten, "cosine").open(root, record, start=0)  # doctest: +SKIP
        """
        path = root / record.file
        try:
            norms = np.load(path)
        except (OSError, ValueError) as err:
            raise AttribIndexError(f"the norms file {path} is missing or damaged ({err}). Rebuild the index.") from None
        return StoreFlatIndex(self.store, start, record.rows, norms, self.precondition, self.mode, device)


class StoreFlatIndex:
    """Exact top-k over the raw rows [start, start + rows) of a row store, scored against preconditioned queries.

    Args:
        store: the index's row store (every chunk; the segment's rows are a range of it).
        start: the segment's first global row.
        rows: its number of rows.
        norms: (rows,) float32 whitened norms ‖W g_t‖, used in cosine mode.
        precondition: W applied to (Q, D) float32 whitened queries (W symmetric: the preconditioner's `whiten`).
        mode: ``dot`` or ``cosine`` (scores divided by the row norms; a zero row scores 0).
        device: "cpu", "cuda" or "auto"; blocks are decoded there and scored in float32.
        max_score_bytes: bound on the score tile, the merge temporaries and one decoded row block.

    Example:
        >>> segment = StoreFlatIndex(store, 0, store.rows, norms, preconditioner.whiten, "cosine")  # doctest: +SKIP
        >>> scores, rows = segment.search(whitened_queries, k=10)  # doctest: +SKIP
    """

    def __init__(
        self,
        store: RowStore,
        start: int,
        rows: int,
        norms: np.ndarray,
        precondition: Precondition,
        mode: str,
        device: str = "cpu",
        max_score_bytes: int = 256 * 2**20,
    ):
        if mode not in ("dot", "cosine"):
            raise AttribIndexError(f"mode must be 'dot' or 'cosine', got {mode!r}.")
        if len(norms) != rows:
            raise AttribIndexError(
                f"the segment's norms file holds {len(norms)} rows but the manifest says {rows}. The index is "
                f"damaged; rebuild it."
            )
        if start < 0 or start + rows > store.rows:
            raise AttribIndexError(
                f"the segment's rows [{start}, {start + rows}) are not in the store's {store.rows} rows. The index is "
                f"damaged; rebuild it."
            )
        self.store, self.start, self._rows = store, int(start), int(rows)
        self.block_dims = list(store.block_dims)
        self.precondition, self.mode = precondition, mode
        self.device = resolve_device(device)
        self.max_score_bytes = int(max_score_bytes)
        norms = np.asarray(norms, dtype=np.float32)
        self._inverse_norms = 1.0 / np.where(norms > 0, norms, 1.0).astype(np.float32)  # (rows,) zero rows stay 0
        self._hidden = np.zeros(0, dtype=np.int64)

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def dim(self) -> int:
        return sum(self.block_dims)

    @property
    def exact(self) -> bool:
        """Float32 scores of the stored values: exact."""
        return True

    @property
    def description(self) -> str:
        return f"flat over the {self.store.dtype} store on {self.device}"

    def exclude(self, local_rows: np.ndarray) -> None:
        """Hide these local rows from every later search (a living index's deleted rows)."""
        self._hidden = checked_local_rows(local_rows, self.rows)

    def configure(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """An exact scan has no search effort to set: accepted and ignored."""

    def candidates(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-min(k, rows) over the rows not hidden: ((Q, k') scores, (Q, k') rows, -1 and -inf past the end)."""
        return self._top_k(queries, min(k, self.rows), self._hidden)

    def search(self, queries: np.ndarray, k: int, excluded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product with the whitened rows (cosine: unit-normalised), as a flat FAISS segment over
        them answers: ((Q, k) float32 scores descending, (Q, k) local rows), -1 and -inf past the end."""
        check_k(k, self.rows)
        return self._top_k(queries, int(k), skipped_rows(self._hidden, excluded, self.rows))

    def _top_k(self, queries: np.ndarray, k: int, excluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise AttribIndexError(
                f"queries must have shape (Q, {self.dim}) to match the index, got {tuple(queries.shape)}. "
                f"Compute query vectors with the same projection as the index."
            )
        whitened = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))  # (Q, D)
        preconditioned = self.precondition(whitened).to(self.device, torch.float32).contiguous()  # (Q, D) = W v
        query_tile, row_tile = search_tiles(
            max(1, len(whitened)), self.rows, self.dim, k, self.max_score_bytes, element_bytes=4, materialised=True
        )
        return blockwise_top_k(preconditioned, self._blocks(row_tile), k, excluded, query_tile, row_tile)

    def _blocks(self, row_tile: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(local start, local stop, (n, D) float32 rows on the device) whose inner product with W v is the score:
        each stored row times its module scales (and in cosine mode divided by its whitened norm).

        Rows are read from the chunk files block by block (not memory-mapped), so that a scan leaves the process
        no bigger than one block: the store's pages stay in the page cache, outside the process's resident set."""
        store, first, last = self.store, self.start, self.start + self.rows
        for c, chunk in enumerate(store.chunks):
            chunk_start, chunk_stop = int(store.starts[c]), int(store.starts[c + 1])
            low, high = max(first, chunk_start), min(last, chunk_stop)
            if low >= high:
                continue
            scales = np.load(store.root / layout.chunk_file(chunk.name, layout.CHUNK_SCALES), mmap_mode="r")
            with _ArrayReader(store.root / layout.chunk_file(chunk.name, layout.CHUNK_GRADS)) as stored:
                for block_start in range(low, high, row_tile):
                    block_stop = min(block_start + row_tile, high)
                    local = slice(block_start - chunk_start, block_stop - chunk_start)
                    factors = np.array(scales[local], dtype=np.float32)  # (n, M)
                    if self.mode == "cosine":
                        factors *= self._inverse_norms[block_start - first : block_stop - first, None]
                    yield block_start - first, block_stop - first, self._decoded(stored.rows(local), factors)

    def _decoded(self, stored: np.ndarray, factors: np.ndarray) -> torch.Tensor:
        """(n, D) stored values → float32 on the device, each module's columns times that row's factor."""
        if self.store.dtype == "bfloat16":  # kept as raw 16 bits: reinterpret, then widen
            values = torch.from_numpy(stored.view(np.int16)).to(self.device)
            values = values.view(torch.bfloat16).float()
        else:  # float32 on the device, which we scale in place
            values = from_numpy(stored).to(self.device, torch.float32)
        factors = torch.from_numpy(factors).to(self.device)  # (n, M)
        dims = self.block_dims
        if len(set(dims)) == 1:  # equal blocks: one broadcast multiply
            values.view(len(values), len(dims), dims[0]).mul_(factors[:, :, None])
        else:
            offset = 0
            for m, dim in enumerate(dims):
                values[:, offset : offset + dim].mul_(factors[:, m : m + 1])
                offset += dim
        return values  # (n, D)


class _ArrayReader:
    """Rows of a 2-d `.npy` file read with plain reads (no memory map), a block at a time.

    Example:
        >>> with _ArrayReader(Path("rows/000000.grads.npy")) as grads:  # doctest: +SKIP
        ...     block = grads.rows(slice(0, 4096))  # (4096, D)
    """

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> _ArrayReader:
        self._handle = open(self.path, "rb")  # noqa: SIM115 (closed by __exit__)
        version = np.lib.format.read_magic(self._handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, self.dtype = read_header(self._handle)
        if len(shape) != 2 or fortran:
            raise AttribIndexError(f"{self.path} is not a 2-d C-ordered array. The index is damaged; rebuild it.")
        self.shape, self._offset = shape, self._handle.tell()
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()

    def rows(self, rows: slice) -> np.ndarray:
        """(n, D) rows `rows` (a slice with step 1) in the file's dtype."""
        count, width = rows.stop - rows.start, self.shape[1]
        self._handle.seek(self._offset + rows.start * width * self.dtype.itemsize)
        block = np.fromfile(self._handle, dtype=self.dtype, count=count * width)
        if len(block) != count * width:
            raise AttribIndexError(f"{self.path} is truncated. The index is damaged; rebuild it.")
        return block.reshape(count, width)
