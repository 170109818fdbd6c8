"""Stored raw rows → whitened vectors → the searchable FAISS segments of an index, streamed block by block.

Used by every stage that writes a segment: a build or merge (one segment of the configured kind), an append
(one exact segment over its rows), compaction and refresh (one segment over every row).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from attribindex._progress import progress as progress_bar
from attribindex.config import IndexConfig
from attribindex.hessian import Preconditioner
from attribindex.index import SegmentPlan, build_segment
from attribindex.store import RowStore, SegmentRecord, atomic_open, layout

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


def sampled_raw_blocks(store: RowStore, rows: np.ndarray) -> Iterator[torch.Tensor]:
    """The stored rows `rows` (sorted global rows), raw, as (n, D) blocks of at most WHITEN_BLOCK_BYTES."""
    block = max(1, WHITEN_BLOCK_BYTES // (4 * sum(store.block_dims)))
    for i in range(0, len(rows), block):
        yield store.raw_rows(rows[i : i + block])


def whitened_blocks(store: RowStore, preconditioner: Preconditioner, mode: str) -> Iterator[np.ndarray]:
    """Every stored row whitened (and in cosine mode normalised), as (n, D) float32 blocks in row order."""
    for _, raw in store.iter_raw(max_bytes=WHITEN_BLOCK_BYTES):
        yield preconditioner.index_vectors(raw, mode)  # (n, D)


def write_store_segment(
    out: Path, store: RowStore, preconditioner: Preconditioner, progress: bool, name: str = layout.STORE_NORMS
) -> SegmentRecord:
    """The exact segment over every row of `store`: the rows stay where they are, and `out/name` gets their
    whitened norms ‖W g_t‖ (float32, 4 bytes per row), which cosine scores divide by. Returns its record.

    One whitening pass, a few blocks of WHITEN_BLOCK_BYTES in memory whatever the number of rows.
    """
    norms = np.empty(store.rows, dtype=np.float32)  # (N,)
    with progress_bar(total=store.rows, desc="norms", unit="row", unit_scale=True, enabled=progress) as bar:
        for start, raw in store.iter_raw(max_bytes=WHITEN_BLOCK_BYTES):
            norms[start : start + len(raw)] = preconditioner.whiten(raw).norm(dim=1).numpy()
            bar.update(len(raw))
    with atomic_open(out / name) as handle:
        np.save(handle, norms)
    return SegmentRecord(file=name, rows=store.rows, from_store=True)


def write_segment(
    out: Path,
    store: RowStore,
    preconditioner: Preconditioner,
    config: IndexConfig,
    mode: str,
    progress: bool,
    version: int = 1,
) -> SegmentRecord:
    """Write the searchable segment `config` asks for over every stored row (under mutation `version`'s name);
    returns its manifest record.

    Exact segments search the store itself (only their norms are written); other kinds are trained on a seeded sample of the rows, filled block
    by block in memory (their size: codes of every row), then written atomically.
    """
    if config.exact:
        return write_store_segment(out, store, preconditioner, progress, layout.versioned(layout.STORE_NORMS, version))
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
    return SegmentRecord(file=name, rows=store.rows, plan=record)
