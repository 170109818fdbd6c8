"""Per-module projected empirical Fisher, accumulated as fp64 sums so shards add up exactly."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from attribindex.store import atomic_path


class CurvatureSums:
    """Σ g gᵀ per module (fp64) and the number of examples summed.

    Sums from disjoint slices of a corpus merge by addition (`merge`), exactly.

    Example:
        >>> sums = CurvatureSums({"fc": 4})
        >>> sums.update({"fc": torch.ones(3, 4)})
        >>> sums.count, float(sums.sums["fc"][0, 0])
        (3, 3.0)
    """

    def __init__(self, block_dims: dict[str, int], count: int = 0, sums: dict[str, torch.Tensor] | None = None):
        self.count = count
        self.sums = (
            sums if sums is not None else {n: torch.zeros(d, d, dtype=torch.float64) for n, d in block_dims.items()}
        )

    def update(self, blocks: dict[str, torch.Tensor]) -> None:
        """Add the outer products of a batch of per-example gradients, blocks[name] of shape (B, d)."""
        batch = 0
        for name, total in self.sums.items():
            g = blocks[name].detach().to(device="cpu", dtype=torch.float64)  # (B, d)
            total.addmm_(g.T, g)  # (d, d)
            batch = g.shape[0]
        self.count += batch

    def remove(self, blocks: dict[str, torch.Tensor]) -> None:
        """Subtract the outer products of rows that leave the index (deleted documents), blocks[name] (B, d)."""
        batch = 0
        for name, total in self.sums.items():
            g = blocks[name].detach().to(device="cpu", dtype=torch.float64)  # (B, d)
            total.addmm_(g.T, g, alpha=-1.0)  # (d, d)
            batch = g.shape[0]
        self.count -= batch

    def merge(self, other: CurvatureSums) -> None:
        for name, total in self.sums.items():
            total.add_(other.sums[name])
        self.count += other.count

    def save(self, path: Path, note: dict | None = None) -> None:
        """Write atomically; `note` is a JSON record kept with the sums (a build stores its resume state there,
        so sums and state are committed together by one rename)."""
        metadata = {"count": str(self.count)} | ({"note": json.dumps(note)} if note is not None else {})
        with atomic_path(path) as tmp:
            save_file({n: t.contiguous() for n, t in self.sums.items()}, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: Path) -> tuple[CurvatureSums, dict | None]:
        """(sums, note) from a file written by `save`."""
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        note = json.loads(metadata["note"]) if "note" in metadata else None
        return cls({}, count=int(metadata["count"]), sums=load_file(str(path))), note
