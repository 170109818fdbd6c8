"""Exact top-10 search: attribindex's search path vs numpy GEMM + argpartition, side by side.

Default workload (issue 2): 100 queries over N = 100,000 random vectors of d = 4,096, stored as fp16
(as the raw store keeps them) and searched in fp32. Prints times, the ratio (target <= 1.5) and which
BLAS kernels ran (threadpoolctl), since faiss-cpu bundles its own OpenBLAS.

    python tools/bench_query.py [--rows 100000] [--dim 4096] [--queries 100] [--k 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def best_of(repeat: int, fn):
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return min(times), result


def numpy_topk(base: np.ndarray, queries: np.ndarray, k: int, block: int = 16384):
    """Reference: one GEMM per row block + argpartition, merged per query (bounded memory)."""
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), k), dtype=np.int64)
    for start in range(0, len(base), block):
        scores = queries @ base[start : start + block].T  # (Q, block)
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        cand_scores = np.concatenate([best_scores, np.take_along_axis(scores, part, 1)], axis=1)
        cand_rows = np.concatenate([best_rows, part + start], axis=1)
        keep = np.argpartition(-cand_scores, k - 1, axis=1)[:, :k]
        best_scores = np.take_along_axis(cand_scores, keep, 1)
        best_rows = np.take_along_axis(cand_rows, keep, 1)
    order = np.argsort(-best_scores, axis=1)
    return np.take_along_axis(best_scores, order, 1), np.take_along_axis(best_rows, order, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from threadpoolctl import threadpool_info

    from attribindex.index import FlatIndex

    rng = np.random.default_rng(0)
    stored = np.empty((args.rows, args.dim), dtype=np.float16)  # as in the raw store
    for start in range(0, args.rows, 10_000):
        stored[start : start + 10_000] = rng.standard_normal(
            (min(10_000, args.rows - start), args.dim), dtype=np.float32
        )
    base = stored.astype(np.float32)  # the searched (whitened, fp32) vectors
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)

    started = time.perf_counter()
    index = FlatIndex.empty(args.dim)
    index.add(base)
    add_seconds = time.perf_counter() - started

    ours, (our_scores, our_rows) = best_of(args.repeat, lambda: index.search(queries, args.k))
    ref, (ref_scores, ref_rows) = best_of(args.repeat, lambda: numpy_topk(base, queries, args.k))
    agree = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(our_rows, ref_rows)]))
    gbytes = base.nbytes / 1e9

    print(f"workload: {args.queries} queries, top-{args.k}, N={args.rows:,}, d={args.dim} ({gbytes:.2f} GB fp32)")
    for info in threadpool_info():
        if info.get("user_api") == "blas":
            print(f"  blas: {info['filepath'].split('/')[-1]} {info.get('version')} kernel={info.get('architecture')}")
    print(f"  index add:                 {add_seconds:8.3f} s")
    print(
        f"  attribindex FlatIndex:     {ours * 1000:8.1f} ms  ({args.queries / ours:8.1f} queries/s, {gbytes / ours:5.1f} GB/s)"
    )
    print(
        f"  numpy GEMM + argpartition: {ref * 1000:8.1f} ms  ({args.queries / ref:8.1f} queries/s, {gbytes / ref:5.1f} GB/s)"
    )
    print(f"  ratio ours / numpy:        {ours / ref:8.2f}   (target <= 1.5)")
    print(f"  top-{args.k} agreement:         {agree:8.3f}")


if __name__ == "__main__":
    main()
