"""A build split into N shards over the processes of a `torchrun` launch (or all in this process), then merged.

Rank r builds shards r, r + W, r + 2W, … (W = WORLD_SIZE) into `OUT/shards/IIIII-of-NNNNN`, each one
resumable; the ranks then compare notes over a gloo process group (errors, projection hashes), and
rank 0 merges the shards into OUT. Without torchrun (no WORLD_SIZE) the one process builds every shard.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from attribindex._records import first_difference, to_json
from attribindex.config import BuildConfig
from attribindex.data import Corpus, shard_window
from attribindex.errors import AttribIndexError, IndexMismatchError
from attribindex.pipeline._merge import check_shards, merge_into
from attribindex.pipeline._output import ModelCache, build_request, prepare_output
from attribindex.pipeline._ranks import Ranks
from attribindex.pipeline._single import build_folder
from attribindex.pipeline._summary import BuildSummary, MergeSummary
from attribindex.store import BuildRequest, IndexManifest, ShardSlot, layout, read_manifest


def build_sharded(
    config: BuildConfig,
    model: str,
    corpus: Corpus,
    out: Path,
    num_shards: int,
    overwrite: bool,
    skip_empty: bool,
    progress: bool,
    keep_shards: bool,
) -> BuildSummary:
    """See `build_index(num_shards=N)`. Every rank returns a summary; rank 0's describes the merged index."""
    started = time.perf_counter()
    if num_shards < 1:
        raise AttribIndexError(f"`num_shards` must be >= 1, got {num_shards}.")
    ranks = Ranks()
    try:
        request = build_request(config, model, corpus, skip_empty, num_shards=num_shards)
        error = _prepare(out, overwrite, request, corpus) if ranks.rank == 0 else None
        error = ranks.broadcast_from_first(error)
        if error:
            raise AttribIndexError(error)

        mine = list(range(ranks.rank, num_shards, ranks.size))
        error, resumed = None, 0
        try:
            resumed = _build_my_shards(config, model, corpus, out, num_shards, mine, skip_empty, progress, ranks)
        except AttribIndexError as err:
            error = f"shard build failed on rank {ranks.rank}: {err}"
        reports = ranks.gather({"error": error, "resumed": resumed})
        errors = [r["error"] for r in reports if r["error"]]
        if errors:
            raise AttribIndexError(errors[0])
        shards_root = out / layout.SHARDS_DIR
        folders = [shards_root / layout.shard_dir_name(i, num_shards) for i in range(num_shards)]
        manifests = [read_manifest(folder, kind="shard") for folder in folders]
        hashes = ranks.gather(sorted({m.projection.hash for i, m in enumerate(manifests) if i in mine}))
        if len({h for rank_hashes in hashes for h in rank_hashes}) > 1:
            raise IndexMismatchError(
                f"the ranks generated different projections ({hashes}); they must be identical by construction. "
                f"Check that every rank runs the same attribindex, numpy and config."
            )
        extract_seconds = time.perf_counter() - started
        outcome: BuildSummary | str | None = None
        if ranks.rank == 0:
            try:
                merged = merge_into(out, check_shards(folders, manifests), progress)
                if not keep_shards:
                    shutil.rmtree(out / layout.SHARDS_DIR)
                outcome = _summary(merged, read_manifest(out), extract_seconds, started, reports, ranks.size)
            except AttribIndexError as err:  # every rank must leave the same way, or the others wait forever
                outcome = str(err)
        outcome = ranks.broadcast_from_first(outcome)
        if isinstance(outcome, str):
            raise AttribIndexError(outcome)
        return outcome
    finally:
        ranks.close()


def _summary(
    merged: MergeSummary,
    manifest: IndexManifest,
    extract_seconds: float,
    started: float,
    reports: list[dict],
    processes: int,
) -> BuildSummary:
    return BuildSummary(
        out=merged.out,
        index_id=merged.index_id,
        rows=merged.rows,
        skipped=manifest.corpus.skipped_empty,
        truncated=manifest.corpus.truncated,
        tokens=manifest.corpus.tokens,
        dim=manifest.dim,
        modules=len(manifest.modules),
        extract_seconds=extract_seconds,
        total_seconds=time.perf_counter() - started,
        bytes_on_disk=merged.bytes_on_disk,
        resumed_rows=sum(r["resumed"] for r in reports),
        kind=f"index of {len(merged.shard_rows)} shards on {processes} process{'es' if processes > 1 else ''}",
        merge=merged,
    )


def _prepare(out: Path, overwrite: bool, request: BuildRequest, corpus: Corpus) -> str | None:
    """Rank 0 readies the output folder; the error message (if any) is broadcast so every rank stops cleanly."""
    try:
        next(iter(corpus))  # a bad path, field or encoding fails now, once
        for index in range(request.num_shards):  # so does an empty shard
            shard_window(corpus, request.num_shards, index)
        prepare_output(out, overwrite, request)
    except AttribIndexError as err:
        return str(err)
    return None


def _build_my_shards(
    config: BuildConfig,
    model: str,
    corpus: Corpus,
    out: Path,
    num_shards: int,
    mine: list[int],
    skip_empty: bool,
    progress: bool,
    ranks: Ranks,
) -> int:
    """Build (or resume, or keep when already finished) this rank's shards; rows resumed in all."""
    models = ModelCache()
    resumed = 0
    for index in mine:
        folder = out / layout.SHARDS_DIR / layout.shard_dir_name(index, num_shards)
        slot = ShardSlot(index=index, count=num_shards)
        if layout.is_index_dir(folder):
            finished = read_manifest(folder, kind="shard")
            expected = build_request(config, model, corpus, skip_empty, shard=slot)
            if first_difference(to_json(finished.request), to_json(expected)) is None:
                resumed += finished.rows
                continue
            raise AttribIndexError(
                f"{folder} holds a finished shard of a different build. Pass `overwrite=True` to start over."
            )
        label = f"rank {ranks.rank} shard {index}/{num_shards}" if ranks.size > 1 else f"shard {index}/{num_shards}"
        summary = build_folder(
            config,
            model,
            corpus,
            folder,
            False,
            skip_empty,
            progress,
            slot,
            models,
            label,
            position=ranks.rank if ranks.size > 1 else None,
        )
        resumed += summary.resumed_rows
    return resumed
