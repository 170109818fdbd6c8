"""The manifest of an index or shard folder as typed, frozen records (docs/format.md documents every key).

Each record's fields are in the order of their keys on disk, so a manifest read and written again is the same
bytes. Facts derived from a manifest (live rows, the files it records, the deleted rows) are computed here and
nowhere else. The log's events and the build requests are in `attribindex.store._log_records`; reading, upgrading
and writing the file in `attribindex.store._manifest`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from attribindex._records import json_key, not_stored, omitted_when_default
from attribindex.config import BuildConfig
from attribindex.store import _layout as layout
from attribindex.store._atomic import file_sha256
from attribindex.store._log_records import BuildRequest, DriftRecord, LogEvent


@dataclass(frozen=True, kw_only=True)
class FileRecord:
    """A file's checksum (``"sha256:" + hex``) and size, as recorded when it was written."""

    sha256: str
    bytes: int


def file_record(path: Path) -> FileRecord:
    """The record of the file at `path` as it is now."""
    return FileRecord(sha256=file_sha256(path), bytes=path.stat().st_size)


def file_records(root: Path, names) -> dict[str, FileRecord]:
    """{name: record} for files `names` under `root`."""
    return {name: file_record(root / name) for name in names}


@dataclass(frozen=True, kw_only=True)
class ChunkRecord:
    """One chunk of stored rows: `rows/<name>.<suffix>` for each suffix in `files`."""

    name: str
    rows: int
    files: dict[str, FileRecord]  # suffix (grads.npy, docs.jsonl, …) → record

    def paths(self) -> Iterator[tuple[str, FileRecord]]:
        """(path relative to the folder, record) of each of the chunk's files."""
        for suffix, file in self.files.items():
            yield layout.chunk_file(self.name, suffix), file


@dataclass(frozen=True, kw_only=True)
class ModelRecord:
    name_or_path: str
    class_name: str = json_key("class")
    revision: str | None
    fingerprint: str  # see docs/format.md, "Model fingerprint"


@dataclass(frozen=True, kw_only=True)
class TokenizerRecord:
    name_or_path: str
    class_name: str = json_key("class")
    vocab_size: int


@dataclass(frozen=True, kw_only=True)
class CorpusRecord:
    description: str
    text_field: str
    id_field: str | None
    skipped_empty: int
    truncated: int  # documents cut at max_length
    tokens: int


@dataclass(frozen=True, kw_only=True)
class ModuleRecord:
    """One captured layer; its block of a row's vector is `[offset, offset + dim)`."""

    name: str
    kind: str  # "linear" or "conv1d"
    in_features: int
    out_features: int
    bias: bool = omitted_when_default(False)  # the bias is captured: P_in has in_features + 1 columns
    rank_in: int
    rank_out: int
    offset: int
    dim: int  # rank_out · rank_in


@dataclass(frozen=True, kw_only=True)
class ProjectionRecord:
    seed: int
    hash: str
    file: str
    optimizer: dict[str, Any] | None = omitted_when_default()  # second moments folded into the projections


@dataclass(frozen=True, kw_only=True)
class TrainingRecord:
    """How an index captured while training made its rows (`capture_training`, `AttributionCallback`): each row is
    an example's gradient at the weights of the step that trained on it.

    `rows` is `per_step` (one row per (example, step), id ``<example id>@<step>``) or `summed` (one row per example:
    the sum of its gradients over the steps that trained on it, id as given). Steps count optimizer updates from 0.
    """

    rows: Literal["per_step", "summed"]
    steps: int  # optimizer steps whose examples were captured
    first_step: int
    last_step: int
    gradients: int  # (example, step) gradients captured: the rows in per_step mode


@dataclass(frozen=True, kw_only=True)
class CheckpointRecord:
    """One checkpoint of an ensemble index: its model, its fingerprint, its weight in a score and the prefix of its
    modules' names (`checkpoint-<k>/`)."""

    name_or_path: str
    fingerprint: str
    weight: float
    prefix: str


@dataclass(frozen=True, kw_only=True)
class EnsembleRecord:
    """An index over several checkpoints of one run (`build_ensemble`): rows are the checkpoints' projected
    gradients side by side; a query's score is Σ_k weight_k × checkpoint k's score."""

    checkpoints: tuple[CheckpointRecord, ...]


@dataclass(frozen=True, kw_only=True)
class ModuleStats:
    """The spectrum of one module's Hessian, as whitened."""

    mean_eigenvalue: float
    damping: float  # λ = α · mean eigenvalue
    effective_rank: float  # Σ e / max e, a rough count of directions that matter


@dataclass(frozen=True, kw_only=True)
class HessianRecord:
    kind: Literal["raw", "kfac", "ekfac", "identity"]
    damping: float  # α
    examples: int  # examples in the curvature sums
    preconditioner_hash: str
    file: str  # the preconditioner
    curvature_file: str
    modules: dict[str, ModuleStats]
    drift: DriftRecord | None = omitted_when_default()  # after an append or delete (not for identity)
    retained_deleted: int = omitted_when_default(0)  # deleted examples still in the Kronecker factors


@dataclass(frozen=True, kw_only=True)
class ExactRecord:
    """The unprojected curvature of the config's `exact` section, for exact re-ranking at query time."""

    kind: Literal["kfac", "ekfac"]
    fisher: Literal["empirical", "true"]  # labels of the factors: the data's, or sampled from the model
    damping: float  # α
    examples: int  # examples whose tokens the factor sums hold (exact.factor_sample's draw; weighted to all)
    sample: int  # examples of the EK-FAC correction pass (0 for kfac)
    factor_bytes: int  # Σ (n_in'² + n_out²) × 8 over the layers: the sums in the curvature file
    file: str  # the exact preconditioner
    preconditioner_hash: str
    biased: tuple[str, ...]  # layers whose bias is a column of the gradient
    modules: dict[str, ModuleStats]


@dataclass(frozen=True, kw_only=True)
class OperatingPoint:
    """The search setting `attribindex eval recall` chose, and what it measured."""

    nprobe: int | None = omitted_when_default()
    ef_search: int | None = omitted_when_default()
    k: int
    recall: float
    ms_per_query: float
    target: float
    queries: int
    rerank: int
    measured: str

    @property
    def settings(self) -> str:
        """The setting in one phrase, e.g. ``nprobe=16``."""
        return " ".join(f"{k}={v}" for k, v in (("nprobe", self.nprobe), ("ef_search", self.ef_search)) if v) or (
            "defaults"
        )


@dataclass(frozen=True, kw_only=True)
class SegmentRecord:
    """A searchable segment over consecutive rows: a FAISS file (without `plan` an exact float32 `IndexFlatIP`),
    or, `from_store`, an exact search over the row store itself, whose `file` holds the rows' whitened norms."""

    file: str
    rows: int
    plan: dict[str, Any] | None = omitted_when_default()  # every resolved parameter (see index.SegmentPlan)
    from_store: bool = omitted_when_default(False)  # exact over the stored rows (format 9): one copy of the vectors

    @property
    def exact(self) -> bool:
        """True for an exact segment: over the store, or a float32 flat FAISS file."""
        if self.from_store or self.plan is None:
            return True
        return self.plan["kind"] == "flat" and self.plan["storage"] == "float32"

    @property
    def description(self) -> str:
        """E.g. ``IVF1024,PQ64 (1,000,000 rows)``, ``store (1,000,000 rows)``."""
        kind = "store" if self.from_store else (self.plan or {}).get("factory", "Flat")
        return f"{kind} ({self.rows:,} rows)"


@dataclass(frozen=True, kw_only=True)
class IndexRecord:
    kind: str  # the configured index.kind
    segments: tuple[SegmentRecord, ...]  # in row order
    operating_point: OperatingPoint | None

    @property
    def description(self) -> str:
        """The segments in one line, e.g. ``IVF1024,PQ64 (1,000,000 rows) + Flat (2,000 rows)``."""
        return " + ".join(segment.description for segment in self.segments)


@dataclass(frozen=True, kw_only=True)
class DeletedRecord:
    file: str | None  # sorted int64 global rows; None when nothing is deleted
    rows: int


@dataclass(frozen=True, kw_only=True)
class StoreRecord:
    dtype: Literal["float16", "bfloat16", "float32"]
    chunk_rows: int
    chunks: tuple[ChunkRecord, ...]  # in row order

    @property
    def rows(self) -> int:
        return sum(chunk.rows for chunk in self.chunks)

    @property
    def next_chunk(self) -> int:
        """The number a new chunk gets: one past the highest in use (numbers are never reused)."""
        return max((int(chunk.name) for chunk in self.chunks), default=-1) + 1


# ---- the manifests ----


@dataclass(frozen=True, kw_only=True)
class ManifestHeader:
    """The keys an index and a shard share (and a merge takes from its shards)."""

    format: str = ""
    format_version: int = layout.FORMAT_VERSION
    index_id: str = ""  # filled in by `with_index_id` once everything else is known
    created: str
    attribindex_version: str
    model: ModelRecord
    tokenizer: TokenizerRecord
    config: BuildConfig
    corpus: CorpusRecord
    modules: tuple[ModuleRecord, ...]  # in vector order
    dim: int  # Σ module dim
    projection: ProjectionRecord
    training: TrainingRecord | None = omitted_when_default()  # rows captured while training
    ensemble: EnsembleRecord | None = omitted_when_default()  # an index over several checkpoints
    read_from_version: int = not_stored(layout.FORMAT_VERSION)  # the file's own format version, before upgrading

    def shared(self) -> dict[str, Any]:
        """The shared keys by field name, less `format` and `index_id` (each kind of manifest sets its own) and
        the version the file was read from."""
        left_out = ("format", "index_id", "read_from_version")
        names = [f.name for f in dataclasses.fields(ManifestHeader) if f.name not in left_out]
        return {name: getattr(self, name) for name in names}

    @property
    def header(self) -> ManifestHeader:
        """Just the shared keys, e.g. to start a merged index from its first shard's."""
        return ManifestHeader(**self.shared())

    @property
    def module_names(self) -> list[str]:
        return [m.name for m in self.modules]

    @property
    def block_dims(self) -> list[int]:
        return [m.dim for m in self.modules]


@dataclass(frozen=True, kw_only=True)
class IndexManifest(ManifestHeader):
    """`manifest.json` of a searchable index.

    Example:
        >>> manifest = read_manifest(Path("demo-index"))  # doctest: +SKIP
        >>> manifest.live_rows, manifest.hessian.kind, manifest.index.description  # doctest: +SKIP
        (1200, 'ekfac', 'Flat (1,200 rows)')
    """

    format: Literal["attribindex-index"] = layout.FORMAT_NAME
    rows: int  # stored rows, deleted ones included
    hessian: HessianRecord
    normalization: Literal["dot", "cosine"]
    store: StoreRecord
    index: IndexRecord
    deleted: DeletedRecord
    version: int  # 1 after a build or merge; each mutation adds 1
    files: dict[str, FileRecord]  # every file that is not a chunk's
    log: tuple[LogEvent, ...]
    exact: ExactRecord | None = omitted_when_default()  # with the config's `exact` section

    def recorded_files(self) -> Iterator[tuple[str, FileRecord]]:
        """(relative path, record) for every file the manifest records: chunk files, then the others."""
        return _recorded_files(self.store, self.files)

    @property
    def live_rows(self) -> int:
        """Rows a search can return: stored rows minus deleted ones."""
        return self.rows - self.deleted.rows

    def deleted_rows(self, root: Path) -> np.ndarray:
        """Sorted int64 global rows deleted so far, read from `root`."""
        return np.load(root / self.deleted.file) if self.deleted.file else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, kw_only=True)
class ShardSlice:
    index: int
    count: int
    documents: tuple[int, int]  # [start, stop) corpus positions; shards 0…count−1 cover the corpus in order


@dataclass(frozen=True, kw_only=True)
class CurvatureRecord:
    examples: int
    file: str


@dataclass(frozen=True, kw_only=True)
class ShardManifest(ManifestHeader):
    """`manifest.json` of one shard of a sharded build: rows and curvature sums, no preconditioner or index."""

    format: Literal["attribindex-shard"] = layout.SHARD_FORMAT_NAME
    request: BuildRequest  # lets a rerun of a multi-shard build recognise this shard as finished
    shard: ShardSlice
    rows: int
    curvature: CurvatureRecord
    store: StoreRecord
    files: dict[str, FileRecord]
    log: tuple[LogEvent, ...]

    def recorded_files(self) -> Iterator[tuple[str, FileRecord]]:
        """(relative path, record) for every file the manifest records: chunk files, then the others."""
        return _recorded_files(self.store, self.files)


Manifest = IndexManifest | ShardManifest


def _recorded_files(store: StoreRecord, files: dict[str, FileRecord]) -> Iterator[tuple[str, FileRecord]]:
    for chunk in store.chunks:
        yield from chunk.paths()
    yield from files.items()
