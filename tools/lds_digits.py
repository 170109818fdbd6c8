"""LDS of attribindex's Hessian kinds on reference workload (1): a small MLP on scikit-learn's bundled digits.

Runs offline in about two minutes here. Every artefact goes under --out; the ground truth resumes if interrupted.
  1. split the 1,797 digits into --train training images and --queries held-out query images (seeded);
  2. an MLP 64 → --hidden → 10 initialised from a seed and trained on all training images (the model explained);
  3. ground truth: --subsets models retrained from the same initialisation on random halves, their query losses;
  4. per rank: LoGra gradients of both linear layers (the same hooks as an LM build, `capture_gradients`), then
     for each Hessian kind × damping the library's preconditioner, scores ⟨W g_q, W g_t⟩ and their LDS with a
     95 % bootstrap CI; identity and random-score baselines in the same table;
  5. the same again with optimizer-aware gradients: divided by the full model's AdamW √v (rank-1 factorised,
     folded into the projections) before projection;
  6. the exact, unprojected method of the index's `exact` section (`attribindex.exact`: full KFAC / EK-FAC factors
     of both layers, bias columns included, EK-FAC corrected over every training image) × damping: the scores of
     every training image, no projection and no index.

    python tools/lds_digits.py [--train 1000] [--queries 100] [--subsets 100] [--ranks 4,8,16,32,64] [--out DIR]
    python tools/lds_digits.py --only-exact  # just the exact rows (and the random baseline)
    python tools/lds_digits.py --bias --no-exact  # the projected rows with each layer's bias column captured

Rank 64 per side is full rank for both layers (64×64 and 10×64): the projection is then an invertible change of
basis, so `raw` there equals unprojected influence with each layer's full empirical Fisher, the reference the
projected ranks approach. The numbers in docs/quality.md come from
the defaults.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from attribindex.eval import lds_records, lds_table, linear_datamodeling_score, plot_lds, retrain_on_subsets
from attribindex.exact import (
    ExactPreconditioner,
    FactorListener,
    RotatedGradients,
    fit_exact_preconditioner,
    kfac_bases,
    layer_shapes,
)
from attribindex.hessian import CurvatureSums, fit_preconditioner
from attribindex.logra import (
    LayerHooks,
    LoGraCapture,
    ModuleSpec,
    ProjectionSet,
    capture_gradients,
    load_second_moment_scales,
)

KINDS = ("identity", "raw", "kfac", "ekfac")


def make_mlp(hidden: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> torch.optim.Optimizer:
    """AdamW on shuffled mini-batches of 64 (data order from `seed`), mean cross-entropy, small weight decay;
    returns the optimizer (its second moments are what the optimizer-aware variant divides by)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
    model.train().requires_grad_(True)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval().requires_grad_(False)
    return optimizer


def query_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none").double().numpy()


def gradients(model, projections, x, y, factors: bool) -> tuple[torch.Tensor, dict | None, list[str]]:
    """(n, D) projected per-example gradients of the cross-entropy (float64) and, with `factors`, the KFAC rows."""
    capture = LoGraCapture(model, projections, torch.float64)
    names = [m.name for m in projections.modules]
    batch = capture_gradients(
        capture, lambda: F.cross_entropy(model.double()(x.double()), y, reduction="none"), factors=factors
    )
    model.float()
    return batch.concatenated(names), batch.factors, names


def full_gradients(model, names, shapes, x, y, preconditioner) -> dict[str, torch.Tensor]:
    """{layer: (n, n_out, n_in')} unprojected per-example gradients of the cross-entropy (float64, bias column
    included), in the eigenbasis of `preconditioner`."""
    gradients = {}
    hooks = LayerHooks(model, names, torch.float64, [RotatedGradients(shapes, preconditioner, gradients.__setitem__)])
    with hooks:
        hooks.backward(F.cross_entropy(model.double()(x.double()), y, reduction="none").sum())
    model.float()
    return gradients


def exact_preconditioners(model, names, x, y, dampings) -> dict[tuple[str, float], ExactPreconditioner]:
    """{(kind, α): unprojected KFAC / EK-FAC inverse Hessian} from the training images, as an index's `exact`
    section fits it (factor sums, `kfac_bases`; EK-FAC's correction over every training image)."""
    shapes = layer_shapes(model, names)
    listener = FactorListener(shapes)
    with LayerHooks(model, names, torch.float64, [listener]) as hooks:
        hooks.backward(F.cross_entropy(model.double()(x.double()), y, reduction="none").sum())
    model.float()
    sums = listener.take()
    bases = kfac_bases(
        {n: s.activations for n, s in sums.items()},
        {n: s.gradients for n, s in sums.items()},
        {n: s.trace for n, s in sums.items()},
        count=len(x),
    )
    basis = ExactPreconditioner.eigenbases(bases, shapes)
    corrected = {n: g.square().mean(dim=0) for n, g in full_gradients(model, names, shapes, x, y, basis).items()}
    return {
        (kind, alpha): fit_exact_preconditioner(
            kind, bases, shapes, alpha, corrected if kind == "ekfac" else None, torch.float64
        )
        for kind in ("kfac", "ekfac")
        for alpha in dampings
    }


def exact_scores(model, preconditioner: ExactPreconditioner, x, y, xq, yq) -> np.ndarray:
    """(Q, N) ⟨G_q, (H + λ)⁻¹ G_t⟩ summed over both layers, unprojected."""
    names, shapes = list(preconditioner.layers), preconditioner.shapes
    train = full_gradients(model, names, shapes, x, y, preconditioner)  # {layer: (N, n_out, n_in')}
    query = full_gradients(model, names, shapes, xq, yq, preconditioner)  # {layer: (Q, n_out, n_in')}
    scores = sum(
        torch.einsum("qoi,noi->qn", query[n] * preconditioner.layers[n].inverse, train[n]) for n in names
    )  # (Q, N)
    return scores.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--ranks", default="4,8,16,32,64")
    parser.add_argument("--dampings", default="0.001,0.01,0.1,1.0")
    parser.add_argument("--exact-dampings", default=None, help="dampings of the exact rows (default: --dampings)")
    parser.add_argument("--no-exact", action="store_true", help="skip the exact, unprojected rows")
    parser.add_argument(
        "--bias", action="store_true", help="projected rows capture each layer's bias too (projection.bias)"
    )
    parser.add_argument("--only-exact", action="store_true", help="skip the projected rows (ground truth is reused)")
    parser.add_argument("--out", type=Path, default=Path("lds-digits"))
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    x_all = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y_all = torch.tensor(digits.target, dtype=torch.long)
    train_rows, query_rows = order[: args.train], order[args.train : args.train + args.queries]
    x, y = x_all[train_rows], y_all[train_rows]
    xq, yq = x_all[query_rows], y_all[query_rows]

    initial = make_mlp(args.hidden, seed=0).state_dict()

    def retrain(members: np.ndarray, subset_seed: int) -> np.ndarray:
        model = make_mlp(args.hidden, seed=0)
        model.load_state_dict(initial)
        members = torch.from_numpy(members)
        train(model, x[members], y[members], args.epochs, subset_seed)
        return query_losses(model, xq, yq)

    started = time.perf_counter()
    described = {"workload": "sklearn digits MLP", "hidden": args.hidden, "epochs": args.epochs, "init_seed": 0}
    truth = retrain_on_subsets(
        out / "ground-truth",
        described,
        [str(i) for i in train_rows],
        [int(i) for i in query_rows],
        retrain,
        subsets=args.subsets,
        fraction=args.fraction,
    )
    print(
        f"ground truth: {truth.completed} subsets × {len(query_rows)} queries ({time.perf_counter() - started:.1f} s)"
    )

    full = make_mlp(args.hidden, seed=0)
    full.load_state_dict(initial)
    optimizer = train(full, x, y, args.epochs, seed=0)
    torch.save(optimizer.state_dict(), out / "optimizer.pt")
    with torch.no_grad():
        accuracy = float((full(xq).argmax(1) == yq).float().mean())
    print(f"full model: query accuracy {accuracy:.3f}, mean query loss {query_losses(full, xq, yq).mean():.3f}")

    rows = []
    random = linear_datamodeling_score(
        np.random.default_rng(0).standard_normal((len(query_rows), len(train_rows))), truth.subsets, truth.losses
    )
    rows.append({"gradients": "-", "hessian": "random scores", "rank": "-", "damping": "-", "lds": random})
    specs = [
        ModuleSpec("0", "linear", 64, args.hidden, args.bias),
        ModuleSpec("2", "linear", args.hidden, 10, args.bias),
    ]
    suffix = " +bias" if args.bias else ""
    variants = {
        f"plain{suffix}": None,
        f"adam √v{suffix}": load_second_moment_scales(out / "optimizer.pt", full, specs),
    }
    print(f"Adam v rank-1 factorisation: relative error {variants[f'adam √v{suffix}'].record['relative_error']:.3f}")
    for variant, scales in variants.items():
        for rank in [] if args.only_exact else [int(r) for r in args.ranks.split(",")]:
            projections = ProjectionSet.generate(specs, seed=0, rank_in=rank, rank_out=rank, optimizer=scales)
            dims, shapes = projections.block_dims, projections.block_shapes
            train_grads, factor_rows, names = gradients(full, projections, x, y, factors=True)  # (N, D)
            query_grads, _, _ = gradients(full, projections, xq, yq, factors=False)  # (Q, D)
            sums = {kind: CurvatureSums.for_kind(kind, names, shapes) for kind in ("raw", "kfac")}
            blocks = dict(zip(names, train_grads.split(dims, dim=1)))
            for curvature in sums.values():
                curvature.update(blocks, factor_rows)
            for kind in KINDS:
                for damping in [0.1] if kind == "identity" else [float(d) for d in args.dampings.split(",")]:
                    curvature = sums["kfac" if kind in ("kfac", "ekfac") else "raw"]
                    pre = fit_preconditioner(kind, curvature, names, dims, damping, rows=lambda g=train_grads: [g])
                    scores = (pre.whiten(query_grads) @ pre.whiten(train_grads).T).numpy()  # (Q, N)
                    result = linear_datamodeling_score(scores, truth.subsets, truth.losses)
                    shown = damping if kind != "identity" else "-"
                    rows.append({"gradients": variant, "hessian": kind, "rank": rank, "damping": shown, "lds": result})
                    print(f"{variant:<8} {kind:<9} rank {rank:<3} damping {damping:<6} {result.format()}", flush=True)

    exact_dampings = [float(d) for d in (args.exact_dampings or args.dampings).split(",")]
    if not args.no_exact:
        exact = exact_preconditioners(full, [s.name for s in specs], x, y, exact_dampings)
        for (kind, damping), preconditioner in exact.items():
            result = linear_datamodeling_score(
                exact_scores(full, preconditioner, x, y, xq, yq), truth.subsets, truth.losses
            )
            rows.append(
                {"gradients": "plain", "hessian": f"exact {kind}", "rank": "full", "damping": damping, "lds": result}
            )
            print(f"exact    {kind:<9} unprojected damping {damping:<6} {result.format()}", flush=True)

    print("\n" + lds_table(rows, ["gradients", "hessian", "rank", "damping"]))
    (out / "lds.json").write_text(json.dumps(lds_records(rows), indent=2))
    if len(rows) > 1:  # a scatter of the best setting (there is none when only the baseline ran)
        best = max(rows[1:], key=lambda r: r["lds"].score)
        plot_lds(
            best["lds"],
            truth.losses,
            out / "lds-scatter.png",
            title=f"digits MLP: {best['gradients']} {best['hessian']} rank {best['rank']}",
        )
        print(f"\nscatter of the best setting: {out / 'lds-scatter.png'}")


if __name__ == "__main__":
    main()
