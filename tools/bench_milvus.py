"""Milvus Lite against local search at 100,000 real rows: push rate, single-query latency, recall@10, disk.

Workload (offline; every artefact goes under --out and a rerun reuses what is finished):
  1. corpus: the first --docs lines of --source/corpus.jsonl, the million documents of tools/bench_scale.py (in
     content-hash order, so a prefix is a uniform sample); queries: its 16 held-out texts (--source/queries.json);
     model: its GPT-NeoX (--source/model);
  2. build: `attribindex build` in its own process with tools/bench_scale.py's config (rank 32 per side on the 8
     linear layers: 8,192 dims, raw Hessian, dot mode, fp16 row store, exact flat index) → --out/index;
  3. local: the exact flat scan of the store (the reference top-10), and a FAISS IndexHNSWFlat (M 16,
     efConstruction 200, inner product) built in this process over the whitened rows, searched for rerank × k
     candidates at each --faiss-ef and re-scored from the store with `AttributionIndex.rescore`;
  4. milvus: `push_index` into one Milvus Lite file per kind (FLAT; HNSW with M 16, efConstruction 200, on inner
     product and on the MIPS→L2 augmentation), then `AttributionIndex.open(index, search=URI)`: rerank × k candidates from Milvus,
     re-scored from the store; HNSW at each --ef (Milvus searches with ef = max(ef, rerank × k)).
Per search: build seconds (FAISS: reading, whitening and adding every row) or push rows/s (Milvus; a rerun whose file
already holds the index reports the first push, kept in --out/milvus.json), seconds to open the collection, p50/p95
of 16 single-query `ranked(vector, 10)` calls after one warm-up (re-scoring included; the query gradients are computed
once, beforehand), recall@10 against the exact top-10, and bytes on disk (allocated blocks) of each Milvus folder.

    python tools/bench_milvus.py [--docs 100000] [--source /work/bench-scale] [--out /work/bench-milvus]
                                 [--phase all|build|local|milvus] [--rerank 4] [--ef 40,64,128,256] [--faiss-ef 64,128]

Prints a table and writes --out/milvus.json (a --phase run replaces its own rows and keeps the others' from before).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from bench_fidelity import overlap
from bench_scale import build
from bench_scale_diet import BLOCK_BYTES, K

from attribindex import AttributionIndex, push_index

KINDS = (("FLAT", "auto"), ("HNSW", "inner_product"), ("HNSW", "augment"))  # (kind, mips)


def training_file(out: Path, source: Path, docs: int) -> Path:
    """--out/train.jsonl: the first `docs` documents of the million-document corpus."""
    train = out / "train.jsonl"
    if train.is_file():
        with train.open(encoding="utf-8") as handle:
            held = sum(1 for _ in handle)
        if held != docs:
            raise SystemExit(f"{train} holds {held:,} documents, not --docs {docs:,}: use another --out")
        return train
    with (source / "corpus.jsonl").open(encoding="utf-8") as handle:
        lines = list(itertools.islice(handle, docs))
    partial = train.with_suffix(".partial")
    partial.write_text("".join(lines), encoding="utf-8")
    partial.rename(train)
    return train


def measure(name: str, search: Callable[[np.ndarray], np.ndarray], vectors: np.ndarray, reference: np.ndarray) -> dict:
    """p50 / p95 ms of single-query calls after one warm-up, and recall@10 of the rows those calls returned."""
    search(vectors[:1])
    times, found = [], []
    for q in range(len(vectors)):
        started = time.perf_counter()
        found.append(search(vectors[q : q + 1])[0])
        times.append(1000 * (time.perf_counter() - started))
    result = {"search": name, "p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95))}
    result["recall_at_10"] = float(overlap(np.stack(found), reference).mean())
    print(json.dumps(result), flush=True)
    return result


def faiss_hnsw(index: AttributionIndex, vectors: np.ndarray, reference: np.ndarray, args) -> list[dict]:
    """IndexHNSWFlat over the whitened rows, built here; rerank × k candidates re-scored from the store."""
    import faiss

    graph = faiss.IndexHNSWFlat(sum(index.store.block_dims), 16, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = 200
    started = time.perf_counter()
    for start, raw in index.store.iter_raw(max_bytes=BLOCK_BYTES):  # (n, D) float32, in row order
        graph.add(index.preconditioner.index_vectors(raw, index.mode))
        print(f"faiss hnsw: {start + len(raw):,} rows in {time.perf_counter() - started:.0f} s", flush=True)
    build_s = time.perf_counter() - started
    results = []
    for ef in args.faiss_ef:
        graph.hnsw.efSearch = ef

        def search(v: np.ndarray) -> np.ndarray:
            _, candidates = graph.search(np.ascontiguousarray(v, dtype=np.float32), args.rerank * K)
            return index.rescore(v, candidates, K)[1]

        name = f"FAISS HNSW16 efSearch={ef}, top-{args.rerank * K} re-scored"
        results.append(measure(name, search, vectors, reference) | {"build_s": build_s})
    return results


def disk_bytes(folder: Path) -> int:
    """Bytes allocated on disk under `folder` (as du counts them)."""
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def milvus(root: Path, out: Path, vectors: np.ndarray, reference: np.ndarray, args, report: dict) -> list[dict]:
    """Push to a Milvus Lite file per kind (unless it holds the index already), then search through it."""
    results = []
    pushes = report.setdefault("push", {})
    for kind, mips in KINDS:
        label = kind + (" augmented" if mips == "augment" else "")
        folder = out / (f"milvus-{kind.lower()}" + ("-augmented" if mips == "augment" else ""))
        folder.mkdir(exist_ok=True)
        uri = str(folder / "index.db")
        summary = push_index(root, uri, kind=kind, mips=mips, progress=True)
        print(summary.format(), flush=True)
        if summary.action != "unchanged":
            pushes[label] = {"action": summary.action, "inserted": summary.inserted, "seconds": summary.seconds}
            (out / "milvus.json").write_text(json.dumps(report, indent=1))  # a rerun reports this first push
        push = pushes.get(label, {})
        rate = push["inserted"] / push["seconds"] if push else None
        started = time.perf_counter()
        searched = AttributionIndex.open(root, search=uri, load_model_now=False, device="cpu")
        open_s = time.perf_counter() - started
        made = {"push_rows_per_s": rate, "push_s": push.get("seconds"), "open_s": open_s}
        measured = []
        try:
            searched.configure_search(rerank=args.rerank)
            for ef in args.ef if kind == "HNSW" else [None]:
                searched.configure_search(ef_search=ef)
                name = f"Milvus Lite {label}" + (f" ef={ef}" if ef else "") + f", top-{args.rerank * K} re-scored"
                measured.append(measure(name, lambda v, s=searched: s.ranked(v, K)[1], vectors, reference) | made)
        finally:
            searched.remote.close()
        results += [result | {"disk_bytes": disk_bytes(folder)} for result in measured]
    return results


def table(report: dict) -> str:
    lines = [
        f"{report['rows']:,} rows × {report['dim']:,} dims, {report['queries']} single queries (k = {K}); dot mode",
        "| search | build / push | open | disk | p50 | p95 | recall@10 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report.get("exact", []) + report.get("faiss", []) + report.get("milvus", []):
        if r.get("push_rows_per_s"):
            made = f"push {r['push_s']:,.0f} s, {r['push_rows_per_s']:,.0f} rows/s"
        else:
            made = f"build {r['build_s']:,.0f} s" if r.get("build_s") is not None else ""
        opened = f"{r['open_s']:.1f} s" if r.get("open_s") is not None else ""
        disk = f"{r['disk_bytes'] / 2**20:,.0f} MiB" if r.get("disk_bytes") else ""
        lines.append(
            f"| {r['search']} | {made} | {opened} | {disk} | {r['p50_ms']:,.1f} ms | {r['p95_ms']:,.1f} ms "
            f"| {r['recall_at_10']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--source", type=Path, default=Path("/work/bench-scale"), help="tools/bench_scale.py's --out")
    parser.add_argument("--out", type=Path, default=Path("/work/bench-milvus"))
    parser.add_argument("--phase", choices=("all", "build", "local", "milvus"), default="all")
    parser.add_argument("--rerank", type=int, default=4, help="candidates re-scored from the store: rerank × k")
    parser.add_argument("--ef", type=lambda s: [int(x) for x in s.split(",")], default=[40, 64, 128, 256])
    parser.add_argument("--faiss-ef", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128])
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    began = time.perf_counter()
    train = training_file(out, args.source, args.docs)
    built = build(out, args.source / "model", train, args.docs)
    print(f"index: built in {built['total_s']:.0f} s ({out / 'index'})", flush=True)
    if args.phase == "build":
        return
    saved = out / "milvus.json"
    report = json.loads(saved.read_text()) if saved.is_file() else {}
    index = AttributionIndex.open(out / "index", device="cpu")
    texts = json.loads((args.source / "queries.json").read_text())
    vectors = index.query_vectors(texts).vectors  # (Q, D) whitened, computed once
    reference = index.ranked(vectors, K)[1]  # (Q, K) the exact flat top-10
    report |= {"rows": index.rows, "dim": vectors.shape[1], "queries": len(vectors), "rerank": args.rerank}
    report["exact"] = [
        measure("local exact flat over the fp16 store", lambda v: index.ranked(v, K)[1], vectors, reference)
    ]
    if args.phase in ("all", "local"):
        report["faiss"] = faiss_hnsw(index, vectors, reference, args)
    if args.phase in ("all", "milvus"):
        report["milvus"] = milvus(out / "index", out, vectors, reference, args, report)
    report["cpu"] = len(os.sched_getaffinity(0))
    saved.write_text(json.dumps(report, indent=1))
    print(table(report))
    print(f"\nthis run: {time.perf_counter() - began:.0f} s; wrote {saved}")


if __name__ == "__main__":
    main()
