"""What every way of making a folder (a build, one shard, a sharded build, a merge) shares: readying the output
folder, its `building.json` marker, the request that decides its rows, and the model loaded once per process."""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import shutil
from pathlib import Path

from attribindex._records import first_difference, to_json
from attribindex._version import __version__
from attribindex.config import BuildConfig, rows_settings
from attribindex.data import Corpus
from attribindex.errors import AttribIndexError, resource_failures
from attribindex.logra import ProjectionSet, SecondMomentScales, load_second_moment_scales, select_modules
from attribindex.model import load_model, model_fingerprint
from attribindex.pipeline._extract import release_freed_memory
from attribindex.store import (
    BuildMarker,
    BuildRequest,
    CorpusRecord,
    ManifestHeader,
    MergeRequest,
    ModelRecord,
    ModuleRecord,
    ProjectionRecord,
    ShardSlot,
    TokenizerRecord,
    TrainingRecord,
    layout,
    read_manifest,
    read_marker,
    write_marker,
)


def now() -> str:
    """The current UTC time as the manifest records it (ISO 8601, seconds)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def build_request(
    config: BuildConfig,
    model: str,
    corpus: Corpus,
    skip_empty: bool,
    shard: ShardSlot | None = None,
    num_shards: int | None = None,
) -> BuildRequest:
    """What decides a build's rows: the model, the corpus and how it is read, and the config less its speed
    settings (so a build killed for lack of memory can resume with a smaller batch size)."""
    return BuildRequest(
        model=model,
        data=corpus.description,
        text_field=corpus.text_field,
        id_field=corpus.id_field,
        limit=corpus.limit,
        skip_empty=skip_empty,
        config=rows_settings(config),
        shard=shard,
        num_shards=num_shards,
    )


def prepare_output(out: Path, overwrite: bool, request: BuildRequest | MergeRequest) -> tuple[BuildMarker, bool]:
    """Make `out` ready for a build and mark it as being built: (its `building.json` marker, True when it
    resumes an interrupted build of the same request).

    Refuses to clobber anything unless asked, and never deletes a folder that is not an attribindex build.
    """
    if out.exists() and not out.is_dir():
        raise AttribIndexError(f"the output path {out} is a file. Choose a folder path.")
    out.mkdir(parents=True, exist_ok=True)
    interrupted = None
    if any(out.iterdir()):
        if not layout.looks_like_ours(out):
            raise AttribIndexError(
                f"the output folder {out} is not empty and holds no attribindex index. Choose a new or empty folder."
            )
        if overwrite:
            (out / layout.MANIFEST).unlink(missing_ok=True)  # first make it incomplete, then clear it
            clear_folder(out)
        else:
            interrupted = _interrupted_build(out, request)
    marker = BuildMarker(started=interrupted.started if interrupted else now(), request=request)
    write_marker(out, marker)
    return marker, interrupted is not None


def _interrupted_build(out: Path, request: BuildRequest | MergeRequest) -> BuildMarker | None:
    if layout.is_index_dir(out):
        what = "a shard" if read_manifest(out, kind="any").format == layout.SHARD_FORMAT_NAME else "an index"
        raise AttribIndexError(
            f"the output folder {out} already holds {what}. Pass `overwrite=True` to replace it, or choose another "
            f"folder."
        )
    marker = read_marker(out)
    difference = first_difference(to_json(marker.request) if marker else None, to_json(request))
    if difference:
        where, before, current = difference
        raise AttribIndexError(
            f"the output folder {out} holds an interrupted build of a different command ({where}: {before!r} there, "
            f"{current!r} now). Run the original build again to resume it, or pass `overwrite=True` to start over."
        )
    return marker


def clear_folder(folder: Path) -> None:
    for child in folder.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def bytes_on_disk(folder: Path, exclude: str | None = None) -> int:
    """Bytes of the files under `folder`, leaving out its subfolder `exclude`."""
    return sum(
        p.stat().st_size
        for p in folder.rglob("*")
        if p.is_file() and (exclude is None or p.relative_to(folder).parts[0] != exclude)
    )


def resolve_model_path(model: str) -> str:
    """Local models are recorded by absolute path, so queries run from anywhere."""
    return str(Path(model).expanduser().resolve()) if Path(model).expanduser().exists() else model


class ModelCache:
    """Loads the model once for all the shards one process builds."""

    def __init__(self):
        self._loaded: dict[tuple, tuple] = {}

    def get(self, name: str, dtype: str, device: str):
        key = (name, dtype, device)
        if key not in self._loaded:
            self._loaded = {key: load_model(name, dtype, device)}
        return self._loaded[key]

    def release(self) -> None:
        self._loaded = {}
        gc.collect()
        release_freed_memory()


def build_projections(
    config: BuildConfig, lm, shapes_only: bool = False
) -> tuple[ProjectionSet, SecondMomentScales | None]:
    """The projections a build of `config` uses on `lm` (its captured modules, seeded, with the optimizer's second
    moments folded in when the config names a state), and those second moments. With `shapes_only` (a plan of a
    model without weights), empty meta tensors of the projections' shapes, and no optimizer state."""
    modules = select_modules(lm, config.projection)
    optimizer = None
    if shapes_only:
        return ProjectionSet.generate(
            modules, config.projection.seed, config.projection.rank_in, config.projection.rank_out, shapes_only=True
        ), None
    if config.projection.optimizer_state is not None:
        optimizer = load_second_moment_scales(
            config.projection.optimizer_state, lm, modules, config.projection.optimizer_eps
        )
    projections = ProjectionSet.generate(
        modules, config.projection.seed, config.projection.rank_in, config.projection.rank_out, optimizer
    )
    return projections, optimizer


def build_resource_failures(out: Path, config: BuildConfig) -> contextlib.AbstractContextManager[None]:
    """Running out of disk space, permission or memory in a build, as one message with the fix (the rerun resumes).

    Example:
        >>> with build_resource_failures(Path("idx"), config):  # doctest: +SKIP
        ...     build_folder(...)
    """
    batch_size = config.extract.batch_size
    return resource_failures(
        out,
        then="it resumes from its last written chunk",
        memory_fix=f"lower extract.batch_size (`batch_size={max(1, batch_size // 2)}`; it is {batch_size}) or "
        "close other programs",
        disk_hint=" (`attribindex plan` with the same options shows what the build needs)",
    )


def corpus_record(corpus: Corpus, skipped_empty: int, truncated: int, tokens: int) -> CorpusRecord:
    """The manifest's record of the corpus a build read (or a plan counted)."""
    return CorpusRecord(
        description=corpus.description,
        text_field=corpus.text_field,
        id_field=corpus.id_field,
        skipped_empty=skipped_empty,
        truncated=truncated,
        tokens=tokens,
    )


def manifest_header(
    config: BuildConfig,
    model_path: str,
    lm,
    tokenizer,
    projections: ProjectionSet,
    optimizer: SecondMomentScales | None,
    corpus: CorpusRecord,
    created: str,
    *,
    fingerprint: str | None = None,
    projection_hash: str | None = None,
    training: TrainingRecord | None = None,
) -> ManifestHeader:
    """The manifest keys an index and a shard share (docs/format.md documents every key), for a build, a capture
    (`training`) and a plan. `fingerprint` and `projection_hash` default to the model's and the projections' own; a
    plan passes placeholders of their length, since it sizes the manifest without hashing anything."""
    return ManifestHeader(
        created=created,
        attribindex_version=__version__,
        model=ModelRecord(
            name_or_path=model_path,
            class_name=type(lm).__name__,
            # weights changed by training belong to no revision of the checkpoint the run started from
            revision=None if training is not None else getattr(getattr(lm, "config", None), "_commit_hash", None),
            fingerprint=fingerprint or model_fingerprint(lm),
        ),
        tokenizer=TokenizerRecord(
            name_or_path=model_path, class_name=type(tokenizer).__name__, vocab_size=len(tokenizer)
        ),
        config=config,
        corpus=corpus,
        modules=module_records(projections),
        dim=projections.dim,
        projection=ProjectionRecord(
            seed=config.projection.seed,
            hash=projection_hash or projections.hash(),
            file=layout.PROJECTIONS,
            optimizer=optimizer.record if optimizer is not None else None,
        ),
        training=training,
    )


def module_records(projections: ProjectionSet) -> tuple[ModuleRecord, ...]:
    """The manifest's records of the captured modules, in vector order, with each block's offset and dims."""
    records, offset = [], 0
    for module, dim in zip(projections.modules, projections.block_dims):
        records.append(
            ModuleRecord(
                name=module.name,
                kind=module.kind,
                in_features=module.in_features,
                out_features=module.out_features,
                bias=module.bias,
                rank_in=int(projections.p_in[module.name].shape[0]),
                rank_out=int(projections.p_out[module.name].shape[0]),
                offset=offset,
                dim=dim,
            )
        )
        offset += dim
    return tuple(records)
