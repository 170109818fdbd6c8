"""The size arithmetic of a plan: the bytes of every file a build writes, from the code that writes them (the store's
codec, the `SegmentPlan` the build would resolve, `CurvatureSums.for_kind` on the meta device, the manifest's own
typed records serialised as the store serialises them), and the memory a build and a query hold."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from attribindex._records import to_json
from attribindex.config import BuildConfig
from attribindex.data import Corpus
from attribindex.hessian import FACTOR_KINDS, CurvatureSums
from attribindex.index import SegmentPlan
from attribindex.index._flat_format import FLAT_HEADER  # the bytes before the vectors of a flat index file
from attribindex.logra import GradientExtractor, ProjectionSet, SecondMomentScales
from attribindex.pipeline._exact import exact_shapes
from attribindex.pipeline._extract import SORT_WINDOW_BATCHES, ExtractState
from attribindex.pipeline._output import corpus_record, manifest_header
from attribindex.pipeline._plan_report import CorpusPlan, DiskPlan, ExactPlan, MemoryPlan
from attribindex.pipeline._write_segments import WHITEN_BLOCK_BYTES
from attribindex.store import (
    BuildEvent,
    BuildRequest,
    ChunkRecord,
    CurvatureRecord,
    DeletedRecord,
    ExactRecord,
    FileRecord,
    HessianRecord,
    IndexManifest,
    IndexRecord,
    ManifestHeader,
    ModuleStats,
    SegmentRecord,
    ShardManifest,
    ShardSlice,
    StoreRecord,
    layout,
    manifest_json,
    with_index_id,
)
from attribindex.store._codec import numpy_store_dtype

LISTED_CHUNKS = 4096  # above this many chunks, the records' bytes are extrapolated from the last two
NPY_HEADER = 128  # bytes of a .npy header for the 1- and 2-d arrays a chunk holds (numpy pads it to 64 bytes)
_SAFETENSORS_DTYPES = {1: "U8", 2: "F16", 4: "F32", 8: "F64"}


def plan_disk(
    config: BuildConfig,
    request: BuildRequest,
    corpus: Corpus,
    projections: ProjectionSet,
    optimizer: SecondMomentScales | None,
    corpus_plan: CorpusPlan,
    segment: SegmentPlan | None,
    exact: ExactPlan | None,
    extractor: GradientExtractor,
    out: str | Path | None,
) -> DiskPlan:
    rows, dim, modules = corpus_plan.documents, projections.dim, len(projections.modules)
    chunk_rows = config.store.chunk_rows
    count = math.ceil(rows / chunk_rows)  # chunks of chunk_rows rows, the last one partial
    item = numpy_store_dtype(config.store.dtype).itemsize
    # grads (n, D) in the store dtype, scales (n, M) fp32, ids (n,) uint64, docs offsets (n + 1,) int64
    store_per_example = dim * item + modules * 4 + 8 + 8
    row_bytes = rows * store_per_example + count * (8 + 4 * NPY_HEADER)  # + per chunk: one more offset, 4 headers
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
    docs_per_row = corpus_plan.text_bytes / max(rows, 1)
    exact_layers = exact_shapes(extractor) if config.exact.enabled else {}
    unprojected = {n: s.gradient_shape for n, s in exact_layers.items()}  # the exact section's (n_out, n_in')
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
    counted = corpus_record(corpus, corpus_plan.empty, corpus_plan.truncated, corpus_plan.tokens)
    lm, tokenizer = extractor.model, extractor.tokenizer
    placeholders = {"fingerprint": _CHECKSUM, "projection_hash": _CHECKSUM}  # of their length: nothing is hashed
    header = manifest_header(
        config, request.model, lm, tokenizer, projections, optimizer, counted, _TIME, **placeholders
    )

    def recorded(chunk_records: list[ChunkRecord]) -> tuple[int, int]:
        """(curvature file, manifest) bytes when the checkpoint note and the manifest list these chunks."""
        note = ExtractState(
            next_position=rows,
            chunks=chunk_records,
            skipped=corpus_plan.empty,
            tokens=corpus_plan.tokens,
            truncated=corpus_plan.truncated,
            complete=True,
        )
        curvature = _safetensors_bytes(
            _curvature_tensors(config.hessian.kind, shapes, unprojected),
            {"count": str(rows), "note": json.dumps(to_json(note)), "retained_deleted": "0"},
        )
        sizes = {layout.PROJECTIONS: projection_bytes, layout.CURVATURE: curvature}
        if segment is not None:
            sizes |= {layout.PRECONDITIONER: preconditioner, _segment_file(config): index}
            if exact is not None:
                sizes[layout.EXACT_PRECONDITIONER] = exact_preconditioner
        store = StoreRecord(dtype=config.store.dtype, chunk_rows=chunk_rows, chunks=tuple(chunk_records))
        files = {name: FileRecord(sha256=_CHECKSUM, bytes=size) for name, size in sizes.items()}
        if segment is None:
            manifest = _shard_manifest(header, request, corpus, store, files)
        else:
            biased = tuple(name for name, layer in exact_layers.items() if layer.bias)
            manifest = _index_manifest(config, header, segment, store, files, exact, biased)
        return curvature, len(manifest_json(with_index_id(manifest)))

    def chunk(number: int) -> ChunkRecord:
        return _chunk_record(number, min(chunk_rows, rows - number * chunk_rows), dim * item, modules, docs_per_row)

    if count <= LISTED_CHUNKS:
        curvature, manifest_bytes = recorded([chunk(i) for i in range(count)])
    else:  # millions of chunk records: each adds what the last full one adds (its number at the widest)
        one = recorded([chunk(count - 1)])
        two = recorded([chunk(count - 2), chunk(count - 1)])
        curvature, manifest_bytes = (a + (count - 1) * (b - a) for a, b in zip(one, two))
    total = row_bytes + corpus_plan.text_bytes + index + projection_bytes + curvature + preconditioner
    total += exact_preconditioner + manifest_bytes
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
        manifest=manifest_bytes,
        total=total,
        free=_free_bytes(Path(out)) if out is not None else None,
    )


def _segment_bytes(plan: SegmentPlan, rows: int) -> int:
    """Bytes of the segment file the build writes for `plan` (and holds in memory at query): for the exact segment
    over the store, the rows' float32 norms; for FAISS kinds, the codes of every row, 8-byte ids of inverted lists,
    and what training leaves (centroids, codebooks, quantiser ranges)."""
    d = plan.index_dim
    if plan.kind == "flat":
        if plan.storage == "float32":
            return NPY_HEADER + 4 * rows
        return FLAT_HEADER.size + rows * plan.dim * 2
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


def _chunk_record(number: int, rows: int, grads_row: int, modules: int, docs_per_row: float) -> ChunkRecord:
    """A chunk's record as the checkpoint note and the manifest hold it."""
    sizes = {
        layout.CHUNK_GRADS: NPY_HEADER + rows * grads_row,
        layout.CHUNK_SCALES: NPY_HEADER + rows * modules * 4,
        layout.CHUNK_DOCS: round(rows * docs_per_row),
        layout.CHUNK_DOC_OFFSETS: NPY_HEADER + (rows + 1) * 8,
        layout.CHUNK_ID_HASHES: NPY_HEADER + rows * 8,
    }
    files = {suffix: FileRecord(sha256=_CHECKSUM, bytes=size) for suffix, size in sizes.items()}
    return ChunkRecord(name=layout.chunk_name(number), rows=rows, files=files)


def _segment_file(config: BuildConfig) -> str:
    """The name of the segment file a build writes (`write_segment` at version 1)."""
    return layout.versioned(layout.segment_file(config.index.kind, config.index.storage), 1)


# The manifest is sized from the records a build writes, filled with placeholders as long as what the build puts
# there: checksums and fingerprints of 71 characters, a time of 25, and floats of ~18 digits.
_CHECKSUM = "sha256:" + "0" * 64
_TIME = "2026-01-01T00:00:00+00:00"
_NUMBER = 0.123456789012345678


def _shard_manifest(
    header: ManifestHeader, request: BuildRequest, corpus: Corpus, store: StoreRecord, files: dict[str, FileRecord]
) -> ShardManifest:
    """What `finalize_shard` records for a shard of these rows."""
    slot = request.shard
    return ShardManifest(
        **header.shared(),
        request=request,
        shard=ShardSlice(index=slot.index, count=slot.count, documents=(corpus.start, corpus.stop)),
        rows=store.rows,
        curvature=CurvatureRecord(examples=store.rows, file=layout.CURVATURE),
        store=store,
        files=files,
        log=(BuildEvent(rows=store.rows, time=_TIME),),
    )


def _index_manifest(
    config: BuildConfig,
    header: ManifestHeader,
    segment: SegmentPlan,
    store: StoreRecord,
    files: dict[str, FileRecord],
    exact: ExactPlan | None,
    biased: tuple[str, ...],
) -> IndexManifest:
    """What `finalize_index` records for an index of these rows."""
    rows, names = store.rows, header.module_names
    stats = ModuleStats(mean_eigenvalue=_NUMBER, damping=_NUMBER, effective_rank=_NUMBER)
    hessian = HessianRecord(
        kind=config.hessian.kind,
        damping=config.hessian.damping,
        examples=rows,
        preconditioner_hash=_CHECKSUM,
        file=layout.PRECONDITIONER,
        curvature_file=layout.CURVATURE,
        modules=dict.fromkeys(names, stats) if config.hessian.kind != "identity" else {},  # identity: no spectra
    )
    plan = None
    if not config.index.exact:
        plan = segment.record() | {"max_norm": _NUMBER if segment.metric == "l2_augmented" else None}
    exact_record = None
    if exact is not None:
        exact_record = ExactRecord(
            kind=config.exact.kind,
            fisher=config.exact.fisher,
            damping=config.exact.damping,
            examples=rows,
            sample=min(config.exact.sample, rows) if config.exact.kind == "ekfac" else 0,
            factor_bytes=exact.factor_bytes,
            file=layout.EXACT_PRECONDITIONER,
            preconditioner_hash=_CHECKSUM,
            biased=biased,
            modules=dict.fromkeys(names, stats),
        )
    return IndexManifest(
        **header.shared(),
        rows=rows,
        hessian=hessian,
        normalization=config.index.mode,
        store=store,
        index=IndexRecord(
            kind=config.index.kind,
            segments=(SegmentRecord(file=_segment_file(config), rows=rows, plan=plan, from_store=config.index.exact),),
            operating_point=None,
        ),
        deleted=DeletedRecord(file=None, rows=0),
        version=1,
        files=files,
        log=(BuildEvent(rows=rows, time=_TIME),),
        exact=exact_record,
    )


def plan_memory(
    config: BuildConfig,
    lm,
    rows: int,
    projections: ProjectionSet,
    disk: DiskPlan,
    exact: ExactPlan | None,
    activations: int | None,
    segment: SegmentPlan | None,
) -> MemoryPlan:
    """Resident bytes at build and at query; `activations` as the probe measured them, None when no probe ran
    (counted as 0, and said so)."""
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
    extraction = int(model + (activations or 0) + window + curvature + exact_bytes)
    build = int(max(extraction, finalize))
    query = model + disk.index + disk.preconditioner + disk.projections + disk.exact_preconditioner
    where = (
        "read into memory (candidates re-scored from the row store)"
        if approximate
        else "the row store itself, memory-mapped and scanned block by block (in the page cache where it fits)"
    )
    measured = (
        f"activations as measured in the probe's batches of {config.extract.batch_size} (longer documents need more)"
        if activations is not None
        else "activations not included: no probe ran to measure them"
    )
    assumptions = (
        f"model weights in {config.extract.dtype}; {measured}",
        f"{SORT_WINDOW_BATCHES} batches of float32 rows per sorted window, one chunk of {config.store.chunk_rows:,} "
        f"encoded rows, two copies of the curvature sums",
        f"the index at query is {where}; query batches and the server add little",
    )
    return MemoryPlan(
        model=model,
        window=int(window),
        curvature=curvature,
        exact=exact_bytes,
        activations=int(activations or 0),
        finalize=int(finalize),
        build=build,
        index=disk.index,
        query=int(query),
        assumptions=assumptions,
    )


def _free_bytes(out: Path) -> int:
    folder = out.resolve()
    while not folder.exists():  # the folder a build would create: ask the disk it would be on
        folder = folder.parent
    return shutil.disk_usage(folder).free
