"""Merging shards into one index: validate that they belong together, sum curvature, whiten once, index.

Merging streams: memory holds the curvature sums and one chunk, whatever the number of rows. Chunk
files are hard-linked into the index (copied when the shards are on another filesystem), so a merge
costs one read of the rows to write the FAISS index, plus one read to verify checksums.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

from attribindex._progress import progress as progress_bar
from attribindex._records import first_difference, to_json
from attribindex._version import __version__
from attribindex.config import rows_settings
from attribindex.errors import AttribIndexError, resource_failures
from attribindex.hessian import CurvatureSums
from attribindex.pipeline._exact import model_extractor
from attribindex.pipeline._finalize import finalize_index
from attribindex.pipeline._output import bytes_on_disk, now, prepare_output
from attribindex.pipeline._summary import MergeSummary
from attribindex.store import (
    ChunkRecord,
    MergedShard,
    MergeEvent,
    MergeRequest,
    ShardManifest,
    TrainingRecord,
    atomic_path,
    layout,
    read_manifest,
    verify_files,
)

Shard = tuple[Path, ShardManifest]  # a shard folder and its manifest


_MUST_AGREE = (  # batch size and device may differ between the machines that built the shards; nothing else may
    ("format version", lambda m: m.format_version),
    ("model fingerprint", lambda m: m.model.fingerprint),
    ("projection hash", lambda m: m.projection.hash),
    ("modules", lambda m: [[x.name, x.dim] for x in m.modules]),
    ("store dtype", lambda m: m.store.dtype),
    ("config", lambda m: rows_settings(m.config)),
    (
        "corpus",
        lambda m: {k: v for k, v in to_json(m.corpus).items() if k in ("description", "text_field", "id_field")},
    ),
    ("shard count", lambda m: m.shard.count),
)


def check_shards(folders: list[Path], manifests: list[ShardManifest]) -> list[Shard]:
    """The shards in index order, after checking that they come from one build and cover the corpus once.

    Raises with a message naming the first disagreement.
    """
    first, reference = folders[0], manifests[0]
    for folder, manifest in zip(folders[1:], manifests[1:]):
        for what, value in _MUST_AGREE:
            difference = first_difference(value(reference), value(manifest))
            if difference:
                where, ours, theirs = difference
                raise AttribIndexError(
                    f"shards {first} and {folder} disagree on the {what} ({where + ': ' if where else ''}{ours!r} in "
                    f"{first}, {theirs!r} in {folder}). All shards must come from one build command; rebuild the odd one."
                )
    count = reference.shard.count
    by_index: dict[int, Shard] = {}
    for folder, manifest in zip(folders, manifests):
        index = manifest.shard.index
        if index in by_index:
            raise AttribIndexError(
                f"{by_index[index][0]} and {folder} are both shard {index} of {count} (overlapping slices). "
                f"Pass each shard once."
            )
        by_index[index] = (folder, manifest)
    missing = [i for i in range(count) if i not in by_index]
    if missing:
        raise AttribIndexError(
            f"shard {missing[0]} of {count} is missing ({len(missing)} missing in all). Build it "
            f"(`num_shards={count}, shard_index={missing[0]}`) and merge again."
        )
    ordered = [by_index[i] for i in range(count)]
    expected_start = 0
    for folder, manifest in ordered:
        start, stop = manifest.shard.documents
        if start != expected_start:
            raise AttribIndexError(
                f"{folder} covers documents [{start}, {stop}) but the shards before it end at {expected_start}: "
                f"the shards were cut from corpora of different lengths (check `limit`). Rebuild them with one command."
            )
        expected_start = stop
        if manifest.curvature.examples != manifest.rows:
            raise AttribIndexError(
                f"{folder} holds {manifest.rows} rows but curvature sums over {manifest.curvature.examples}; "
                f"the shard is damaged. Rebuild it."
            )
    return ordered


def _verify(shards: list[Shard], progress: bool) -> None:
    total = sum(record.bytes for _, manifest in shards for _, record in manifest.recorded_files())
    with progress_bar(total=total, desc="verify", unit="B", unit_scale=True, enabled=progress) as bar:
        for folder, manifest in shards:
            report = verify_files(folder, manifest, progress=bar.update)
            if not report.ok:
                name, problem = report.damaged[0]
                raise AttribIndexError(
                    f"shard file {folder / name} is damaged ({problem}); {len(report.damaged)} damaged file(s) in "
                    f"{folder}. Rebuild that shard (or restore the files) and merge again."
                )


def merge_shards(
    shard_dirs: list[str | Path], out: str | Path, *, overwrite: bool = False, progress: bool = True
) -> MergeSummary:
    """Merge the shards of one build (`build_index(..., num_shards=N, shard_index=i)`) into a searchable index.

    The result equals a single-process build over the whole corpus: same rows in the same order,
    same curvature sums (up to fp64 round-off of summation order), one preconditioner.

    Example:
        >>> from attribindex import merge_shards
        >>> print(merge_shards(["shards/0", "shards/1", "shards/2"], "my-index").format())  # doctest: +SKIP
    """
    folders = [Path(d) for d in shard_dirs]
    if not folders:
        raise AttribIndexError("give at least one shard folder to merge.")
    shards = check_shards(folders, [read_manifest(folder, kind="shard") for folder in folders])
    out = Path(out)
    request = MergeRequest(merge=tuple(str(folder.resolve()) for folder, _ in shards))
    with resource_failures(out, then="the merge starts again (the shards are left as they are)"):
        prepare_output(out, overwrite, request)  # an interrupted merge of the same shards simply starts again
        return merge_into(out, shards, progress)


def _link_or_copy(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)  # shards are never modified in place (writes are renames), so sharing is safe
    except OSError:  # another filesystem, or no hard links there
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)


def merge_into(out: Path, shards: list[Shard], progress: bool) -> MergeSummary:
    """Verify checked shards and merge them into `out`, readied (and marked) by the caller; whatever a previous
    attempt left there goes first."""
    started = time.perf_counter()
    _verify(shards, progress)
    verify_seconds = time.perf_counter() - started
    for child in list(out.iterdir()):
        if child.name not in (layout.SHARDS_DIR, layout.BUILD_MARKER, layout.EXACT_CORRECTION):
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    chunks, curvature = _link_rows_and_sum_curvature(out, shards)
    curvature.save(out / layout.CURVATURE)
    _link_or_copy(shards[0][0] / layout.PROJECTIONS, out / layout.PROJECTIONS)

    reference = shards[0][1]
    totals = {key: sum(getattr(m.corpus, key) for _, m in shards) for key in ("skipped_empty", "truncated", "tokens")}
    created = now()
    header = dataclasses.replace(
        reference.header,
        created=created,
        attribindex_version=__version__,
        corpus=dataclasses.replace(reference.corpus, **totals),
        training=_merged_training([m.training for _, m in shards]),
    )
    rows = sum(m.rows for _, m in shards)
    event = MergeEvent(
        rows=rows,
        time=created,
        shards=tuple(MergedShard(folder=str(f), rows=m.rows, documents=m.shard.documents) for f, m in shards),
    )
    extractor = model_extractor(out, header) if reference.config.exact.enabled else None
    manifest = finalize_index(out, reference.config, header, curvature, chunks, event, progress, extractor)
    return MergeSummary(
        out=out,
        index_id=manifest.index_id,
        shard_rows=[(str(folder), m.rows) for folder, m in shards],
        rows=rows,
        verify_seconds=verify_seconds,
        seconds=time.perf_counter() - started,
        bytes_on_disk=bytes_on_disk(out, exclude=layout.SHARDS_DIR),
    )


def _merged_training(records: list[TrainingRecord | None]) -> TrainingRecord | None:
    """The shards of a capture during multi-process training: each rank saw every step, and its own gradients."""
    if records[0] is None:
        return None
    return dataclasses.replace(
        records[0],
        steps=max(r.steps for r in records),
        first_step=min(r.first_step for r in records),
        last_step=max(r.last_step for r in records),
        gradients=sum(r.gradients for r in records),
    )


def _link_rows_and_sum_curvature(out: Path, shards: list[Shard]) -> tuple[list[ChunkRecord], CurvatureSums]:
    """The shards' chunks linked into `out/rows`, renumbered in shard order, and their curvature sums added."""
    (out / layout.ROWS_DIR).mkdir()
    chunks: list[ChunkRecord] = []
    curvature: CurvatureSums | None = None
    for folder, manifest in shards:
        for chunk in manifest.store.chunks:
            name = layout.chunk_name(len(chunks))
            for suffix in chunk.files:
                _link_or_copy(folder / layout.chunk_file(chunk.name, suffix), out / layout.chunk_file(name, suffix))
            chunks.append(dataclasses.replace(chunk, name=name))
        sums, _ = CurvatureSums.load(folder / layout.CURVATURE)
        if curvature is None:
            curvature = sums
        else:
            curvature.merge(sums)
    assert curvature is not None  # check_shards refuses an empty list
    return chunks, curvature
