"""How much the store's element type changes what an index retrieves: top-10 agreement of a bfloat16 store and of
a float16 store (both scaled per row and module, see attribindex/store/_codec.py) with a float32 store, for the
Hessian kinds the presets use (raw, ekfac) at damping α = 0.01 and 0.1.

Raw projected gradients are rounded to the store type *before* whitening, and whitening multiplies each
eigendirection by (e + λ)^{-1/2}: with small damping, low-curvature directions are amplified and with them the
rounding error there (bfloat16 keeps 8 significant bits, float16 11). This measures the effect on retrieval.

Workload: the demo's SmolLM2-135M with the demo preset's projection (every linear layer of the last 4 blocks,
rank 16 per side: 7,168 dims) over Shakespeare speeches; held-out speeches are the queries. Gradients are
extracted once (float32); each store type is simulated with the store's own codec, the preconditioner is fitted
as a build would (curvature sums from the unrounded gradients; EK-FAC's eigenvalue pass over the stored rows), and
the search is exact. Agreement = |top-10 ∩ float32 store's top-10| / 10, averaged over queries (1 = identical).

    python tools/bench_store_precision.py                     # 400 speeches, 40 queries: a few minutes on 2 cores
    python tools/bench_store_precision.py --docs 200 --queries 20 --model PATH
    python tools/bench_store_precision.py --config my-rank-64.yaml --kinds ekfac  # the paper presets' rank
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from attribindex.config import load_config
from attribindex.data import batched
from attribindex.hessian import CurvatureSums, fit_preconditioner
from attribindex.hessian._precondition import normalize_rows
from attribindex.logra import GradientExtractor, ProjectionSet, select_modules
from attribindex.model import load_model
from attribindex.store._codec import decode, encode

STORE_DTYPES = ("float32", "float16", "bfloat16")
KINDS = ("raw", "ekfac")
DAMPINGS = (0.01, 0.1)
K = 10


def extract(extractor: GradientExtractor, texts: list[str], names: list[str], batch_size: int, sums=()) -> torch.Tensor:
    """(n, D) float32 raw projected gradients of `texts`; adds them (and their factors) to each of `sums`."""
    rows = []
    for group in batched(texts, batch_size):
        extracted = extractor.extract(extractor.tokenize(group), factors=bool(sums))
        for total in sums:
            total.update(extracted.blocks, extracted.factors if total.tracks_factors else None)
        rows.append(extracted.concatenated(names).to(torch.float32))
    return torch.cat(rows)


def stored(rows: torch.Tensor, dims: list[int], dtype: str) -> torch.Tensor:
    """What a store of `dtype` gives back for `rows`: encoded and decoded by the store's codec."""
    return decode(*encode(rows, dims, dtype), dims, dtype)


def scores(queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return queries.double() @ rows.double().T  # (Q, N); exact search is a top-k of these


def agreement(found: torch.Tensor, reference: torch.Tensor) -> float:
    tops = (torch.topk(s, K, dim=1).indices.tolist() for s in (found, reference))
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(*tops)]))


def score_error(found: torch.Tensor, reference: torch.Tensor) -> float:
    """RMS score error over the spread of the scores (mean over queries): unlike top-10 agreement it does not
    depend on how many rows compete, so it says how a larger index would fare (its score gaps are smaller)."""
    spread = (reference - reference.mean(dim=1, keepdim=True)).norm(dim=1)
    return float(((found - reference).norm(dim=1) / spread).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a local causal LM folder (default: the demo's SmolLM2-135M)")
    parser.add_argument("--config", default="demo", help="preset or YAML whose projection and max_length are used")
    parser.add_argument("--docs", type=int, default=400)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cache", default=None, help="a .pt file keeping the extracted gradients for reruns")
    parser.add_argument("--kinds", default=",".join(KINDS), help="Hessian kinds (raw needs d² fp64 per module)")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    started = time.perf_counter()
    from attribindex.demo import demo_model_dir, load_shakespeare_speeches

    config = load_config(args.config)
    model, tokenizer = load_model(args.model or str(demo_model_dir()), dtype="float32", device="cpu")
    specs = select_modules(model, config.projection)
    projections = ProjectionSet.generate(
        specs, seed=config.projection.seed, rank_in=config.projection.rank_in, rank_out=config.projection.rank_out
    )
    names, dims, shapes = [s.name for s in specs], projections.block_dims, projections.block_shapes
    extractor = GradientExtractor(model, tokenizer, projections, max_length=config.extract.max_length)
    speeches = [s["text"] for s in load_shakespeare_speeches(limit=args.docs + args.queries, seed=0)]
    held_out, corpus = speeches[: args.queries], speeches[args.queries :]

    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.is_file():  # gradients and sums of an earlier run with the same settings
        saved = torch.load(cache, weights_only=True)
        train, queries = saved["train"], saved["queries"]
        sums = {kind: CurvatureSums(sums=saved[f"sums:{kind}"], count=len(train)) for kind in kinds}
    else:
        sums = {kind: CurvatureSums.for_kind(kind, names, shapes) for kind in kinds}
        train = extract(extractor, corpus, names, args.batch_size, sums=list(sums.values()))
        queries = extract(extractor, held_out, names, args.batch_size)
        if cache is not None:
            torch.save({"train": train, "queries": queries} | {f"sums:{k}": s.tensors for k, s in sums.items()}, cache)
    print(
        f"{len(corpus)} documents, {len(held_out)} queries, D = {train.shape[1]:,} ({len(names)} modules), "
        f"gradients ready after {time.perf_counter() - started:.0f} s"
    )

    table = []
    for kind in kinds:
        for damping in DAMPINGS:
            results = {}
            for dtype in STORE_DTYPES:
                rows = stored(train, dims, dtype)
                pre = fit_preconditioner(kind, sums[kind], names, dims, damping, rows=lambda rows=rows: [rows])
                for mode in ("dot", "cosine"):
                    index, probe = pre.whiten(rows), pre.whiten(queries)
                    if mode == "cosine":
                        index, probe = normalize_rows(index), normalize_rows(probe)
                    results[dtype, mode] = scores(probe, index)
            for mode in ("dot", "cosine"):
                reference = results["float32", mode]
                found = [results[dtype, mode] for dtype in ("float16", "bfloat16")]
                row = [agreement(f, reference) for f in found] + [score_error(f, reference) for f in found]
                table.append((kind, damping, mode, *row))

    print(f"\nvs a float32 store: top-{K} agreement (mean over queries; 1 = the same top-{K}) and score error")
    print(f"(RMS over the scores' spread, mean over queries); {len(corpus)} rows")
    print(f"| Hessian | α | mode | top-{K} float16 | top-{K} bfloat16 | score error float16 | score error bfloat16 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind, damping, mode, f16, bf16, e16, ebf16 in table:
        print(f"| {kind} | {damping} | {mode} | {f16:.3f} | {bf16:.3f} | {e16:.1e} | {ebf16:.1e} |")
    print(f"\ndone in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
