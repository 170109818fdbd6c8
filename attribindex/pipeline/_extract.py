"""The extraction pass: corpus → per-example projected gradients in durable chunks + curvature sums, resumable.

The curvature file is also the resume checkpoint. It is rewritten (atomically) each time a chunk is
written, holding the sums over exactly the rows of the written chunks, and a note with those chunks'
records and the corpus position to continue from. One rename commits both, so a build killed at any
point (SIGKILL included) resumes from its last chunk: no row is lost or duplicated.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from attribindex._progress import progress as progress_bar
from attribindex._records import from_json, to_json
from attribindex.config import StoreConfig
from attribindex.data import Corpus, TokenizedExample, batched
from attribindex.errors import AttribIndexError
from attribindex.hessian import CurvatureSums, factor_width
from attribindex.logra import GradientExtractor
from attribindex.pipeline._exact import ExactFactors
from attribindex.store import ChunkRecord, ChunkWriter, file_problem, layout

SORT_WINDOW_BATCHES = 16  # batches read ahead and regrouped by length; memory: this many batches of vectors


def _glibc_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


_MALLOC_TRIM = _glibc_malloc_trim()


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS. Batches of changing shapes otherwise leave glibc's heap
    fragmented: on the demo build this kept peak RSS at 1.50 GB instead of 1.24 GB, at no measurable cost."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclass
class ExtractState:
    """What the durable chunks cover; saved as the checkpoint's note."""

    next_position: int  # first corpus position whose row is not in a written chunk
    chunks: list[ChunkRecord] = field(default_factory=list)
    skipped: int = 0  # empty documents before next_position, left out with skip_empty
    tokens: int = 0
    truncated: int = 0
    complete: bool = False

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.chunks)


@dataclass
class Checkpoint:
    curvature: CurvatureSums
    state: ExtractState


@dataclass
class Extraction:
    """The outcome of the pass: all chunks (resumed and new) and statistics over the whole slice."""

    state: ExtractState
    curvature: CurvatureSums
    seconds: float  # extraction time of this run only
    resumed_rows: int


def read_checkpoint(out: Path, checkpoint: str = layout.CURVATURE, first_chunk: int = 0) -> Checkpoint | None:
    """The last committed state of an interrupted extraction into `out` (its chunks are numbered from
    `first_chunk`), with the killed run's leftovers removed: chunk files from `first_chunk` on that the
    checkpoint does not list, and temporaries.

    Chunk files are re-hashed: resuming on top of a damaged chunk would build a wrong index.
    """
    path = out / checkpoint
    if not path.is_file():
        return None
    curvature, note = CurvatureSums.load(path)
    state = from_json(ExtractState, note, f"{path} (metadata note)")
    keep_committed_chunks(out, state.chunks, first_chunk)
    return Checkpoint(curvature, state)


def keep_committed_chunks(out: Path, chunks: list[ChunkRecord], first_chunk: int = 0) -> None:
    """Before resuming: re-hash the committed `chunks` (resuming on top of a damaged one would build a wrong index)
    and delete the chunk files from `first_chunk` on that they do not list (written after the commit), and
    temporaries."""
    keep = set()
    for chunk in chunks:
        for name, record in chunk.paths():
            keep.add(name)
            if file_problem(out, name, record) is not None:
                raise AttribIndexError(
                    f"cannot resume the interrupted work in {out}: its chunk file {name} is missing or damaged."
                )
    for file in layout.chunk_files_from(out, first_chunk):
        if f"{layout.ROWS_DIR}/{file.name}" not in keep:
            file.unlink()


def remove_temporaries(out: Path) -> None:
    for file in out.rglob(".*"):
        if layout.is_temporary(file.name):
            file.unlink()


class _ChunkCommitter:
    """Rows handed to the chunk writer, and the durable state: each time a chunk is written, its curvature sums,
    token counts and record join the checkpoint in one atomic save."""

    def __init__(self, out: Path, checkpoint: str, writer: ChunkWriter, resume: Checkpoint, empty_sums):
        self.path, self.writer = out / checkpoint, writer
        self.durable, self.state = resume.curvature, resume.state
        self._empty_sums = empty_sums
        self.pending = empty_sums()  # curvature of the rows not yet in a written chunk
        self.tokens = self.truncated = 0  # likewise
        self.skipped_positions: list[int] = []  # empty documents skipped since the last commit
        self.last_added = self.state.next_position - 1

    def add(
        self, segment: list, vectors: torch.Tensor, blocks: dict, factor_blocks: dict | None, exact: dict | None
    ) -> None:
        """Hand `segment` ((position, document, example) in corpus order, all in the current chunk) to the writer."""
        self.pending.update(blocks, factor_blocks, exact)
        self.tokens += sum(len(example.input_ids) for _, _, example in segment)
        self.truncated += sum(example.truncated for _, _, example in segment)
        record = self.writer.add(vectors, [doc for _, doc, _ in segment])
        self.last_added = segment[-1][0]
        if record is not None:
            self.commit(record)

    def commit(self, record: ChunkRecord) -> None:
        """A chunk was written: move what it holds from pending to the checkpoint, and save it."""
        state, next_position = self.state, self.last_added + 1
        self.durable.merge(self.pending)
        state.chunks.append(record)
        state.next_position = next_position
        state.skipped += sum(p < next_position for p in self.skipped_positions)
        self.skipped_positions[:] = [p for p in self.skipped_positions if p >= next_position]
        state.tokens += self.tokens
        state.truncated += self.truncated
        self.durable.save(self.path, note=to_json(state))
        self.pending, self.tokens, self.truncated = self._empty_sums(), 0, 0

    def finish(self, description: str) -> None:
        """Write the last, partial chunk and mark the pass complete."""
        record = self.writer.close()
        if record is not None:
            self.commit(record)
        self.state.skipped += len(self.skipped_positions)  # all after the last row: no commit counted them
        self.state.complete = True
        if not self.state.chunks:
            raise AttribIndexError(f"no document of {description} carries loss; nothing to index.")
        self.durable.save(self.path, note=to_json(self.state))


def extract(
    corpus: Corpus,
    extractor: GradientExtractor,
    out: Path,
    store: StoreConfig,
    batch_size: int,
    skip_empty: bool,
    resume: Checkpoint | None,
    progress: bool,
    hessian_kind: str,
    label: str = "extract",
    position: int | None = None,
    checkpoint: str = layout.CURVATURE,
    first_chunk: int = 0,
    exact: ExactFactors | None = None,
) -> Extraction:
    """One pass over the corpus (from the checkpoint on, if any): rows to chunk files, curvature sums to the checkpoint.

    Chunks are numbered from `first_chunk` (an append continues after the index's last chunk) and the
    checkpoint is the file `out/checkpoint`. The curvature sums hold what `hessian_kind` needs (for kfac/ekfac,
    the Kronecker factors the hooks return with each row), and with `exact` the unprojected factors too.

    Documents are read in windows of SORT_WINDOW_BATCHES batches and batched by length (longest first) inside a
    window (padding fell from 29 % to 3 % of the tokens on the demo corpus); rows are still written in corpus
    order, and each row is independent of the batch it ran in.
    """
    names = [m.name for m in extractor.projections.modules]
    dims = extractor.projections.block_dims
    shapes = extractor.projections.block_shapes
    widths = [factor_width(shape) for shape in shapes]

    def empty_sums() -> CurvatureSums:
        return CurvatureSums.for_kind(hessian_kind, names, shapes, exact.empty_shapes() if exact else None)

    resume = resume or Checkpoint(empty_sums(), ExtractState(next_position=corpus.start))
    resumed_rows = resume.state.rows
    if resume.state.complete:
        return Extraction(resume.state, resume.curvature, 0.0, resumed_rows)
    first = first_chunk + len(resume.state.chunks)
    writer = ChunkWriter(out, dims, store.dtype, store.chunk_rows, first_chunk=first)
    chunks = _ChunkCommitter(out, checkpoint, writer, resume, empty_sums)
    factors = chunks.durable.tracks_factors

    started = time.perf_counter()
    bar = progress_bar(
        total=corpus.known_length(),
        initial=chunks.state.next_position - corpus.start,
        desc=label,
        unit="doc",
        enabled=progress,
        position=position,
    )
    tokens_this_run = 0
    documents = _tokenized(corpus, chunks.state.next_position, extractor, skip_empty, chunks.skipped_positions)
    for window in batched(documents, batch_size * SORT_WINDOW_BATCHES):
        examples = [example for _, _, example in window]
        # The window is written as slices that each end in one chunk: the first fills the current chunk's room.
        slice_of = (np.arange(len(window)) + store.chunk_rows - writer.room) // store.chunk_rows  # (W,)
        positions = [position for position, _, _ in window]
        rows, factor_sums, exact_sums = _window_rows(
            extractor, examples, positions, batch_size, names, slice_of, factors, exact, bar
        )  # (W, D), (slices, F), {slice: {name: FactorBatch}}
        _check_finite(rows, window, names, dims)
        start = 0
        while start < len(window):
            segment = window[start : start + writer.room]
            vectors = rows[start : start + len(segment)]  # (S, D), corpus order
            factor_blocks = None
            if factor_sums is not None:  # the slice's factor sums, as one summed row
                factor_blocks = dict(zip(names, factor_sums[slice_of[start]][None].split(widths, dim=1)))
            blocks = dict(zip(names, vectors.split(dims, dim=1)))
            chunks.add(segment, vectors, blocks, factor_blocks, exact_sums.get(int(slice_of[start])))
            start += len(segment)
        tokens_this_run += sum(len(example.input_ids) for example in examples)
        bar.update(window[-1][0] + 1 - corpus.start - bar.n)  # rows and skipped documents up to this window's end
        bar.set_postfix(tokens_per_s=f"{tokens_this_run / (time.perf_counter() - started):.0f}", refresh=False)
    bar.update((corpus.known_length() or bar.n) - bar.n)  # empty documents at the very end
    bar.close()
    chunks.finish(corpus.description)
    return Extraction(chunks.state, chunks.durable, time.perf_counter() - started, resumed_rows)


def _check_finite(rows: torch.Tensor, window: list, names: list[str], dims: list[int]) -> None:
    """Refuse NaN / inf gradients before they reach a chunk or the curvature sums: one such row makes the Hessian's
    eigendecomposition fail, or every whitened row and score NaN. `rows` (W, D) are `window`'s, in its order."""
    finite = torch.isfinite(rows)  # (W, D)
    if bool(finite.all()):
        return
    row = int((~finite.all(dim=1)).nonzero()[0])
    _, doc, _ = window[row]
    bad = [name for name, block in zip(names, finite[row].split(dims)) if not bool(block.all())]
    raise AttribIndexError(
        f"document {doc.id!r} ({doc.source}): its gradient is not finite (NaN or inf) in {len(bad)} of {len(names)} "
        f"modules, first {bad[0]}. The model's weights hold NaN or inf values, or its activations overflow in this "
        f"dtype: check the checkpoint (torch.isfinite over its state dict), or compute in float32 (extract.dtype)."
    )


def _tokenized(corpus: Corpus, first: int, extractor: GradientExtractor, skip_empty: bool, skipped: list[int]):
    """(position, document, tokenized example) from `first` on; empty documents are skipped or refused."""
    for position, doc in corpus.numbered(first):
        try:
            (example,) = extractor.tokenize([doc.text], [f"document {doc.id!r} ({doc.source})"])
        except AttribIndexError as err:
            if not skip_empty:
                raise AttribIndexError(f"{err} Or pass `skip_empty=True` to leave such documents out.") from None
            skipped.append(position)
            continue
        yield position, doc, example


def _window_rows(
    extractor: GradientExtractor,
    examples: list[TokenizedExample],
    positions: list[int],
    batch_size: int,
    names: list[str],
    slice_of: np.ndarray,
    factors: bool,
    exact: ExactFactors | None,
    bar,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[int, dict]]:
    """(W, D) projected gradients of a window of examples, computed longest-first, returned in window order.

    `slice_of` ((W,)) is the written slice each example falls in. With `factors`, also the Kronecker factor rows
    summed per slice, (slices, F) in float64 (modules in `names` order): per-example factors (2·rank² per module)
    are never held for the whole window, only as many sums as the window has slices (one or two, usually). With
    `exact`, the unprojected factors of the examples its sample picks by corpus position (`positions`, (W,)), summed
    per slice ({slice: {name: FactorBatch}}); batches are then split where a slice ends, since those sums exist per
    batch only.
    """
    by_length = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    rows: list[torch.Tensor] = [torch.empty(0)] * len(examples)
    factor_sums = None
    exact_sums: dict[int, dict] = {}
    for group in _batches(by_length, batch_size, slice_of if exact is not None else None):
        batch = [examples[i] for i in group]
        if exact is not None:
            exact.select([positions[i] for i in group])
        extracted = extractor.extract(batch, factors=factors, listeners=exact.same_pass if exact else ())
        for row, i in zip(extracted.concatenated(names), group):
            rows[i] = row
        if exact is not None:
            _add_exact(exact_sums.setdefault(int(slice_of[group[0]]), {}), exact.take(batch))
        if extracted.factors is not None:
            factor_rows = torch.cat([extracted.factors[name] for name in names], dim=1).cpu().double()  # (B, F)
            if factor_sums is None:
                factor_sums = factor_rows.new_zeros(int(slice_of.max()) + 1, factor_rows.shape[1])
            factor_sums.index_add_(0, torch.from_numpy(slice_of[group]), factor_rows)
        del extracted
        release_freed_memory()
        bar.update(len(group))
    return torch.stack(rows), factor_sums, exact_sums


def _batches(order: list[int], batch_size: int, slice_of: np.ndarray | None):
    """`order` in batches of `batch_size`, each split where the slice changes when `slice_of` is given."""
    for group in batched(order, batch_size):
        if slice_of is None:
            yield group
            continue
        for part in sorted({int(slice_of[i]) for i in group}):
            yield [i for i in group if slice_of[i] == part]


def _add_exact(total: dict, batch: dict) -> None:
    for name, sums in batch.items():
        if name in total:
            total[name].add_(sums)
        else:
            total[name] = sums
