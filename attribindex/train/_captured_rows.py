"""The rows one capturing process has taken so far, and their commit points at training checkpoints.

Rows go to chunk files as they come (rows="per_step", one per example and step, id ``<id>@<step>``) or are added up
per example in memory (rows="summed"), with the counts and curvature sums that go with them. `commit(step)` makes
them durable when the loop saves a checkpoint at that step; a capture made again with `resume_step` = that step
continues from the commit, with no row twice and none missing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open

from attribindex._records import from_json, to_json
from attribindex.config import BuildConfig
from attribindex.data import Document
from attribindex.errors import AttribIndexError
from attribindex.hessian import CurvatureSums
from attribindex.pipeline._extract import keep_committed_chunks
from attribindex.pipeline._output import now
from attribindex.store import BuildEvent, ChunkRecord, ChunkWriter, ResumedRecord, layout, save_safetensors
from attribindex.train._loss_scale import MicroBatch

RowsMode = Literal["per_step", "summed"]


@dataclass
class Summed:
    """An example's row summed over the steps that trained on it (rows="summed")."""

    document: Document
    row: torch.Tensor  # (D,) Σ over its steps
    steps: list[int] = field(default_factory=list)


class CapturedRows:
    """This process's rows, counts and curvature sums, written to chunk files in `folder` as they come; made with
    `resume_step`, it continues from the commit at that step."""

    def __init__(
        self,
        folder: Path,
        config: BuildConfig,
        rows_mode: RowsMode,
        names: list[str],
        dims: list[int],
        curvature: CurvatureSums,
        resume_step: int | None,
    ):
        self.folder, self.rows_mode, self.names, self.dims, self.curvature = folder, rows_mode, names, dims, curvature
        self.chunks: list[ChunkRecord] = []
        self.summed: dict[str, Summed] = {}
        self.per_step_ids: set[str] = set()  # this run's, for the duplicate check
        self.steps_seen: set[int] = set()
        self.gradients = self.tokens = self.no_loss = 0
        self.resumed_rows, self.resumed_at = 0, ""
        if resume_step is not None:
            self._restore(resume_step)
        self.writer = ChunkWriter(folder, dims, config.store.dtype, config.store.chunk_rows, len(self.chunks))

    def add(self, batch: MicroBatch, rows: torch.Tensor, factor_rows: dict[str, torch.Tensor] | None) -> None:
        """The rows (B, D) of a micro-batch's examples that carry loss, and their KFAC factor rows (or None)."""
        blocks = dict(zip(self.names, rows.split(self.dims, dim=1)))
        self.curvature.update(blocks, factor_rows)
        self.gradients += len(batch.ids)
        self.steps_seen.add(batch.step)
        self._store(batch, rows)

    def _store(self, batch: MicroBatch, rows: torch.Tensor) -> None:
        if self.rows_mode == "per_step":
            documents = [
                Document(id=f"{i}@{batch.step}", text=text, source=source)
                for i, text, source in zip(batch.ids, batch.texts, batch.sources)
            ]
            for document in documents:
                if document.id in self.per_step_ids:
                    raise AttribIndexError(
                        f"example {document.id.rsplit('@', 1)[0]!r} was trained on twice in step {batch.step}: its "
                        "id is not unique. Give every example its own id, or capture with rows='summed'."
                    )
                self.per_step_ids.add(document.id)
            self._add_rows(rows, documents)
            return
        for i, text, source, row in zip(batch.ids, batch.texts, batch.sources, rows):
            entry = self.summed.get(i)
            if entry is None:
                self.summed[i] = Summed(Document(id=i, text=text, source=source), row.clone(), [batch.step])
            else:
                entry.row += row
                entry.steps.append(batch.step)

    def _add_rows(self, rows: torch.Tensor, documents: list[Document]) -> None:
        start = 0
        while start < len(documents):
            take = min(self.writer.room, len(documents) - start)
            record = self.writer.add(rows[start : start + take].float(), documents[start : start + take])
            if record is not None:
                self.chunks.append(record)
            start += take

    def _close_chunk(self) -> None:
        record = self.writer.close()
        if record is not None:
            self.chunks.append(record)

    def commit(self, step: int, dim: int) -> None:
        """Make the rows of the steps before `step` durable (`dim`: the row width, for an empty summed commit).
        Each commit keeps its own copy of the curvature sums (and, with rows="summed", of the summed rows) until
        the index is written."""
        self._close_chunk()  # the partial chunk: a commit ends at a chunk's end
        note = {
            "step": step,
            "chunks": [to_json(chunk) for chunk in self.chunks],
            "gradients": self.gradients,
            "tokens": self.tokens,
            "no_loss": self.no_loss,
            "steps_seen": sorted(self.steps_seen),
        }
        if self.rows_mode == "summed":
            entries = list(self.summed.values())
            rows = torch.stack([e.row for e in entries]) if entries else torch.zeros(0, dim)
            documents = [[e.document.id, e.document.text, e.document.source, e.steps] for e in entries]
            save_safetensors(
                {"rows": rows.contiguous()},
                self.folder / layout.capture_summed(step),
                {"documents": json.dumps(documents)},
            )
        self.curvature.save(self.folder / layout.capture_commit(step), note=note)  # the commit point

    def _restore(self, step: int) -> None:
        """Continue from the commit at `step`: its chunks, sums and counters; whatever was written after it goes."""
        path = self.folder / layout.capture_commit(step)
        if not path.is_file():
            found = sorted({layout.capture_commit_step(f.name) for f in self.folder.glob(layout.CAPTURE_COMMITS)})
            raise AttribIndexError(
                f"training resumes at step {step}, but the capture in {self.folder} committed steps {found} "
                "only (a commit is made whenever a checkpoint is saved). Resume training from one of those "
                "checkpoints, or start the capture over with overwrite=True."
            )
        self.curvature, note = CurvatureSums.load(path)
        self.chunks = [from_json(ChunkRecord, c, f"{path} (note)") for c in note["chunks"]]
        keep_committed_chunks(self.folder, self.chunks)
        self.gradients, self.tokens, self.no_loss = note["gradients"], note["tokens"], note["no_loss"]
        self.steps_seen = set(note["steps_seen"])
        if self.rows_mode == "summed":
            summed = self.folder / layout.capture_summed(step)
            with safe_open(str(summed), framework="pt") as handle:
                documents = json.loads(handle.metadata()["documents"])
                rows = handle.get_tensor("rows")
            for (i, text, source, steps), row in zip(documents, rows):
                self.summed[i] = Summed(Document(id=i, text=text, source=source), row, steps)
        self.resumed_rows, self.resumed_at = sum(chunk.rows for chunk in self.chunks), now()
        self.drop_commits_after(step)

    def drop_commits_after(self, step: int) -> None:
        for file in self.folder.glob(layout.CAPTURE_COMMITS):
            if layout.capture_commit_step(file.name) > step:
                file.unlink()

    def sums(self) -> dict:
        """What another rank's `add_sums` adds up: the summed rows per example, curvature and counts."""
        return {
            "rows": {i: (e.document, e.steps, e.row.cpu()) for i, e in self.summed.items()},
            "curvature": self.curvature,
            "counts": (self.gradients, self.tokens, self.no_loss, sorted(self.steps_seen)),
        }

    def add_sums(self, other: dict) -> None:
        """Add another rank's `sums()` to these."""
        for i, (document, steps, row) in other["rows"].items():
            entry = self.summed.get(i)
            if entry is None:
                self.summed[i] = Summed(document, row.clone(), list(steps))
            else:
                entry.row += row
                entry.steps = sorted(entry.steps + list(steps))
        self.curvature.merge(other["curvature"])
        gradients, tokens, no_loss, steps = other["counts"]
        self.gradients += gradients
        self.tokens += tokens
        self.no_loss += no_loss
        self.steps_seen |= set(steps)

    def finish(self, started: str) -> BuildEvent:
        """Write the remaining rows (the summed ones, the partial chunk) and the curvature sums; the build event of
        the rows, from `started`."""
        for entry in self.summed.values():
            shown = ", ".join(map(str, entry.steps[:8])) + (
                f", … ({len(entry.steps)} in all)" if len(entry.steps) > 8 else ""
            )
            document = dataclasses.replace(entry.document, source=f"{entry.document.source}, steps {shown}")
            self._add_rows(entry.row[None], [document])
        self._close_chunk()
        if not self.chunks:
            raise AttribIndexError(
                "no example was captured: no training-mode forward + backward ran on the model inside the capture."
            )
        self.curvature.save(self.folder / layout.CURVATURE)
        self.drop_commits_after(-1)  # the rows are complete from here on: the commits are no longer needed
        resumed = ResumedRecord(rows=self.resumed_rows, time=self.resumed_at) if self.resumed_at else None
        return BuildEvent(rows=sum(chunk.rows for chunk in self.chunks), time=started, resumed=resumed)
