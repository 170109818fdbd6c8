"""The query side of a checkpoint ensemble (`build_ensemble`): each checkpoint's model with its own block of the
projections, their raw gradients side by side in the index's block order, and each checkpoint's weight over its
blocks."""

from __future__ import annotations

import dataclasses

import torch

from attribindex.config import ExtractConfig
from attribindex.data import TokenizedExample
from attribindex.errors import IndexMismatchError
from attribindex.logra import GradientExtractor, ProjectionSet
from attribindex.model import DTYPES, load_model, model_fingerprint
from attribindex.store import CheckpointRecord, IndexManifest

Member = tuple[CheckpointRecord, GradientExtractor]


def checkpoint_members(
    manifest: IndexManifest, projections: ProjectionSet, extract_config: ExtractConfig, dtype: str | None, device: str
) -> list[Member]:
    """Every checkpoint's model, checked against its recorded fingerprint, each with its own block of the
    projections."""
    members = []
    compute = DTYPES[dtype or extract_config.dtype]
    for checkpoint in manifest.ensemble.checkpoints:
        lm, tokenizer = load_model(checkpoint.name_or_path, dtype or extract_config.dtype, device)
        fingerprint = model_fingerprint(lm)
        if fingerprint != checkpoint.fingerprint:
            raise IndexMismatchError(
                f"checkpoint {checkpoint.name_or_path} differs from the one this ensemble was built with "
                f"(fingerprint {fingerprint[:19]}… instead of {checkpoint.fingerprint[:19]}…). Restore it, or "
                "rebuild the ensemble."
            )
        specs = [m for m in projections.modules if m.name.startswith(checkpoint.prefix)]
        member = ProjectionSet(
            [dataclasses.replace(m, name=m.name.removeprefix(checkpoint.prefix)) for m in specs],
            {m.name.removeprefix(checkpoint.prefix): projections.p_in[m.name] for m in specs},
            {m.name.removeprefix(checkpoint.prefix): projections.p_out[m.name] for m in specs},
        )
        extractor = GradientExtractor(lm, tokenizer, member, extract_config.max_length, compute)
        members.append((checkpoint, extractor))
    return members


def ensemble_raw(members: list[Member], group: list[TokenizedExample]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, D) raw projected gradients of tokenized queries at every checkpoint, side by side in the index's
    block order, and their (B,) losses under the last checkpoint."""
    blocks, losses = [], None
    for _, extractor in members:
        extracted = extractor.extract(group)
        blocks.append(extracted.concatenated([m.name for m in extractor.projections.modules]))
        losses = extracted.losses
    return torch.cat(blocks, dim=1), losses


def checkpoint_weights(manifest: IndexManifest) -> torch.Tensor:
    """(D,) each checkpoint's weight over its blocks: the query side of Σ_k w_k ⟨W_k g_q, W_k g_n⟩."""
    weights = {c.prefix: c.weight for c in manifest.ensemble.checkpoints}
    return torch.cat([torch.full((m.dim,), weights[m.name.split("/", 1)[0] + "/"]) for m in manifest.modules])
