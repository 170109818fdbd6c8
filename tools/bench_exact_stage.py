"""The exact stage against its bound: candidates scored per second ÷ plain forward + backward examples per second.

Re-ranking C candidates with exact, unprojected influence (`attribute(..., exact=C)`) costs one forward + backward
of each candidate, plus what scoring adds to it; the bound is a plain training step of the same model and batch
(every weight gradient, no hooks). Workload (issue 27's): a 2-layer GPT-NeoX of hidden 128 (`--hidden`), documents
of 128 tokens, batch 16, EK-FAC on its 8 linear layers (the `exact` section), float32 unless `--dtype`; N
candidates (`--candidates`, 256) scored against 1 query and against 16, each in its own timed call after a warm-up
(`AttributionIndex.exact_scores`, which includes preparing the queries and tokenizing the candidates);
each repetition times the plain pass and both exact calls one after the other, and the ratios are medians over
the repetitions (this machine's speed drifts between runs).

    python tools/bench_exact_stage.py [--hidden 128] [--candidates 256] [--dtype float32] [--out DIR]

Prints plain examples/s, candidates/s for 1 and 16 queries, and each ratio (target ≥ 0.8); and, timed apart in
each repetition, the share of a call spent tokenizing the candidates and preparing the queries, with the ratio of
the candidates' passes alone.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_extract import plain_step

from attribindex import AttributionIndex, build_index
from attribindex.config import BuildConfig, ExactConfig, ExtractConfig, HessianConfig, IndexConfig, ProjectionConfig
from attribindex.data import batched, collate
from attribindex.testing import make_tiny_model, tiny_corpus, write_jsonl

TOKENS = 128
BATCH = 16


def workload(out: Path, hidden: int, candidates: int, dtype: str) -> tuple[Path, list[str]]:
    """A model, an index with the `exact` section over `candidates` documents of ~TOKENS tokens, and 16 queries."""
    texts = [" ".join(d["text"] for d in tiny_corpus(12, seed=i)) for i in range(candidates + 16)]
    model = make_tiny_model(out / "model", arch="gpt_neox", texts=texts[:200], hidden=hidden, layers=2)
    corpus = write_jsonl(out / "corpus.jsonl", [{"id": f"doc-{i}", "text": t} for i, t in enumerate(texts[16:])])
    config = BuildConfig(
        projection=ProjectionConfig(rank_in=32, rank_out=32),
        hessian=HessianConfig(kind="ekfac"),
        extract=ExtractConfig(batch_size=BATCH, max_length=TOKENS, dtype=dtype, device="cpu"),
        index=IndexConfig(mode="dot", device="cpu"),
        exact=ExactConfig(enabled=True, kind="ekfac"),
    )
    build_index(config, str(model), corpus, out / "index", id_field="id", progress=False)
    return out / "index", texts[:16]


def timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def rates(index: AttributionIndex, texts: list[str], rows: list[int], repeats: int) -> dict[str, list[float]]:
    """Per repetition, interleaved: plain examples/s over the candidates, then candidates/s for 1 and 16 queries."""
    extractor = index.extractor
    documents = index.store.documents(rows)
    examples = extractor.tokenize([d.text for d in documents], [d.id for d in documents])
    batches = [collate(group, extractor.pad_token_id) for group in batched(examples, BATCH)]
    plain_step(extractor.model, batches[0])  # warm-ups
    index.exact_scores(texts, rows[:BATCH])
    out: dict[str, list[float]] = {"plain": [], "1": [], "16": [], "tokenize": [], "prepare 1": [], "prepare 16": []}
    for _ in range(repeats):
        out["plain"].append(len(rows) / timed(lambda: [plain_step(extractor.model, b) for b in batches]))
        for count in (1, 16):
            out[str(count)].append(len(rows) / timed(lambda c=count: index.exact_scores(texts[:c], rows)))
        # What the calls spend besides the candidates' passes: reading and tokenizing them, and preparing the
        # queries (a call with one candidate: the queries' own forward + backward and preconditioning).
        out["tokenize"].append(timed(lambda: extractor.tokenize([d.text for d in index.store.documents(rows)])))
        for count in (1, 16):
            out[f"prepare {count}"].append(timed(lambda c=count: index.exact_scores(texts[:c], rows[:1])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--candidates", type=int, default=256)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="keep the workload here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        if not (out / "index" / "manifest.json").is_file():
            workload(out, args.hidden, args.candidates, args.dtype)
        texts = [" ".join(d["text"] for d in tiny_corpus(12, seed=i)) for i in range(16)]
        index = AttributionIndex.open(out / "index", device="cpu")
        rows = list(range(index.rows))
        measured = rates(index, texts, rows, args.repeats)
        plain = statistics.median(measured["plain"])
        print(
            f"GPT-NeoX 2 × {args.hidden}, {args.dtype}, {torch.get_num_threads()} threads; {len(rows)} candidates of "
            f"≤ {TOKENS} tokens, batch {BATCH}; medians of {args.repeats} interleaved repetitions"
        )
        print(f"  plain forward + backward:  {plain:8.1f} examples/s")
        for count in (1, 16):
            rate = statistics.median(measured[str(count)])
            ratio = statistics.median(r / p for r, p in zip(measured[str(count)], measured["plain"]))
            label = "query  " if count == 1 else "queries"
            print(f"  exact stage, {count:2d} {label}: {rate:8.1f} candidates/s  (÷ plain: {ratio:.2f}; target ≥ 0.8)")
            besides = [t + p for t, p in zip(measured["tokenize"], measured[f"prepare {count}"])]
            alone = [len(rows) / (len(rows) / r - b) for r, b in zip(measured[str(count)], besides)]
            share = statistics.median(b * r / len(rows) for b, r in zip(besides, measured[str(count)]))
            print(
                f"    of its time {share:.0%} tokenizing the candidates and preparing the queries; the candidates' "
                f"passes alone ÷ plain: {statistics.median(a / p for a, p in zip(alone, measured['plain'])):.2f}"
            )


if __name__ == "__main__":
    main()
