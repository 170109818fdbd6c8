"""Exact inner-product top-k with torch matmul, one (query tile x row tile) block at a time.

Three jobs FAISS does not cover: the GPU exact path when faiss-gpu is not installed (GEMM + topk in
bfloat16/float16), answering thousands of queries at once without the (Q, N) score matrix, and stores
larger than GPU memory, streamed from host memory in row blocks each search. Everything also runs on CPU.

The scan is row-block outer, query-tile inner: every row block is read (or streamed) once per search,
and a running (Q, k) top-k in float32 absorbs each block's top-k.

Memory bound (on the compute device, beyond the caller's arrays), with e = bytes per element of `dtype`,
Q queries, N rows of dimension D, B = max_score_bytes::

    B                 score tile, query_tile * row_tile * e <= B (see `score_tile_shape`), one per search, reused
  + B                 top-k merge temporaries (the query tile shrinks when k is large to stay under this)
  + m * B             row blocks, materialised only when converted or streamed (row_tile * D * e <= B):
                      m = 0 for resident blocks and CPU blocks already in `dtype` (zero-copy views),
                      1 for CPU blocks converted to `dtype`,
                      2 for GPU streaming (double buffer; plus 2 * B of pinned host staging)
  + Q * k * (4 + 8)   running top-k: float32 scores, int64 rows (this is also the size of the answer)
  + Q * D * e         the queries in `dtype`
  + N * D * e         the resident copy, on GPU only and only when it fits `resident_bytes`

plus torch.topk's own workspace. Pages of a memory-mapped store count in RSS as they are read, but they
are page cache the kernel reclaims, not allocations.

float16 scores overflow above 65504: use bfloat16 (the GPU default) or float32 for unnormalised vectors;
an overflow that reaches the top-k is reported rather than returned. Ties come back in an unspecified order.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from attribindex.errors import AttribIndexError
from attribindex.index._flat_format import FLAT_FOURCC, FLAT_HEADER, FLAT_METRIC_INNER_PRODUCT
from attribindex.index._segment import check_k, checked_local_rows, skipped_rows

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_TORCH_DTYPES = {
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
}
ROW_TILE_TARGET = 8192  # the query tile gives way before row tiles shrink below this: merges cost ~k/row_tile of a scan
_MERGE_BYTES_PER_CANDIDATE = 36  # float32 + int64 per candidate, counted for cat, topk, gather and the block's top-k


def read_flat_vectors(path: Path) -> np.ndarray:
    """Memory-mapped (N, D) float32 view of a flat FAISS file written by FlatIndexWriter or faiss.write_index.

    Nothing is read until rows are used, so a store larger than RAM is fine. The file layout is
    `FLAT_HEADER` (see `_flat_format`) followed by the vectors.

    Example:
        >>> vectors = read_flat_vectors(Path("idx/segment-0.faiss"))  # doctest: +SKIP
        >>> vectors.shape  # doctest: +SKIP
        (1000000, 4096)
    """
    path = Path(path)
    if not path.is_file():
        raise AttribIndexError(f"index file {path} is missing. Rebuild the index or restore the file.")
    size = path.stat().st_size
    if size < FLAT_HEADER.size:
        raise AttribIndexError(
            f"index file {path} is truncated ({size} bytes, shorter than its header). Rebuild the index."
        )
    with path.open("rb") as handle:
        fourcc, dim, rows, _, _, _, metric, floats = FLAT_HEADER.unpack(handle.read(FLAT_HEADER.size))
    if fourcc != FLAT_FOURCC:
        raise AttribIndexError(
            f"index file {path} is not a flat inner-product FAISS index (fourcc {fourcc!r}, expected {FLAT_FOURCC!r}). "
            f"Rebuild the index."
        )
    if dim < 1 or rows < 0 or metric != FLAT_METRIC_INNER_PRODUCT or floats != rows * dim:
        raise AttribIndexError(
            f"index file {path} has an inconsistent header (d={dim}, ntotal={rows}, metric={metric}, "
            f"{floats} floats). Rebuild the index."
        )
    expected = FLAT_HEADER.size + 4 * rows * dim
    if size != expected:
        raise AttribIndexError(
            f"index file {path} is {size} bytes but its header describes {rows} x {dim} float32 vectors "
            f"({expected} bytes): it is truncated or damaged. Rebuild the index."
        )
    if rows == 0:
        return np.zeros((0, dim), dtype=np.float32)  # mmap refuses an empty range
    return np.memmap(path, dtype="<f4", mode="r", offset=FLAT_HEADER.size, shape=(rows, dim))


def score_tile_shape(
    queries: int,
    rows: int,
    dim: int,
    max_score_bytes: int,
    element_bytes: int = 4,
    *,
    max_block_bytes: int | None = None,
) -> tuple[int, int]:
    """(query tile, row tile) with query_tile * row_tile * element_bytes <= max_score_bytes; at least (1, 1).

    Row tiles are kept long (up to all rows) because each one costs a top-k merge per query; the query
    tile takes what the budget leaves. With `max_block_bytes`, a row block of row_tile x dim elements
    also stays under that many bytes (for blocks that are materialised: converted or streamed).

    Example:
        >>> score_tile_shape(queries=4096, rows=50_000, dim=64, max_score_bytes=8 * 2**20)
        (256, 8192)
        >>> score_tile_shape(queries=1, rows=10**6, dim=4096, max_score_bytes=2**28, element_bytes=2)
        (1, 1000000)
    """
    if min(queries, rows, dim, element_bytes) < 1:
        raise ValueError(
            f"queries, rows, dim and element_bytes must be positive, got {(queries, rows, dim, element_bytes)}"
        )
    if max_score_bytes < element_bytes:
        raise ValueError(f"max_score_bytes ({max_score_bytes}) must hold at least one {element_bytes}-byte score")
    budget = max_score_bytes // element_bytes  # scores per tile
    row_cap = rows
    if max_block_bytes is not None:
        row_cap = min(rows, max(1, max_block_bytes // (dim * element_bytes)))
    row_tile = min(row_cap, budget, max(ROW_TILE_TARGET, budget // queries))
    return min(queries, budget // row_tile), row_tile


def search_tiles(
    queries: int, rows: int, dim: int, k: int, max_score_bytes: int, element_bytes: int, *, materialised: bool
) -> tuple[int, int]:
    """(query tile, row tile) of a blockwise top-k search: `score_tile_shape`, with row blocks bounded too when they
    are `materialised` (converted or streamed), and the query tile shrunk so that one top-k merge stays under
    `max_score_bytes` when k is large."""
    query_tile, row_tile = score_tile_shape(
        queries,
        rows,
        dim,
        max_score_bytes,
        element_bytes,
        max_block_bytes=max_score_bytes if materialised else None,
    )
    merge_bytes = _MERGE_BYTES_PER_CANDIDATE * (k + min(k, row_tile))  # per query, per merge
    return max(1, min(query_tile, max_score_bytes // merge_bytes)), row_tile


def from_numpy(array: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor over a numpy block; a read-only memmap is fine because blocks are never written."""
    if array.dtype not in (np.float16, np.float32, np.float64) or min(array.strides, default=0) < 0:
        array = np.ascontiguousarray(array, dtype=np.float32)  # big-endian, long double, reversed views
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given NumPy array is not writable"
        return torch.from_numpy(array)


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AttribIndexError(
            f"device is {str(device)!r} but torch sees no CUDA GPU. Use device 'cpu', or install a CUDA build of torch."
        )
    if device.type not in ("cpu", "cuda"):
        raise AttribIndexError(f"device must be 'cpu', 'cuda' or 'auto', got {str(device)!r}.")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # so a tensor on cuda:0 counts as already there
    return device


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype not in _DTYPES:
        raise AttribIndexError(
            f"dtype must be one of float32, float64, float16, bfloat16, got {dtype}. bfloat16 is the GPU default."
        )
    return dtype


class TorchFlatIndex:
    """Exact top-k by inner product over (N, D) vectors with torch GEMMs, block by block; mirrors FlatIndex.

    On CUDA the vectors are copied once into GPU memory in `dtype` when they fit `resident_bytes`
    (default: 80 % of free GPU memory), else streamed from host memory in row blocks every search.
    On CPU blocks are read straight from `vectors` (a memory map is fine) and converted one at a time.
    Scores are computed in `dtype` (bfloat16 on CUDA, float32 on CPU by default); top-k merges in float32.

    Args:
        vectors (np.ndarray | torch.Tensor): (N, D) floating vectors; a CUDA tensor already in `dtype` is used
            as is, a pinned CPU tensor in `dtype` is streamed without staging.
        device (str): "cpu", "cuda", "cuda:1" or "auto". Default "cpu".
        dtype (torch.dtype | None): GEMM dtype. Default float32 on CPU, bfloat16 on CUDA.
        max_score_bytes (int): bound on the score tile (and on the merge temporaries and each materialised
            row block). Default 256 MiB.
        resident_bytes (int | None): copy to the GPU when N * D * element size is at most this.
            Default 80 % of free GPU memory; 0 always streams.

    Example:
        >>> index = TorchFlatIndex(np.eye(4, dtype=np.float32))
        >>> scores, rows = index.search(np.array([[0, 0, 1, 0]], dtype=np.float32), k=2)
        >>> int(rows[0, 0]), float(scores[0, 0])
        (2, 1.0)
        >>> index.search(np.array([[1, 2, 3, 4]], dtype=np.float32), k=4, excluded=np.array([2, 3]))[1].tolist()
        [[1, 0, -1, -1]]
    """

    def __init__(
        self,
        vectors: np.ndarray | torch.Tensor,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        max_score_bytes: int = 256 * 2**20,
        resident_bytes: int | None = None,
    ):
        if vectors.ndim != 2 or vectors.shape[1] < 1:
            raise AttribIndexError(f"vectors must be a 2-D (rows, dim) array, got shape {tuple(vectors.shape)}.")
        if not (vectors.dtype.is_floating_point if isinstance(vectors, torch.Tensor) else vectors.dtype.kind == "f"):
            raise AttribIndexError(f"vectors must be floating point, got {vectors.dtype}. Convert them to float32.")
        self.device = resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self._element_bytes = torch.empty((), dtype=self.dtype).element_size()
        if max_score_bytes < 64 * self._element_bytes:
            raise AttribIndexError(
                f"max_score_bytes must be at least {64 * self._element_bytes}, got {max_score_bytes}. "
                f"Raise it (the default is 256 MiB)."
            )
        self.max_score_bytes = int(max_score_bytes)
        self._source = vectors
        self._rows, self._dim = int(vectors.shape[0]), int(vectors.shape[1])
        self.on_gpu = self.device.type == "cuda"
        self.streamed = False
        self._store: torch.Tensor | None = None  # the (N, D) tensor blocks are viewed from, when there is one
        if isinstance(vectors, torch.Tensor) and vectors.device == self.device and vectors.dtype == self.dtype:
            self._store = vectors
        elif not self.on_gpu and isinstance(vectors, np.ndarray) and _TORCH_DTYPES.get(vectors.dtype) == self.dtype:
            self._store = from_numpy(vectors)  # zero-copy over the whole (memory-mapped) array: reads nothing yet
        elif self.on_gpu:
            needed = self._rows * self._dim * self._element_bytes
            if resident_bytes is None:
                resident_bytes = int(0.8 * torch.cuda.mem_get_info(self.device)[0])
            on_host = not isinstance(vectors, torch.Tensor) or vectors.device.type == "cpu"
            if needed <= resident_bytes or not on_host:  # a CUDA source that does not fit is converted per block
                self._store = self._copy_resident() if needed <= resident_bytes else None
            else:
                self.streamed = True
        elif isinstance(vectors, torch.Tensor) and vectors.device.type != "cpu":
            raise AttribIndexError(f"vectors are on {vectors.device} but device is 'cpu'. Pass vectors.cpu().")
        self._hidden = np.zeros(0, dtype=np.int64)  # rows `exclude` hides, sorted local positions

    @property
    def exact(self) -> bool:
        """Float32 scores are exact; bf16/fp16 GEMMs round them, so their candidates are re-ranked."""
        return self.dtype in (torch.float32, torch.float64)

    @property
    def description(self) -> str:
        return f"flat torch {str(self.dtype).removeprefix('torch.')} on {self.device}" + (
            " streamed" if self.streamed else ""
        )

    def exclude(self, local_rows: np.ndarray) -> None:
        """Hide these local rows from every later `candidates` and `search` (a living index's deleted rows)."""
        self._hidden = checked_local_rows(local_rows, self.rows)

    def candidates(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-min(k, rows) over the rows not hidden: ((Q, k') scores, (Q, k') rows, -1 and -inf past the end)."""
        return self._top_k(queries, min(k, self.rows), self._hidden)

    def configure(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """An exact scan has no search effort to set: accepted and ignored."""

    @classmethod
    def load(cls, path: Path, device: str = "cpu", dtype: torch.dtype | None = None, **kwargs) -> TorchFlatIndex:
        """Open a flat FAISS file (memory-mapped; copied to the GPU only when it fits there).

        Example:
            >>> index = TorchFlatIndex.load(Path("idx/segment-0.faiss"), device="cuda")  # doctest: +SKIP
        """
        return cls(read_flat_vectors(path), device=device, dtype=dtype, **kwargs)

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def dim(self) -> int:
        return self._dim

    def _copy_resident(self) -> torch.Tensor:
        """One (N, D) tensor in `dtype` on the GPU, filled block by block so no full float32 copy is ever there."""
        store = torch.empty((self._rows, self._dim), dtype=self.dtype, device=self.device)  # (N, D)
        source_bytes = self._source.element_size() if isinstance(self._source, torch.Tensor) else self._source.itemsize
        step = max(1, self.max_score_bytes // (self._dim * source_bytes))  # one source block in transit: <= B
        for start in range(0, self._rows, step):
            stop = min(start + step, self._rows)
            store[start:stop].copy_(self._host_block(start, stop).to(self.device))  # converts on the GPU
        return store

    def _host_block(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the source as a tensor, zero-copy where the source allows."""
        if isinstance(self._source, torch.Tensor):
            return self._source[start:stop]
        return from_numpy(self._source[start:stop])  # (n, D), reads only these rows of a memmap

    def _blocks(self, row_tile: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, (n, D) block in `dtype` on the device) for consecutive row blocks."""
        if self.streamed:
            yield from self._streamed_blocks(row_tile)
            return
        for start in range(0, self._rows, row_tile):
            stop = min(start + row_tile, self._rows)
            if self._store is not None:
                yield start, stop, self._store[start:stop]
            else:
                yield start, stop, self._host_block(start, stop).to(self.device, self.dtype)

    def _streamed_blocks(self, row_tile: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Double-buffered host-to-GPU streaming: block b+1 is converted and copied while block b is scored.

        Host rows are converted to `dtype` into pinned staging (so half the PCIe bytes for 16-bit types),
        copied on a side stream, and the compute stream waits on an event; buffers are reused only after
        the events say the copy (host side) or the scoring (device side) that used them has finished.
        """
        source = self._source
        direct = isinstance(source, torch.Tensor) and source.dtype == self.dtype and source.is_pinned()
        shape = (row_tile, self._dim)
        staging = [] if direct else [torch.empty(shape, dtype=self.dtype, pin_memory=True) for _ in range(2)]
        buffers = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(2)]
        copy_stream = torch.cuda.Stream(self.device)
        compute_stream = torch.cuda.current_stream(self.device)
        copied: list[torch.cuda.Event | None] = [None, None]
        scored: list[torch.cuda.Event | None] = [None, None]
        for block, start in enumerate(range(0, self._rows, row_tile)):
            stop, slot = min(start + row_tile, self._rows), block % 2
            n = stop - start
            if direct:
                host = source[start:stop]
            else:
                if copied[slot] is not None:
                    copied[slot].synchronize()  # the copy two blocks back has finished reading this staging buffer
                host = staging[slot][:n]
                host.copy_(self._host_block(start, stop))  # multithreaded float32 -> dtype conversion
            with torch.cuda.stream(copy_stream):
                if scored[slot] is not None:
                    copy_stream.wait_event(scored[slot])
                buffers[slot][:n].copy_(host, non_blocking=True)
                copied[slot] = torch.cuda.Event()
                copied[slot].record(copy_stream)
            compute_stream.wait_event(copied[slot])
            yield start, stop, buffers[slot][:n]
            scored[slot] = torch.cuda.Event()
            scored[slot].record(compute_stream)

    def _tile_shape(self, queries: int, k: int) -> tuple[int, int]:
        materialised = self.streamed or self._store is None
        return search_tiles(
            queries, self._rows, self._dim, k, self.max_score_bytes, self._element_bytes, materialised=materialised
        )

    def _queries(self, queries: np.ndarray | torch.Tensor) -> torch.Tensor:
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise AttribIndexError(
                f"queries must have shape (Q, {self.dim}) to match the index, got {tuple(queries.shape)}. "
                f"Compute query vectors with the same projection as the index."
            )
        if not isinstance(queries, torch.Tensor):
            queries = from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        return queries.to(self.device, self.dtype).contiguous()  # (Q, D)

    def search(self, queries: np.ndarray, k: int, excluded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: ((Q, k) float32 scores descending, (Q, k) int64 row positions).

        Rows hidden by `exclude` and this call's `excluded` (local positions) are never returned, whatever k;
        when fewer than k rows remain, the tail is row -1 with score -inf. Rows with equal scores come back in
        an unspecified order.

        Example:
            >>> index = TorchFlatIndex(np.eye(3, dtype=np.float32))
            >>> index.search(np.ones((1, 3), dtype=np.float32), k=3, excluded=np.array([0, 1]))[1].tolist()
            [[2, -1, -1]]
        """
        check_k(k, self.rows)
        return self._top_k(queries, int(k), skipped_rows(self._hidden, excluded, self.rows))

    def _top_k(self, queries: np.ndarray, k: int, excluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-k without the sorted local rows `excluded` (k already checked)."""
        query_block = self._queries(queries)  # (Q, D)
        query_tile, row_tile = self._tile_shape(max(1, query_block.shape[0]), k)
        return blockwise_top_k(query_block, self._blocks(row_tile), k, excluded, query_tile, row_tile)


def blockwise_top_k(
    queries: torch.Tensor,
    blocks: Iterator[tuple[int, int, torch.Tensor]],
    k: int,
    excluded: np.ndarray,
    query_tile: int,
    row_tile: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The top-k by inner product of (Q, D) `queries` over the rows of `blocks`, ((start, stop, (n, D) block))
    in row order on the queries' device and dtype, without the sorted local rows `excluded`; the scan every
    exact torch segment shares. Blocks hold at most `row_tile` rows; queries are scored `query_tile` at a time
    into one reused score tile, and a running (Q, k) top-k in float32 absorbs each block's top-k.

    Returns ((Q, k) float32 scores descending, (Q, k) int64 rows), -1 and -inf where fewer rows remain.
    """
    count, device, dtype = queries.shape[0], queries.device, queries.dtype
    if count == 0:
        return np.zeros((0, k), dtype=np.float32), np.zeros((0, k), dtype=np.int64)
    excluded_device = torch.from_numpy(excluded).to(device)  # once: per-block slices then never sync
    best_scores = torch.full((count, k), -torch.inf, dtype=torch.float32, device=device)  # (Q, k)
    best_rows = torch.full((count, k), -1, dtype=torch.int64, device=device)  # (Q, k)
    # one score tile reused by every GEMM, so the allocator never holds several (CPU malloc keeps freed tiles)
    tile = torch.empty(min(query_tile, count) * row_tile, dtype=dtype, device=device)
    for start, stop, block in blocks:  # block: (n, D)
        low, high = np.searchsorted(excluded, [start, stop])
        dropped = excluded_device[low:high] - start if high > low else None  # (x,) local to the block
        block_k = min(k, stop - start)
        for first in range(0, count, query_tile):
            last = min(first + query_tile, count)
            scores = tile[: (last - first) * (stop - start)].view(last - first, stop - start)  # (q, n)
            torch.mm(queries[first:last], block.T, out=scores)  # in dtype
            if dropped is not None:
                scores.index_fill_(1, dropped, -torch.inf)
            values, rows = torch.topk(scores, block_k, dim=1)  # (q, block_k)
            merged_scores = torch.cat([best_scores[first:last], values.float()], dim=1)  # (q, k + block_k)
            merged_rows = torch.cat([best_rows[first:last], rows + start], dim=1)  # (q, k + block_k)
            top, positions = torch.topk(merged_scores, k, dim=1)  # (q, k)
            best_scores[first:last] = top
            best_rows[first:last] = torch.gather(merged_rows, 1, positions)
    # excluded rows (and padding) score -inf and may have been picked to fill k: they are no answer
    best_rows.masked_fill_(best_scores == -torch.inf, -1)
    if bool((torch.isnan(best_scores) | torch.isposinf(best_scores)).any()):
        raise AttribIndexError(
            f"scores overflowed or are NaN in {dtype} (float16 tops out at 65504). "
            f"Use dtype=torch.bfloat16 or torch.float32, or check the vectors for NaN/inf."
        )
    return best_scores.cpu().numpy(), best_rows.cpu().numpy()
