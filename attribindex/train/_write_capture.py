"""Writing a capture's index once training is done: its manifest header, and the index itself, from one process,
from the ranks' shards merged (rows="per_step" under torchrun), or from every rank's sums added up on rank 0
(rows="summed": an example's steps may fall on several ranks). Every rank leaves the same way."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from attribindex.config import BuildConfig
from attribindex.errors import AttribIndexError
from attribindex.logra import ProjectionSet, SecondMomentScales
from attribindex.pipeline._finalize import finalize_index, finalize_shard
from attribindex.pipeline._merge import check_shards, merge_into
from attribindex.pipeline._output import manifest_header
from attribindex.pipeline._ranks import Ranks
from attribindex.store import (
    BuildRequest,
    CorpusRecord,
    ManifestHeader,
    ShardSlice,
    TrainingRecord,
    layout,
    read_manifest,
)
from attribindex.train._captured_rows import CapturedRows


@dataclass
class CaptureTarget:
    """Where this process writes: the index (`out`), or under torchrun its rank's shard folder (`folder`)."""

    out: Path
    folder: Path
    config: BuildConfig
    request: BuildRequest
    started: str  # when the capture began (its build marker's time)
    ranks: Ranks


def capture_header(
    *,
    started: str,
    model: nn.Module,
    model_path: str,
    tokenizer,
    config: BuildConfig,
    description: str,
    projections: ProjectionSet,
    optimizer_moments: SecondMomentScales | None,
    rows: CapturedRows,
) -> ManifestHeader:
    """The manifest header of a captured index: the training steps and counts come from `rows`."""
    steps = sorted(rows.steps_seen)
    corpus = CorpusRecord(
        description=description,
        text_field="text",
        id_field="id",
        skipped_empty=rows.no_loss,
        truncated=0,
        tokens=rows.tokens,
    )
    training = TrainingRecord(
        rows=rows.rows_mode,
        steps=len(steps),
        first_step=steps[0] if steps else 0,
        last_step=steps[-1] if steps else 0,
        gradients=rows.gradients,
    )
    return manifest_header(
        config, model_path, model, tokenizer, projections, optimizer_moments, corpus, started, training=training
    )


def write_capture(target: CaptureTarget, rows: CapturedRows, header: Callable[[], ManifestHeader]) -> None:
    """Write the index into `target.out` (`header`: the manifest header, made once the rows are complete)."""
    if target.ranks.size == 1:
        _write(target, rows, header, finalize=True)
    elif rows.rows_mode == "per_step":
        _merge_shards(target, rows, header)
    else:
        _sum_over_ranks(target, rows, header)


def _write(target: CaptureTarget, rows: CapturedRows, header: Callable[[], ManifestHeader], finalize: bool) -> None:
    """Write the remaining rows and the curvature sums into this process's folder, then the index (`finalize`) or
    this rank's shard."""
    event = rows.finish(target.started)
    config, curvature, chunks = target.config, rows.curvature, rows.chunks
    if finalize:
        finalize_index(target.out, config, header(), curvature, chunks, event, progress=False)
    else:
        window = ShardSlice(index=target.ranks.rank, count=target.ranks.size, documents=(0, 0))  # no corpus slice
        finalize_shard(target.folder, config, header(), target.request, curvature, chunks, window, event)


def _sum_over_ranks(target: CaptureTarget, rows: CapturedRows, header: Callable[[], ManifestHeader]) -> None:
    """rows="summed" under torchrun: every rank's sums (rows per example, curvature, counts) go to rank 0, which
    adds them up and writes the index into `out` (its own folder); every rank leaves the same way."""
    ranks = target.ranks
    everyone = ranks.gather_to_first(rows.sums())
    error = None
    if ranks.rank == 0:
        try:
            for other in everyone[1:]:
                rows.add_sums(other)
            _write(target, rows, header, finalize=True)
            shutil.rmtree(target.out / layout.SHARDS_DIR, ignore_errors=True)  # the other ranks' commit folders
        except AttribIndexError as err:
            error = str(err)
    error = ranks.broadcast_from_first(error)
    if error:
        raise AttribIndexError(error)


def _merge_shards(target: CaptureTarget, rows: CapturedRows, header: Callable[[], ManifestHeader]) -> None:
    """rows="per_step" under torchrun: each rank writes its shard; rank 0 merges them into the index, and every
    rank leaves the same way."""
    ranks = target.ranks
    error = None
    try:
        _write(target, rows, header, finalize=False)
    except AttribIndexError as err:
        error = f"rank {ranks.rank}: {err}"
    errors = [e for e in ranks.gather(error) if e]
    if errors:
        raise AttribIndexError(errors[0])
    if ranks.rank == 0:
        try:
            root = target.out / layout.SHARDS_DIR
            folders = [root / layout.shard_dir_name(i, ranks.size) for i in range(ranks.size)]
            shards = check_shards(folders, [read_manifest(folder, kind="shard") for folder in folders])
            merge_into(target.out, shards, progress=False)
            shutil.rmtree(root)
        except AttribIndexError as err:
            error = str(err)
    error = ranks.broadcast_from_first(error)
    if error:
        raise AttribIndexError(error)
