"""Approximate and compressed FAISS segments over whitened vectors, built from streamed blocks.

Kinds: ``flat`` with float16/bfloat16 storage (exhaustive scan of scalar-quantised vectors), ``ivf_flat``,
``ivf_sq8``, ``ivf_pq`` and ``hnsw``. Search results carry approximate scores; the query layer re-scores the
candidates exactly from the stored raw gradients (`rerank`).

Influence vectors have heavy-tailed norms, and inner-product IVF cells ignore norms (faiss issue #1496).
``ivf_flat`` in ``dot`` mode may therefore index the MIPS→L2 augmentation ``x' = [x, √(M² − ‖x‖²)]`` with
M the segment's largest norm (recorded), searched with ``q' = [q, 0]``:
``‖q' − x'‖² = ‖q‖² + M² − 2⟨q, x⟩``, so the nearest x' is the largest inner product. Measured on synthetic
gradient-like data (tests/index, tools/bench_ann.py) it recalls more than inner-product cells once about
1/16 of the cells are scanned, and less at a handful; with quantised codes (SQ8, PQ) or an HNSW graph it
is harmful, because their coding error in the large extra coordinate swamps the inner product. Every
other case uses FAISS's inner-product metric, whose candidates are then re-ranked exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from attribindex._progress import progress as progress_bar
from attribindex.config import IndexConfig
from attribindex.errors import AttribIndexError
from attribindex.index._flat import bitmap_selector, import_faiss, read_faiss_index
from attribindex.index._segment import check_k, checked_local_rows, skipped_rows
from attribindex.store import atomic_open

MIN_TRAIN_PER_CENTROID = 39  # faiss k-means warns below this many training points per centroid
PQ_DIMS_PER_CODE = 4  # default ivf_pq: one code per 4 dimensions (16× smaller than float32; 8 recalled 0.86 at 10 × k)
NORM_SAFETY = 1 + 1e-6  # M is raised slightly so that √(M² − ‖x‖²) never takes a rounding-negative argument

_SQ_STORAGE = {"float16": "SQfp16", "bfloat16": "SQbf16"}


def default_nlist(rows: int) -> int:
    """The power of two nearest √rows, capped so that every cell gets 39 training rows.

    Example:
        >>> default_nlist(1_000_000), default_nlist(4_000), default_nlist(20)
        (1024, 64, 1)
    """
    nearest = 2 ** round(math.log2(max(1.0, math.sqrt(rows))))
    return max(1, min(nearest, rows // MIN_TRAIN_PER_CENTROID))


def augmentation_column(x: np.ndarray, max_norm: float) -> np.ndarray:
    """The extra coordinate of the MIPS→L2 augmentation (module docstring): (n, D) → (n,) √(M² − ‖x‖²), float32."""
    squared = np.einsum("nd,nd->n", x, x, dtype=np.float64)
    return np.sqrt(np.maximum(max_norm**2 - squared, 0.0)).astype(np.float32)


@dataclass(frozen=True)
class SegmentPlan:
    """Every resolved parameter of one FAISS segment: what the manifest records and search needs.

    Example:
        >>> plan = SegmentPlan.resolve(IndexConfig(kind="ivf_pq"), mode="dot", rows=1_000_000, dim=256)
        >>> plan.factory, plan.index_dim, plan.nprobe
        ('IVF1024,PQ64', 256, 64)
    """

    kind: str
    storage: str
    metric: str  # "inner_product" or "l2_augmented" (MIPS→L2, dot mode)
    dim: int  # dimension of the whitened vectors
    index_dim: int  # dimension FAISS sees: + 1 for the augmentation, zero-padded to a multiple of pq_m
    nlist: int | None
    nprobe: int | None
    pq_m: int | None
    pq_bits: int | None
    hnsw_m: int | None
    ef_construction: int | None
    ef_search: int | None
    train_rows: int
    seed: int

    @classmethod
    def resolve(cls, config: IndexConfig, mode: str, rows: int, dim: int) -> SegmentPlan:
        """Fill the parameters `config` leaves open from the segment's size: nlist ≈ √N, nprobe = nlist/16,
        one PQ code per 4 dimensions, and a training sample of `train_per_centroid` rows per cell."""
        kind = config.kind
        augmented = mode == "dot" and kind == "ivf_flat" and config.mips in ("auto", "augment")
        index_dim = dim + 1 if augmented else dim
        nlist = nprobe = pq_m = pq_bits = hnsw_m = ef_construction = ef_search = None
        train_rows = 0
        if kind.startswith("ivf_"):
            nlist = min(config.nlist or default_nlist(rows), rows)
            nprobe = min(config.nprobe or max(1, nlist // 16), nlist)
            train_rows = min(rows, nlist * config.train_per_centroid)
        if kind == "ivf_pq":
            pq_m = config.pq_m or math.ceil(index_dim / PQ_DIMS_PER_CODE)
            index_dim = pq_m * math.ceil(index_dim / pq_m)
            train_rows = min(rows, max(train_rows, 256 * MIN_TRAIN_PER_CENTROID))
            # 8-bit codebooks need 39 × 256 training rows; smaller segments get fewer bits rather than bad k-means
            pq_bits = max(1, min(8, int(math.log2(train_rows / MIN_TRAIN_PER_CENTROID))))
        if kind == "hnsw":
            hnsw_m, ef_construction, ef_search = config.hnsw_m, config.ef_construction, config.ef_search
        return cls(
            kind=kind,
            storage=config.storage,
            metric="l2_augmented" if augmented else "inner_product",
            dim=dim,
            index_dim=index_dim,
            nlist=nlist,
            nprobe=nprobe,
            pq_m=pq_m,
            pq_bits=pq_bits,
            hnsw_m=hnsw_m,
            ef_construction=ef_construction,
            ef_search=ef_search,
            train_rows=train_rows,
            seed=config.seed,
        )

    @property
    def factory(self) -> str:
        """The FAISS index-factory string of this segment."""
        if self.kind == "flat":
            return _SQ_STORAGE.get(self.storage, "Flat")
        if self.kind == "hnsw":
            return f"HNSW{self.hnsw_m}"
        pq = f"PQ{self.pq_m}" + (f"x{self.pq_bits}" if self.pq_bits != 8 else "")
        return f"IVF{self.nlist}," + {"ivf_flat": "Flat", "ivf_sq8": "SQ8", "ivf_pq": pq}[self.kind]

    def record(self) -> dict:
        return asdict(self) | {"factory": self.factory}

    @classmethod
    def from_record(cls, record: dict) -> SegmentPlan:
        return cls(**{k: v for k, v in record.items() if k in cls.__dataclass_fields__})


def training_rows(plan: SegmentPlan, rows: int) -> np.ndarray:
    """Sorted row positions of the training sample: `plan.train_rows` drawn without replacement with
    `plan.seed`, so the same seed and data give the same sample (and, with k-means seeded too, the same index)."""
    rng = np.random.default_rng(plan.seed)
    return np.sort(rng.choice(rows, size=plan.train_rows, replace=False))


class _Augmentation:
    """Maps whitened vectors and queries into the space FAISS searches (augmentation and zero padding)."""

    def __init__(self, plan: SegmentPlan, max_norm: float | None):
        self.plan = plan
        self.max_norm = max_norm

    def vectors(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)  # (n, D)
        if self.plan.index_dim == x.shape[1]:  # neither augmented nor padded: FAISS takes the block as is
            return x
        out = np.zeros((len(x), self.plan.index_dim), dtype=np.float32)  # (n, D')
        out[:, : x.shape[1]] = x
        if self.plan.metric == "l2_augmented":
            out[:, x.shape[1]] = augmentation_column(x, self.max_norm)
        return out

    def queries(self, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, dtype=np.float32)  # (Q, D)
        if self.plan.index_dim == q.shape[1]:
            return q
        out = np.zeros((len(q), self.plan.index_dim), dtype=np.float32)  # (Q, D'): the extra coordinate is 0
        out[:, : q.shape[1]] = q
        return out

    def inner_products(self, q: np.ndarray, distances: np.ndarray) -> np.ndarray:
        """FAISS results → inner products: identity for IP; (‖q‖² + M² − d²) / 2 for augmented L2."""
        if self.plan.metric != "l2_augmented":
            return distances
        squared = np.einsum("qd,qd->q", q, q, dtype=np.float64)[:, None]  # (Q, 1)
        return ((squared + self.max_norm**2 - distances) / 2).astype(np.float32)


def build_segment(
    path: Path,
    plan: SegmentPlan,
    rows: int,
    blocks: Callable[[], Iterator[np.ndarray]],
    sample: Callable[[np.ndarray], np.ndarray],
    progress: bool = True,
) -> dict:
    """Train (when the kind needs it) and fill a FAISS segment, then write it atomically to `path`.

    Args:
        blocks: yields every whitened vector of the segment in row order, block by block (called once,
            or twice when augmented: a first pass finds the largest norm M).
        sample: whitened vectors of the given sorted row positions (the training sample).

    Returns the segment's manifest record: file details are added by the caller.
    """
    faiss = import_faiss()
    max_norm = None
    if plan.metric == "l2_augmented":
        with progress_bar(total=rows, desc="norms", unit="row", unit_scale=True, enabled=progress) as bar:
            for block in blocks():
                norm = float(np.sqrt(np.einsum("nd,nd->n", block, block, dtype=np.float64).max()))
                max_norm = max(max_norm or 0.0, norm)
                bar.update(len(block))
        max_norm *= NORM_SAFETY
    augment = _Augmentation(plan, max_norm)
    metric = faiss.METRIC_L2 if plan.metric == "l2_augmented" else faiss.METRIC_INNER_PRODUCT
    index = faiss.index_factory(plan.index_dim, plan.factory, metric)
    if plan.kind == "hnsw":
        index.hnsw.efConstruction = plan.ef_construction
    if not index.is_trained:
        _seed_clustering(faiss, index, plan.seed)
        with progress_bar(total=plan.train_rows, desc="train", unit="row", unit_scale=True, enabled=progress) as bar:
            index.train(augment.vectors(sample(training_rows(plan, rows))))
            bar.update(plan.train_rows)
    with progress_bar(total=rows, desc=f"index {plan.factory}", unit="row", unit_scale=True, enabled=progress) as bar:
        for block in blocks():
            index.add(augment.vectors(block))
            bar.update(len(block))
    if index.ntotal != rows:
        raise AttribIndexError(
            f"built {index.ntotal} vectors for a segment of {rows} rows; the store changed during the build."
        )
    with atomic_open(path) as handle:
        faiss.write_index(index, faiss.PyCallbackIOWriter(handle.write))
    return plan.record() | {"max_norm": max_norm}


def _seed_clustering(faiss, index, seed: int) -> None:
    """Seed every k-means a kind runs (coarse quantiser, product quantiser) for a reproducible index."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
        pq = getattr(faiss.downcast_index(ivf), "pq", None)
        if pq is not None:
            pq.cp.seed = seed


class ApproximateIndex:
    """One approximate or compressed FAISS segment, searched by inner product in the original space.

    A `Segment`: hidden rows are excluded inside FAISS (an ID selector), so they never come back. The search
    effort (`nprobe`, `ef_search`) may be changed between searches with `configure` (the recall evaluation
    sweeps it).

    Example:
        >>> segment = ApproximateIndex.load(Path("index/segment.faiss"), record)  # doctest: +SKIP
        >>> segment.configure(nprobe=32)  # doctest: +SKIP
        >>> scores, rows = segment.candidates(queries, k=40)  # doctest: +SKIP
    """

    exact = False  # approximate segments search on CPU (HNSW has no GPU implementation)

    def __init__(self, index, record: dict):
        self._index = index
        self.plan = SegmentPlan.from_record(record)
        self._augment = _Augmentation(self.plan, record.get("max_norm"))
        self.nprobe = self.plan.nprobe
        self.ef_search = self.plan.ef_search
        self._hidden = np.zeros(0, dtype=np.int64)  # rows `exclude` hides, sorted local positions
        self._selector = None  # (bitmap, FAISS selector) hiding them

    @classmethod
    def load(cls, path: Path, record: dict) -> ApproximateIndex:
        index = read_faiss_index(path)
        if index.d != record["index_dim"]:
            raise AttribIndexError(
                f"{path} has dimension {index.d} but the manifest records {record['index_dim']}. Rebuild the index."
            )
        return cls(index, record)

    @property
    def rows(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return self.plan.dim

    @property
    def description(self) -> str:
        settings = {"nprobe": self.nprobe if self.plan.nlist else None, "efSearch": self.ef_search}
        return " ".join([self.plan.factory] + [f"{k}={v}" for k, v in settings.items() if v is not None])

    def configure(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Set the IVF cells scanned (capped at nlist) and the HNSW candidate list; None keeps the current
        value, and a setting this kind does not have is ignored."""
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None and value < 1:
                raise AttribIndexError(f"{name} must be at least 1, got {value}.")
        if nprobe is not None and self.plan.nlist:
            self.nprobe = min(int(nprobe), self.plan.nlist)
        if ef_search is not None and self.plan.kind == "hnsw":
            self.ef_search = int(ef_search)

    def exclude(self, local_rows: np.ndarray) -> None:
        """Hide these local rows from every later `candidates` and `search` (replaces earlier ones)."""
        self._hidden = checked_local_rows(local_rows, self.rows)
        self._selector = bitmap_selector(self.rows, self._hidden) if len(self._hidden) else None

    def candidates(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-min(k, rows) over the rows not hidden: ((Q, k') approximate inner products
        descending, (Q, k') rows, -1 and -inf past the end)."""
        return self._top_k(queries, min(k, self.rows), self._selector)

    def search(self, queries: np.ndarray, k: int, excluded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k over the rows neither hidden by `exclude` nor in `excluded` (local positions):
        ((Q, k) approximate inner products descending, (Q, k) rows, -1 and -inf past the end)."""
        check_k(k, self.rows)
        if excluded is None:
            return self._top_k(queries, k, self._selector)
        skipped = skipped_rows(self._hidden, excluded, self.rows)  # (x,) sorted
        return self._top_k(queries, k, bitmap_selector(self.rows, skipped) if len(skipped) else None)

    def _top_k(self, queries: np.ndarray, k: int, selector) -> tuple[np.ndarray, np.ndarray]:
        faiss = import_faiss()
        queries = np.asarray(queries, dtype=np.float32)  # (Q, D)
        if self.plan.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))
        elif self.plan.nlist:
            params = faiss.SearchParametersIVF(nprobe=self.nprobe)
        else:
            params = faiss.SearchParameters()
        if selector is not None:
            params.sel = selector[1]  # `selector` keeps the bitmap FAISS points to alive for the search
        distances, rows = self._index.search(self._augment.queries(queries), k, params=params)  # (Q, k) each
        scores = self._augment.inner_products(queries, distances)  # nearest first = largest inner product first
        return np.where(rows >= 0, scores, -np.inf).astype(np.float32), rows
