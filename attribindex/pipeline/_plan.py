"""`plan_build`: what a build will take — dims, disk, memory, time — before it runs.

Everything is derived from the code a build runs: the modules and projections come from `select_modules` and
`ProjectionSet.generate` on the loaded model, the store's bytes from its codec (float16 rows carry one fp32 scale per
module), the FAISS segment's from the `SegmentPlan` the build would resolve, the exact section's memory from
`check_exact_memory`, and the time from a few real batches through the real `GradientExtractor`.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from attribindex._progress import progress as progress_bar
from attribindex._version import __version__
from attribindex.config import BuildConfig, config_to_dict
from attribindex.data import Corpus, TokenizedExample, batched, open_corpus, shard_window
from attribindex.errors import AttribIndexError
from attribindex.hessian import FACTOR_KINDS, CurvatureSums
from attribindex.index import SegmentPlan
from attribindex.logra import GradientExtractor, ProjectionSet
from attribindex.model import DTYPES, load_model
from attribindex.pipeline._exact import (
    SUM_COPIES,
    ExactFactors,
    _physical_memory,
    check_exact_memory,
    exact_shapes,
    factor_bytes,
)
from attribindex.pipeline._extract import SORT_WINDOW_BATCHES
from attribindex.pipeline._output import build_projections, module_records, resolve_model_path
from attribindex.pipeline._write_segments import WHITEN_BLOCK_BYTES
from attribindex.store import ModuleRecord, layout
from attribindex.store._codec import encode, numpy_store_dtype

SAMPLE_DOCUMENTS = 1000  # a streamed corpus is estimated from its first this-many documents
PROBE_BATCHES = 3  # timed batches of the probe, after a warm-up batch (kernels, allocator, caches)
PROBE_MIN_SECONDS = 0.5  # below this, more batches are timed (up to PROBE_MAX_BATCHES): tiny models time noisily
PROBE_MAX_BATCHES = 16
NPY_HEADER = 128  # bytes of a .npy header for the 1- and 2-d arrays a chunk holds (numpy pads it to 64 bytes)
FLAT_HEADER = 45  # bytes before the vectors of a faiss IndexFlatIP file (d, ntotal, metric, vector length …)
_SAFETENSORS_DTYPES = {1: "U8", 2: "F16", 4: "F32", 8: "F64"}
Log = Callable[[str], None]


@dataclass(frozen=True)
class CorpusPlan:
    """The documents a build would index. `counted`: every document was tokenised (a local corpus); otherwise the
    figures are the first `sample` documents' scaled to `documents`."""

    description: str
    documents: int  # rows the build will write
    counted: bool
    sample: int  # documents tokenised for these figures
    tokens: int  # after truncation to max_length
    truncated: int
    empty: int  # documents that tokenise to nothing (no token carries loss)
    text_bytes: int  # bytes of the docs.jsonl lines (id, source, full text)
    tokenize_seconds: float  # measured on the `sample` documents


@dataclass(frozen=True)
class DiskPlan:
    """Bytes of each part of the output folder, and per example."""

    store_per_example: float  # grads + scales + ids + offsets (the codec's bytes)
    index_per_example: float  # the FAISS segment
    docs_per_example: float  # docs.jsonl
    rows: int  # every rows/*.npy file, headers included
    docs: int  # every rows/*.docs.jsonl
    index: int
    projections: int
    curvature: int
    preconditioner: int
    exact_preconditioner: int
    manifest: int  # estimated from its records' sizes
    total: int
    free: int | None  # free bytes where --out would go (None when no folder is given)


@dataclass(frozen=True)
class MemoryPlan:
    """Resident bytes, at build (peak of the extraction and the finalizing phases) and at query."""

    model: int  # parameters and buffers in extract.dtype
    window: int  # a window of float32 rows being extracted, and one chunk of encoded rows being buffered
    curvature: int  # the sums held while extracting (committed + pending)
    exact: int  # the exact section's factor sums (SUM_COPIES copies)
    activations: int  # measured during the probe (CUDA: peak allocated beyond the model; CPU: growth of peak RSS)
    finalize: int  # whitening blocks + the approximate segment held in memory while it is filled
    build: int
    index: int  # the segment at query: memory-mapped (flat float32) or read into memory (other kinds)
    query: int
    assumptions: tuple[str, ...]


@dataclass(frozen=True)
class TimePlan:
    """Build time extrapolated from the probe: seconds per token of a few real batches of this config."""

    device: str
    batch_size: int
    probe_batches: int  # timed (after one warm-up batch)
    probe_examples: int
    probe_tokens: int
    probe_seconds: float
    seconds_per_token: float
    extract_seconds: float  # model passes + curvature sums + encoding + tokenising, for the whole corpus
    exact_correction_seconds: float  # EK-FAC's correction pass of the exact section over its sample (0 without)


@dataclass(frozen=True)
class ExactPlan:
    """The exact section's factor sums and whether the build's memory check lets them through."""

    kind: str
    fisher: str
    layers: int
    factor_bytes: int  # one copy of Σ (n_in'² + n_out²) × 8
    copies: int
    needed: int  # copies × factor_bytes
    limit: int  # exact.memory_gb, or half of this machine's RAM
    refusal: str | None  # the build's message when it would refuse the section


@dataclass(frozen=True)
class BuildPlan:
    """What `build_index` on the same arguments will produce and need. `to_dict()` for JSON, `format()` to read.

    Example:
        >>> plan = plan_build(load_config("tiny"), "./tiny-gpt2", "corpus.jsonl")  # doctest: +SKIP
        >>> plan.dim, plan.disk.total, plan.time.extract_seconds  # doctest: +SKIP
        (128, 243993, 0.8)
    """

    model: str
    kind: str  # "index", or "shard i of n"
    hessian: str
    store_dtype: str
    index: str  # the FAISS segment: "Flat", "IVF1024,PQ64", …
    segment: dict | None  # the resolved SegmentPlan of an approximate segment
    modules: tuple[ModuleRecord, ...]  # as the manifest will record them
    dim: int
    bytes_per_example: float  # store + index (+ docs.jsonl: see disk)
    corpus: CorpusPlan
    disk: DiskPlan
    memory: MemoryPlan
    time: TimePlan
    exact: ExactPlan | None
    notes: tuple[str, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        c, d, m, t = self.corpus, self.disk, self.memory, self.time
        ranks = sorted({(p.rank_out, p.rank_in) for p in self.modules})
        how = "counted" if c.counted else f"estimated from the first {c.sample:,} documents"
        lines = [
            f"plan         {self.kind} of {self.model}: hessian {self.hessian}, store {self.store_dtype}, "
            f"index {self.index}",
            f"vector       {self.dim:,} dims from {len(self.modules)} modules, rank "
            + ", ".join(f"{o}×{i}" for o, i in ranks)
            + f", {sum(p.bias for p in self.modules)} with their bias",
        ]
        lines += [
            f"  {p.dim:>6,}  {p.name}  ({p.out_features}×{p.in_features}{'+b' if p.bias else ''})" for p in self.modules
        ]
        lines += [
            f"corpus       {c.documents:,} documents, {c.tokens:,} tokens after truncation ({c.truncated:,} truncated, "
            f"{c.empty:,} empty) — {how}",
            f"per example  {self.bytes_per_example:,.0f} bytes (store {d.store_per_example:,.0f} + index "
            f"{d.index_per_example:,.0f}) + {d.docs_per_example:,.0f} bytes of text",
            f"disk         {_size(d.total)}: rows {_size(d.rows)}, texts {_size(d.docs)}, index {_size(d.index)}, "
            f"projections {_size(d.projections)}, curvature {_size(d.curvature)}, preconditioner "
            f"{_size(d.preconditioner)}"
            + (f", exact preconditioner {_size(d.exact_preconditioner)}" if d.exact_preconditioner else "")
            + f", manifest {_size(d.manifest)}"
            + (f"; {_size(d.free)} free there" if d.free is not None else ""),
            f"RAM build    {_size(m.build)}: model {_size(m.model)}, activations {_size(m.activations)}, rows "
            f"{_size(m.window)}, curvature {_size(m.curvature)}"
            + (f", exact factors {_size(m.exact)}" if m.exact else "")
            + f"; finalizing {_size(m.finalize)}",
            f"RAM query    {_size(m.query)}: model {_size(m.model)} + index {_size(m.index)}",
            f"time         ~{_duration(t.extract_seconds + t.exact_correction_seconds)} on {t.device} "
            f"({t.seconds_per_token * 1e3:.3f} ms/token from {t.probe_batches} timed batches of {t.batch_size}, "
            f"{t.probe_tokens:,} tokens in {t.probe_seconds:.2f} s)"
            + (
                f"; of which the exact EK-FAC correction ~{_duration(t.exact_correction_seconds)}"
                if t.exact_correction_seconds
                else ""
            ),
        ]
        e = self.exact
        if e is not None:
            verdict = "refused: " + e.refusal if e.refusal else f"fits the limit of {_size(e.limit)}"
            lines.append(
                f"exact        {e.kind} ({e.fisher} Fisher) over {e.layers} layers: {e.copies} × "
                f"{_size(e.factor_bytes)} = {_size(e.needed)} of factor sums; {verdict}"
            )
        lines += [f"assumes      {a}" for a in m.assumptions]
        lines += [f"note         {n}" for n in self.notes]
        return "\n".join(lines)


def plan_build(
    config: BuildConfig,
    model: str,
    data: str | Path | Corpus,
    *,
    text_field: str = "text",
    id_field: str | None = None,
    split: str = "train",
    limit: int | None = None,
    skip_empty: bool = False,
    num_shards: int | None = None,
    shard_index: int | None = None,
    keep_shards: bool = False,
    out: str | Path | None = None,
    sample: int = SAMPLE_DOCUMENTS,
    probe_batches: int = PROBE_BATCHES,
    progress: bool = True,
    log: Log | None = None,
) -> BuildPlan:
    """Plan `build_index` with the same arguments: dims, bytes per example, disk, memory and time, without
    writing anything.

    A local corpus is tokenised in full (exact counts); a streamed one is estimated from its first `sample`
    documents and needs `limit`. The time comes from `probe_batches` real batches of the config on its device
    (the first is a warm-up), scaled to the corpus's tokens.

    Args:
        config, model, data, text_field, id_field, split, limit, skip_empty, num_shards, shard_index, keep_shards:
            as for `build_index`.
        out: where the index would go; only used to report the free disk space there.
        sample: documents of a streamed corpus to estimate from.
        probe_batches: timed batches, after one warm-up batch.
        log: called with a line per stage (what the planner is doing).

    Example:
        >>> from attribindex import load_config, plan_build
        >>> plan = plan_build(load_config("tiny"), "./tiny-gpt2", "corpus.jsonl")  # doctest: +SKIP
        >>> print(plan.format())  # doctest: +SKIP
        >>> plan.to_dict()["disk"]["total"]  # doctest: +SKIP
        243993
    """
    say = log or (lambda _: None)
    corpus = data if isinstance(data, Corpus) else open_corpus(data, text_field, id_field, split, limit)
    model = resolve_model_path(model)
    if shard_index is not None and num_shards is None:
        raise AttribIndexError("`shard_index` needs `num_shards`: say how many shards the corpus is split into.")
    shard = shard_index is not None
    streamed = corpus.known_length() is None  # a hub dataset: only `limit` bounds it
    if streamed and corpus.limit is None:
        raise AttribIndexError(
            f"planning needs to know how many documents {corpus.description} holds, and a streamed dataset does not "
            f"say. Pass `limit=N` to plan for the first N documents, or save the dataset to disk first."
        )
    if shard:
        corpus = shard_window(corpus, num_shards, shard_index)
    next(iter(corpus))  # a bad path, field or encoding fails now, as it does in a build

    say(f"loading {model} ({config.extract.dtype}, device {config.extract.device})")
    lm, tokenizer = load_model(model, config.extract.dtype, config.extract.device)
    projections, _ = build_projections(config, lm)
    extractor = GradientExtractor(lm, tokenizer, projections, config.extract.max_length, DTYPES[config.extract.dtype])
    counted = not streamed
    say(
        f"tokenising {'every document' if counted else f'the first {sample:,} documents'} of {corpus.description} "
        f"(max_length {config.extract.max_length})"
    )
    keep = (max(probe_batches, PROBE_MAX_BATCHES) + 1) * config.extract.batch_size
    stats, examples = _tokenize_corpus(corpus, extractor, None if counted else sample, keep, progress)
    corpus_plan = _corpus_plan(corpus, stats, counted, skip_empty)

    exact_plan, exact_factors = None, None
    if config.exact.enabled:
        exact_plan, exact_factors = _exact_plan(config, extractor)
    say(
        f"probing: {probe_batches}+ batches of {config.extract.batch_size} documents through the model on "
        f"{extractor.device}, after a warm-up batch"
    )
    timing, activations = _probe(config, extractor, examples, exact_factors, probe_batches)
    rows = corpus_plan.documents
    seconds_per_token = timing.seconds / max(timing.tokens, 1)
    extract_seconds = seconds_per_token * corpus_plan.tokens + stats.seconds / max(stats.documents, 1) * rows
    correction = 0.0
    if config.exact.enabled and config.exact.kind == "ekfac":  # one more model pass over the sampled rows
        correction = extract_seconds * min(config.exact.sample, rows) / max(rows, 1)
    time_plan = TimePlan(
        device=_device_name(extractor.device),
        batch_size=config.extract.batch_size,
        probe_batches=timing.batches,
        probe_examples=timing.examples,
        probe_tokens=timing.tokens,
        probe_seconds=timing.seconds,
        seconds_per_token=seconds_per_token,
        extract_seconds=extract_seconds,
        exact_correction_seconds=correction,
    )

    segment = None if shard else SegmentPlan.resolve(config.index, config.index.mode, rows, projections.dim)
    disk = _disk_plan(config, model, corpus, projections, corpus_plan, segment, exact_plan, extractor, out)
    memory = _memory_plan(config, lm, rows, projections, disk, exact_plan, activations, segment)
    notes = _notes(config, corpus_plan, skip_empty, num_shards, shard, keep_shards)
    index_name = "none (a shard: the merge builds it)" if segment is None else _index_name(segment, rows)
    return BuildPlan(
        model=model,
        kind=f"shard {shard_index} of {num_shards}" if shard else "index",
        hessian=config.hessian.kind,
        store_dtype=config.store.dtype,
        index=index_name,
        segment=segment.record() if segment is not None and not config.index.exact else None,
        modules=module_records(projections),
        dim=projections.dim,
        bytes_per_example=disk.store_per_example + disk.index_per_example,
        corpus=corpus_plan,
        disk=disk,
        memory=memory,
        time=time_plan,
        exact=exact_plan,
        notes=notes,
    )


@dataclass
class _TokenStats:
    documents: int = 0
    tokens: int = 0
    truncated: int = 0
    empty: int = 0
    text_bytes: int = 0
    seconds: float = 0.0


def _tokenize_corpus(
    corpus: Corpus, extractor: GradientExtractor, sample: int | None, keep: int, progress: bool
) -> tuple[_TokenStats, list[TokenizedExample]]:
    """Tokenise the corpus (its first `sample` documents when given) as the build does, and keep the first `keep`
    examples for the probe."""
    stats, kept = _TokenStats(), []
    started = time.perf_counter()
    total = corpus.known_length() if sample is None else min(sample, corpus.limit or sample)
    with progress_bar(total=total, desc="tokenise", unit="doc", enabled=progress) as bar:
        for _, doc in corpus.numbered(corpus.start):
            if sample is not None and stats.documents >= sample:
                break
            stats.documents += 1
            # the docs.jsonl line the chunk writer writes for this document
            line = json.dumps({"id": doc.id, "source": doc.source, "text": doc.text}, ensure_ascii=False) + "\n"
            stats.text_bytes += len(line.encode("utf-8"))
            bar.update(1)
            try:
                (example,) = extractor.tokenize([doc.text], [doc.id])
            except AttribIndexError:
                stats.empty += 1
                continue
            stats.tokens += len(example.input_ids)
            stats.truncated += int(example.truncated)
            if len(kept) < keep:
                kept.append(example)
    stats.seconds = time.perf_counter() - started
    return stats, kept


def _corpus_plan(corpus: Corpus, stats: _TokenStats, counted: bool, skip_empty: bool) -> CorpusPlan:
    documents = corpus.known_length() or corpus.limit or stats.documents  # a streamed corpus: at most `limit`
    scale = documents / max(stats.documents, 1)  # 1 when counted
    empty = round(stats.empty * scale)
    rows = documents - empty if skip_empty else documents  # without skip_empty an empty document stops the build
    kept = max(stats.documents - stats.empty, 1)
    return CorpusPlan(
        description=corpus.description,
        documents=rows,
        counted=counted,
        sample=stats.documents,
        tokens=round(stats.tokens / kept * rows),
        truncated=round(stats.truncated / kept * rows),
        empty=empty,
        text_bytes=round(stats.text_bytes / max(stats.documents, 1) * rows),
        tokenize_seconds=stats.seconds,
    )


@dataclass
class _Timing:
    batches: int = 0
    examples: int = 0
    tokens: int = 0
    seconds: float = 0.0


def _probe(
    config: BuildConfig,
    extractor: GradientExtractor,
    examples: list[TokenizedExample],
    exact: ExactFactors | None,
    batches: int,
) -> tuple[_Timing, int]:
    """Time `batches` real batches as the extraction runs them — longest first, forward + backward with the hooks,
    the curvature sums of the Hessian kind (and the exact section's factors), the store's encoding — after one
    warm-up batch; more while they took under PROBE_MIN_SECONDS. Returns the timing and the activation memory
    measured."""
    if not examples:
        raise AttribIndexError("no document of the corpus carries loss; nothing to plan for.")
    names = [m.name for m in extractor.projections.modules]
    dims, shapes = extractor.projections.block_dims, extractor.projections.block_shapes
    kind = config.hessian.kind
    sums = CurvatureSums.for_kind(kind, names, shapes, exact.empty_shapes() if exact else None)
    factors = kind in FACTOR_KINDS
    cuda = extractor.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(extractor.device)
        torch.cuda.reset_peak_memory_stats(extractor.device)
        baseline = torch.cuda.memory_allocated(extractor.device)
    else:
        baseline = _peak_rss()
    timing = _Timing()
    ordered = sorted(examples, key=lambda e: -len(e.input_ids))  # as `_window_rows` orders a window
    groups = list(batched(ordered, config.extract.batch_size))
    # Timed batches are taken across the sorted window (a golden-ratio sequence), not from its long end only, so
    # that a probe stopped early has seen short and long documents alike.
    spread = sorted(range(1, len(groups)), key=lambda i: (i * 0.6180339887) % 1)
    for number, batch in enumerate(groups[i] for i in [0, *spread]):
        if timing.batches >= batches and timing.seconds >= PROBE_MIN_SECONDS:
            break
        started = time.perf_counter()
        extracted = extractor.extract(batch, factors=factors, listeners=exact.same_pass if exact else ())
        rows = extracted.concatenated(names)  # (B, D)
        factor_rows = None
        if factors:
            factor_rows = {n: extracted.factors[n] for n in names}
        sums.update(dict(zip(names, rows.cpu().split(dims, dim=1))), factor_rows, exact.take(batch) if exact else None)
        encode(rows, dims, config.store.dtype)
        if cuda:
            torch.cuda.synchronize(extractor.device)
        if number > 0 or len(ordered) <= config.extract.batch_size:  # a one-batch corpus: its only batch counts
            timing.batches += 1
            timing.examples += len(batch)
            timing.tokens += sum(len(e.input_ids) for e in batch)
            timing.seconds += time.perf_counter() - started
    if cuda:
        activations = torch.cuda.max_memory_allocated(extractor.device) - baseline
    else:
        activations = max(0, _peak_rss() - baseline)
    return timing, activations


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _exact_plan(config: BuildConfig, extractor: GradientExtractor) -> tuple[ExactPlan, ExactFactors | None]:
    """The build's own check of the exact section, reported instead of raised; the factors for the probe when
    they fit."""
    factors = ExactFactors(extractor, config.exact)
    one = factor_bytes(factors.shapes)
    limit = config.exact.memory_gb * 2**30 if config.exact.memory_gb is not None else _physical_memory() / 2
    refusal = None
    try:
        check_exact_memory(config.exact, factors.shapes)
    except AttribIndexError as err:
        refusal = str(err)
    plan = ExactPlan(
        kind=config.exact.kind,
        fisher=config.exact.fisher,
        layers=len(factors.shapes),
        factor_bytes=one,
        copies=SUM_COPIES,
        needed=SUM_COPIES * one,
        limit=int(limit),
        refusal=refusal,
    )
    return plan, factors if refusal is None else None


def _disk_plan(
    config: BuildConfig,
    model: str,
    corpus: Corpus,
    projections: ProjectionSet,
    corpus_plan: CorpusPlan,
    segment: SegmentPlan | None,
    exact: ExactPlan | None,
    extractor: GradientExtractor,
    out: str | Path | None,
) -> DiskPlan:
    rows, dim, modules = corpus_plan.documents, projections.dim, len(projections.modules)
    chunk_rows = config.store.chunk_rows
    chunks = [min(chunk_rows, rows - start) for start in range(0, rows, chunk_rows)]
    item = numpy_store_dtype(config.store.dtype).itemsize
    # grads (n, D) in the store dtype, scales (n, M) fp32, ids (n,) uint64, docs offsets (n + 1,) int64
    store_per_example = dim * item + modules * 4 + 8 + 8
    row_bytes = sum(n * store_per_example + 8 + 4 * NPY_HEADER for n in chunks)
    index = _segment_bytes(segment, rows) if segment is not None else 0

    shapes = dict(zip([m.name for m in projections.modules], projections.block_shapes))
    projection_bytes = _safetensors_bytes(
        {
            f"{n}.{side}": (tuple(t.shape), t.element_size())
            for side, ts in (("in", projections.p_in), ("out", projections.p_out))
            for n, t in ts.items()
        },
        {"hash": "sha256:" + "0" * 64},
    )
    chunk_json = [_chunk_json(i, n, store_per_example, dim * item, modules) for i, n in enumerate(chunks)]
    note = {
        "next_position": rows,
        "chunks": chunk_json,
        "skipped": corpus_plan.empty,
        "tokens": corpus_plan.tokens,
        "truncated": corpus_plan.truncated,
        "complete": True,
    }
    unprojected: dict[str, tuple[int, int]] = {}  # the exact section's (n_out, n_in') per layer
    if config.exact.enabled:
        unprojected = {n: s.gradient_shape for n, s in exact_shapes(extractor).items()}
    curvature = _safetensors_bytes(
        _curvature_tensors(config.hessian.kind, shapes, unprojected),
        {"count": str(rows), "note": json.dumps(note), "retained_deleted": "0"},
    )
    preconditioner = (
        0 if segment is None else _preconditioner_bytes(config.hessian.kind, shapes, config.hessian.damping)
    )
    exact_preconditioner = 0
    if exact is not None and segment is not None:
        width = 8 if extractor.dtype == torch.float64 else 4
        tensors = {}
        for name, (n_out, n_in) in unprojected.items():
            tensors |= {f"{name}::u_out": ((n_out, n_out), width), f"{name}::u_in": ((n_in, n_in), width)}
            tensors |= {f"{name}::eigenvalues": ((n_out, n_in), width), f"{name}::damping": ((1,), 8)}
        meta = {"kind": config.exact.kind, "alpha": repr(config.exact.damping)}
        meta |= {f"{n}::shape": f"{o},{i},1" for n, (o, i) in unprojected.items()}
        exact_preconditioner = _safetensors_bytes(tensors, meta)
    manifest = _manifest_bytes(config, model, corpus, projections, rows, chunk_json, segment, exact is not None)
    total = row_bytes + corpus_plan.text_bytes + index + projection_bytes + curvature + preconditioner
    total += exact_preconditioner + manifest
    return DiskPlan(
        store_per_example=float(store_per_example),
        index_per_example=index / max(rows, 1),
        docs_per_example=corpus_plan.text_bytes / max(rows, 1),
        rows=row_bytes,
        docs=corpus_plan.text_bytes,
        index=index,
        projections=projection_bytes,
        curvature=curvature,
        preconditioner=preconditioner,
        exact_preconditioner=exact_preconditioner,
        manifest=manifest,
        total=total,
        free=_free_bytes(Path(out)) if out is not None else None,
    )


def _segment_bytes(plan: SegmentPlan, rows: int) -> int:
    """Bytes of the FAISS file the build writes for `plan` (and holds in memory at query): the codes of every row,
    8-byte ids of inverted lists, and what training leaves (centroids, codebooks, quantiser ranges)."""
    d = plan.index_dim
    if plan.kind == "flat":
        return FLAT_HEADER + rows * plan.dim * (4 if plan.storage == "float32" else 2)
    if plan.kind == "hnsw":
        # a flat float32 storage, then per node ~2M links at level 0 and M/(M-1) ≈ 1 above (int32), an 8-byte
        # offset and a 4-byte level
        return 256 + rows * (4 * d + 4 * (2 * plan.hnsw_m + 1) + 12)
    code = {"ivf_flat": 4 * d, "ivf_sq8": d}.get(plan.kind)
    trained = plan.nlist * d * 4  # the coarse quantiser's centroids
    if plan.kind == "ivf_sq8":
        trained += 2 * d * 4
    if plan.kind == "ivf_pq":
        code = math.ceil(plan.pq_m * plan.pq_bits / 8)
        trained += 2**plan.pq_bits * d * 4  # pq_m codebooks of 2^bits centroids over d / pq_m dims each
    return 256 + trained + plan.nlist * 16 + rows * (code + 8)


def _index_name(plan: SegmentPlan, rows: int) -> str:
    return f"{plan.factory} ({rows:,} rows" + (f", nprobe {plan.nprobe})" if plan.nprobe else ")")


def _curvature_tensors(
    kind: str, shapes: dict[str, tuple[int, int]], exact: dict[str, tuple[int, int]]
) -> dict[str, tuple[tuple[int, ...], int]]:
    """The tensors `CurvatureSums.for_kind` keeps (name → (shape, bytes per number)), made on the meta device:
    nothing is allocated."""
    sums = CurvatureSums.for_kind(kind, list(shapes), list(shapes.values()), exact or None, device="meta")
    return {name: (tuple(t.shape), t.element_size()) for name, t in sums.tensors.items()}


def _preconditioner_bytes(kind: str, shapes: dict[str, tuple[int, int]], damping: float) -> int:
    """`Preconditioner.save`: raw keeps a dense d×d fp32 W per module, kfac/ekfac U_out, U_in and the scales."""
    tensors: dict[str, tuple[tuple[int, ...], int]] = {}
    for name, (k_out, k_in) in shapes.items():
        if kind == "raw":
            tensors[name] = ((k_out * k_in, k_out * k_in), 4)
        elif kind in FACTOR_KINDS:
            tensors[f"{name}::u_out"] = ((k_out, k_out), 4)
            tensors[f"{name}::u_in"] = ((k_in, k_in), 4)
            tensors[f"{name}::scale"] = ((k_out, k_in), 4)
    return _safetensors_bytes(tensors or {"_empty": ((0,), 4)}, {"kind": kind, "damping": repr(damping)})


def _safetensors_bytes(tensors: dict[str, tuple[tuple[int, ...], int]], metadata: dict[str, str]) -> int:
    """The size of a safetensors file of these tensors (name → (shape, bytes per number)) and metadata: an 8-byte
    length, the compact JSON header padded to 8 bytes, the data."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, (shape, width) in tensors.items():
        size = math.prod(shape) * width
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[width],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    return 8 + (text + 7) // 8 * 8 + offset


def _chunk_json(number: int, rows: int, store_per_example: int, grads_row: int, modules: int) -> dict:
    """A chunk's record as the checkpoint note and the manifest hold it (checksums are 71 characters each)."""
    checksum = "sha256:" + "0" * 64
    sizes = {
        layout.CHUNK_GRADS: NPY_HEADER + rows * grads_row,
        layout.CHUNK_SCALES: NPY_HEADER + rows * modules * 4,
        layout.CHUNK_DOCS: rows * 100,  # only its digit count matters here
        layout.CHUNK_DOC_OFFSETS: NPY_HEADER + (rows + 1) * 8,
        layout.CHUNK_ID_HASHES: NPY_HEADER + rows * 8,
    }
    files = {suffix: {"sha256": checksum, "bytes": size} for suffix, size in sizes.items()}
    return {"name": layout.chunk_name(number), "rows": rows, "files": files}


def _manifest_bytes(
    config: BuildConfig,
    model: str,
    corpus: Corpus,
    projections: ProjectionSet,
    rows: int,
    chunks: list[dict],
    segment: SegmentPlan | None,
    exact: bool,
) -> int:
    """manifest.json's size: its records with placeholder values of the lengths the build writes (checksums,
    floats of ~18 digits), written as `write_json` writes it (indented). Within a few hundred bytes."""
    checksum, number = "sha256:" + "0" * 64, 0.123456789012345678
    stats = {"mean_eigenvalue": number, "damping": number, "effective_rank": number}
    names = [m.name for m in projections.modules]
    files = [layout.PROJECTIONS, layout.CURVATURE] + ([layout.PRECONDITIONER, "index/flat.faiss"] if segment else [])
    manifest = {
        "format": layout.FORMAT_NAME,
        "format_version": layout.FORMAT_VERSION,
        "index_id": "ai-000000000000",
        "created": "2026-01-01T00:00:00+00:00",
        "attribindex_version": __version__,
        "model": {"name_or_path": model, "class": "PreTrainedModelClass", "revision": None, "fingerprint": checksum},
        "tokenizer": {"name_or_path": model, "class": "TokenizersBackend", "vocab_size": 100000},
        "config": config_to_dict(config),
        "corpus": {"description": corpus.description, "text_field": corpus.text_field, "id_field": corpus.id_field}
        | {"skipped_empty": 0, "truncated": rows, "tokens": rows * 100},
        "modules": [asdict(m) for m in module_records(projections)],
        "dim": projections.dim,
        "projection": {"seed": 0, "hash": checksum, "file": layout.PROJECTIONS, "optimizer": None},
        "rows": rows,
        "store": {"dtype": config.store.dtype, "chunk_rows": config.store.chunk_rows, "chunks": chunks},
        "files": {name: {"sha256": checksum, "bytes": rows} for name in files},
        "log": [{"event": "build", "rows": rows, "time": "2026-01-01T00:00:00+00:00", "resumed": None}],
    }
    if segment is not None:
        manifest["hessian"] = {"kind": config.hessian.kind, "damping": number, "examples": rows}
        manifest["hessian"] |= {"preconditioner_hash": checksum, "file": layout.PRECONDITIONER}
        modules = dict.fromkeys(names, stats) if config.hessian.kind != "identity" else {}  # identity: no spectra
        manifest["hessian"] |= {"curvature_file": layout.CURVATURE, "modules": modules}
        record = {"file": "index/flat.faiss", "rows": rows}
        if not config.index.exact:
            record["plan"] = segment.record() | {"max_norm": number}
        manifest["index"] = {"kind": config.index.kind, "segments": [record], "operating_point": None}
        manifest |= {"normalization": config.index.mode, "deleted": {"file": None, "rows": 0}, "version": 1}
    else:  # a shard keeps its request and slice instead
        manifest |= {"request": {"model": model, "config": config_to_dict(config)}, "shard": {"documents": [0, rows]}}
    if exact:
        manifest["exact"] = {"kind": config.exact.kind, "file": layout.EXACT_PRECONDITIONER, "hash": checksum}
        manifest["exact"] |= {"modules": dict.fromkeys(names, stats), "biased": names}
    return len((json.dumps(manifest, indent=2) + "\n").encode("utf-8"))


def _memory_plan(
    config: BuildConfig,
    lm,
    rows: int,
    projections: ProjectionSet,
    disk: DiskPlan,
    exact: ExactPlan | None,
    activations: int,
    segment: SegmentPlan | None,
) -> MemoryPlan:
    model = sum(t.numel() * t.element_size() for t in (*lm.parameters(), *lm.buffers()))
    dim = projections.dim
    window = SORT_WINDOW_BATCHES * config.extract.batch_size * dim * 4  # float32 rows of a sorted window
    window += config.store.chunk_rows * (disk.store_per_example + disk.docs_per_example)  # the chunk being filled
    # committed + pending sums, whose sizes are those of the file's tensors (the note aside)
    curvature = 2 * max(disk.curvature - (exact.factor_bytes if exact else 0), 0)
    exact_bytes = exact.needed if exact is not None else 0
    approximate = segment is not None and not config.index.exact
    whitening = 4 * min(WHITEN_BLOCK_BYTES, rows * dim * 4)  # a few whitening blocks of raw and whitened rows
    finalize = whitening + disk.preconditioner + (disk.index if approximate else 0)
    if config.exact.enabled:  # the model stays for the exact section's correction pass
        finalize += model
    extraction = int(model + activations + window + curvature + exact_bytes)
    build = int(max(extraction, finalize))
    query = model + disk.index + disk.preconditioner + disk.projections + disk.exact_preconditioner
    where = "memory-mapped: resident in the page cache once searched" if not approximate else "read into memory"
    assumptions = (
        f"model weights in {config.extract.dtype}; activations as measured in the probe's batches of "
        f"{config.extract.batch_size} (longer documents need more)",
        f"{SORT_WINDOW_BATCHES} batches of float32 rows per sorted window, one chunk of {config.store.chunk_rows:,} "
        f"encoded rows, two copies of the curvature sums",
        f"the index at query is {where}; query batches and the server add little",
    )
    return MemoryPlan(
        model=model,
        window=int(window),
        curvature=curvature,
        exact=exact_bytes,
        activations=int(activations),
        finalize=int(finalize),
        build=build,
        index=disk.index,
        query=int(query),
        assumptions=assumptions,
    )


def _notes(
    config: BuildConfig,
    corpus: CorpusPlan,
    skip_empty: bool,
    num_shards: int | None,
    shard: bool,
    keep_shards: bool,
) -> tuple[str, ...]:
    notes = []
    if corpus.empty and not skip_empty:
        notes.append(
            f"{corpus.empty:,} documents tokenise to nothing: the build stops at the first; pass --skip-empty "
            f"(`skip_empty=True`) to leave them out"
        )
    if num_shards is not None and not shard:
        kept = "stay in OUT/shards/" if keep_shards else "are deleted after the merge"
        notes.append(f"{num_shards} shards hold the rows again until merged (and {kept}): disk peaks near 2× rows")
    if config.hessian.kind == "ekfac":
        notes.append("ekfac adds a pass over the stored rows (no model) before indexing; not in the time estimate")
    if not config.index.exact and not shard:
        notes.append("training and filling the approximate index are not in the time estimate")
    return tuple(notes)


def _free_bytes(out: Path) -> int:
    folder = out.resolve()
    while not folder.exists():  # the folder a build would create: ask the disk it would be on
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
