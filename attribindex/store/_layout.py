"""Every on-disk name of an index folder, in one place. See docs/format.md."""

from __future__ import annotations

import re
from pathlib import Path

FORMAT_NAME = "attribindex-index"
SHARD_FORMAT_NAME = "attribindex-shard"  # one slice of a sharded build: rows + curvature sums, no searchable index
FORMAT_VERSION = 10  # 2: index segments, deleted rows, versioned files; 3: approximate segments (`plan`);
# 4: kfac/ekfac curvature and preconditioner tensors, optimizer-aware projections; 5: the `exact` section;
# 6: captured biases (`modules[].bias`), the head excluded as the model's output embedding; 7: `training`, rows
# captured while a model trains; 8: an append event's `request`, so a rerun of a committed append is recognised;
# 9: exact segments over the row store (`from_store`, a norms file instead of a whitened float32 copy); 10: the
# exact section's factors over a seeded sample of the examples (`exact.factor_sample`)
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)  # 1 is read as one segment; 2 has flat segments only

MANIFEST = "manifest.json"  # written last: its presence marks a complete index
BUILD_MARKER = "building.json"  # present while a build runs; an index folder with it is incomplete
PROJECTIONS = "projections.safetensors"
CURVATURE = "curvature.safetensors"
PRECONDITIONER = "preconditioner.safetensors"
EXACT_PRECONDITIONER = "exact_preconditioner.safetensors"  # unprojected KFAC / EK-FAC eigenbases and eigenvalues
EXACT_CORRECTION = "exact_correction.safetensors"  # EK-FAC correction sums while a build runs (its checkpoint)
ROWS_DIR = "rows"
INDEX_DIR = "index"
FLAT_INDEX = f"{INDEX_DIR}/flat.faiss"  # the exact segment of a build before format 9 (whitened float32 FAISS)
APPENDED_SEGMENT = f"{INDEX_DIR}/segment.faiss"  # one per append before format 9, versioned: segment.vN.faiss
# From format 9 an exact segment searches the store itself and keeps only its rows' whitened norms (float32 .npy):
STORE_NORMS = f"{INDEX_DIR}/norms.npy"  # the exact segment of a build; compaction and refresh write norms.vN.npy
APPENDED_NORMS = f"{INDEX_DIR}/segment-norms.npy"  # one per append, versioned: segment-norms.vN.npy
SHARDS_DIR = "shards"  # a multi-process build keeps its shards here until they are merged
MEMBERS_DIR = "members"  # a checkpoint ensemble's per-checkpoint extractions, until they are stitched
DELETED = "deleted.npy"  # sorted int64 global rows hidden from every result (versioned, see `versioned`)
APPEND_CHECKPOINT = "append.checkpoint.safetensors"  # curvature of rows being appended, until the commit
APPEND_REQUEST = "append.request.json"  # what the append in progress is doing (its `request`): a rerun of it resumes
LOCK = ".lock"  # held (flock) by the one process changing an index

# Per chunk `rows/<chunk>.<suffix>`; chunks are numbered in build order and never renamed.
CHUNK_GRADS = "grads.npy"  # (n, D) raw projected gradients, store dtype (bfloat16 as uint16 bits)
CHUNK_SCALES = "scales.npy"  # (n, M) float32 per-row, per-module scale: raw = grads * scale
CHUNK_DOCS = "docs.jsonl"  # n lines {"id", "source", "text"}
CHUNK_DOC_OFFSETS = "docs.offsets.npy"  # (n + 1,) int64 byte offsets of the lines of docs.jsonl
CHUNK_ID_HASHES = "ids.npy"  # (n,) uint64 id hashes (`id_hash`), so finding ids never reads the texts
CHUNK_FILES = (CHUNK_GRADS, CHUNK_SCALES, CHUNK_DOCS, CHUNK_DOC_OFFSETS, CHUNK_ID_HASHES)


def chunk_name(number: int) -> str:
    return f"{number:06d}"


def chunk_file(chunk: str, suffix: str) -> str:
    return f"{ROWS_DIR}/{chunk}.{suffix}"


def versioned(name: str, version: int) -> str:
    """The name of a file rewritten by mutation `version`: `curvature.v3.safetensors`; version 1 keeps `name`.

    A mutation writes new files under new names and commits by rewriting the manifest, so a crash
    before the commit leaves the previous version whole.
    """
    if version <= 1:
        return name
    folder, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return f"{folder + '/' if folder else ''}{stem}.v{version}.{suffix}"


def segment_file(kind: str, storage: str = "float32") -> str:
    """The segment file a build writes: `index/norms.npy` (exact, over the store), `index/flat-float16.faiss`,
    `index/ivf_pq.faiss`, …"""
    if kind == "flat":
        return STORE_NORMS if storage == "float32" else f"{INDEX_DIR}/flat-{storage}.faiss"
    return f"{INDEX_DIR}/{kind}.faiss"


def shard_dir_name(index: int, count: int) -> str:
    return f"{index:05d}-of-{count:05d}"


def capture_commit(step: int) -> str:
    """A capture's state as of a training checkpoint at `step` (rows of the steps before it): curvature sums and a
    note with its chunks; `capture_summed(step)` holds the summed rows of a `rows="summed"` capture."""
    return f"capture.step-{step:09d}.safetensors"


def capture_summed(step: int) -> str:
    return f"capture.step-{step:09d}.summed.safetensors"


CAPTURE_COMMITS = "capture.step-*.safetensors"  # matches both kinds of file above


def capture_commit_step(name: str) -> int:
    """The step of a file named by `capture_commit` or `capture_summed`."""
    return int(name.removeprefix("capture.step-").split(".")[0])


# safetensors (from 0.5) writes a file through a temporary of Rust's `tempfile` crate in the same folder, `.tmp`
# and 6 letters or digits, then renames it: a process killed in between leaves it behind.
_SAFETENSORS_TEMPORARY = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def is_temporary(name: str) -> bool:
    """Names of temporaries a killed process can leave behind: atomic writes' (`.NAME.tmp-PID`) and safetensors'
    own (`.tmpXXXXXX`)."""
    return (name.startswith(".") and ".tmp-" in name) or _SAFETENSORS_TEMPORARY.fullmatch(name) is not None


def chunk_files_from(root: Path, first: int) -> list[Path]:
    """The files of chunks numbered `first` or higher in `root/rows`, and the temporaries there: what an
    unfinished extraction (a build or an append) may have left."""
    if not (root / ROWS_DIR).is_dir():
        return []
    return [f for f in (root / ROWS_DIR).iterdir() if is_temporary(f.name) or int(f.name.split(".")[0]) >= first]


def is_index_dir(path: Path) -> bool:
    """True when `path` holds a complete index or shard (its manifest exists)."""
    return (path / MANIFEST).is_file()


def looks_like_ours(path: Path) -> bool:
    """True when `path` holds a complete or interrupted attribindex build (safe to overwrite)."""
    return (path / MANIFEST).exists() or (path / BUILD_MARKER).exists()
