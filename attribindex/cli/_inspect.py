"""`info` and `verify`: read what an index or shard holds, and check its files against its manifest."""

from __future__ import annotations

import json

import click

from attribindex.cli import _options as options
from attribindex.cli._base import Command


@click.command(cls=Command)
@options.index_dir
@options.as_json("Print the whole manifest as JSON.")
@click.option(
    "--search", "search_uri", default=None, metavar="URI", help="Also show what this Milvus collection holds."
)
@options.milvus_token
def info(index_dir, as_json, search_uri, milvus_token):
    """Summarise an index or shard: rows, dims, model, Hessian, sizes on disk (and a Milvus collection's state).

    \b
    Examples:
      attribindex info my-index
      attribindex info my-index --search milvus://10.0.0.5:19530/wiki
    """
    from attribindex._records import to_json
    from attribindex.store import IndexManifest, read_manifest

    manifest = read_manifest(index_dir, kind="any")
    if as_json:
        click.echo(json.dumps(to_json(manifest), indent=2))
        return
    sizes: dict[str, int] = {}
    for path in index_dir.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            top = path.relative_to(index_dir).parts[0]
            sizes[top] = sizes.get(top, 0) + path.stat().st_size
    modules = manifest.modules
    indexed = isinstance(manifest, IndexManifest)
    lines = [
        f"{'index' if indexed else 'shard':<13}{manifest.index_id}  (format v{manifest.read_from_version}"
        + (
            f", read as v{manifest.format_version}: its next change writes it so"
            if manifest.read_from_version != manifest.format_version
            else ""
        )
        + f", created {manifest.created})",
        f"rows         {manifest.live_rows if indexed else manifest.rows:,}  in {len(manifest.store.chunks)} chunks "
        f"({manifest.store.dtype})",
        f"vector       {manifest.dim:,} dims from {len(modules)} modules, rank {modules[0].rank_out}×{modules[0].rank_in}"
        f", {sum(m.bias for m in modules)} with their bias",
        f"model        {manifest.model.name_or_path} ({manifest.model.class_name})",
    ]
    if manifest.ensemble is not None:
        checkpoints = manifest.ensemble.checkpoints
        lines.append(
            f"ensemble     {len(checkpoints)} checkpoints, score = Σ weight × score: "
            + ", ".join(f"{c.name_or_path} (×{c.weight:g})" for c in checkpoints)
        )
    if manifest.training is not None:
        training = manifest.training
        lines.append(
            f"training     captured while training: {training.gradients:,} gradients over {training.steps:,} steps "
            f"({training.first_step}–{training.last_step}), rows {training.rows}"
        )
    lines += _index_lines(manifest) if indexed else _shard_lines(manifest)
    lines += [
        f"projection   seed {manifest.projection.seed}, {manifest.projection.hash[:23]}…",
        "on disk      " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(sizes.items())),
    ]
    if search_uri is not None and indexed:
        from attribindex.milvus._search import collection_summary

        lines += collection_summary(search_uri, manifest, manifest.deleted_rows(index_dir), milvus_token)
    click.echo("\n".join(lines))


def _shard_lines(manifest) -> list[str]:
    shard = manifest.shard
    start, stop = shard.documents
    return [
        f"slice        shard {shard.index} of {shard.count}: documents [{start:,}, {stop:,}) — "
        f"merge all {shard.count} with `attribindex merge`"
    ]


def _index_lines(manifest) -> list[str]:
    hessian, segments, deleted = manifest.hessian, manifest.index.segments, manifest.deleted.rows
    lines = [
        f"version      {manifest.version}  ({len(manifest.log)} events; --json shows the log)"
        + (f", {deleted:,} rows deleted (`attribindex compact` frees them)" if deleted else ""),
        f"hessian      {hessian.kind}, damping α={hessian.damping} over {hessian.examples:,} examples"
        + _spectrum(hessian.modules)
        + (
            f"; its curvature sums still count {hessian.retained_deleted:,} deleted examples "
            f"(token statistics are not stored per row: rebuild to drop them)"
            if hessian.retained_deleted
            else ""
        ),
        f"scores       {manifest.normalization}  ({len(segments)} segment{'s' if len(segments) > 1 else ''}: "
        f"{manifest.index.description})",
    ]
    exact = manifest.exact
    if exact is not None:
        sample = f", eigenvalues corrected on {exact.sample:,} examples" if exact.kind == "ekfac" else ""
        lines.append(
            f"exact        {exact.kind} unprojected, {exact.fisher} Fisher, damping α={exact.damping}, factors from "
            f"{exact.examples:,} examples{sample}; factors {exact.factor_bytes / 2**20:.1f} MiB; "
            f"`query --exact C` re-ranks the top-C"
        )
    point = manifest.index.operating_point
    if point:
        lines.append(
            f"operating    {point.settings}: recall@{point.k} {point.recall:.3f} at {point.ms_per_query:.2f} ms/query "
            f"(measured on {point.queries} queries, target {point.target})"
        )
    drift = hessian.drift
    if drift and drift.max > 0:
        lines.append(
            f"drift        whitening is {drift.median:.2%} (median), {drift.max:.2%} (max) from what the "
            f"current {drift.examples:,} examples imply; `attribindex refresh` re-whitens"
        )
    return lines


def _spectrum(stats: dict) -> str:
    """The median effective rank (Σe / max e) of the per-module Hessians: how many directions matter."""
    if not stats:
        return ""
    ranks = sorted(s.effective_rank for s in stats.values())
    return f"; median effective rank {ranks[len(ranks) // 2]:.1f} of {len(ranks)} module blocks"


@click.command(cls=Command)
@options.index_dir
def verify(index_dir):
    """Re-check every file of an index or shard against the checksums in its manifest.

    Exits with status 1 and lists the damaged files if any.

    \b
    Example:
      attribindex verify my-index
    """
    from attribindex._progress import progress
    from attribindex.store import read_manifest, verify_files

    manifest = read_manifest(index_dir, kind="any")
    total = sum(record.bytes for _, record in manifest.recorded_files())
    with progress(total=total, desc="verify", unit="B", unit_scale=True) as bar:
        report = verify_files(index_dir, manifest, progress=bar.update)
    for name, problem in report.damaged:
        click.echo(f"DAMAGED  {index_dir / name}: {problem}")
    verdict = "intact" if report.ok else f"{len(report.damaged)} damaged"
    click.echo(f"{index_dir}: {report.files} files, {report.bytes / 2**20:.1f} MiB checked, {verdict}")
    if not report.ok:  # the list is on stdout; stderr says what to do, and the exit status is 1
        files, them = ("file is", "it") if len(report.damaged) == 1 else ("files are", "them")
        raise click.ClickException(
            f"{len(report.damaged)} {files} damaged in {index_dir}. Restore {them} from a copy, or rebuild the index."
        )
