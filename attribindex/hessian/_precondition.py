"""H^{-1/2} per module (raw, KFAC or EK-FAC) with relative damping, and whitening of concatenated gradient vectors."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from attribindex.errors import AttribIndexError
from attribindex.hessian._curvature import FACTOR_KINDS, CurvatureSums
from attribindex.store import ModuleStats, save_safetensors


@dataclass
class KroneckerWhitening:
    """(H + λ)^{-1/2} for H diagonal in the basis U_out ⊗ U_in, kept factored: W = (U_out ⊗ U_in) diag(s) (…)ᵀ.

    A block g (k_out × k_in, row-major) maps to U_out [(U_outᵀ g U_in) ⊙ s] U_inᵀ: O(k³) per example
    instead of O(k⁴) for the dense d×d matrix, and W is symmetric, so scores stay inner products.
    """

    u_out: torch.Tensor  # (k_out, k_out) orthonormal columns
    u_in: torch.Tensor  # (k_in, k_in)
    scale: torch.Tensor  # (k_out, k_in) = (Λ + λ)^{-1/2}

    def apply(self, block: torch.Tensor) -> torch.Tensor:
        """(B, k_out·k_in) → (B, k_out·k_in)."""
        u_out, u_in, scale = (t.to(block.dtype) for t in (self.u_out, self.u_in, self.scale))
        g = block.reshape(block.shape[0], *scale.shape)  # (B, k_out, k_in)
        rotated = u_out.T @ g @ u_in  # (B, k_out, k_in) in the eigenbasis
        return (u_out @ (rotated * scale) @ u_in.T).reshape(block.shape)

    def dense(self) -> torch.Tensor:
        """The (d, d) matrix W, for tests and small modules."""
        basis = torch.kron(self.u_out, self.u_in)  # (d, d); row-major flattening matches kron's order
        return (basis * self.scale.reshape(-1)) @ basis.T

    def inner(self, other: KroneckerWhitening) -> float:
        """tr(W_self W_other) without forming either: Σ_ij s_ij [C_out s' C_inᵀ]_ij with C = (Uᵀ U')²."""
        c_out = (self.u_out.double().T @ other.u_out.double()).square()  # (k_out, k_out)
        c_in = (self.u_in.double().T @ other.u_in.double()).square()  # (k_in, k_in)
        return float((self.scale.double() * (c_out @ other.scale.double() @ c_in.T)).sum())


def relative_damping(eigenvalues: torch.Tensor, alpha: float) -> tuple[torch.Tensor, float, ModuleStats]:
    """(eigenvalues clamped at 0, λ = α · mean of them, the module's statistics); λ = 1 for an all-zero block,
    which is then only rescaled, not whitened. The one damping rule of projected and exact preconditioners."""
    eigenvalues = eigenvalues.clamp_min(0.0)  # round-off can leave tiny negatives
    mean = float(eigenvalues.mean())
    lam = alpha * mean if mean > 0 else 1.0
    top = float(eigenvalues.max())
    stats = ModuleStats(
        mean_eigenvalue=mean, damping=lam, effective_rank=float(eigenvalues.sum()) / top if top > 0 else 0.0
    )
    return eigenvalues, lam, stats


def _damped(eigenvalues: torch.Tensor, damping: float) -> tuple[torch.Tensor, ModuleStats]:
    """(e + λ)^{-1/2} with λ = α · mean(e), and the module's statistics."""
    eigenvalues, lam, stats = relative_damping(eigenvalues, damping)
    return (eigenvalues + lam).rsqrt(), stats


class Preconditioner:
    """Whitening W_m = (H_m + λ_m I)^{-1/2} per module, for Hessian kind `identity`, `raw`, `kfac` or `ekfac`.

    Influence is ⟨W g_q, W g_t⟩ = g_qᵀ (H + λ)^{-1} g_t, block by block; the stored vector is the
    concatenation of the whitened blocks, so per-module partial scores stay recoverable. `raw` keeps a
    dense d×d W per module (`matrices`); `kfac`/`ekfac` keep it factored (`kronecker`).

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
        kronecker: dict[str, KroneckerWhitening] | None = None,
    ):
        self.kind = kind
        self.names = names
        self.dims = dims
        self.matrices = matrices  # name -> (d, d) float32, symmetric
        self.kronecker = kronecker or {}
        self.damping = damping
        self.stats = stats or {}

    @classmethod
    def identity(cls, names: list[str], dims: list[int]) -> Preconditioner:
        return cls("identity", names, dims, {}, damping=0.0)

    @classmethod
    def from_curvature(cls, sums: CurvatureSums, names: list[str], dims: list[int], damping: float) -> Preconditioner:
        """`raw`: the projected empirical Fisher E[g gᵀ] per module, eigendecomposed."""
        _require_examples(sums)
        matrices, stats = {}, {}
        for name in names:
            fisher = sums.sums[name] / sums.count  # (d, d) fp64, E[g gᵀ]
            eigenvalues, eigenvectors = torch.linalg.eigh(fisher)
            inv_sqrt, stats[name] = _damped(eigenvalues, damping)
            matrices[name] = ((eigenvectors * inv_sqrt) @ eigenvectors.T).to(torch.float32)
        return cls("raw", names, dims, matrices, damping, stats)

    @classmethod
    def kronecker_factored(
        cls,
        sums: CurvatureSums,
        names: list[str],
        dims: list[int],
        damping: float,
        rows: Iterable[torch.Tensor] | None = None,
    ) -> Preconditioner:
        """`kfac` (rows=None) or `ekfac`: H ≈ S ⊗ A from the token covariances of projected output gradients
        (S) and inputs (A), whitened in their joint eigenbasis U_S ⊗ U_A.

        KFAC's eigenvalues are s_i·a_j, rescaled so they sum to E‖g‖² (the trace of the empirical Fisher):
        the factors' own scale depends on tokens per example, which would otherwise weigh modules arbitrarily.
        EK-FAC replaces them by the corrected eigenvalues Λ_ij = E[(U_Sᵀ G U_A)²_ij] (George et al. 2018),
        the exact second moments of the gradients in that basis, from one pass over `rows`: (n, D) raw
        projected gradients of the examples to fit on.
        """
        _require_examples(sums)
        bases = {}
        for name in names:
            a, u_in = torch.linalg.eigh(sums.activations[name] / sums.count)  # (k_in,), (k_in, k_in)
            s, u_out = torch.linalg.eigh(sums.gradients[name] / sums.count)  # (k_out,), (k_out, k_out)
            product = torch.outer(s.clamp_min(0), a.clamp_min(0))  # (k_out, k_in)
            total = float(product.sum())
            trace = float(sums.traces[name]) / sums.count
            bases[name] = (u_out, u_in, product * (trace / total) if total > 0 else product)
        kind = "kfac"
        if rows is not None:
            kind = "ekfac"
            corrected = _corrected_eigenvalues(bases, names, dims, rows)
            bases = {n: (u_out, u_in, corrected[n]) for n, (u_out, u_in, _) in bases.items()}
        kronecker, stats = {}, {}
        for name, (u_out, u_in, eigenvalues) in bases.items():
            scale, stats[name] = _damped(eigenvalues, damping)
            kronecker[name] = KroneckerWhitening(u_out.float(), u_in.float(), scale.float())
        return cls(kind, names, dims, {}, damping, stats, kronecker)

    def whiten(self, vectors: torch.Tensor) -> torch.Tensor:
        """(B, D) raw projected gradients → (B, D) whitened vectors."""
        if self.kind == "identity":
            return vectors
        out = torch.empty_like(vectors)
        offset = 0
        for name, dim in zip(self.names, self.dims):
            block = slice(offset, offset + dim)
            if name in self.kronecker:
                out[:, block] = self.kronecker[name].apply(vectors[:, block])
            else:
                out[:, block] = vectors[:, block] @ self.matrices[name].to(vectors.dtype)  # W is symmetric
            offset += dim
        return out

    def index_vectors(self, raw: torch.Tensor, mode: str) -> np.ndarray:
        """(B, D) raw projected gradients → the (B, D) float32 vectors an index of `mode` holds: whitened, and
        unit-normalised in cosine mode."""
        vectors = self.whiten(raw)
        return (normalize_rows(vectors) if mode == "cosine" else vectors).numpy()

    def relative_change(self, other: Preconditioner) -> list[float]:
        """‖W_other − W_self‖_F / ‖W_self‖_F per module (both of the same kind)."""
        changes = []
        for name in self.names:
            if name in self.kronecker:
                mine, theirs = self.kronecker[name], other.kronecker[name]
                own, new = mine.inner(mine), theirs.inner(theirs)
                changes.append(max(own + new - 2 * mine.inner(theirs), 0.0) ** 0.5 / own**0.5)
            else:
                mine = self.matrices[name]
                changes.append(float(torch.linalg.norm(other.matrices[name] - mine) / torch.linalg.norm(mine)))
        return changes

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name in self.names:
            if name in self.kronecker:
                whitening = self.kronecker[name]
                tensors |= {f"{name}::u_out": whitening.u_out, f"{name}::u_in": whitening.u_in}
                tensors[f"{name}::scale"] = whitening.scale
            elif name in self.matrices:
                tensors[name] = self.matrices[name]
        return tensors

    def hash(self) -> str:
        digest = hashlib.sha256(f"{self.kind}:{self.damping!r}".encode())
        for key, tensor in self._tensors().items():
            digest.update(key.split("::")[0].encode())  # the module name (raw hashes are as before version 4)
            digest.update(tensor.contiguous().numpy().tobytes())
        return "sha256:" + digest.hexdigest()

    def save(self, path: Path) -> None:
        tensors = {n: m.contiguous() for n, m in self._tensors().items()} or {"_empty": torch.zeros(0)}
        save_safetensors(tensors, path, {"kind": self.kind, "damping": repr(self.damping)})

    @classmethod
    def load(cls, path: Path, names: list[str], dims: list[int]) -> Preconditioner:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
            tensors = {n: handle.get_tensor(n) for n in handle.keys() if n != "_empty"}  # noqa: SIM118 (not a dict)
        kronecker = {
            name: KroneckerWhitening(tensors[f"{name}::u_out"], tensors[f"{name}::u_in"], tensors[f"{name}::scale"])
            for name in names
            if f"{name}::scale" in tensors
        }
        matrices = {n: t for n, t in tensors.items() if "::" not in n}
        return cls(meta["kind"], names, dims, matrices, float(meta["damping"]), kronecker=kronecker)


def fit_preconditioner(
    kind: str,
    sums: CurvatureSums,
    names: list[str],
    dims: list[int],
    damping: float,
    rows: Callable[[], Iterable[torch.Tensor]] | None = None,
) -> Preconditioner:
    """The preconditioner of Hessian `kind` from curvature sums; `ekfac` also calls `rows()` for one pass over
    the (n, D) raw projected gradients it is fitted on.

    Example:
        >>> sums = CurvatureSums({"fc": 2}); sums.update({"fc": torch.eye(2)})
        >>> fit_preconditioner("raw", sums, ["fc"], [2], damping=0.1).kind
        'raw'
    """
    if kind == "identity":
        return Preconditioner.identity(names, dims)
    if kind == "raw":
        return Preconditioner.from_curvature(sums, names, dims, damping)
    if kind not in FACTOR_KINDS:
        raise AttribIndexError(f"unknown Hessian kind {kind!r}; use identity, raw, kfac or ekfac.")
    if kind == "ekfac" and rows is None:
        raise ValueError("ekfac needs a pass over the stored rows; pass `rows`.")
    return Preconditioner.kronecker_factored(sums, names, dims, damping, rows() if kind == "ekfac" else None)


def _require_examples(sums: CurvatureSums) -> None:
    if sums.count == 0:
        raise AttribIndexError("cannot compute a Hessian from zero examples; the corpus produced no gradients.")


def _corrected_eigenvalues(
    bases: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    names: list[str],
    dims: list[int],
    rows: Iterable[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """E[(U_outᵀ G U_in)²] per module over the rows (fp64)."""
    totals = {name: torch.zeros_like(bases[name][2], dtype=torch.float64) for name in names}
    count = 0
    for block in rows:  # (n, D)
        offset = 0
        for name, dim in zip(names, dims):
            u_out, u_in, _ = bases[name]
            g = block[:, offset : offset + dim].to(torch.float64).reshape(-1, *totals[name].shape)  # (n, k_out, k_in)
            totals[name] += (u_out.T @ g @ u_in).square().sum(dim=0)
            offset += dim
        count += block.shape[0]
    if count == 0:
        raise AttribIndexError("cannot correct EK-FAC eigenvalues over zero rows; the index has no live rows.")
    return {name: total / count for name, total in totals.items()}


def normalize_rows(vectors: torch.Tensor) -> torch.Tensor:
    """Unit-normalise rows; an all-zero row stays zero (no NaN)."""
    norms = vectors.norm(dim=1, keepdim=True)  # (B, 1)
    return vectors / torch.where(norms > 0, norms, torch.ones_like(norms))
