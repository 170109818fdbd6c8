"""Approximate index kinds vs exact flat search: recall@10 and queries/s, side by side in one run.

Two workloads:
  * synthetic: N vectors (default 1,000,000 × 256) shaped like whitened gradients: a 32-dimensional
    low-rank part plus noise, scaled by heavy-tailed log-normal norms (dot mode), or unit-normalised
    (cosine mode); queries are 200 more draws of the same distribution;
  * demo: the vectors of a real demo store (`attribindex demo`, cosine mode), 10 % of its rows held out
    as queries and the rest indexed.

Every kind is built with attribindex's own code (SegmentPlan, build_segment, ApproximateIndex, rerank),
so this measures the product. Exact baselines are FAISS IndexFlatIP and torch blockwise GEMM (TorchFlatIndex,
float32) over the same vectors; speed-ups are against the faster of the two. Queries are searched as one
batch; recall@10 counts the true top-10 found after the exact re-rank.

    python tools/bench_ann.py [--rows 1000000] [--dim 256] [--queries 200] [--demo /tmp/demo-index]
                              [--modes dot,cosine] [--kinds ivf_flat,ivf_flat-inner_product,…] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from attribindex.config import IndexConfig
from attribindex.index import ApproximateIndex, SegmentPlan, TorchFlatIndex, build_segment, import_faiss, rerank

K = 10


def gradient_like(
    rows: int, dim: int, seed: int, normalised: bool = False, rank: int = 32, block: int = 100_000
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(12345).standard_normal((rank, dim)).astype(np.float32) / np.sqrt(rank)
    out = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, block):
        n = min(block, rows - start)
        x = rng.standard_normal((n, rank), dtype=np.float32) @ basis
        x += 0.5 * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        norms = rng.lognormal(0.0, 1.0, (n, 1)).astype(np.float32)
        out[start : start + n] = x if normalised else x * norms
    return out


def timed(fn, repeat: int = 3):
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / len(t) for f, t in zip(found, truth)]))


def exact_baselines(vectors, queries):
    faiss = import_faiss()
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    faiss_s, (_, truth) = timed(lambda: flat.search(queries, K))
    torch_index = TorchFlatIndex(vectors)
    torch_s, (_, torch_rows) = timed(lambda: torch_index.search(queries, K))
    return truth, {"faiss IndexFlatIP": faiss_s, "torch GEMM blockwise fp32": torch_s}, recall(torch_rows, truth)


def sweep(kind: str, rows: int) -> list[dict]:
    if kind == "hnsw":
        return [{"ef_search": e} for e in (16, 32, 64, 128, 256)]
    if kind == "flat":
        return [{}]
    nlist = SegmentPlan.resolve(IndexConfig(kind=kind), "dot", rows, 8).nlist
    return [{"nprobe": 2**i} for i in range(nlist.bit_length()) if 2**i < nlist] + [{"nprobe": nlist}]


def bench_kind(spec, vectors, queries, truth, mode, workdir, rerank_factor):
    """`spec`: a kind, `flat-float16`, or `ivf_flat-inner_product` (inner-product cells instead of the default
    MIPS→L2 augmentation in dot mode)."""
    kind, _, variant = spec.partition("-")
    extra = {"storage": variant} if kind == "flat" else {"mips": variant} if variant else {}
    config = IndexConfig(mode=mode, kind=kind, **extra)
    plan = SegmentPlan.resolve(config, mode, len(vectors), vectors.shape[1])
    started = time.perf_counter()
    record = build_segment(
        workdir / f"{kind}.faiss",
        plan,
        len(vectors),
        blocks=lambda: (vectors[i : i + 65536] for i in range(0, len(vectors), 65536)),
        sample=lambda rows: vectors[rows],
        progress=False,
    )
    build_s = time.perf_counter() - started
    segment = ApproximateIndex.load(workdir / f"{kind}.faiss", record)
    size_mb = (workdir / f"{kind}.faiss").stat().st_size / 2**20
    results = []
    for setting in sweep(kind, len(vectors)):
        segment.configure(**setting)

        def search():
            _, candidates = segment.candidates(queries, K * rerank_factor)
            return rerank(queries, candidates, lambda positions: vectors[positions], K)

        seconds, (_, found) = timed(search)
        results.append({"setting": setting, "recall": recall(found, truth), "seconds": seconds})
    (workdir / f"{kind}.faiss").unlink()
    factory = plan.factory + (" +aug" if plan.metric == "l2_augmented" else "")
    return {"kind": spec, "factory": factory, "build_s": build_s, "size_mb": size_mb, "points": results}


def run(name, vectors, queries, mode, kinds, rerank_factor, workdir):
    print(f"\n## {name}: N = {len(vectors):,}, d = {vectors.shape[1]}, {len(queries)} queries (one batch), {mode}")
    truth, exact, torch_recall = exact_baselines(vectors, queries)
    fastest = min(exact.values())
    for label, seconds in exact.items():
        print(f"exact  {label:<28} {len(queries) / seconds:>10,.0f} q/s")
    print(f"(torch blockwise recall@10 vs faiss: {torch_recall:.3f})")
    print(f"{'kind':<22}{'setting':<16}{'recall@10':>10}{'q/s':>11}{'× exact':>9}{'build s':>9}{'MiB':>8}")
    report = {"workload": name, "rows": len(vectors), "dim": vectors.shape[1], "exact_s": exact, "kinds": []}
    for kind in kinds:
        result = bench_kind(kind, vectors, queries, truth, mode, workdir, rerank_factor)
        report["kinds"].append(result)
        for point in result["points"]:
            setting = " ".join(f"{k}={v}" for k, v in point["setting"].items()) or "-"
            print(
                f"{result['factory']:<22}{setting:<16}{point['recall']:>10.3f}{len(queries) / point['seconds']:>11,.0f}"
                f"{fastest / point['seconds']:>8.1f}×{result['build_s']:>9.1f}{result['size_mb']:>8.0f}"
            )
        good = [p for p in result["points"] if p["recall"] >= 0.95]
        if good:
            best = min(good, key=lambda p: p["seconds"])
            print(f"  → recall ≥ 0.95 at {best['setting']}: {fastest / best['seconds']:.1f}× exact")
    return report


def demo_vectors(demo: Path):
    from attribindex import AttributionIndex

    index = AttributionIndex.open(demo, load_model_now=False, device="cpu")
    vectors = index.exact_vectors(np.arange(index.index.rows))
    rng = np.random.default_rng(0)
    held_out = np.zeros(len(vectors), dtype=bool)
    held_out[rng.choice(len(vectors), size=len(vectors) // 10, replace=False)] = True
    return vectors[~held_out], vectors[held_out], index.mode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--kinds", default="ivf_flat,ivf_flat-inner_product,ivf_sq8,ivf_pq,hnsw")
    parser.add_argument("--rerank", type=int, default=4, help="candidates fetched = rerank × 10")
    parser.add_argument("--demo", type=Path, default=None, help="a demo index folder (`attribindex demo --out …`)")
    parser.add_argument("--modes", default="dot,cosine", help="synthetic workloads to run ('' = none)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.demo is not None:
            train, held_out, mode = demo_vectors(args.demo)
            kinds_here = [k for k in kinds if "-" not in k] + ["flat-float16"]  # cosine: no augmentation
            reports.append(run(f"demo store {args.demo}", train, held_out, mode, kinds_here, args.rerank, Path(tmp)))
        for mode in args.modes.split(","):
            vectors = gradient_like(args.rows, args.dim, seed=0, normalised=mode == "cosine")
            queries = gradient_like(args.queries, args.dim, seed=1, normalised=mode == "cosine")
            kinds_here = [k for k in kinds if mode == "dot" or "-" not in k]
            reports.append(run(f"synthetic {mode}", vectors, queries, mode, kinds_here, args.rerank, Path(tmp)))
            del vectors
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
