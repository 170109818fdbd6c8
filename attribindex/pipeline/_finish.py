"""The end of a build or merge: preconditioner, FAISS index and manifest from curvature sums and written chunks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from attribindex._progress import progress as progress_bar
from attribindex.config import BuildConfig, IndexConfig
from attribindex.hessian import CurvatureSums, Preconditioner, fit_preconditioner
from attribindex.index import FlatIndexWriter, SegmentPlan, build_segment
from attribindex.store import RowStore, file_sha256, layout, write_json


def _index_id(manifest: dict) -> str:
    content = json.dumps([manifest["projection"], manifest.get("hessian"), manifest["store"]["chunks"]], sort_keys=True)
    return "ai-" + hashlib.sha256(content.encode()).hexdigest()[:12]


def file_records(out: Path, names) -> dict:
    return {name: {"sha256": file_sha256(out / name), "bytes": (out / name).stat().st_size} for name in names}


WHITEN_BLOCK_BYTES = 32 * 2**20  # rows whitened at a time; a handful of copies of this is the merge's working memory


def raw_blocks(store: RowStore, deleted: np.ndarray | None = None, progress: bool = False) -> Iterator[torch.Tensor]:
    """Every stored row not in `deleted` (sorted global rows), raw, as (n, D) blocks in row order: the pass that
    corrects EK-FAC's eigenvalues."""
    with progress_bar(total=store.rows, desc="ekfac", unit="row", unit_scale=True, enabled=progress) as bar:
        for start, raw in store.iter_raw(max_bytes=WHITEN_BLOCK_BYTES):
            bar.update(len(raw))
            if deleted is not None and len(deleted):
                rows = np.arange(start, start + len(raw))
                raw = raw[torch.from_numpy(~np.isin(rows, deleted))]
            yield raw


def whitened_blocks(store: RowStore, preconditioner: Preconditioner, mode: str) -> Iterator[np.ndarray]:
    """Every stored row whitened (and in cosine mode normalised), as (n, D) float32 blocks in row order."""
    for _, raw in store.iter_raw(max_bytes=WHITEN_BLOCK_BYTES):
        yield preconditioner.index_vectors(raw, mode)  # (n, D)


def write_flat_index(
    out: Path, store: RowStore, preconditioner: Preconditioner, mode: str, progress: bool, name: str = layout.FLAT_INDEX
) -> dict:
    """Write every stored row, whitened, into the exact FAISS file `out/name`; returns its segment record.

    Streams to disk: memory stays at a few blocks of WHITEN_BLOCK_BYTES whatever the number of rows.
    """
    with (
        FlatIndexWriter(out / name, sum(store.block_dims)) as writer,
        progress_bar(total=store.rows, desc="index", unit="row", unit_scale=True, enabled=progress) as bar,
    ):
        for vectors in whitened_blocks(store, preconditioner, mode):
            writer.add(vectors)
            bar.update(len(vectors))
    return {"file": name, "rows": store.rows}


def write_segment(
    out: Path,
    store: RowStore,
    preconditioner: Preconditioner,
    config: IndexConfig,
    mode: str,
    progress: bool,
    version: int = 1,
) -> dict:
    """Write the searchable segment `config` asks for over every stored row; returns its manifest record.

    Exact flat segments stream to disk; other kinds are trained on a seeded sample of the rows, filled block
    by block in memory (their size: codes of every row), then written atomically.
    """
    if config.exact:
        return write_flat_index(
            out, store, preconditioner, mode, progress, layout.versioned(layout.FLAT_INDEX, version)
        )
    name = layout.versioned(layout.segment_file(config.kind, config.storage), version)
    plan = SegmentPlan.resolve(config, mode, store.rows, sum(store.block_dims))
    record = build_segment(
        out / name,
        plan,
        store.rows,
        blocks=lambda: whitened_blocks(store, preconditioner, mode),
        sample=lambda rows: preconditioner.index_vectors(store.raw_rows(rows), mode),
        progress=progress,
    )
    return {"file": name, "rows": store.rows, "plan": record}


def _complete(out: Path, manifest: dict) -> dict:
    manifest["index_id"] = _index_id(manifest)
    write_json(out / layout.MANIFEST, manifest)  # the commit point: from here on the folder is complete
    (out / layout.BUILD_MARKER).unlink(missing_ok=True)
    return manifest


def finish_index(
    out: Path,
    config: BuildConfig,
    header: dict,
    curvature: CurvatureSums,
    chunks: list[dict],
    event: dict,
    progress: bool,
) -> dict:
    """Compute the preconditioner once, write the FAISS index over every chunk, then the manifest (last)."""
    names = [m["name"] for m in header["modules"]]
    dims = [m["dim"] for m in header["modules"]]
    store = RowStore(out, dims, config.store.dtype, chunks)
    preconditioner = fit_preconditioner(
        config.hessian.kind,
        curvature,
        names,
        dims,
        config.hessian.damping,
        lambda: raw_blocks(store, progress=progress),
    )
    preconditioner.save(out / layout.PRECONDITIONER)
    segment = write_segment(out, store, preconditioner, config.index, config.index.mode, progress)
    manifest = header | {
        "format": layout.FORMAT_NAME,
        "rows": store.rows,
        "hessian": {
            "kind": preconditioner.kind,
            "damping": config.hessian.damping,
            "examples": curvature.count,
            "preconditioner_hash": preconditioner.hash(),
            "file": layout.PRECONDITIONER,
            "curvature_file": layout.CURVATURE,
            "modules": {name: dataclasses.asdict(stats) for name, stats in preconditioner.stats.items()},
        },
        "normalization": config.index.mode,
        "store": {"dtype": config.store.dtype, "chunk_rows": config.store.chunk_rows, "chunks": chunks},
        "index": {"kind": config.index.kind, "segments": [segment], "operating_point": None},
        "deleted": {"file": None, "rows": 0},
        "version": 1,
        "files": file_records(out, (layout.PROJECTIONS, layout.CURVATURE, layout.PRECONDITIONER, segment["file"])),
        "log": [event],
    }
    return _complete(out, manifest)


def finish_shard(
    out: Path, config: BuildConfig, header: dict, curvature: CurvatureSums, chunks: list[dict], shard: dict, event: dict
) -> dict:
    """A shard keeps its rows and curvature sums; the preconditioner and index are made once, by the merge."""
    manifest = header | {
        "format": layout.SHARD_FORMAT_NAME,
        "shard": shard,
        "rows": sum(c["rows"] for c in chunks),
        "curvature": {"examples": curvature.count, "file": layout.CURVATURE},
        "store": {"dtype": config.store.dtype, "chunk_rows": config.store.chunk_rows, "chunks": chunks},
        "files": file_records(out, (layout.PROJECTIONS, layout.CURVATURE)),
        "log": [event],
    }
    return _complete(out, manifest)
