"""Recall of an approximate index against exact search, measured on the user's own queries.

Ground truth is an exact scan of every live stored row (re-whitened from the raw gradients block by
block), so it holds whatever kind the index is. Each search setting (nprobe for IVF, efSearch for HNSW)
is timed on the whole query batch, re-ranking included: what a user of that setting gets.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from attribindex._records import to_json
from attribindex.errors import AttribIndexError
from attribindex.index import SegmentPlan
from attribindex.query import AttributionIndex, check_count
from attribindex.store import OperatingPoint

EXACT_SCAN_BLOCK_BYTES = 32 * 2**20  # raw rows re-whitened at a time by the exact scan


@dataclass(frozen=True)
class RecallPoint:
    """One search setting and what it achieved: mean recall@k and batch latency per query."""

    settings: dict  # {"nprobe": 8} / {"ef_search": 64} / {} for a kind without settings
    recall: float
    ms_per_query: float

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.settings.items()) or "default"


@dataclass
class RecallReport:
    """The sweep of `measure_recall`: every setting, the exact scan's cost, and the chosen operating point.

    Example:
        >>> print(report.format())  # doctest: +SKIP
    """

    index: str
    search: str
    k: int
    queries: int
    rerank: int
    target: float
    exact_ms_per_query: float
    points: list[RecallPoint] = field(default_factory=list)

    @property
    def chosen(self) -> RecallPoint:
        """The fastest setting that reaches `target`; the most accurate one when none does."""
        reaching = [p for p in self.points if p.recall >= self.target]
        if reaching:
            return min(reaching, key=lambda p: p.ms_per_query)
        return max(self.points, key=lambda p: (p.recall, -p.ms_per_query))

    def operating_point(self) -> OperatingPoint:
        """The manifest record of the chosen setting."""
        chosen = self.chosen
        return OperatingPoint(
            nprobe=chosen.settings.get("nprobe"),
            ef_search=chosen.settings.get("ef_search"),
            k=self.k,
            recall=round(chosen.recall, 4),
            ms_per_query=round(chosen.ms_per_query, 4),
            target=self.target,
            queries=self.queries,
            rerank=self.rerank,
            measured=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        )

    def format(self) -> str:
        lines = [
            f"recall@{self.k} of {self.search} against an exact scan, {self.queries} queries",
            f"{'setting':<18}{'recall@' + str(self.k):>10}{'ms/query':>11}{'vs exact scan':>15}",
        ]
        for point in self.points:
            mark = "  ← operating point" if point is self.chosen else ""
            speedup = self.exact_ms_per_query / point.ms_per_query if point.ms_per_query > 0 else float("inf")
            lines.append(f"{point.label:<18}{point.recall:>10.3f}{point.ms_per_query:>11.3f}{speedup:>14.1f}×{mark}")
        lines.append(
            f"exact scan (re-whitened from the store): {self.exact_ms_per_query:.3f} ms/query. "
            + (
                f"Target recall {self.target} reached."
                if self.chosen.recall >= self.target
                else f"No setting reached recall {self.target}: raise nprobe/ef_search or rerank, or use kind flat."
            )
        )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self) | {"operating_point": to_json(self.operating_point())}


def default_settings(index: AttributionIndex, k: int) -> list[dict]:
    """The sweep for the index's approximate segments (or its Milvus collection): nprobe 1, 2, 4, … nlist; or
    efSearch from the number of candidates fetched (a graph never searches with fewer) doubling up to 512."""
    candidates = max(k, index.rerank * k)
    if index.remote is not None:
        state = index.remote.state
        return _sweep(state.nlist, state.milvus_kind.effort is not None, candidates)
    plans = [SegmentPlan.from_record(s.plan) for s in index.manifest.index.segments if not s.exact]
    if not plans:
        raise AttribIndexError(
            f"{index.root} holds exact flat segments only: its recall is 1 by construction. "
            f"Build with an approximate index.kind (ivf_flat, ivf_sq8, ivf_pq, hnsw) to measure recall."
        )
    return _sweep(max((p.nlist or 0) for p in plans), any(p.kind == "hnsw" for p in plans), candidates)


def _sweep(nlist: int, graph: bool, candidates: int) -> list[dict]:
    if nlist:
        return [{"nprobe": 2**i} for i in range(nlist.bit_length()) if 2**i < nlist] + [{"nprobe": nlist}]
    if graph:
        return [{"ef_search": candidates}] + [{"ef_search": 2**i} for i in range(4, 10) if 2**i > candidates]
    return [{}]


def exact_top_k(index: AttributionIndex, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over every live stored row: ((Q, k) scores, (Q, k) rows), one block of rows at a time, so
    memory is a block plus a (Q, block) score tile, never (Q, N)."""
    deleted = index.index.deleted
    best_scores = np.full((len(vectors), 0), -np.inf, dtype=np.float32)  # (Q, ≤ k)
    best_rows = np.zeros((len(vectors), 0), dtype=np.int64)
    for start, raw in index.store.iter_raw(max_bytes=EXACT_SCAN_BLOCK_BYTES):
        block = index.preconditioner.index_vectors(raw, index.mode)  # (n, D)
        scores = vectors @ block.T  # (Q, n)
        rows = np.arange(start, start + len(block))
        scores[:, np.isin(rows, deleted)] = -np.inf
        merged_scores = np.concatenate([best_scores, scores], axis=1)
        merged_rows = np.concatenate([best_rows, np.broadcast_to(rows, scores.shape)], axis=1)
        keep = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(merged_scores, keep, axis=1)
        best_rows = np.take_along_axis(merged_rows, keep, axis=1)
    return best_scores, best_rows


def measure_recall(
    index: AttributionIndex,
    vectors: np.ndarray,
    k: int = 10,
    settings: list[dict] | None = None,
    rerank: int | None = None,
    target: float = 0.95,
) -> RecallReport:
    """Recall@k and latency of `index` for each search setting, against exact search, on query `vectors`.

    Args:
        vectors: (Q, D) whitened query vectors (`AttributionIndex.query_vectors(...).vectors`).
        settings: e.g. ``[{"nprobe": 4}, {"nprobe": 16}]`` (default: `default_settings`).
            An HNSW efSearch below the number of candidates fetched searches with that number instead.
        rerank: re-rank factor to measure with (default: the index's).
        target: the recall the operating point must reach.

    Example:
        >>> index = AttributionIndex.open("ivf-index")  # doctest: +SKIP
        >>> report = measure_recall(index, index.query_vectors(held_out_texts).vectors, k=10)  # doctest: +SKIP
        >>> report.chosen.settings  # doctest: +SKIP
        {'nprobe': 16}
    """
    check_count("k", k, index.rows, minimum=1)
    if not 0 < target <= 1:
        raise AttribIndexError(f"the recall target must be in (0, 1], got {target}.")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    settings = settings if settings is not None else default_settings(index, k)
    started = time.perf_counter()
    _, truth = exact_top_k(index, vectors, k)
    exact_ms = (time.perf_counter() - started) * 1000 / len(vectors)
    kept_rerank = index.rerank
    kept_effort = [(s, getattr(s, "nprobe", None), getattr(s, "ef_search", None)) for s in index.index.segments]
    kept_remote_effort = index.remote.effort if index.remote is not None else None
    if rerank is not None:
        index.configure_search(rerank=rerank)
    report = RecallReport(
        index=str(index.root),
        search=index.search_description,
        k=k,
        queries=len(vectors),
        rerank=index.rerank,
        target=target,
        exact_ms_per_query=exact_ms,
    )
    try:
        for setting in settings:
            index.configure_search(**setting)
            index.ranked(vectors[:1], k)  # warm-up: first-touch page faults are not the setting's cost
            started = time.perf_counter()
            _, found = index.ranked(vectors, k)
            elapsed_ms = (time.perf_counter() - started) * 1000
            hits = [len(set(f[f >= 0]) & set(t[t >= 0])) / k for f, t in zip(found, truth)]
            report.points.append(RecallPoint(dict(setting), float(np.mean(hits)), elapsed_ms / len(vectors)))
    finally:  # the index searches as before the sweep
        index.configure_search(rerank=kept_rerank)
        for segment, nprobe, ef_search in kept_effort:
            segment.configure(nprobe=nprobe, ef_search=ef_search)
        if index.remote is not None:
            index.remote.effort = kept_remote_effort
    return report


def plot_recall(report: RecallReport, path: Path) -> Path:
    """Recall@k against ms/query, one point per setting, the operating point marked; written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display is needed or used
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    latencies = [p.ms_per_query for p in report.points]
    axes.plot(latencies, [p.recall for p in report.points], "o-", color="tab:blue", label="search settings")
    for point in report.points:
        axes.annotate(
            point.label, (point.ms_per_query, point.recall), fontsize=7, xytext=(4, -10), textcoords="offset points"
        )
    chosen = report.chosen
    axes.plot(
        [chosen.ms_per_query],
        [chosen.recall],
        "o",
        color="tab:red",
        markersize=10,
        fillstyle="none",
        label="operating point",
    )
    axes.axvline(report.exact_ms_per_query, color="gray", linestyle="--", label="exact scan")
    axes.axhline(report.target, color="tab:green", linestyle=":", label=f"target {report.target}")
    axes.set_xscale("log")
    axes.set_xlabel(f"ms per query (batch of {report.queries})")
    axes.set_ylabel(f"recall@{report.k}")
    axes.set_ylim(0, 1.02)
    axes.set_title(f"{Path(report.index).name}: {report.search.split(' ')[0]}, recall vs latency", fontsize=10)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png")
    plt.close(figure)
    return path
