"""Curvature statistics in the projected space, accumulated as fp64 sums so shards add up exactly.

What is kept depends on the Hessian kind:

- `raw`: per module the d×d sum Σ_n g_n g_nᵀ of projected per-example gradients (d = k_out·k_in).
- `kfac` / `ekfac`: per module the Kronecker factors Σ_n Σ_t x̃ x̃ᵀ (k_in×k_in, projected layer inputs) and
  Σ_n Σ_t δ̃ δ̃ᵀ (k_out×k_out, projected output gradients), summed over each example's tokens. They cost
  k_in² + k_out² numbers per module instead of (k_in·k_out)², which is what makes rank 64+ per side affordable.
- `identity`: only the count (nothing is whitened, so nothing is summed).

With the config's `exact` section, any kind also keeps the unprojected factors of each layer, Σ_n Σ_t x̄ x̄ᵀ
(n_in' × n_in', x̄ = [x, 1] with a bias), Σ_n Σ_t δ δᵀ (n_out × n_out) and Σ_n ‖G_n‖² (`attribindex.exact`),
in the same file, so they resume, merge and grow with appends exactly as the projected sums do. Those sums run
over a seeded sample of the examples (`exact.factor_sample`, counted in `exact_examples`), weighted to estimate
the sums over all of them.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from attribindex.store import atomic_path, write_safetensors

FACTOR_KINDS = ("kfac", "ekfac")  # Hessian kinds that need the Kronecker factor sums
_ACTIVATIONS = "::activations"
_GRADIENTS = "::gradients"
_TRACE = "::trace"
_EXACT_ACTIVATIONS = "::exact_activations"
_EXACT_GRADIENTS = "::exact_gradients"
_EXACT_TRACE = "::exact_trace"


def factor_width(shape: tuple[int, int]) -> int:
    """Numbers one example contributes to a module's factor sums: k_in² + k_out² for shape (k_out, k_in)."""
    k_out, k_in = shape
    return k_in * k_in + k_out * k_out


class CurvatureSums:
    """Per-module curvature sums (fp64) and the number of examples summed.

    `sums[name]` is Σ g gᵀ (d×d) when gradient sums are kept; `activations[name]` (k_in×k_in) and
    `gradients[name]` (k_out×k_out) are the Kronecker factor sums when factors are kept, with `traces[name]`
    = Σ ‖g‖² (which fixes the factors' overall scale, see `Preconditioner.kronecker`). Sums from disjoint
    slices of a corpus merge by addition (`merge`), exactly.

    Example:
        >>> sums = CurvatureSums({"fc": 4})
        >>> sums.update({"fc": torch.ones(3, 4)})
        >>> sums.count, float(sums.sums["fc"][0, 0])
        (3, 3.0)
        >>> factors = CurvatureSums.for_kind("kfac", ["fc"], [(2, 2)])
        >>> factors.tracks_factors, factors.factor_shapes
        (True, {'fc': (2, 2)})
    """

    def __init__(
        self,
        block_dims: dict[str, int] | None = None,
        count: int = 0,
        sums: dict[str, torch.Tensor] | None = None,
        factor_shapes: dict[str, tuple[int, int]] | None = None,
        retained_deleted: int = 0,
        exact_shapes: dict[str, tuple[int, int]] | None = None,
        device: str = "cpu",  # "meta": the same tensors' shapes and dtypes, nothing allocated (a build's plan)
        exact_examples: int = 0,
    ):
        self.count = count
        self.exact_examples = exact_examples  # examples whose tokens the exact factors summed (their sample)
        # Deleted examples whose token statistics could not be subtracted (factor sums keep no per-example part).
        self.retained_deleted = retained_deleted
        if sums is None:
            zeros = partial(torch.zeros, dtype=torch.float64, device=device)
            sums = {n: zeros(d, d) for n, d in (block_dims or {}).items()}
            for name, (k_out, k_in) in (factor_shapes or {}).items():
                sums[name + _ACTIVATIONS] = zeros(k_in, k_in)
                sums[name + _GRADIENTS] = zeros(k_out, k_out)
                sums[name + _TRACE] = zeros(1)
            for name, (n_out, n_in) in (exact_shapes or {}).items():
                sums[name + _EXACT_ACTIVATIONS] = zeros(n_in, n_in)
                sums[name + _EXACT_GRADIENTS] = zeros(n_out, n_out)
                sums[name + _EXACT_TRACE] = zeros(1)
        self.tensors = sums
        self.sums = {n: t for n, t in sums.items() if "::" not in n}
        self.activations = {n.removesuffix(_ACTIVATIONS): t for n, t in sums.items() if n.endswith(_ACTIVATIONS)}
        self.gradients = {n.removesuffix(_GRADIENTS): t for n, t in sums.items() if n.endswith(_GRADIENTS)}
        self.traces = {n.removesuffix(_TRACE): t for n, t in sums.items() if n.endswith(_TRACE)}
        self.exact_activations = _with_suffix(sums, _EXACT_ACTIVATIONS)
        self.exact_gradients = _with_suffix(sums, _EXACT_GRADIENTS)
        self.exact_traces = _with_suffix(sums, _EXACT_TRACE)

    @classmethod
    def for_kind(
        cls,
        kind: str,
        names: list[str],
        shapes: list[tuple[int, int]],
        exact_shapes: dict[str, tuple[int, int]] | None = None,
        device: str = "cpu",
    ) -> CurvatureSums:
        """Empty sums holding what Hessian `kind` needs; `shapes` are the modules' (k_out, k_in). With
        `exact_shapes` ({name: (n_out, n_in')}), also the unprojected factors of the exact section. `device="meta"`
        gives their shapes without allocating them."""
        if kind in FACTOR_KINDS:
            return cls(factor_shapes=dict(zip(names, shapes)), exact_shapes=exact_shapes, device=device)
        if kind == "identity":
            return cls(exact_shapes=exact_shapes, device=device)
        dims = {name: k_out * k_in for name, (k_out, k_in) in zip(names, shapes)}
        return cls(dims, exact_shapes=exact_shapes, device=device)

    @property
    def tracks_exact(self) -> bool:
        """True when the unprojected factors of the exact section are kept."""
        return bool(self.exact_activations)

    @property
    def tracks_factors(self) -> bool:
        return bool(self.activations)

    @property
    def factor_shapes(self) -> dict[str, tuple[int, int]]:
        return {n: (self.gradients[n].shape[0], a.shape[0]) for n, a in self.activations.items()}

    def update(
        self,
        blocks: dict[str, torch.Tensor],
        factors: dict[str, torch.Tensor] | None = None,
        exact: dict | None = None,
    ) -> None:
        """Add a batch of examples: `blocks[name]` (B, d) projected gradients, and when factors are kept,
        `factors[name]` (B, k_in² + k_out²): per example the flattened token sums [Σ x̃x̃ᵀ, Σ δ̃δ̃ᵀ]. When the
        exact section's factors are kept, `exact[name]` is the same examples' `attribindex.exact.FactorBatch`."""
        batch = next(iter(blocks.values())).shape[0]
        for name, total in self.sums.items():
            g = blocks[name].detach().to(device="cpu", dtype=torch.float64)  # (B, d)
            total.addmm_(g.T, g)  # (d, d)
        if self.tracks_factors:
            if factors is None:
                raise ValueError("these curvature sums keep Kronecker factors; pass the per-example factor rows.")
            for name, activations in self.activations.items():
                summed = factors[name].detach().to(device="cpu", dtype=torch.float64).sum(dim=0)  # (k_in² + k_out²,)
                activations.add_(summed[: activations.numel()].view_as(activations))
                self.gradients[name].add_(summed[activations.numel() :].view_as(self.gradients[name]))
                self.traces[name] += blocks[name].detach().to(device="cpu", dtype=torch.float64).square().sum()
        if self.tracks_exact:
            if exact is None:
                raise ValueError(
                    "these curvature sums keep the exact section's factors; pass them (empty: none of the batch was sampled)."
                )
            for name, activations in self.exact_activations.items() if exact else ():
                activations.add_(exact[name].activations.cpu())
                self.exact_gradients[name].add_(exact[name].gradients.cpu())
                self.exact_traces[name].add_(exact[name].trace.cpu())
            self.exact_examples += next(iter(exact.values())).examples if exact else 0
        self.count += batch

    def remove(self, blocks: dict[str, torch.Tensor]) -> None:
        """Subtract rows that leave the index (deleted documents), blocks[name] (B, d).

        Gradient sums are exact after this. Kronecker factor sums cannot be: their per-example token
        statistics are not stored. They keep those examples, counted in `retained_deleted`.
        """
        batch = next(iter(blocks.values())).shape[0]
        if self.tracks_factors or self.tracks_exact:
            self.retained_deleted += batch
            return
        for name, total in self.sums.items():
            g = blocks[name].detach().to(device="cpu", dtype=torch.float64)  # (B, d)
            total.addmm_(g.T, g, alpha=-1.0)  # (d, d)
        self.count -= batch

    def merge(self, other: CurvatureSums) -> None:
        if set(self.tensors) != set(other.tensors):
            raise ValueError("curvature sums of different Hessian kinds or modules cannot be merged.")
        for name, total in self.tensors.items():
            total.add_(other.tensors[name])
        self.count += other.count
        self.exact_examples += other.exact_examples
        self.retained_deleted += other.retained_deleted

    def save(self, path: Path, note: dict | None = None) -> None:
        """Write atomically; `note` is a JSON record kept with the sums (a build stores its resume state there,
        so sums and state are committed together by one rename)."""
        metadata = {"count": str(self.count), "retained_deleted": str(self.retained_deleted)}
        metadata |= {"exact_examples": str(self.exact_examples)} if self.tracks_exact else {}
        metadata |= {"note": json.dumps(note)} if note is not None else {}
        # Spelled out (not save_safetensors) so crash tests can stop a checkpoint between its write and its rename.
        with atomic_path(path) as tmp:
            write_safetensors({n: t.contiguous() for n, t in self.tensors.items()}, tmp, metadata)

    @classmethod
    def load(cls, path: Path) -> tuple[CurvatureSums, dict | None]:
        """(sums, note) from a file written by `save`."""
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        note = json.loads(metadata["note"]) if "note" in metadata else None
        sums = cls(
            count=int(metadata["count"]),
            sums=load_file(str(path)),
            retained_deleted=int(metadata.get("retained_deleted", 0)),
            exact_examples=int(metadata.get("exact_examples", metadata["count"])),  # before sampling: every example
        )
        return sums, note


def _with_suffix(sums: dict[str, torch.Tensor], suffix: str) -> dict[str, torch.Tensor]:
    return {n.removesuffix(suffix): t for n, t in sums.items() if n.endswith(suffix)}
