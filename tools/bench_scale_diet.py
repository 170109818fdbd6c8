"""The storage diet of tools/bench_scale.py: candidate indexes over the built store, each against the exact scan.

One pass over the store whitens each row once and feeds every candidate index (each trained first on its own
seeded sample, as `attribindex build` trains it) and the int8 row-store study; then each kind is searched, re-ranked
from the store, timed and compared with the exact flat top-10. See tools/bench_scale.py for the workload.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from bench_fidelity import overlap

from attribindex import AttributionIndex
from attribindex.config import IndexConfig
from attribindex.index import SegmentPlan
from attribindex.index._approx import ApproximateIndex, _Augmentation, _seed_clustering, training_rows
from attribindex.store import atomic_open

K = 10
NLIST = 256  # IVF cells: √N would be 1,024; 256 keeps k-means and assignment affordable on 2 cores
NPROBES = (16, 64, 256)  # cells scanned per query: the sweep `eval recall` makes
RERANKS = (10, 40)  # candidates re-scored from the store: depth × k
PQ_BYTES = (64, 128, 224, 256)  # 224: codes + 8-byte id + centroids and codebooks ≤ 256 bytes per row at 1M
BLOCK_BYTES = 64 * 2**20


@dataclass
class Candidate:
    """One candidate index being filled: its plan, its FAISS index, and the seconds spent training and adding."""

    name: str
    plan: SegmentPlan
    rows: int  # rows it holds (HNSW: the first --hnsw-rows)
    index: object = None
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)


def candidate_plans(rows: int, dim: int, hnsw_rows: int) -> list[Candidate]:
    ivf = {"nlist": NLIST, "nprobe": NPROBES[0]}
    configs = {"ivf_sq8": IndexConfig(mode="dot", kind="ivf_sq8", **ivf)}
    for size in PQ_BYTES:
        configs[f"ivf_pq{size}"] = IndexConfig(mode="dot", kind="ivf_pq", pq_m=size, **ivf)
    out = [Candidate(n, SegmentPlan.resolve(c, "dot", rows, dim), rows) for n, c in configs.items()]
    hnsw_rows = min(hnsw_rows, rows)
    out.append(
        Candidate("hnsw", SegmentPlan.resolve(IndexConfig(mode="dot", kind="hnsw"), "dot", hnsw_rows, dim), hnsw_rows)
    )
    return out


def int8_rows(raw: torch.Tensor, block_dims: list[int]) -> torch.Tensor:
    """(n, D) raw rows through an int8 code with one float32 scale per row and module (max |x| ↦ 127)."""
    parts = []
    for block in raw.split(block_dims, dim=1):  # (n, d_m) each
        scale = block.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127.0  # (n, 1)
        parts.append(torch.round(block / scale).clamp(-127, 127) * scale)
    return torch.cat(parts, dim=1)


def fill(index: AttributionIndex, queries: np.ndarray, candidates: list[Candidate], folder: Path) -> dict:
    """Train every candidate, then one pass over the store: whiten each block once, add it to every candidate
    that holds those rows, and score it against the queries from fp16 and from int8 rows."""
    import faiss

    store, preconditioner = index.store, index.preconditioner
    dim = sum(store.block_dims)
    pending = [c for c in candidates if not (folder / f"{c.name}.faiss").is_file()]
    scores_path = folder / "int8-scores.npz"
    if not pending and scores_path.is_file():
        return dict(np.load(scores_path))
    samples: dict[tuple[int, int], np.ndarray] = {}
    for c in pending:
        c.index = faiss.index_factory(c.plan.index_dim, c.plan.factory, faiss.METRIC_INNER_PRODUCT)
        if c.plan.kind == "hnsw":
            c.index.hnsw.efConstruction = c.plan.ef_construction
        if not c.index.is_trained:
            key = (c.plan.train_rows, c.plan.seed)
            if key not in samples:
                rows = training_rows(c.plan, c.rows)
                samples[key] = preconditioner.index_vectors(store.raw_rows(rows), "dot")  # (n_train, D)
            _seed_clustering(faiss, c.index, c.plan.seed)
            started = time.perf_counter()
            c.index.train(_Augmentation(c.plan, None).vectors(samples[key]))  # zero-padded to index_dim
            c.timings["train_s"] = time.perf_counter() - started
            c.seconds += c.timings["train_s"]
            print(f"trained {c.name} in {c.timings['train_s']:.0f} s", flush=True)
    samples.clear()
    preconditioned = preconditioner.whiten(torch.from_numpy(queries))  # (Q, D): ⟨W g, v⟩ = ⟨g, W v⟩
    fp16_scores = np.empty((len(queries), store.rows), np.float32)  # (Q, N)
    int8_scores = np.empty_like(fp16_scores)
    whitening_s, started_pass = 0.0, time.perf_counter()
    for start, raw in store.iter_raw(max_bytes=BLOCK_BYTES):  # (n, D) float32
        stop = start + len(raw)
        fp16_scores[:, start:stop] = (raw @ preconditioned.T).T.numpy()
        int8_scores[:, start:stop] = (int8_rows(raw, store.block_dims) @ preconditioned.T).T.numpy()
        began = time.perf_counter()
        whitened = preconditioner.index_vectors(raw, "dot")  # (n, D)
        whitening_s += time.perf_counter() - began
        for c in pending:
            if start < c.rows:
                began = time.perf_counter()
                c.index.add(_Augmentation(c.plan, None).vectors(whitened[: c.rows - start]))
                c.seconds += time.perf_counter() - began
        if (stop // len(raw)) % 20 == 0:
            print(f"diet pass: {stop:,} rows in {time.perf_counter() - started_pass:.0f} s", flush=True)
    for c in pending:
        with atomic_open(folder / f"{c.name}.faiss") as handle:
            faiss.write_index(c.index, faiss.PyCallbackIOWriter(handle.write))
        (folder / f"{c.name}.json").write_text(json.dumps({"build_s": c.seconds} | c.timings | c.plan.record()))
        c.index = None
    result = {"fp16": fp16_scores, "int8": int8_scores, "whitening_s": np.array(whitening_s), "dim": np.array(dim)}
    np.savez(scores_path, **result)
    return result


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) rows of the k highest scores per query."""
    part = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean share of b's rows in a's, query by query."""
    return float(overlap(a, b).mean())


def latency(search, vectors: np.ndarray) -> dict:
    """p50 / p95 milliseconds of single-query calls, after one warm-up call."""
    search(vectors[:1])
    times = []
    for q in range(len(vectors)):
        started = time.perf_counter()
        search(vectors[q : q + 1])
        times.append(1000 * (time.perf_counter() - started))
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95))}


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only), so that the next scan reads from disk."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def store_bytes(root: Path) -> tuple[int, int]:
    """(bytes of the row store's vectors and scales, bytes of the norms file)."""
    rows = root / "rows"
    vectors = sum(p.stat().st_size for p in rows.iterdir() if p.name.endswith(("grads.npy", "scales.npy")))
    return vectors, (root / "index" / "norms.npy").stat().st_size


def cached_json(path: Path, compute) -> dict:
    if not path.is_file():
        path.write_text(json.dumps(compute()))
    return json.loads(path.read_text())


def exact_scan(index: AttributionIndex, vectors: np.ndarray, reference_top: np.ndarray) -> dict:
    """The exact segment over the store: sizes, warm latency of single queries and of all at once, one cold query."""
    n = index.rows
    vector_bytes, norm_bytes = store_bytes(index.root)
    flat = index.index
    exact_rows = flat.search(vectors, K)[1]
    warm = latency(lambda v: flat.search(v, K), vectors)
    all_at_once = time.perf_counter()
    flat.search(vectors, K)
    all_at_once = time.perf_counter() - all_at_once
    cold = None
    if drop_page_cache():
        started = time.perf_counter()
        flat.search(vectors[:1], K)
        cold = 1000 * (time.perf_counter() - started)
    return {
        "kind": "flat over the fp16 store",
        "disk_bytes_per_row": (vector_bytes + norm_bytes) / n,
        "ram_bytes_per_row": norm_bytes / n,
        "agreement_with_pass_scores": agreement(exact_rows, reference_top),
        "all_queries_s": all_at_once,
        "cold_single_ms": cold,
    } | warm


def diet(out: Path, query_texts: list[str], args) -> dict:
    root = out / "index"
    folder = out / "diet"
    folder.mkdir(exist_ok=True)
    index = AttributionIndex.open(root, device="cpu")
    n, dim = index.rows, sum(index.store.block_dims)
    vectors = index.query_vectors(query_texts).vectors  # (Q, D) whitened
    candidates = candidate_plans(n, dim, args.hnsw_rows)
    scores = fill(index, vectors, candidates, folder)
    fp16_top = top_k(scores["fp16"], K)
    report = {"rows": n, "dim": dim, "queries": len(vectors), "whitening_pass_s": float(scores["whitening_s"])}
    report["int8_store"] = {
        "top10_agreement_with_fp16": agreement(top_k(scores["int8"], K), fp16_top),
        "bytes_per_row": dim + 4 * len(index.store.block_dims),
        "fp16_bytes_per_row": 2 * dim + 4 * len(index.store.block_dims),
    }
    hnsw_rows = next(c.rows for c in candidates if c.plan.kind == "hnsw")
    hnsw_top = top_k(scores["fp16"][:, :hnsw_rows], K)
    del scores

    kinds = []
    for c in candidates:
        path = folder / f"{c.name}.faiss"
        record = json.loads((folder / f"{c.name}.json").read_text())
        segment = ApproximateIndex.load(path, record)
        truth = hnsw_top if c.plan.kind == "hnsw" else fp16_top
        size = path.stat().st_size
        for effort, depth in itertools.product(NPROBES if c.plan.nlist else (None,), RERANKS):
            segment.configure(nprobe=effort)

            def search(v, segment=segment, depth=depth):
                _, found = segment.search(v, depth * K)
                return index.rescore(v, found, K)[1]

            kinds.append(
                {
                    "kind": f"{c.plan.factory}" + (f" (first {c.rows:,} rows)" if c.rows < n else ""),
                    "rows": c.rows,
                    "disk_bytes_per_row": size / c.rows,
                    "ram_bytes_per_row": size / c.rows,  # FAISS holds the whole file in memory
                    "build_s": record["build_s"],
                    "recall_at_10": agreement(search(vectors), truth),
                    "settings": segment.description + f", top-{depth * K} re-scored",
                }
                | latency(search, vectors)
            )
            print(json.dumps(kinds[-1]), flush=True)
        del segment

    report["exact"] = cached_json(folder / "exact.json", lambda: exact_scan(index, vectors, fp16_top))
    report["kinds"] = kinds
    report["cpu"] = os.cpu_count()
    return report


def partial(kind: dict) -> str:
    return f" (first {kind['rows']:,} rows)" if "first" in kind["kind"] else ""


def diet_table(report: dict) -> str:
    exact = report["exact"]
    lines = [
        f"{report['rows']:,} rows × {report['dim']:,} dims, {report['queries']} queries; dot mode",
        "| kind | disk B/row | RAM B/row | build | p50 | p95 | recall@10 after re-rank |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| exact flat over the fp16 store (warm page cache) | {exact['disk_bytes_per_row']:,.0f} "
        f"| {exact['ram_bytes_per_row']:.0f} + store in page cache | (the build) | {exact['p50_ms']:,.0f} ms "
        f"| {exact['p95_ms']:,.0f} ms | 1 (reference) |",
    ]
    if exact["cold_single_ms"] is not None:
        lines.append(f"| exact flat, cold page cache (one query) | | | | {exact['cold_single_ms']:,.0f} ms | | |")
    for k in report["kinds"]:
        lines.append(
            f"| {k['settings']}{partial(k)} | {k['disk_bytes_per_row']:,.0f} | {k['ram_bytes_per_row']:,.0f} | {k['build_s']:.0f} s "
            f"| {k['p50_ms']:.1f} ms | {k['p95_ms']:.1f} ms | {k['recall_at_10']:.3f} |"
        )
    s = report["int8_store"]
    lines += [
        "",
        f"whitening pass shared by the candidate builds: {report['whitening_pass_s']:.0f} s; "
        f"16 queries at once on the exact scan: {exact['all_queries_s']:.1f} s; the exact scan's top-10 "
        f"agrees with the pass's fp16 scores at {exact['agreement_with_pass_scores']:.3f}",
        f"int8 row store (one scale per row and module): {s['bytes_per_row']:,} B/row against fp16's "
        f"{s['fp16_bytes_per_row']:,}; top-10 agreement with fp16 {s['top10_agreement_with_fp16']:.3f}",
    ]
    return "\n".join(lines)
