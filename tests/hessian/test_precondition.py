"""Whitening equals (H + λI)^{-1/2} with λ = α·mean eigenvalue; sums merge exactly; zeros stay finite."""

from __future__ import annotations

import torch

from attribindex.hessian import CurvatureSums, Preconditioner, normalize_rows


def _grads(seed: int, n: int, dims: list[int]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"m{i}": torch.randn(n, d, generator=gen, dtype=torch.float64) * (i + 1) for i, d in enumerate(dims)}


def test_whitened_inner_product_is_inverse_hessian_influence():
    dims = [6, 4]
    grads = _grads(0, 50, dims)
    sums = CurvatureSums({n: g.shape[1] for n, g in grads.items()})
    sums.update(grads)
    pre = Preconditioner.from_curvature(sums, list(grads), dims, damping=0.05)
    vectors = torch.cat(list(grads.values()), dim=1)
    whitened = pre.whiten(vectors)
    for name, offset, dim in (("m0", 0, 6), ("m1", 6, 4)):
        g = grads[name]
        fisher = g.T @ g / 50
        lam = 0.05 * torch.linalg.eigvalsh(fisher).mean()
        influence = g @ torch.linalg.solve(fisher + lam * torch.eye(dim, dtype=torch.float64), g.T)
        block = whitened[:, offset : offset + dim]
        torch.testing.assert_close(block @ block.T, influence, rtol=1e-5, atol=1e-6)
    assert pre.stats["m0"].damping > 0


def test_curvature_sums_merge_exactly():
    dims = [5]
    whole, a, b = (CurvatureSums({"m0": 5}) for _ in range(3))
    grads = _grads(1, 30, dims)["m0"]
    whole.update({"m0": grads})
    a.update({"m0": grads[:11]})
    b.update({"m0": grads[11:]})
    a.merge(b)
    assert a.count == whole.count == 30
    torch.testing.assert_close(a.sums["m0"], whole.sums["m0"], rtol=1e-14, atol=1e-14)


def test_curvature_round_trip(tmp_path):
    sums = CurvatureSums({"m0": 3})
    sums.update({"m0": torch.ones(4, 3)})
    sums.save(tmp_path / "c.safetensors", note={"chunks": 2})
    loaded, note = CurvatureSums.load(tmp_path / "c.safetensors")
    assert loaded.count == 4 and torch.equal(loaded.sums["m0"], sums.sums["m0"]) and note == {"chunks": 2}


def test_zero_vectors_and_zero_blocks_stay_finite():
    sums = CurvatureSums({"m0": 3})
    sums.update({"m0": torch.zeros(4, 3)})
    pre = Preconditioner.from_curvature(sums, ["m0"], [3], damping=0.1)
    out = normalize_rows(pre.whiten(torch.zeros(2, 3)))
    assert torch.isfinite(out).all() and out.abs().sum() == 0


def test_identity_preconditioner_is_a_no_op_and_hash_differs():
    ident = Preconditioner.identity(["m0"], [3])
    vectors = torch.randn(2, 3)
    assert torch.equal(ident.whiten(vectors), vectors)
    sums = CurvatureSums({"m0": 3})
    sums.update({"m0": torch.randn(5, 3)})
    assert Preconditioner.from_curvature(sums, ["m0"], [3], 0.1).hash() != ident.hash()


def test_damping_changes_the_hash(tmp_path):
    sums = CurvatureSums({"m0": 3})
    sums.update({"m0": torch.randn(5, 3)})
    first = Preconditioner.from_curvature(sums, ["m0"], [3], 0.1)
    assert first.hash() != Preconditioner.from_curvature(sums, ["m0"], [3], 0.2).hash()
    first.save(tmp_path / "p.safetensors")
    assert Preconditioner.load(tmp_path / "p.safetensors", ["m0"], [3]).hash() == first.hash()
