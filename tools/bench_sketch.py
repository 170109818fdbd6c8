"""Sketched candidates for a Milvus collection: does a CountSketch of the whitened rows still find the exact top-10?

Milvus caps vectors at 32,768 dims; an index may have more (Σ rank_in × rank_out). The option measured here: push
a seeded sketch of each whitened row (S < D dims), take the top-C rows by sketched inner product, re-score them
exactly from the store (`AttributionIndex.rescore`) and keep the top-10.

Workload: the first --rows rows of the tools/bench_scale.py index (8,192 dims, dot mode, fp16 store) and its first
--queries held-out queries. One streamed pass whitens each block of rows (`index_vectors(raw, "dot")`) and scores it
against the queries exactly and through every sketch; only (Q, N) scores are kept, never the rows. The truth is the
exact top-10 over those N rows. Per sketch and C: recall@10 after the exact re-rank and the candidate recall (share
of the exact top-10 inside the top-C). The candidates are the exact top-C of the sketched scores (a flat search in
Milvus; an HNSW or IVF collection adds its own loss on top).

Sketches: the CountSketch `attribindex push` stores (`attribindex.milvus._collection.count_sketch`: bucket h(i) ∈
[0, S) and sign s(i) = ±1 for each input dim i, drawn from numpy.random.default_rng([seed, D, S]));
sketch(x)[b] = Σ_{h(i)=b} s(i)·x_i, so E⟨sketch(x), sketch(y)⟩ = ⟨x, y⟩. For
reference, a Gaussian projection to 2,048 dims: N(0, 1) entries from default_rng([seed, 2048, 1]), scaled 1/√S.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 taskset -c 1 nice -n 10 \\
        .venv/bin/python tools/bench_sketch.py [--index /work/bench-scale/index] [--rows 100000] [--out FILE]

Prints a table and writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from bench_fidelity import final_top, overlap, overlap_within
from bench_scale_diet import BLOCK_BYTES, top_k

from attribindex import AttributionIndex
from attribindex.milvus._collection import count_sketch

K = 10
SIZES = (4096, 2048, 1024)  # CountSketch buckets: 2×, 4× and 8× fewer dims than 8,192
GAUSSIAN_SIZE = 2048
CANDIDATES = (100, 400, 1000)


def sketch_of(size: int, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """(n, D) → (n, size): the CountSketch a Milvus collection stores (`attribindex.milvus._collection`)."""
    return lambda x: torch.from_numpy(count_sketch(x.numpy(), size, seed))


def gaussian(dim: int, size: int, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """(n, dim) → (n, size): a dense N(0, 1/size) projection from default_rng([seed, size, 1])."""
    matrix = torch.from_numpy(np.random.default_rng([seed, size, 1]).standard_normal((dim, size), np.float32))
    matrix /= size**0.5
    return lambda x: x @ matrix


def scores(index: AttributionIndex, vectors: np.ndarray, sketches: dict, rows: int) -> dict[str, np.ndarray]:
    """(Q, rows) scores of the first `rows` rows: exact ("exact") and per sketch, in one streamed pass."""
    queries = torch.from_numpy(vectors)
    sketched_queries = {name: fn(queries) for name, fn in sketches.items()}  # (Q, S)
    out = {name: np.empty((len(vectors), rows), np.float32) for name in ["exact", *sketches]}
    started = time.perf_counter()
    for start, raw in index.store.iter_raw(max_bytes=BLOCK_BYTES):  # (n, D) float32
        if start >= rows:
            break
        stop = min(rows, start + len(raw))
        whitened = torch.from_numpy(index.preconditioner.index_vectors(raw[: stop - start], "dot"))  # (n, D)
        out["exact"][:, start:stop] = (whitened @ queries.T).T.numpy()
        for name, fn in sketches.items():
            out[name][:, start:stop] = (fn(whitened) @ sketched_queries[name].T).T.numpy()
        if (stop // len(raw)) % 10 == 0 or stop == rows:
            print(f"pass: {stop:,} rows in {time.perf_counter() - started:.0f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, default=Path("/work/bench-scale/index"))
    parser.add_argument("--query-file", type=Path, default=Path("/work/bench-scale/queries.json"))
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/work/bench-sketch.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    began = time.perf_counter()
    index = AttributionIndex.open(args.index, device="cpu")
    rows, dim = min(args.rows, index.rows), sum(index.store.block_dims)
    texts = json.loads(args.query_file.read_text())[: args.queries]
    vectors = np.ascontiguousarray(index.query_vectors(texts).vectors, np.float32)  # (Q, D) whitened
    sketches = {f"countsketch {s}": sketch_of(s, args.seed) for s in SIZES}
    sketches[f"gaussian {GAUSSIAN_SIZE}"] = gaussian(dim, GAUSSIAN_SIZE, args.seed)
    found = scores(index, vectors, sketches, rows)
    pass_s = time.perf_counter() - began
    exact = found.pop("exact")
    truth = top_k(exact, K)  # (Q, K)
    results = []
    for name, sketched in found.items():
        ranked = top_k(sketched, max(CANDIDATES))  # (Q, C_max), best first
        for c in CANDIDATES:
            candidates = ranked[:, :c].astype(np.int64)
            reranked = index.rescore(vectors, candidates, K)[1]  # (Q, K) from the fp16 store
            results.append(
                {
                    "sketch": name,
                    "dims": int(name.split()[-1]),
                    "candidates": c,
                    "recall_at_10": float(overlap(reranked, truth).mean()),
                    "candidate_recall": overlap_within(truth, candidates),
                    "rescore_matches_read_off": float(overlap(reranked, final_top(exact, candidates, c, K)).mean()),
                }
            )
    report = {"rows": rows, "dim": dim, "queries": len(texts), "k": K, "seed": args.seed, "results": results}
    report["wall_s"] = time.perf_counter() - began
    report["pass_s"] = pass_s
    lines = [
        f"{rows:,} rows × {dim:,} dims, {len(texts)} queries, dot mode; truth: exact top-{K} over those rows",
        "| sketch | dims | C | recall@10 after re-rank | candidate recall | re-rank = read-off |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['sketch']} | {r['dims']:,} | {r['candidates']:,} | {r['recall_at_10']:.3f} "
            f"| {r['candidate_recall']:.3f} | {r['rescore_matches_read_off']:.3f} |"
        )
    lines.append(f"\nwall {report['wall_s']:.0f} s (open, queries and the streamed pass: {pass_s:.0f} s)")
    print("\n".join(lines), flush=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
