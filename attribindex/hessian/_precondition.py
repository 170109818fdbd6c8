"""H^{-1/2} per module by eigh with relative damping, and whitening of concatenated gradient vectors."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from attribindex.errors import AttribIndexError
from attribindex.hessian._curvature import CurvatureSums
from attribindex.store import atomic_path


@dataclass
class ModuleStats:
    mean_eigenvalue: float
    damping: float  # λ = α · mean eigenvalue
    effective_rank: float  # Σ e / max e, a rough count of directions that matter


class Preconditioner:
    """Whitening matrices W_m = (H_m + λ_m I)^{-1/2} per module (None everywhere for `identity`).

    Influence is ⟨W g_q, W g_t⟩ = g_qᵀ (H + λ)^{-1} g_t, block by block; the stored vector is the
    concatenation of the whitened blocks, so per-module partial scores stay recoverable.

    Example:
        >>> sums = CurvatureSums({"fc": 2}); sums.update({"fc": torch.tensor([[1.0, 0.0], [0.0, 2.0]])})
        >>> pre = Preconditioner.from_curvature(sums, ["fc"], [2], damping=0.1)
        >>> pre.whiten(torch.tensor([[1.0, 0.0]])).shape
        torch.Size([1, 2])
    """

    def __init__(
        self,
        kind: str,
        names: list[str],
        dims: list[int],
        matrices: dict[str, torch.Tensor],
        damping: float,
        stats: dict[str, ModuleStats] | None = None,
    ):
        self.kind = kind
        self.names = names
        self.dims = dims
        self.matrices = matrices  # name -> (d, d) float32, symmetric
        self.damping = damping
        self.stats = stats or {}

    @classmethod
    def identity(cls, names: list[str], dims: list[int]) -> Preconditioner:
        return cls("identity", names, dims, {}, damping=0.0)

    @classmethod
    def from_curvature(cls, sums: CurvatureSums, names: list[str], dims: list[int], damping: float) -> Preconditioner:
        if sums.count == 0:
            raise AttribIndexError("cannot compute a Hessian from zero examples; the corpus produced no gradients.")
        matrices, stats = {}, {}
        for name in names:
            fisher = sums.sums[name] / sums.count  # (d, d) fp64, E[g gᵀ]
            eigenvalues, eigenvectors = torch.linalg.eigh(fisher)
            eigenvalues = eigenvalues.clamp_min(0.0)  # round-off can leave tiny negatives
            mean = float(eigenvalues.mean())
            lam = damping * mean if mean > 0 else 1.0  # an all-zero block: whitening is then the identity
            inv_sqrt = (eigenvalues + lam).rsqrt()
            matrices[name] = ((eigenvectors * inv_sqrt) @ eigenvectors.T).to(torch.float32)
            top = float(eigenvalues.max())
            stats[name] = ModuleStats(mean, lam, float(eigenvalues.sum()) / top if top > 0 else 0.0)
        return cls("raw", names, dims, matrices, damping, stats)

    def whiten(self, vectors: torch.Tensor) -> torch.Tensor:
        """(B, D) raw projected gradients → (B, D) whitened vectors."""
        if self.kind == "identity":
            return vectors
        out = torch.empty_like(vectors)
        offset = 0
        for name, dim in zip(self.names, self.dims):
            block = slice(offset, offset + dim)
            out[:, block] = vectors[:, block] @ self.matrices[name].to(vectors.dtype)  # W is symmetric
            offset += dim
        return out

    def index_vectors(self, raw: torch.Tensor, mode: str) -> np.ndarray:
        """(B, D) raw projected gradients → the (B, D) float32 vectors an index of `mode` holds: whitened, and
        unit-normalised in cosine mode."""
        vectors = self.whiten(raw)
        return (normalize_rows(vectors) if mode == "cosine" else vectors).numpy()

    def hash(self) -> str:
        digest = hashlib.sha256(f"{self.kind}:{self.damping!r}".encode())
        for name in self.names:
            if name in self.matrices:
                digest.update(name.encode())
                digest.update(self.matrices[name].contiguous().numpy().tobytes())
        return "sha256:" + digest.hexdigest()

    def save(self, path: Path) -> None:
        tensors = {n: m.contiguous() for n, m in self.matrices.items()} or {"_empty": torch.zeros(0)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"kind": self.kind, "damping": repr(self.damping)})

    @classmethod
    def load(cls, path: Path, names: list[str], dims: list[int]) -> Preconditioner:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
            matrices = {n: handle.get_tensor(n) for n in handle.keys() if n != "_empty"}  # noqa: SIM118 (not a dict)
        return cls(meta["kind"], names, dims, matrices, float(meta["damping"]))


def normalize_rows(vectors: torch.Tensor) -> torch.Tensor:
    """Unit-normalise rows; an all-zero row stays zero (no NaN)."""
    norms = vectors.norm(dim=1, keepdim=True)  # (B, 1)
    return vectors / torch.where(norms > 0, norms, torch.ones_like(norms))
