"""What each Hessian kind costs, side by side on the same batches: raw (d×d gradient sums) vs kfac / ekfac
(Kronecker factor sums), per rank per side.

For each rank it prints, per kind: the extraction time per batch (LoGra + curvature update, median after a
warm-up), the size of the curvature sums (fp64), the time to fit the preconditioner (ekfac includes its
eigenvalue pass over the extracted rows), and the whitening throughput. raw is skipped where its sums would
exceed --max-curvature-gib, and the size it would need is printed instead.

    python tools/bench_hessian.py                  # the demo's SmolLM2-135M, all 210 linear layers
    python tools/bench_hessian.py --model PATH     # any local causal LM folder
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from attribindex.config import ProjectionConfig
from attribindex.data import batched
from attribindex.hessian import CurvatureSums, factor_width, fit_preconditioner
from attribindex.logra import GradientExtractor, ProjectionSet, select_modules
from attribindex.model import load_model
from attribindex.testing import tiny_corpus

WHITEN_BYTES = 256 * 2**20  # rows whitened at once in the throughput test: enough that per-call overhead vanishes


def bench_rank(model, tokenizer, specs, rank: int, args) -> None:
    projections = ProjectionSet.generate(specs, seed=0, rank_in=rank, rank_out=rank)
    names, dims, shapes = [s.name for s in specs], projections.block_dims, projections.block_shapes
    extractor = GradientExtractor(model, tokenizer, projections, max_length=args.max_length)
    texts = [" ".join(d["text"] for d in tiny_corpus(60, seed=i)) for i in range(args.batch_size * (args.batches + 2))]
    groups = [extractor.tokenize(g) for g in batched(texts, args.batch_size)]
    raw_bytes = 8 * sum(d * d for d in dims)
    factor_bytes = 8 * sum(factor_width(s) + 1 for s in shapes)
    families = {"kfac": CurvatureSums.for_kind("kfac", names, shapes)}
    if raw_bytes <= args.max_curvature_gib * 2**30:
        families["raw"] = CurvatureSums.for_kind("raw", names, shapes)

    times: dict[str, list[float]] = {family: [] for family in families}
    rows = []
    for i, group in enumerate(groups):  # the two families alternate on the same batches, first one then the other
        order = list(families.items())
        for family, sums in order if i % 2 else order[::-1]:
            started = time.perf_counter()
            extracted = extractor.extract(group, factors=family == "kfac")
            sums.update(extracted.blocks, extracted.factors)
            if i >= 2:
                times[family].append(time.perf_counter() - started)
        rows.append(extracted.concatenated(names))
    stored = torch.cat(rows)  # (n, D) raw projected gradients, the rows an index would store

    print(f"\nrank {rank} per side: D = {projections.dim:,}, {len(specs)} modules, {len(stored)} examples")
    print("| kind | extract + curvature ms/batch | curvature MiB | fit s | whiten rows/s |")
    print("| --- | --- | --- | --- | --- |")
    if "raw" not in families:
        print(f"| raw | – | {raw_bytes / 2**20:,.0f} (over --max-curvature-gib) | – | – |")
    for kind in ("raw", "kfac", "ekfac"):
        family = "raw" if kind == "raw" else "kfac"
        if family not in families:
            continue
        started = time.perf_counter()
        pre = fit_preconditioner(kind, families[family], names, dims, 0.1, rows=lambda: stored.split(64))
        fit = time.perf_counter() - started
        probe_rows = max(len(stored), WHITEN_BYTES // (4 * stored.shape[1]))
        probe = stored.repeat(-(-probe_rows // len(stored)), 1)[:probe_rows]
        started = time.perf_counter()
        pre.whiten(probe)
        whiten = len(probe) / (time.perf_counter() - started)
        size = raw_bytes if family == "raw" else factor_bytes
        per_batch = statistics.median(times[family]) * 1000
        print(f"| {kind} | {per_batch:,.0f} | {size / 2**20:,.1f} | {fit:,.2f} | {whiten:,.0f} |")
    print(f"peak RSS so far: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a local model folder (default: the demo's SmolLM2-135M)")
    parser.add_argument("--ranks", default="16,32,64")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--max-curvature-gib", type=float, default=4.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.model is None:
        from attribindex.demo import demo_model_dir

        args.model = str(demo_model_dir())
    model, tokenizer = load_model(args.model, dtype="float32", device="cpu")
    specs = select_modules(model, ProjectionConfig())
    print(f"{args.model}: batch {args.batch_size} × {args.max_length} tokens, {args.batches} timed batches")
    for rank in [int(r) for r in args.ranks.split(",")]:
        bench_rank(model, tokenizer, specs, rank, args)


if __name__ == "__main__":
    main()
