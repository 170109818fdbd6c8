"""The unprojected KFAC / EK-FAC inverse Hessian of each captured layer, kept in its Kronecker eigenbasis.

With A = U_A diag(a) U_Aᵀ and S = U_S diag(s) U_Sᵀ the (mean) factors of a layer, H ≈ (U_S ⊗ U_A) diag(Λ)
(U_S ⊗ U_A)ᵀ. KFAC takes Λ_ij = s_i a_j, rescaled so that Σ Λ = E‖G‖² (as the projected `kfac` does: the
factors' own scale depends on the tokens per example); EK-FAC takes the corrected Λ_ij = E[(U_Sᵀ G U_A)²_ij]
(George et al. 2018) over a sample of examples. With damping λ = α · mean(Λ), a gradient G is preconditioned as
U_S [(U_Sᵀ G U_A) ⊘ (Λ + λ)] U_Aᵀ, and influence is ⟨G_query, (H + λ)⁻¹ G_train⟩ summed over layers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from attribindex.errors import AttribIndexError
from attribindex.exact._factors import LayerShape
from attribindex.hessian import relative_damping
from attribindex.store import ModuleStats, save_safetensors


@dataclass
class LayerCurvature:
    """One layer's eigenbasis and eigenvalues; `inverse` = 1 / (Λ + λ), the diagonal of (H + λ)⁻¹ there."""

    u_out: torch.Tensor  # (n_out, n_out) orthonormal columns
    u_in: torch.Tensor  # (n_in', n_in')
    eigenvalues: torch.Tensor  # (n_out, n_in') Λ
    damping: float  # λ (absolute)

    @property
    def inverse(self) -> torch.Tensor:
        return 1.0 / (self.eigenvalues + self.damping)  # (n_out, n_in')

    def rotate(self, gradients: torch.Tensor) -> torch.Tensor:
        """(..., n_out, n_in') → U_Sᵀ G U_A, the gradients in the eigenbasis."""
        u_out, u_in = self.u_out.to(gradients.dtype), self.u_in.to(gradients.dtype)
        return u_out.T @ gradients @ u_in

    def unrotate(self, rotated: torch.Tensor) -> torch.Tensor:
        """(..., n_out, n_in') → U_S R U_Aᵀ, back from the eigenbasis."""
        u_out, u_in = self.u_out.to(rotated.dtype), self.u_in.to(rotated.dtype)
        return u_out @ rotated @ u_in.T


@dataclass
class ExactPreconditioner:
    """(H + λ)⁻¹ of every captured layer, unprojected, for exact influence scores.

    Example:
        >>> pre = ExactPreconditioner.load(Path("my-index/exact_preconditioner.safetensors"))  # doctest: +SKIP
        >>> sorted(pre.layers)[:1], pre.kind  # doctest: +SKIP
        (['gpt_neox.layers.0.attention.dense'], 'ekfac')
    """

    kind: str  # "kfac" or "ekfac"
    alpha: float  # the relative damping α
    layers: dict[str, LayerCurvature]
    shapes: dict[str, LayerShape]

    def stats(self) -> dict[str, ModuleStats]:
        return {name: relative_damping(layer.eigenvalues, self.alpha)[2] for name, layer in self.layers.items()}

    @classmethod
    def eigenbases(
        cls, bases: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], shapes: dict[str, LayerShape]
    ) -> ExactPreconditioner:
        """Just the eigenbases of `kfac_bases` (no damping): what `RotatedGradients` rotates into for EK-FAC's
        correction, E[(U_Sᵀ G U_A)²]."""
        layers = {n: LayerCurvature(u_out, u_in, values, 0.0) for n, (u_out, u_in, values) in bases.items()}
        return cls("kfac", 0.0, layers, shapes)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> ExactPreconditioner:
        """A copy with its tensors on `device` in `dtype` (once, not per batch)."""
        layers = {
            name: LayerCurvature(
                layer.u_out.to(device, dtype),
                layer.u_in.to(device, dtype),
                layer.eigenvalues.to(device, dtype),
                layer.damping,
            )
            for name, layer in self.layers.items()
        }
        return ExactPreconditioner(self.kind, self.alpha, layers, self.shapes)

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, layer in self.layers.items():
            tensors |= {f"{name}::u_out": layer.u_out, f"{name}::u_in": layer.u_in}
            tensors |= {f"{name}::eigenvalues": layer.eigenvalues}
            tensors[f"{name}::damping"] = torch.tensor([layer.damping], dtype=torch.float64)
        return tensors

    def hash(self) -> str:
        digest = hashlib.sha256(f"{self.kind}:{self.alpha!r}".encode())
        for key, tensor in sorted(self._tensors().items()):  # safetensors' metadata comes back in its own order
            digest.update(key.encode())
            digest.update(tensor.contiguous().cpu().numpy().tobytes())
        return "sha256:" + digest.hexdigest()

    def save(self, path: Path) -> None:
        metadata = {"kind": self.kind, "alpha": repr(self.alpha)}
        metadata |= {
            f"{name}::shape": f"{s.out_features},{s.in_features},{int(s.bias)}" for name, s in self.shapes.items()
        }
        save_safetensors({n: t.contiguous() for n, t in self._tensors().items()}, path, metadata)

    @classmethod
    def load(cls, path: Path) -> ExactPreconditioner:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
            tensors = {n: handle.get_tensor(n) for n in handle.keys()}  # noqa: SIM118 (not a dict)
        shapes = {}
        for key, value in meta.items():
            if key.endswith("::shape"):
                out_features, in_features, bias = (int(v) for v in value.split(","))
                shapes[key.removesuffix("::shape")] = LayerShape(out_features, in_features, bool(bias))
        layers = {
            name: LayerCurvature(
                tensors[f"{name}::u_out"],
                tensors[f"{name}::u_in"],
                tensors[f"{name}::eigenvalues"],
                float(tensors[f"{name}::damping"][0]),
            )
            for name in shapes
        }
        return cls(meta["kind"], float(meta["alpha"]), layers, shapes)


def kfac_bases(
    activations: dict[str, torch.Tensor],
    gradients: dict[str, torch.Tensor],
    traces: dict[str, torch.Tensor],
    count: int,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{layer: (U_S, U_A, KFAC eigenvalues s_i a_j rescaled to E‖G‖²)} from the factor sums over `count` examples."""
    if count == 0:
        raise AttribIndexError("cannot compute a Hessian from zero examples; the corpus produced no gradients.")
    bases = {}
    for name, activation_sum in activations.items():
        a, u_in = torch.linalg.eigh(activation_sum / count)  # (n_in',), (n_in', n_in')
        s, u_out = torch.linalg.eigh(gradients[name] / count)  # (n_out,), (n_out, n_out)
        product = torch.outer(s.clamp_min(0), a.clamp_min(0))  # (n_out, n_in')
        total, trace = float(product.sum()), float(traces[name]) / count
        bases[name] = (u_out, u_in, product * (trace / total) if total > 0 else product)
    return bases


def fit_exact_preconditioner(
    kind: str,
    bases: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    shapes: dict[str, LayerShape],
    alpha: float,
    corrected: dict[str, torch.Tensor] | None,
    dtype: torch.dtype,
) -> ExactPreconditioner:
    """The preconditioner from `kfac_bases`, with EK-FAC's `corrected` eigenvalues (E[(U_Sᵀ G U_A)²]) when
    `kind` is ekfac; tensors are kept in `dtype` (float64 for exactness tests, float32 otherwise)."""
    if (kind == "ekfac") != (corrected is not None):
        raise ValueError("ekfac needs the corrected eigenvalues, and kfac takes none.")
    layers = {}
    for name, (u_out, u_in, eigenvalues) in bases.items():
        clamped, lam, _ = relative_damping(corrected[name] if corrected is not None else eigenvalues, alpha)
        layers[name] = LayerCurvature(u_out, u_in, clamped, lam)
    return ExactPreconditioner(kind, alpha, layers, shapes).to("cpu", dtype)
