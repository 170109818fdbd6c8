"""Seeded Kronecker projections P_in ⊗ P_out per captured module.

Matrices come from numpy's PCG64 seeded by (seed, crc32(module name), side), so they are identical
on every machine; their hash is stored in the manifest and re-checked at query time.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from attribindex.logra._modules import ModuleSpec
from attribindex.logra._optimizer import SecondMomentScales
from attribindex.store import save_safetensors

_SIDES = {"in": 0, "out": 1, "bias": 2}


def gaussian_projection(
    seed: int, module_name: str, side: str, rank: int, dim: int, *, shapes_only: bool = False
) -> torch.Tensor:
    """A JL-scaled Gaussian matrix (rank × dim) with entries N(0, 1/rank), the same on any machine; with
    `shapes_only`, an empty float32 tensor of that shape on the meta device (a plan sizes it, nothing is drawn).

    Example:
        >>> gaussian_projection(0, "mlp.fc", "in", 4, 8).shape
        torch.Size([4, 8])
    """
    if shapes_only:
        return torch.empty((rank, dim), dtype=torch.float32, device="meta")
    sequence = np.random.SeedSequence([seed, zlib.crc32(module_name.encode("utf-8")), _SIDES[side]])
    rng = np.random.Generator(np.random.PCG64(sequence))
    matrix = rng.standard_normal((rank, dim), dtype=np.float32) / np.float32(np.sqrt(rank))
    return torch.from_numpy(matrix)


def _input_projection(seed: int, module: ModuleSpec, rank_in: int, shapes_only: bool = False) -> torch.Tensor:
    """P_in (k_in × input_dim); a captured bias's column has its own stream, so the weight columns are the
    same with or without it."""
    rank = min(rank_in, module.input_dim)
    weight_columns = gaussian_projection(seed, module.name, "in", rank, module.in_features, shapes_only=shapes_only)
    if not module.bias:
        return weight_columns  # (k_in, n_in)
    bias_column = gaussian_projection(seed, module.name, "bias", rank, 1, shapes_only=shapes_only)
    return torch.cat([weight_columns, bias_column], dim=1)  # (k_in, n_in + 1)


@dataclass
class ProjectionSet:
    """The projections of all captured modules, with a content hash.

    `p_in[name]` is (k_in × n_in, or n_in + 1 with a captured bias), `p_out[name]` is (k_out × n_out); module
    `name`'s projected gradient `P_out · [DW Db] · P_inᵀ` is flattened row-major into k_out·k_in numbers.

    Example:
        >>> specs = [ModuleSpec("fc", "linear", in_features=8, out_features=6)]
        >>> ProjectionSet.generate(specs, seed=0, rank_in=2, rank_out=3).block_dims
        [6]
    """

    modules: list[ModuleSpec]
    p_in: dict[str, torch.Tensor]
    p_out: dict[str, torch.Tensor]

    @classmethod
    def generate(
        cls,
        modules: list[ModuleSpec],
        seed: int,
        rank_in: int,
        rank_out: int,
        optimizer: SecondMomentScales | None = None,
        shapes_only: bool = False,
    ) -> ProjectionSet:
        """Seeded projections; with `optimizer`, gradients are divided by the optimizer's √v̂ before projection.

        With v̂ factorised as 1/√v̂ = out_scale ⊗ in_scale, P_out (g ⊘ √v̂) P_inᵀ = (P_out diag(out_scale)) g
        (P_in diag(in_scale))ᵀ: the correction folds into the projections and costs nothing per example.
        With `shapes_only`, the matrices are empty meta tensors of their shapes (what a plan without weights needs).
        """
        p_in = {m.name: _input_projection(seed, m, rank_in, shapes_only) for m in modules}
        p_out = {
            m.name: gaussian_projection(
                seed, m.name, "out", min(rank_out, m.out_features), m.out_features, shapes_only=shapes_only
            )
            for m in modules
        }
        plain = cls(modules, p_in, p_out)
        return plain if optimizer is None else plain.folded(optimizer)

    def folded(self, optimizer: SecondMomentScales) -> ProjectionSet:
        """These projections times the optimizer's factorised 1/√v̂: P_in diag(in_scale), P_out diag(out_scale)."""
        p_in = {name: p * optimizer.in_scale[name][None, :] for name, p in self.p_in.items()}  # (k_in, n_in)
        p_out = {name: p * optimizer.out_scale[name][None, :] for name, p in self.p_out.items()}  # (k_out, n_out)
        return ProjectionSet(self.modules, p_in, p_out)

    @property
    def block_dims(self) -> list[int]:
        return [self.p_out[m.name].shape[0] * self.p_in[m.name].shape[0] for m in self.modules]

    @property
    def block_shapes(self) -> list[tuple[int, int]]:
        """(k_out, k_in) per module: a block is the row-major flattening of this matrix."""
        return [(self.p_out[m.name].shape[0], self.p_in[m.name].shape[0]) for m in self.modules]

    @property
    def dim(self) -> int:
        return sum(self.block_dims)

    def hash(self) -> str:
        digest = hashlib.sha256()
        for m in self.modules:
            for side, matrix in (("in", self.p_in[m.name]), ("out", self.p_out[m.name])):
                digest.update(f"{m.name}.{side}:{tuple(matrix.shape)}".encode())
                digest.update(matrix.contiguous().numpy().tobytes())
        return "sha256:" + digest.hexdigest()

    def save(self, path: Path) -> None:
        tensors = {f"{m.name}.in": self.p_in[m.name].contiguous() for m in self.modules}
        tensors |= {f"{m.name}.out": self.p_out[m.name].contiguous() for m in self.modules}
        save_safetensors(tensors, path, {"hash": self.hash()})

    @classmethod
    def load(cls, path: Path, modules: list[ModuleSpec]) -> ProjectionSet:
        tensors = load_file(str(path))
        return cls(
            modules,
            {m.name: tensors[f"{m.name}.in"] for m in modules},
            {m.name: tensors[f"{m.name}.out"] for m in modules},
        )
