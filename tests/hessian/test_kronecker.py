"""KFAC and EK-FAC whitening: equal to explicit Kronecker algebra, to raw where the Fisher is exactly Kronecker,
and their factor sums merge, save and delete as documented."""

from __future__ import annotations

import pytest
import torch

from attribindex.hessian import CurvatureSums, KroneckerWhitening, Preconditioner, fit_preconditioner

K_OUT, K_IN = 3, 4


def _examples(seed: int, n: int, tokens: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, d) per-example gradients Σ_t δ_t x_tᵀ and their (n, k_in² + k_out²) factor rows [Σ x xᵀ, Σ δ δᵀ]."""
    gen = torch.Generator().manual_seed(seed)
    mix_in = torch.randn(K_IN, K_IN, generator=gen, dtype=torch.float64)
    mix_out = torch.randn(K_OUT, K_OUT, generator=gen, dtype=torch.float64)
    x = torch.randn(n, tokens, K_IN, generator=gen, dtype=torch.float64) @ mix_in  # (n, T, k_in)
    delta = torch.randn(n, tokens, K_OUT, generator=gen, dtype=torch.float64) @ mix_out  # (n, T, k_out)
    grads = (delta.transpose(1, 2) @ x).reshape(n, -1)  # (n, k_out·k_in)
    factors = torch.cat([(x.transpose(1, 2) @ x).flatten(1), (delta.transpose(1, 2) @ delta).flatten(1)], dim=1)
    return grads, factors


def _sums(grads: torch.Tensor, factors: torch.Tensor) -> CurvatureSums:
    sums = CurvatureSums.for_kind("kfac", ["m"], [(K_OUT, K_IN)])
    sums.update({"m": grads}, {"m": factors})
    return sums


def _inverse_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.rsqrt()) @ vectors.T


def test_kfac_whitening_is_the_inverse_root_of_the_kronecker_product():
    grads, factors = _examples(0, 40)
    pre = Preconditioner.kronecker_factored(_sums(grads, factors), ["m"], [K_OUT * K_IN], damping=0.1)
    a = factors[:, : K_IN * K_IN].sum(0).view(K_IN, K_IN) / 40
    s = factors[:, K_IN * K_IN :].sum(0).view(K_OUT, K_OUT) / 40
    kron = torch.kron(s, a)  # (d, d); row-major flattening of (k_out, k_in) blocks
    kron *= grads.square().sum(1).mean() / torch.trace(kron)  # eigenvalues rescaled to sum to E‖g‖²
    lam = 0.1 * torch.trace(kron) / kron.shape[0]
    expected = _inverse_sqrt(kron + lam * torch.eye(kron.shape[0], dtype=torch.float64))
    whitening = pre.kronecker["m"]
    torch.testing.assert_close(whitening.dense().double(), expected, rtol=1e-4, atol=1e-6)
    probe = torch.randn(7, K_OUT * K_IN, dtype=torch.float64)
    torch.testing.assert_close(pre.whiten(probe), probe @ expected, rtol=1e-4, atol=1e-6)
    assert pre.kind == "kfac" and pre.stats["m"].damping == pytest.approx(float(lam), rel=1e-6)


def test_ekfac_eigenvalues_are_the_gradient_second_moments_in_the_kfac_basis():
    grads, factors = _examples(1, 50)
    sums = _sums(grads, factors)
    kfac = Preconditioner.kronecker_factored(sums, ["m"], [K_OUT * K_IN], damping=0.1)
    ekfac = fit_preconditioner("ekfac", sums, ["m"], [K_OUT * K_IN], 0.1, rows=lambda: iter(grads.split(16)))
    basis = torch.kron(kfac.kronecker["m"].u_out, kfac.kronecker["m"].u_in).double()  # (d, d)
    fisher = grads.T @ grads / 50
    corrected = torch.diagonal(basis.T @ fisher @ basis)  # (d,) = E[(U_Sᵀ G U_A)²] flattened
    lam = 0.1 * corrected.mean()
    expected = (basis * (corrected + lam).rsqrt()) @ basis.T
    assert ekfac.kind == "ekfac"
    torch.testing.assert_close(ekfac.kronecker["m"].dense().double(), expected, rtol=1e-4, atol=1e-6)


def test_kfac_and_ekfac_equal_raw_when_the_fisher_is_exactly_kronecker():
    """Every (δ, x) pair once, one token each: the empirical Fisher is exactly E[δδᵀ] ⊗ E[xxᵀ]."""
    gen = torch.Generator().manual_seed(2)
    deltas = torch.randn(5, K_OUT, generator=gen, dtype=torch.float64)
    xs = torch.randn(6, K_IN, generator=gen, dtype=torch.float64)
    delta = deltas.repeat_interleave(6, dim=0)[:, None]  # (30, 1, k_out)
    x = xs.repeat(5, 1)[:, None]  # (30, 1, k_in)
    grads = (delta.transpose(1, 2) @ x).reshape(30, -1)
    factors = torch.cat([(x.transpose(1, 2) @ x).flatten(1), (delta.transpose(1, 2) @ delta).flatten(1)], dim=1)
    raw_sums = CurvatureSums({"m": K_OUT * K_IN})
    raw_sums.update({"m": grads})
    raw = Preconditioner.from_curvature(raw_sums, ["m"], [K_OUT * K_IN], damping=0.05)
    probe = torch.randn(4, K_OUT * K_IN, dtype=torch.float64)
    for kind in ("kfac", "ekfac"):
        pre = fit_preconditioner(kind, _sums(grads, factors), ["m"], [K_OUT * K_IN], 0.05, rows=lambda: [grads])
        torch.testing.assert_close(pre.whiten(probe), raw.whiten(probe), rtol=1e-4, atol=1e-6)


def test_kronecker_whitening_round_trips_and_its_trace_formula_matches_dense(tmp_path):
    grads, factors = _examples(3, 30)
    sums = _sums(grads, factors)
    pre = fit_preconditioner("ekfac", sums, ["m"], [K_OUT * K_IN], 0.1, rows=lambda: [grads])
    pre.save(tmp_path / "p.safetensors")
    loaded = Preconditioner.load(tmp_path / "p.safetensors", ["m"], [K_OUT * K_IN])
    assert loaded.kind == "ekfac" and loaded.hash() == pre.hash()
    probe = torch.randn(3, K_OUT * K_IN)
    torch.testing.assert_close(loaded.whiten(probe), pre.whiten(probe))
    assert pre.hash() != fit_preconditioner("kfac", sums, ["m"], [K_OUT * K_IN], 0.1).hash()
    other_grads, other_factors = _examples(4, 30)
    other = Preconditioner.kronecker_factored(_sums(other_grads, other_factors), ["m"], [K_OUT * K_IN], 0.1)
    dense_a, dense_b = pre.kronecker["m"].dense().double(), other.kronecker["m"].dense().double()
    expected = float(torch.linalg.norm(dense_b - dense_a) / torch.linalg.norm(dense_a))
    assert pre.relative_change(other) == [pytest.approx(expected, rel=1e-4)]
    assert pre.relative_change(pre) == [pytest.approx(0.0, abs=1e-3)]


def test_factor_sums_merge_save_and_keep_deleted_examples(tmp_path):
    grads, factors = _examples(5, 20)
    whole = _sums(grads, factors)
    part = _sums(grads[:7], factors[:7])
    part.merge(_sums(grads[7:], factors[7:]))
    for name, total in whole.tensors.items():
        torch.testing.assert_close(part.tensors[name], total, rtol=1e-13, atol=1e-13)
    whole.remove({"m": grads[:2]})
    assert whole.count == 20 and whole.retained_deleted == 2  # token statistics are not per-row: they stay
    whole.save(tmp_path / "c.safetensors")
    loaded, _ = CurvatureSums.load(tmp_path / "c.safetensors")
    assert loaded.tracks_factors and loaded.factor_shapes == {"m": (K_OUT, K_IN)} and loaded.retained_deleted == 2
    with pytest.raises(ValueError, match="different Hessian kinds"):
        loaded.merge(CurvatureSums({"m": K_OUT * K_IN}))


def test_kronecker_apply_matches_its_dense_matrix():
    gen = torch.Generator().manual_seed(6)
    u_out = torch.linalg.qr(torch.randn(K_OUT, K_OUT, generator=gen))[0]
    u_in = torch.linalg.qr(torch.randn(K_IN, K_IN, generator=gen))[0]
    whitening = KroneckerWhitening(u_out, u_in, torch.rand(K_OUT, K_IN, generator=gen) + 0.5)
    block = torch.randn(5, K_OUT * K_IN, generator=gen)
    torch.testing.assert_close(whitening.apply(block), block @ whitening.dense(), rtol=1e-5, atol=1e-6)
