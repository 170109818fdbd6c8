"""A living index, measured side by side in one run on this machine.

1. Append vs rebuild (real model and pipeline): append 1 % and 5 % new documents to an index, and
   rebuild the index over old + 1 % from scratch. Target: an append costs in proportion to the new
   documents only.
2. Query latency (the index's SegmentedIndex over real FAISS segments, synthetic vectors): one
   segment; after deleting 10 % of rows (tombstones filtered inside FAISS); after compaction; and
   after ten 1 % appends (eleven segments).

    python tools/bench_living.py                          # 6,000 documents; 200k × 1,024 vectors for latency
    python tools/bench_living.py --documents 1000 --rows 20000 --repeats 3   # a quick run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from attribindex import append_documents, build_index
from attribindex.config import BuildConfig, ExtractConfig, IndexConfig, ProjectionConfig, StoreConfig
from attribindex.index import FlatIndex, SegmentedIndex
from attribindex.testing import make_tiny_model, tiny_corpus, write_jsonl


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def append_vs_rebuild(root: Path, documents: int) -> None:
    texts = [d["text"] for d in tiny_corpus(400)]
    model = str(make_tiny_model(root / "llama", arch="llama", texts=texts, hidden=256, layers=4, vocab_size=512))
    config = BuildConfig(
        projection=ProjectionConfig(rank_in=8, rank_out=8),
        extract=ExtractConfig(batch_size=32, max_length=96, device="cpu"),
        store=StoreConfig(dtype="float16", chunk_rows=4096),
        index=IndexConfig(mode="cosine", device="cpu"),
    )
    pool = tiny_corpus(int(documents * 1.07), seed=3, min_words=20, max_words=60)
    base, one, five = pool[:documents], pool[documents : documents * 101 // 100], pool[documents * 101 // 100 :]

    def build(records, out):
        build_index(
            config, model, write_jsonl(root / f"{out}.jsonl", records), root / out, id_field="id", progress=False
        )

    build_seconds = timed(lambda: build(base, "living"))
    append_one = timed(
        lambda: append_documents(root / "living", write_jsonl(root / "one.jsonl", one), id_field="id", progress=False)
    )
    append_five = timed(
        lambda: append_documents(root / "living", write_jsonl(root / "five.jsonl", five), id_field="id", progress=False)
    )
    rebuild = timed(lambda: build(base + one, "rebuilt"))
    print(f"\n== append vs rebuild: Llama hidden 256 × 4 layers, rank 8×8, {documents:,} documents of 20–60 words ==")
    print(f"build {documents:,}                    {build_seconds:7.1f} s")
    print(f"append {len(one):,} (1 %)               {append_one:7.1f} s   ({len(one) / append_one:.1f} documents/s)")
    print(f"append {len(five):,} (5 % more)         {append_five:7.1f} s   ({len(five) / append_five:.1f} documents/s)")
    print(f"rebuild {documents + len(one):,} from scratch     {rebuild:7.1f} s")
    print(
        f"append 1 % ÷ rebuild            {append_one / rebuild:7.3f}   (new data ÷ all data = {len(one) / (documents + len(one)):.3f})"
    )


def _median_ms(index: SegmentedIndex, queries: np.ndarray, k: int, repeats: int) -> float:
    index.search(queries, k)  # warm the page cache and FAISS
    return statistics.median(timed(lambda: index.search(queries, k)) for _ in range(repeats)) * 1000


def query_latency(rows: int, dim: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((rows, dim), dtype=np.float32)
    vectors *= rng.lognormal(0, 1, size=(rows, 1)).astype(np.float32)  # heavy-tailed norms, like gradients
    deleted = np.sort(rng.choice(rows, rows // 10, replace=False))
    alive = np.setdiff1d(np.arange(rows), deleted)

    def segments(parts: list[np.ndarray]) -> list[FlatIndex]:
        out = []
        for part in parts:
            flat = FlatIndex.empty(dim)
            flat.add(part)
            out.append(flat)
        return out

    layouts = {
        "one segment": SegmentedIndex(segments([vectors]), np.zeros(0, np.int64)),
        "10 % deleted (tombstones)": SegmentedIndex(segments([vectors]), deleted),
        "after compaction": SegmentedIndex(segments([vectors[alive]]), np.zeros(0, np.int64)),
        "11 segments (10 appends of 1 %)": SegmentedIndex(
            segments(np.split(vectors, [rows * 90 // 100 + rows * i // 100 for i in range(10)])), np.zeros(0, np.int64)
        ),
    }
    print(f"\n== query latency: {rows:,} × {dim:,} float32, exact top-10 (median of {repeats}) ==")
    print(f"{'layout':<34}{'rows':>10}{'1 query ms':>12}{'32 queries ms':>15}")
    for name, index in layouts.items():
        one = _median_ms(index, rng.standard_normal((1, dim), dtype=np.float32), 10, repeats)
        batch = _median_ms(index, rng.standard_normal((32, dim), dtype=np.float32), 10, repeats)
        print(f"{name:<34}{index.live_rows:>10,}{one:>12.1f}{batch:>15.1f}")
    scores, found = layouts["10 % deleted (tombstones)"].search(rng.standard_normal((8, dim), dtype=np.float32), 100)
    assert not np.isin(found, deleted).any()  # the measurement is of a correct search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=6000)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-living-") as tmp:
        append_vs_rebuild(Path(tmp), args.documents)
    query_latency(args.rows, args.dim, args.repeats)


if __name__ == "__main__":
    main()
