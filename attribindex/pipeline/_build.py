"""Orchestration of a build: corpus → LoGra gradients + curvature → store → preconditioner → FAISS index.

A build can be one shard of many (`shard=(i, n)`): the same pass over a contiguous slice of the corpus,
finished without a preconditioner or index, for `merge_shards` to combine. Every build resumes: the
same command run again on an interrupted folder continues from its last written chunk.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from attribindex import __version__
from attribindex.config import BuildConfig, config_to_dict
from attribindex.data import Corpus, open_corpus, shard_window
from attribindex.errors import AttribIndexError
from attribindex.index import describe_segments
from attribindex.logra import GradientExtractor, ProjectionSet, load_second_moment_scales, select_modules
from attribindex.model import DTYPES, load_model, model_description
from attribindex.pipeline._extract import extract, read_checkpoint, release_freed_memory, remove_temporaries
from attribindex.pipeline._finish import finish_index, finish_shard
from attribindex.store import layout, read_manifest, write_json

if TYPE_CHECKING:
    from attribindex.pipeline._merge import MergeSummary


@dataclass(frozen=True)
class BuildSummary:
    """What a build produced, printed at its end.

    Example:
        >>> summary = build_index(config, "./tiny-gpt2", "corpus.jsonl", Path("idx"))  # doctest: +SKIP
        >>> summary.rows, summary.dim  # doctest: +SKIP
        (200, 1024)
    """

    out: Path
    index_id: str
    rows: int
    skipped: int
    truncated: int
    tokens: int
    dim: int
    modules: int
    extract_seconds: float
    total_seconds: float
    bytes_on_disk: int
    resumed_rows: int = 0  # rows already written by an interrupted run that this one continued
    kind: str = "index"  # "index", "shard I of N", or "index of N shards …"
    merge: MergeSummary | None = None  # for a multi-shard build: how its shards were merged
    search: str = ""  # the searchable segments, e.g. "IVF1024,PQ64 (1,000,000 rows)"; empty for a shard
    approximate: bool = False

    def format(self) -> str:
        new_rows = self.rows - self.resumed_rows
        rate = new_rows / self.extract_seconds if self.extract_seconds > 0 else float("nan")
        lines = [
            f"{self.kind:<10} {self.out}  ({self.index_id})",
            f"rows       {self.rows:,}"
            + (f"  ({self.skipped} empty documents skipped)" if self.skipped else "")
            + (f"  ({self.resumed_rows:,} from the interrupted run, resumed)" if self.resumed_rows else ""),
            f"tokens     {self.tokens:,}"
            + (f"  ({self.truncated:,} documents truncated to max_length)" if self.truncated else ""),
            f"vector     {self.dim:,} dims from {self.modules} modules",
            f"extract    {self.extract_seconds:.1f} s  ({rate:.1f} examples/s)",
            f"total      {self.total_seconds:.1f} s",
            f"on disk    {self.bytes_on_disk / 2**20:.1f} MiB",
        ]
        if self.search:
            lines.append(f"search     {self.search}")
        if self.approximate:
            lines.append(f"           approximate: `attribindex eval recall {self.out} --queries …` measures it")
        return (self.merge.format() + "\n\n" if self.merge else "") + "\n".join(lines)


def bytes_on_disk(folder: Path, exclude: str | None = None) -> int:
    """Bytes of the files under `folder`, leaving out its subfolder `exclude`."""
    return sum(
        p.stat().st_size
        for p in folder.rglob("*")
        if p.is_file() and (exclude is None or p.relative_to(folder).parts[0] != exclude)
    )


def build_request(config: BuildConfig, model: str, corpus: Corpus, skip_empty: bool, **extra) -> dict:
    """What decides a build's result; an interrupted build resumes only under the same request.

    Batch size and device are left out: they change speed, not rows, so a build killed for lack of
    memory can resume with a smaller --batch-size.
    """
    settings = config_to_dict(config)
    settings["extract"] = {k: v for k, v in settings["extract"].items() if k not in ("batch_size", "device")}
    return {
        "model": model,
        "data": corpus.description,
        "text_field": corpus.text_field,
        "id_field": corpus.id_field,
        "limit": corpus.limit,
        "skip_empty": skip_empty,
        "config": settings,
    } | extra


def first_difference(recorded, current, path: str = "") -> tuple[str, object, object] | None:
    """(key path, recorded value, current value) where two JSON-like values first differ; None when equal."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        for key in list(recorded) + [k for k in current if k not in recorded]:
            found = first_difference(recorded.get(key), current.get(key), f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    return None if recorded == current else (path, recorded, current)


def prepare_output(out: Path, overwrite: bool, request: dict) -> bool:
    """Make `out` ready for a build; True when it holds an interrupted build of the same request to resume.

    Refuses to clobber anything unless asked, and never deletes a folder that is not an attribindex build.
    """
    if not out.exists():
        out.mkdir(parents=True)
        return False
    if not out.is_dir():
        raise AttribIndexError(f"--out {out} is a file. Choose a folder path.")
    if not any(out.iterdir()):
        return False
    if not layout.looks_like_ours(out):
        raise AttribIndexError(
            f"--out {out} is a non-empty folder that is not an attribindex index. Choose a new or empty folder."
        )
    if overwrite:
        (out / layout.MANIFEST).unlink(missing_ok=True)  # first make it incomplete, then clear it
        clear_folder(out)
        return False
    if layout.is_index_dir(out):
        shard = read_manifest(out, kind="any")["format"] == layout.SHARD_FORMAT_NAME
        what = "a shard" if shard else "an index"
        raise AttribIndexError(
            f"--out {out} already holds {what}. Pass --overwrite to replace it, or choose another folder."
        )
    marker = read_marker(out)
    difference = first_difference(marker.get("request"), request)
    if difference:
        where, recorded, now = difference
        raise AttribIndexError(
            f"--out {out} holds an interrupted build of a different command ({where}: {recorded!r} there, {now!r} now). "
            f"Rerun the original command to resume it, or pass --overwrite to start over."
        )
    return True


def read_marker(out: Path) -> dict:
    try:
        return json.loads((out / layout.BUILD_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def clear_folder(folder: Path) -> None:
    for child in folder.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


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


def resolve_model_path(model: str) -> str:
    """Local models are recorded by absolute path, so queries run from anywhere."""
    return str(Path(model).expanduser().resolve()) if Path(model).expanduser().exists() else model


def build_index(
    config: BuildConfig,
    model: str,
    data: str | Path | Corpus,
    out: str | Path,
    *,
    text_field: str = "text",
    id_field: str | None = None,
    split: str = "train",
    limit: int | None = None,
    overwrite: bool = False,
    skip_empty: bool = False,
    progress: bool = True,
    num_shards: int | None = None,
    shard_index: int | None = None,
    keep_shards: bool = False,
) -> BuildSummary:
    """Build an attribution index over a corpus, or one shard of it; resume an interrupted build.

    Args:
        config: the build configuration (see `load_config`).
        model: a local model folder or a hub id.
        data: a `.jsonl` file, a folder of `.txt` files, a saved HF dataset, a hub dataset name, or a Corpus.
        out: the index (or shard) folder. If it holds an interrupted build of the same command, the build
            resumes from its last written chunk.
        overwrite: replace whatever build `out` holds.
        skip_empty: leave out documents that tokenise to nothing instead of failing.
        num_shards, shard_index: with both, build only shard `shard_index` (a contiguous slice) into `out`,
            to be merged with `merge_shards`. With `num_shards` alone, build all shards — spread over the
            processes of a `torchrun` launch when there is one — and merge them into `out`.
        keep_shards: keep the shard folders (`out/shards/`) after a multi-shard build has merged them.

    Example:
        >>> from attribindex import build_index, load_config
        >>> build_index(load_config("tiny"), "./tiny-gpt2", "corpus.jsonl", "idx")  # doctest: +SKIP
        >>> build_index(load_config("tiny"), "./tiny-gpt2", "corpus.jsonl", "s1", num_shards=4, shard_index=1)  # doctest: +SKIP
    """
    corpus = data if isinstance(data, Corpus) else open_corpus(data, text_field, id_field, split, limit)
    model = resolve_model_path(model)
    if shard_index is not None and num_shards is None:
        raise AttribIndexError("--shard-index needs --num-shards: say how many shards the corpus is split into.")
    if num_shards is not None and shard_index is None:
        from attribindex.pipeline._distributed import build_all_shards

        return build_all_shards(
            config, model, corpus, Path(out), num_shards, overwrite, skip_empty, progress, keep_shards
        )
    shard = (shard_index, num_shards) if num_shards is not None else None
    return build_one(config, model, corpus, Path(out), overwrite, skip_empty, progress, shard, ModelCache())


def build_one(
    config: BuildConfig,
    model: str,
    corpus: Corpus,
    out: Path,
    overwrite: bool,
    skip_empty: bool,
    progress: bool,
    shard: tuple[int, int] | None,
    models: ModelCache,
    label: str = "extract",
    position: int | None = None,
) -> BuildSummary:
    """One process, one folder: a whole index (`shard=None`) or shard (i, n)."""
    started = time.perf_counter()
    if shard is not None:
        corpus = shard_window(corpus, shard[1], shard[0])
    next(iter(corpus))  # fail on a bad path, field or encoding now, before anything is written
    extra = {"shard": {"index": shard[0], "count": shard[1]}} if shard else {}
    request = build_request(config, model, corpus, skip_empty, **extra)
    fresh = not out.exists() or not any(out.iterdir())
    resuming = prepare_output(out, overwrite, request)
    try:
        return _build(
            config, model, corpus, out, request, resuming, started, skip_empty, progress, models, label, position
        )
    except AttribIndexError:
        if fresh and not (out / layout.CURVATURE).exists():  # bad input before any durable work: leave nothing
            clear_folder(out)
        raise


def _build(
    config: BuildConfig,
    model: str,
    corpus: Corpus,
    out: Path,
    request: dict,
    resuming: bool,
    started: float,
    skip_empty: bool,
    progress: bool,
    models: ModelCache,
    label: str,
    position: int | None,
) -> BuildSummary:
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    created = read_marker(out).get("started", now) if resuming else now
    write_json(out / layout.BUILD_MARKER, {"started": created, "request": request})
    resume = None
    if resuming:
        remove_temporaries(out)
        try:
            resume = read_checkpoint(out)
        except AttribIndexError as err:
            raise AttribIndexError(f"{err} Start over with --overwrite.") from None

    lm, tokenizer = models.get(model, config.extract.dtype, config.extract.device)
    modules = select_modules(lm, config.projection)
    optimizer = None
    if config.projection.optimizer_state is not None:
        optimizer = load_second_moment_scales(
            config.projection.optimizer_state, lm, modules, config.projection.optimizer_eps
        )
    projections = ProjectionSet.generate(
        modules, config.projection.seed, config.projection.rank_in, config.projection.rank_out, optimizer
    )
    projections.save(out / layout.PROJECTIONS)
    extractor = GradientExtractor(lm, tokenizer, projections, config.extract.max_length, DTYPES[config.extract.dtype])
    extraction = extract(
        corpus,
        extractor,
        out,
        config.store,
        config.extract.batch_size,
        skip_empty,
        resume,
        progress,
        config.hessian.kind,
        label,
        position,
    )
    state = extraction.state

    header = _header(config, model, lm, tokenizer, corpus, projections, created)
    if optimizer is not None:
        header["projection"]["optimizer"] = optimizer.record
    header["corpus"] |= {"skipped_empty": state.skipped, "truncated": state.truncated, "tokens": state.tokens}
    event = {"event": "build", "rows": state.rows, "time": created}
    if extraction.resumed_rows:
        event["resumed"] = {"rows": extraction.resumed_rows, "time": now}
    if "shard" in request:
        shard = request["shard"] | {"documents": [corpus.start, corpus.stop]}
        header["request"] = request  # lets a rerun of a multi-shard build recognise this shard as finished
        manifest = finish_shard(out, config, header, extraction.curvature, state.chunks, shard, event)
        kind = f"shard {shard['index']} of {shard['count']}"
    else:
        # The model is not needed for whitening and indexing: drop it first (its weights are most of the memory).
        del lm, tokenizer, extractor
        models.release()
        manifest = finish_index(out, config, header, extraction.curvature, state.chunks, event, progress)
        kind = "index"
    return BuildSummary(
        out=out,
        index_id=manifest["index_id"],
        rows=state.rows,
        skipped=state.skipped,
        truncated=state.truncated,
        tokens=state.tokens,
        dim=projections.dim,
        modules=len(modules),
        extract_seconds=extraction.seconds,
        total_seconds=time.perf_counter() - started,
        bytes_on_disk=bytes_on_disk(out),
        resumed_rows=extraction.resumed_rows,
        kind=kind,
        search=describe_segments(manifest["index"]["segments"]) if "index" in manifest else "",
        approximate=not config.index.exact and "index" in manifest,
    )


def _header(
    config: BuildConfig,
    model: str,
    lm,
    tokenizer,
    corpus: Corpus,
    projections: ProjectionSet,
    created: str,
) -> dict:
    """The manifest keys an index and a shard share (docs/format.md documents every key)."""
    offsets = np.cumsum([0] + projections.block_dims[:-1])
    return {
        "format": None,
        "format_version": layout.FORMAT_VERSION,
        "index_id": None,
        "created": created,
        "attribindex_version": __version__,
        "model": model_description(lm, model),
        "tokenizer": {"name_or_path": model, "class": type(tokenizer).__name__, "vocab_size": len(tokenizer)},
        "config": config_to_dict(config),
        "corpus": {"description": corpus.description, "text_field": corpus.text_field, "id_field": corpus.id_field},
        "modules": [
            {
                "name": m.name,
                "kind": m.kind,
                "in_features": m.in_features,
                "out_features": m.out_features,
                "rank_in": int(projections.p_in[m.name].shape[0]),
                "rank_out": int(projections.p_out[m.name].shape[0]),
                "offset": int(offset),
                "dim": dim,
            }
            for m, offset, dim in zip(projections.modules, offsets, projections.block_dims)
        ],
        "dim": projections.dim,
        "projection": {"seed": config.projection.seed, "hash": projections.hash(), "file": layout.PROJECTIONS},
    }
