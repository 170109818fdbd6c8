"""Projections are seeded, JL-scaled and identical across calls (and machines: numpy PCG64)."""

from __future__ import annotations

import torch

from attribindex.logra import ModuleSpec, ProjectionSet, gaussian_projection

SPECS = [ModuleSpec("a.fc", "linear", 40, 30), ModuleSpec("b.fc", "conv1d", 30, 50)]


def test_same_seed_same_matrices_and_hash():
    first = ProjectionSet.generate(SPECS, seed=3, rank_in=4, rank_out=5)
    second = ProjectionSet.generate(SPECS, seed=3, rank_in=4, rank_out=5)
    for name in ("a.fc", "b.fc"):
        assert torch.equal(first.p_in[name], second.p_in[name])
        assert torch.equal(first.p_out[name], second.p_out[name])
    assert first.hash() == second.hash()
    assert first.p_in["a.fc"].shape == (4, 40) and first.p_out["b.fc"].shape == (5, 50)


def test_seed_module_and_side_change_the_matrix():
    base = gaussian_projection(0, "a.fc", "in", 4, 40)
    assert not torch.equal(base, gaussian_projection(1, "a.fc", "in", 4, 40))
    assert not torch.equal(base, gaussian_projection(0, "b.fc", "in", 4, 40))
    assert not torch.equal(base, gaussian_projection(0, "a.fc", "out", 4, 40))
    assert ProjectionSet.generate(SPECS, 0, 4, 5).hash() != ProjectionSet.generate(SPECS, 1, 4, 5).hash()


def test_pinned_values_do_not_drift():
    """Values for seed 0 are pinned: a change of generator would silently break every existing index."""
    matrix = gaussian_projection(0, "model.layers.0.mlp.up_proj", "in", 2, 3)
    expected = torch.tensor(
        [
            [0.21797388792037964, -1.2552193403244019, -0.644353449344635],
            [1.038898229598999, 0.42935702204704285, -0.39736998081207275],
        ]
    )
    assert matrix.dtype == torch.float32
    assert torch.equal(matrix, expected)


def test_jl_scaling_preserves_norms_on_average():
    matrix = gaussian_projection(0, "x", "in", 256, 64).double()
    vectors = torch.randn(200, 64, dtype=torch.float64)
    ratio = (vectors @ matrix.T).norm(dim=1) ** 2 / vectors.norm(dim=1) ** 2
    assert abs(float(ratio.mean()) - 1.0) < 0.05


def test_save_load_round_trip(tmp_path):
    projections = ProjectionSet.generate(SPECS, seed=3, rank_in=4, rank_out=5)
    projections.save(tmp_path / "p.safetensors")
    loaded = ProjectionSet.load(tmp_path / "p.safetensors", SPECS)
    assert loaded.hash() == projections.hash()
