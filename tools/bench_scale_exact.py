"""Exact re-rank at scale, for tools/bench_scale.py: does `--exact C` keep the exact answer's top-10 as N grows?

On the bench_scale workload (its model, its corpus in content-hash order, its held-out queries) an index is built
over the first N documents for each N of --exact-rows (default 4,096 and 102,400: 25×), as tools/bench_fidelity.py
builds its re-ranked index: rank 32 per side (8,192 dims), EK-FAC projected Hessian and an `exact` section (EK-FAC,
unprojected, empirical Fisher, damping 0.1 × mean eigenvalue, 1,024-example correction pass), dot mode, float32 store.
The reference is `exact_scores` of all N rows for every query: the exact method with no index. For each C the final
top-10 of `--exact C` (the top-10 by exact score among the index's top-C) is read off the reference, and for the
first 4 queries at C = 200 it is also produced for real with `attribute(..., exact=200)` and compared.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from bench_fidelity import final_top, overlap, top_rows

from attribindex import AttributionIndex, build_index
from attribindex.config import (
    BuildConfig,
    ExactConfig,
    ExtractConfig,
    HessianConfig,
    IndexConfig,
    ProjectionConfig,
    StoreConfig,
)

K = 10
CANDIDATES = (50, 100, 200, 400)
CHECKED_QUERIES = 4


def exact_config() -> BuildConfig:
    return BuildConfig(
        projection=ProjectionConfig(modules=("gpt_neox.layers.*",), rank_in=32, rank_out=32, seed=0),
        hessian=HessianConfig(kind="ekfac", damping=0.1),
        extract=ExtractConfig(batch_size=64, max_length=64, dtype="float32", device="cpu"),
        store=StoreConfig(dtype="float32"),
        index=IndexConfig(mode="dot", kind="flat", device="cpu"),
        exact=ExactConfig(enabled=True, kind="ekfac", damping=0.1, sample=1024),
    )


def one_size(out: Path, model: Path, train: Path, queries: list[str], rows: int) -> dict:
    record = out / f"exact-{rows}.json"
    if record.is_file():
        return json.loads(record.read_text())
    folder = out / f"exact-{rows}"
    started = time.perf_counter()
    build_index(exact_config(), str(model), train, folder, id_field="id", limit=rows, progress=True, overwrite=True)
    build_s = time.perf_counter() - started
    index = AttributionIndex.open(folder, device="cpu")
    started = time.perf_counter()
    reference = index.exact_scores(queries)  # (Q, N)
    reference_s = time.perf_counter() - started
    truth = top_rows(reference, K)
    ranked = np.array([[a.row for a in top] for top, _ in index.search(index.query_vectors(queries), max(CANDIDATES))])
    index_alone = float(overlap(ranked[:, :K], truth).mean())
    result = {"rows": rows, "build_s": build_s, "reference_s": reference_s, "index_alone": index_alone, "exact": {}}
    for c in CANDIDATES:
        result["exact"][str(c)] = {
            "recall_at_10": float(overlap(final_top(reference, ranked, c, K), truth).mean()),
            "reference_in_top_c": float(
                np.mean([len(set(truth[q]) & set(ranked[q, :c])) / K for q in range(len(truth))])
            ),
        }
    calls = [index.attribute(q, k=K, exact=200) for q in queries[:CHECKED_QUERIES]]
    produced = np.array([[a.row for a in call.results[0].top] for call in calls])
    read_off = final_top(reference[:CHECKED_QUERIES], ranked[:CHECKED_QUERIES], 200, K)
    result["real_calls_match_read_off"] = bool((produced == read_off).all())
    result["rerank_ms_200"] = float(np.median([call.rerank.rerank_ms for call in calls]))
    record.write_text(json.dumps(result))
    return result


def exact_at_scale(out: Path, model: Path, train: Path, queries: list[str], sizes: list[int]) -> list[dict]:
    return [one_size(out, model, train, queries, n) for n in sizes]


def exact_table(results: list[dict]) -> str:
    head = (
        "| N | index alone | "
        + " | ".join(f"--exact {c}" for c in CANDIDATES)
        + " | all-N reference | real calls = read-off |"
    )
    lines = [head, "| --- " * (len(CANDIDATES) + 4) + "|"]
    for r in results:
        cells = " | ".join(f"{r['exact'][str(c)]['recall_at_10']:.3f}" for c in CANDIDATES)
        lines.append(
            f"| {r['rows']:,} | {r['index_alone']:.3f} | {cells} | {r['reference_s']:.0f} s "
            f"| {r['real_calls_match_read_off']} |"
        )
    return "\n".join(lines)
