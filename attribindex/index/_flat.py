"""Exact inner-product search with FAISS over whitened vectors; labels are row positions.

Bottom-k (opponents) is a top-k search with the negated query (scores negated back), so it never scans
with k = N.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from attribindex.errors import AttribIndexError
from attribindex.index._flat_format import FLAT_FOURCC, FLAT_HEADER, FLAT_METRIC_INNER_PRODUCT, FLAT_RESERVED
from attribindex.index._segment import best_k, check_k, checked_local_rows, skipped_rows
from attribindex.store import atomic_open

GPU_MAX_K = 2048  # faiss GPU kernels select at most this many results per query


def check_single_faiss(distributions: list[str]) -> None:
    """faiss-cpu and faiss-gpu wheels install the same `faiss` module; with both, one silently shadows the other."""
    found = sorted(d for d in distributions if d == "faiss-cpu" or d.startswith("faiss-gpu"))
    if len(found) > 1:
        raise AttribIndexError(
            f"several faiss builds are installed ({', '.join(found)}); they overwrite each other's `faiss` module. "
            f"Keep one: `pip uninstall {' '.join(found)}` then install attribindex[cpu] or attribindex[gpu]."
        )


@functools.lru_cache(maxsize=1)
def import_faiss():
    """Import faiss lazily with an install hint (faiss-cpu and faiss-gpu are alternative extras)."""
    from importlib.metadata import distributions

    check_single_faiss([(d.metadata["Name"] or "").lower() for d in distributions()])
    try:
        import faiss
    except ImportError:
        raise AttribIndexError(
            "faiss is not installed. Install exactly one of: `pip install 'attribindex[cpu]'` (faiss-cpu) or "
            "`pip install 'attribindex[gpu]'` (faiss-gpu)."
        ) from None
    return faiss


def gpu_available() -> bool:
    """Whether faiss can search on a GPU here (False without faiss: a CUDA search then runs through torch)."""
    try:
        faiss = import_faiss()
    except AttribIndexError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def read_faiss_index(path: Path, io_flags: int = 0):
    """`faiss.read_index` with the project's errors: a missing or damaged file is named, with the fix."""
    faiss = import_faiss()
    if not path.is_file():
        raise AttribIndexError(f"index file {path} is missing. Rebuild the index or restore the file.")
    try:
        return faiss.read_index(str(path), io_flags)
    except RuntimeError as err:
        raise AttribIndexError(
            f"index file {path} is damaged ({str(err).splitlines()[0]}). Rebuild the index."
        ) from None


class FlatIndex:
    """An exact inner-product index (IndexFlatIP) on CPU, or on GPU when GPU faiss and a GPU are present.

    A `Segment`: hidden rows are dropped inside FAISS by a bitmap selector on CPU (about 3 % slower than an
    unfiltered scan); GPU faiss takes no selector, so there it over-fetches and drops them.

    Example:
        >>> index = FlatIndex.empty(dim=4)
        >>> index.add(np.eye(4, dtype=np.float32))
        >>> scores, rows = index.search(np.array([[0, 0, 1, 0]], dtype=np.float32), k=2)
        >>> int(rows[0, 0]), float(scores[0, 0])
        (2, 1.0)
        >>> index.search(np.array([[1, 2, 3, 4]], dtype=np.float32), k=4, excluded=np.array([2, 3]))[1].tolist()
        [[1, 0, -1, -1]]
    """

    exact = True  # every candidate set and score is exact
    description = "flat"

    def __init__(self, index, on_gpu: bool = False):
        self._index = index
        self.on_gpu = on_gpu
        self._hidden = np.zeros(0, dtype=np.int64)  # rows `exclude` hides, sorted local positions
        self._params = None  # search parameters carrying the selector that hides them (CPU only)

    @classmethod
    def empty(cls, dim: int) -> FlatIndex:
        return cls(import_faiss().IndexFlatIP(dim))

    @property
    def rows(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    def add(self, vectors: np.ndarray) -> None:
        self._index.add(np.ascontiguousarray(vectors, dtype=np.float32))  # (n, D)

    @classmethod
    def load(cls, path: Path, device: str = "auto") -> FlatIndex:
        """Load (memory-mapped on CPU); move to GPU when `device` allows and GPU faiss finds one."""
        faiss = import_faiss()
        index = read_faiss_index(path, faiss.IO_FLAG_MMAP_IFC)
        if device != "cpu" and gpu_available():
            resources = faiss.StandardGpuResources()
            gpu = faiss.index_cpu_to_gpu(resources, 0, index)
            gpu.referenced_resources = resources  # keep the resources alive as long as the index
            return cls(gpu, on_gpu=True)
        if device == "cuda":
            raise AttribIndexError(
                "index.device is 'cuda' but GPU faiss or a GPU is missing. Install attribindex[gpu]."
            )
        return cls(index)

    def search(self, queries: np.ndarray, k: int, excluded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: ((Q, k) scores descending, (Q, k) row positions).

        Rows hidden by `exclude` and this call's `excluded` (local positions) never come back; when fewer
        than k rows remain, the tail is row -1 with score -inf.
        """
        check_k(k, self.rows)
        if excluded is None:
            return self._top_k(queries, k, self._hidden, self._params)
        skipped = skipped_rows(self._hidden, excluded, self.rows)  # (x,) sorted
        return self._top_k(queries, k, skipped, self._selector_params(skipped))

    def exclude(self, local_rows: np.ndarray) -> None:
        """Hide these local rows from every later `candidates` and `search` (replaces earlier ones)."""
        self._hidden = checked_local_rows(local_rows, self.rows)
        self._params = self._selector_params(self._hidden)

    def candidates(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-min(k, rows) over the rows not hidden: ((Q, k') scores, (Q, k') rows, -1 and -inf past the end)."""
        return self._top_k(queries, min(k, self.rows), self._hidden, self._params)

    def configure(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """An exact scan has no search effort to set: accepted and ignored."""

    def _selector_params(self, excluded: np.ndarray):
        """FAISS search parameters whose bitmap selector hides `excluded`; None when there is nothing to hide or
        on GPU (which takes no selector)."""
        if not len(excluded) or self.on_gpu:
            return None
        bitmap, selector = bitmap_selector(self.rows, excluded)
        params = import_faiss().SearchParameters(sel=selector)
        params.keep_alive = (bitmap, selector)  # FAISS holds raw pointers to both
        return params

    def _top_k(self, queries: np.ndarray, k: int, excluded: np.ndarray, params) -> tuple[np.ndarray, np.ndarray]:
        """Top-k without the sorted local rows `excluded` (inside FAISS through `params` on CPU)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, D)
        overfetch = self.on_gpu and len(excluded) > 0
        want = min(k + len(excluded), self.rows) if overfetch else k
        if self.on_gpu and want > GPU_MAX_K:
            raise AttribIndexError(
                f"GPU faiss returns at most {GPU_MAX_K} results per query; k plus the {len(excluded)} deleted rows of a "
                f"segment exceeds that. Compact the index (`attribindex compact`) or use a smaller k."
                if overfetch
                else f"GPU faiss returns at most {GPU_MAX_K} results per query, got k={k}. Use a smaller k."
            )
        if params is not None:
            scores, rows = self._index.search(queries, want, params=params)  # (Q, want) each
        else:
            scores, rows = self._index.search(queries, want)  # (Q, want) each
        gone = rows < 0  # (Q, want)
        if overfetch:
            gone |= np.isin(rows, excluded)
        scores, rows = np.where(gone, -np.inf, scores), np.where(gone, -1, rows)
        return best_k(scores, rows, k) if overfetch else (scores, rows)


def bitmap_selector(rows: int, excluded: np.ndarray):
    """(bitmap, FAISS selector) keeping every row of `rows` but `excluded`; FAISS holds a raw pointer to the bitmap."""
    faiss = import_faiss()
    alive = np.ones(rows, dtype=bool)
    alive[excluded] = False
    bitmap = np.packbits(alive, bitorder="little")
    return bitmap, faiss.IDSelectorBitmap(rows, faiss.swig_ptr(bitmap))


class FlatIndexWriter:
    """Streams vectors into a FAISS `IndexFlatIP` file, so building an index of any size needs one chunk of memory.

    The bytes equal what `faiss.write_index` writes for the same vectors (a test checks this against the
    installed faiss): the header `FLAT_HEADER` (see `_flat_format`), then the vectors row by row. Its row
    and float counts are patched on close.

    Example:
        >>> with FlatIndexWriter(Path("flat.faiss"), dim=4) as writer:  # doctest: +SKIP
        ...     writer.add(np.eye(4, dtype=np.float32))
    """

    def __init__(self, path: Path, dim: int):
        self.path = path
        self.dim = dim
        self.rows = 0

    def _header(self) -> bytes:
        return FLAT_HEADER.pack(
            FLAT_FOURCC,
            self.dim,
            self.rows,
            FLAT_RESERVED,
            FLAT_RESERVED,
            True,
            FLAT_METRIC_INNER_PRODUCT,
            self.rows * self.dim,
        )

    def __enter__(self) -> FlatIndexWriter:
        self._context = atomic_open(self.path)
        self._handle = self._context.__enter__()
        self._handle.write(self._header())
        return self

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype="<f4")  # (n, D)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {vectors.shape}")
        self._handle.write(vectors.tobytes())
        self.rows += vectors.shape[0]

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self._handle.seek(0)
            self._handle.write(self._header())
            self._handle.seek(0, 2)
        self._context.__exit__(*exc)
