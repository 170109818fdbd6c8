"""How many examples the `exact` section's Kronecker factors need: `exact.factor_sample` against every example.

The workload of tools/bench_fidelity.py (4,096 stdlib docstrings, a 2-layer GPT-NeoX at hidden 128 trained on
them, 16 held-out queries; rank 32 per side, EK-FAC on the empirical Fisher, its correction over 1,024 sampled
rows). One index per factor sample, the same projection; for each, the exact scores of all N rows
(`exact_scores`, the reference of bench_fidelity) and their top-k against those of the factors over every
example, both over all N and after the re-rank of the index's top-C. The noise floor beside them: every example's
factors with another correction sample (exact.seed 1), which moves the eigenvalues as much as a fresh sample of the
same size would. Build seconds are one run each, taken in turn.

    python tools/bench_factor_sample.py [--samples 2048,1024,512,256] [--out bench-factor-sample]

Artefacts (corpus, model, indexes, references) are cached under --out and reused by a rerun; --out may be
bench_fidelity's own folder, whose corpus and model it then shares.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_fidelity import (  # noqa: E402 (a sibling script, found on the path set above)
    CAPTURED,
    built,
    check_settings,
    final_top,
    index_ranking,
    overlap,
    prepare_corpus,
    reference,
    top_rows,
    trained_model,
)

from attribindex.config import (  # noqa: E402
    BuildConfig,
    ExactConfig,
    ExtractConfig,
    HessianConfig,
    IndexConfig,
    ProjectionConfig,
    StoreConfig,
)
from attribindex.store import read_manifest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default="2048,1024,512,256", help="factor samples to compare with every example")
    parser.add_argument("--candidates", type=int, default=200, help="C of the re-rank compared")
    parser.add_argument("--out", type=Path, default=Path("bench-factor-sample"))
    # bench_fidelity's workload settings (its defaults; they key the cached corpus and model)
    settings = dict(docs=4096, queries=16, k=10, damping=0.1, sample=1024, hidden=128, vocab=2048, max_length=128)
    settings |= dict(epochs=3, batch_size=32)
    args = argparse.Namespace(**settings, **vars(parser.parse_args()))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    check_settings(out, args)
    documents, queries, corpus = prepare_corpus(out, args)
    model = trained_model(out, documents, args)

    base = BuildConfig(
        projection=ProjectionConfig(modules=CAPTURED, rank_in=32, rank_out=32, seed=0),
        hessian=HessianConfig(kind="ekfac", damping=args.damping),
        extract=ExtractConfig(batch_size=args.batch_size, max_length=args.max_length, dtype="float32", device="cpu"),
        store=StoreConfig(dtype="float32"),
        index=IndexConfig(mode="dot", kind="flat", device="cpu"),
        exact=ExactConfig(enabled=True, kind="ekfac", damping=args.damping, sample=args.sample, factor_sample=None),
    )
    variants = {
        "every example": base.exact,
        "every example, correction seed 1": dataclasses.replace(base.exact, seed=1),
    }
    variants |= {f"sample {s}": dataclasses.replace(base.exact, factor_sample=int(s)) for s in args.samples.split(",")}
    names = {label: "r32-s0-factors-" + label.replace(",", "").replace(" ", "-") for label in variants}
    folders, seconds, scores = {}, {}, {}
    for label, exact in variants.items():
        folders[label], seconds[label] = built(out, names[label], dataclasses.replace(base, exact=exact), model, corpus)
        scores[label], _ = reference(out, names[label], folders[label], queries)
    _, without_s = built(out, "r32-s0-no-exact", dataclasses.replace(base, exact=ExactConfig()), model, corpus)
    ranking, _ = index_ranking(out, folders["every example"], queries, args.candidates, args.k)
    truth = scores["every example"]
    truth_top, truth_final = top_rows(truth, args.k), final_top(truth, ranking, args.candidates, args.k)

    report = {"no exact section": {"build_s": without_s}}
    print(f"build without the exact section: {without_s:.1f} s")
    print(
        f"| factors | examples summed | build s | top-{args.k} vs every example (all N) | after re-rank C={args.candidates} |"
    )
    print("| --- | --- | --- | --- | --- |")
    for label, got in scores.items():
        row = {
            "examples": read_manifest(folders[label]).exact.examples,
            "build_s": seconds[label],
            "reference_agreement": float(overlap(top_rows(got, args.k), truth_top).mean()),
            "rerank_agreement": float(overlap(final_top(got, ranking, args.candidates, args.k), truth_final).mean()),
        }
        report[label] = row
        print(
            f"| {label} | {row['examples']:,} | {row['build_s']:.1f} | {row['reference_agreement']:.3f} "
            f"| {row['rerank_agreement']:.3f} |"
        )
    (out / "factor-sample.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
