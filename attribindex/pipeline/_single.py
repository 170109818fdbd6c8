"""One process builds one folder: a whole index, or one shard (i of n) of a sharded build. Resumable: the same
build run again on an interrupted folder continues from its last written chunk."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from attribindex.config import BuildConfig
from attribindex.data import Corpus, shard_window
from attribindex.errors import AttribIndexError
from attribindex.logra import (
    GradientExtractor,
)
from attribindex.model import DTYPES
from attribindex.pipeline._exact import ExactFactors, check_exact_memory
from attribindex.pipeline._extract import Extraction, extract, read_checkpoint, remove_temporaries
from attribindex.pipeline._finalize import finalize_index, finalize_shard
from attribindex.pipeline._output import (
    ModelCache,
    build_projections,
    build_request,
    bytes_on_disk,
    clear_folder,
    corpus_record,
    manifest_header,
    now,
    prepare_output,
)
from attribindex.pipeline._summary import BuildSummary
from attribindex.store import (
    BuildEvent,
    BuildRequest,
    IndexManifest,
    ManifestHeader,
    ResumedRecord,
    ShardSlice,
    ShardSlot,
    layout,
)


@dataclass
class _Extracted:
    """What the extraction pass left for finalizing: rows on disk, sums in memory, the manifest's header."""

    extraction: Extraction
    header: ManifestHeader
    event: BuildEvent
    extractor: GradientExtractor  # the model, for the exact section's correction pass


def build_folder(
    config: BuildConfig,
    model: str,
    corpus: Corpus,
    out: Path,
    overwrite: bool,
    skip_empty: bool,
    progress: bool,
    shard: ShardSlot | None,
    models: ModelCache,
    label: str = "extract",
    position: int | None = None,
) -> BuildSummary:
    """Build (or resume) a whole index in `out` (`shard=None`), or shard `shard`; `models` loads the model once
    for every folder this process builds."""
    started = time.perf_counter()
    if shard is not None:
        corpus = shard_window(corpus, shard.count, shard.index)
    next(iter(corpus))  # fail on a bad path, field or encoding now, before anything is written
    request = build_request(config, model, corpus, skip_empty, shard=shard)
    fresh = not out.exists() or (out.is_dir() and not any(out.iterdir()))  # a file is refused just below
    marker, resuming = prepare_output(out, overwrite, request)
    try:
        extracted = _extract_rows(
            config, request, corpus, out, resuming, marker.started, models, progress, label, position
        )
    except AttribIndexError:
        if fresh and not (out / layout.CURVATURE).exists():  # bad input before any durable work: leave nothing
            clear_folder(out)
        raise
    state = extracted.extraction.state
    if shard is not None:
        window = ShardSlice(index=shard.index, count=shard.count, documents=(corpus.start, corpus.stop))
        manifest = finalize_shard(
            out,
            config,
            extracted.header,
            request,
            extracted.extraction.curvature,
            state.chunks,
            window,
            extracted.event,
        )
        kind = f"shard {shard.index} of {shard.count}"
    else:
        if not config.exact.enabled:
            models.release()  # the model is not needed for whitening and indexing (its weights are most of the memory)
        manifest = finalize_index(
            out,
            config,
            extracted.header,
            extracted.extraction.curvature,
            state.chunks,
            extracted.event,
            progress,
            extracted.extractor if config.exact.enabled else None,
        )
        models.release()
        kind = "index"
    indexed = isinstance(manifest, IndexManifest)
    return BuildSummary(
        out=out,
        index_id=manifest.index_id,
        rows=state.rows,
        skipped=state.skipped,
        truncated=state.truncated,
        tokens=state.tokens,
        dim=manifest.dim,
        modules=len(manifest.modules),
        extract_seconds=extracted.extraction.seconds,
        total_seconds=time.perf_counter() - started,
        bytes_on_disk=bytes_on_disk(out),
        resumed_rows=extracted.extraction.resumed_rows,
        kind=kind,
        search=manifest.index.description if indexed else "",
        approximate=indexed and not config.index.exact,
    )


def _extract_rows(
    config: BuildConfig,
    request: BuildRequest,
    corpus: Corpus,
    out: Path,
    resuming: bool,
    started: str,
    models: ModelCache,
    progress: bool,
    label: str,
    position: int | None,
) -> _Extracted:
    """The model's pass over the corpus (from the last written chunk when resuming): rows, sums and header."""
    resume = None
    if resuming:
        remove_temporaries(out)
        try:
            resume = read_checkpoint(out)
        except AttribIndexError as err:
            raise AttribIndexError(f"{err} Start over with `overwrite=True`.") from None
    lm, tokenizer = models.get(request.model, config.extract.dtype, config.extract.device)
    projections, optimizer = build_projections(config, lm)
    projections.save(out / layout.PROJECTIONS)
    extractor = GradientExtractor(lm, tokenizer, projections, config.extract.max_length, DTYPES[config.extract.dtype])
    exact = None
    if config.exact.enabled:
        exact = ExactFactors(extractor, config.exact, corpus.whole_length)
        check_exact_memory(config.exact, exact.shapes)
    extraction = extract(
        corpus,
        extractor,
        out,
        config.store,
        config.extract.batch_size,
        request.skip_empty,
        resume,
        progress,
        config.hessian.kind,
        label,
        position,
        exact=exact,
    )
    state = extraction.state
    read = corpus_record(corpus, state.skipped, state.truncated, state.tokens)
    header = manifest_header(config, request.model, lm, tokenizer, projections, optimizer, read, started)
    resumed = ResumedRecord(rows=extraction.resumed_rows, time=now()) if extraction.resumed_rows else None
    event = BuildEvent(rows=extraction.state.rows, time=started, resumed=resumed)
    return _Extracted(extraction, header, event, extractor)
