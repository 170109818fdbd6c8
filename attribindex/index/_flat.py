"""Exact inner-product search with FAISS over whitened vectors; labels are row positions.

Bottom-k (opponents) is a top-k search with the negated query, so it never scans with k = N.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path

import numpy as np

from attribindex.errors import AttribIndexError
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
    faiss = import_faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class FlatIndex:
    """An exact inner-product index (IndexFlatIP) on CPU, or on GPU when GPU faiss and a GPU are present.

    Example:
        >>> index = FlatIndex.empty(dim=4)
        >>> index.add(np.eye(4, dtype=np.float32))
        >>> scores, rows = index.search(np.array([[0, 0, 1, 0]], dtype=np.float32), k=2)
        >>> int(rows[0, 0]), float(scores[0, 0])
        (2, 1.0)
    """

    exact = True  # every candidate set and score is exact
    description = "flat"

    def __init__(self, index, on_gpu: bool = False):
        self._index = index
        self.on_gpu = on_gpu
        self._excluded = np.zeros(0, dtype=np.int64)
        self._params = None  # search parameters carrying the selector that hides excluded rows

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
        if not path.is_file():
            raise AttribIndexError(f"index file {path} is missing. Rebuild the index or restore the file.")
        try:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
        except RuntimeError as err:
            raise AttribIndexError(
                f"index file {path} is damaged ({str(err).splitlines()[0]}). Rebuild the index."
            ) from None
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

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: ((Q, k) scores descending, (Q, k) row positions)."""
        self._check_k(k)
        return self.raw_search(queries, k)

    def raw_search(self, queries: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search as is: `params` may carry an ID selector; rows past the end come back as -1."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        return self._index.search(queries, k, params=params) if params is not None else self._index.search(queries, k)

    def search_bottom(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Bottom-k by inner product: ((Q, k) scores ascending, (Q, k) row positions)."""
        scores, rows = self.search(-np.asarray(queries, dtype=np.float32), k)
        return -scores, rows

    def exclude(self, local_rows: np.ndarray) -> None:
        """Never return these rows (sorted int64) from `candidates`: a bitmap selector inside FAISS on CPU
        (about 3 % slower than an unfiltered scan); on GPU, which takes no selector, over-fetch and drop."""
        self._excluded = np.asarray(local_rows, dtype=np.int64)
        self._params = None
        if len(self._excluded) and not self.on_gpu:
            bitmap, selector = bitmap_selector(self.rows, self._excluded)
            self._params = import_faiss().SearchParameters(sel=selector)
            self._params.keep_alive = (bitmap, selector)  # FAISS holds raw pointers to both

    def candidates(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-min(k, rows) over the rows not excluded: ((Q, k') scores, (Q, k') rows, -1 and -inf past the end)."""
        excluded = self._excluded
        if not len(excluded) or not self.on_gpu:
            scores, rows = self.raw_search(queries, min(k, self.rows), self._params)
            return np.where(rows >= 0, scores, -np.inf), rows
        want = min(k + len(excluded), self.rows)
        if want > GPU_MAX_K:
            raise AttribIndexError(
                f"GPU faiss returns at most {GPU_MAX_K} results per query; k plus the {len(excluded)} deleted rows of a "
                f"segment exceeds that. Compact the index (`attribindex compact`) or use a smaller k."
            )
        scores, rows = self.raw_search(queries, want)
        gone = np.isin(rows, excluded) | (rows < 0)
        scores, rows = np.where(gone, -np.inf, scores), np.where(gone, -1, rows)
        order = np.argsort(-scores, axis=1, kind="stable")[:, : min(k, self.rows)]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)

    def _check_k(self, k: int) -> None:
        if k < 1 or k > self.rows:
            raise AttribIndexError(f"k must be between 1 and the number of rows ({self.rows}), got {k}.")
        if self.on_gpu and k > GPU_MAX_K:
            raise AttribIndexError(
                f"GPU faiss returns at most {GPU_MAX_K} results per query, got k={k}. Use a smaller k."
            )


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
    installed faiss): fourcc ``IxFI``, the index header (d, ntotal, two reserved int64s, is_trained,
    metric), the number of floats, then the vectors row by row. Header fields are patched on close.

    Example:
        >>> with FlatIndexWriter(Path("flat.faiss"), dim=4) as writer:  # doctest: +SKIP
        ...     writer.add(np.eye(4, dtype=np.float32))
    """

    _HEADER = struct.Struct("<4siqqq?iq")  # fourcc, d, ntotal, dummy, dummy, is_trained, metric, float count
    _RESERVED = 1 << 20  # faiss writes this value in both reserved fields
    _METRIC_INNER_PRODUCT = 0

    def __init__(self, path: Path, dim: int):
        self.path = path
        self.dim = dim
        self.rows = 0

    def _header(self) -> bytes:
        return self._HEADER.pack(
            b"IxFI",
            self.dim,
            self.rows,
            self._RESERVED,
            self._RESERVED,
            True,
            self._METRIC_INNER_PRODUCT,
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
