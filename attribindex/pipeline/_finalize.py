"""The last stage of a build or merge: from curvature sums and written chunks to a complete folder.

An index gets its preconditioner (fitted once), its FAISS segment and its manifest; a shard keeps rows and
curvature sums only, for a merge to finalize. The manifest is written last: it is the commit point.
"""

from __future__ import annotations

from pathlib import Path

from attribindex.config import BuildConfig
from attribindex.hessian import CurvatureSums, fit_preconditioner
from attribindex.logra import GradientExtractor
from attribindex.pipeline._exact import fit_exact
from attribindex.pipeline._write_segments import raw_blocks, write_segment
from attribindex.store import (
    BuildEvent,
    BuildRequest,
    ChunkRecord,
    CurvatureRecord,
    DeletedRecord,
    HessianRecord,
    IndexManifest,
    IndexRecord,
    Manifest,
    ManifestHeader,
    MergeEvent,
    RowStore,
    ShardManifest,
    ShardSlice,
    StoreRecord,
    file_records,
    layout,
    with_index_id,
    write_manifest,
)


def commit_build(out: Path, manifest: Manifest) -> Manifest:
    """Give `manifest` its id and write it (from here on the folder is complete), then drop the build marker."""
    manifest = with_index_id(manifest)
    write_manifest(out, manifest)
    (out / layout.BUILD_MARKER).unlink(missing_ok=True)
    return manifest


def _store_record(config: BuildConfig, chunks: list[ChunkRecord]) -> StoreRecord:
    return StoreRecord(dtype=config.store.dtype, chunk_rows=config.store.chunk_rows, chunks=tuple(chunks))


def finalize_index(
    out: Path,
    config: BuildConfig,
    header: ManifestHeader,
    curvature: CurvatureSums,
    chunks: list[ChunkRecord],
    event: BuildEvent | MergeEvent,
    progress: bool,
    extractor: GradientExtractor | None = None,
) -> IndexManifest:
    """Fit the preconditioner once, write the FAISS segment over every chunk, then the manifest (last). With the
    config's exact section, also the exact preconditioner (its EK-FAC correction runs the model of `extractor`)."""
    store = RowStore(out, header.block_dims, config.store.dtype, chunks)
    exact = None
    if config.exact.enabled:
        if extractor is None:
            raise ValueError("the exact section needs the model: pass `extractor`.")
        exact = fit_exact(out, config.exact, curvature, store, extractor, config.extract.batch_size, progress)
    preconditioner = fit_preconditioner(
        config.hessian.kind,
        curvature,
        header.module_names,
        header.block_dims,
        config.hessian.damping,
        lambda: raw_blocks(store, progress=progress),
    )
    preconditioner.save(out / layout.PRECONDITIONER)
    segment = write_segment(out, store, preconditioner, config.index, config.index.mode, progress)
    exact_files = (exact.file,) if exact is not None else ()
    hessian = HessianRecord(
        kind=preconditioner.kind,
        damping=config.hessian.damping,
        examples=curvature.count,
        preconditioner_hash=preconditioner.hash(),
        file=layout.PRECONDITIONER,
        curvature_file=layout.CURVATURE,
        modules=dict(preconditioner.stats),
    )
    manifest = IndexManifest(
        **header.shared(),
        rows=store.rows,
        hessian=hessian,
        normalization=config.index.mode,
        store=_store_record(config, chunks),
        index=IndexRecord(kind=config.index.kind, segments=(segment,), operating_point=None),
        deleted=DeletedRecord(file=None, rows=0),
        version=1,
        files=file_records(
            out, (layout.PROJECTIONS, layout.CURVATURE, layout.PRECONDITIONER, segment.file, *exact_files)
        ),
        log=(event,),
        exact=exact,
    )
    return commit_build(out, manifest)


def finalize_shard(
    out: Path,
    config: BuildConfig,
    header: ManifestHeader,
    request: BuildRequest,
    curvature: CurvatureSums,
    chunks: list[ChunkRecord],
    shard: ShardSlice,
    event: BuildEvent,
) -> ShardManifest:
    """A shard keeps its rows and curvature sums; the preconditioner and index are made once, by the merge."""
    manifest = ShardManifest(
        **header.shared(),
        request=request,
        shard=shard,
        rows=sum(chunk.rows for chunk in chunks),
        curvature=CurvatureRecord(examples=curvature.count, file=layout.CURVATURE),
        store=_store_record(config, chunks),
        files=file_records(out, (layout.PROJECTIONS, layout.CURVATURE)),
        log=(event,),
    )
    return commit_build(out, manifest)
