"""Capture LoGra rows while a model trains, from the training loop's own backward pass: no second backward.

A training loop backpropagates L = c · Σ_b ℓ_b, where ℓ_b is example b's summed token loss (the loss an index row
is the gradient of) and c a constant of the micro-batch: HF's causal-LM loss is Σ ℓ / N with N the batch's counted
tokens (or the Trainer's `num_items_in_batch`), and the loop may scale it further (1 / accumulation steps, a world
size, an AMP loss scale). The layer hooks see δ = c · ∂ℓ_b/∂y for each example's positions, so every projected
gradient and KFAC output factor they form carries c (c² for the factor). c is read, not assumed: N from the labels
or `num_items_in_batch` the model was given, and the loop's own factor as the gradient arriving at the model's
loss. Dividing by c gives exactly the rows `attribindex build` computes at the same weights.

A loss the model did not compute itself (label smoothing, a custom `compute_loss`) has no such c, and is refused
unless the loop states it (`loss_scale`).

With `optimizer_moments`, the training optimizer's current second moments are folded into the projections step by
step (TrackStar / LESS divide by √v̂; see `attribindex.logra._optimizer`): the rows of step s are divided by the √v̂
the optimizer holds after max(s, 1) updates, the newest it has when the step's gradient is computed. Adam has none
before its first update, so the first step's layer inputs and output gradients are kept until that update and
projected then. Queries are divided by the √v̂ after the last update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from torch import nn

from attribindex._records import from_json, to_json
from attribindex._version import __version__
from attribindex.config import BuildConfig, rows_settings
from attribindex.data import Document
from attribindex.errors import AttribIndexError
from attribindex.hessian import CurvatureSums
from attribindex.logra import LayerHooks, LoGraCapture, live_second_moment_scales
from attribindex.model import model_fingerprint
from attribindex.pipeline._extract import keep_committed_chunks
from attribindex.pipeline._finalize import finalize_index, finalize_shard
from attribindex.pipeline._merge import check_shards, merge_into
from attribindex.pipeline._output import build_projections, bytes_on_disk, module_records, now, prepare_output
from attribindex.pipeline._ranks import Ranks
from attribindex.pipeline._summary import BuildSummary
from attribindex.store import (
    BuildEvent,
    BuildRequest,
    ChunkRecord,
    ChunkWriter,
    CorpusRecord,
    ManifestHeader,
    ModelRecord,
    ProjectionRecord,
    ResumedRecord,
    ShardSlice,
    ShardSlot,
    TokenizerRecord,
    TrainingRecord,
    layout,
    read_manifest,
    save_safetensors,
)

RowsMode = Literal["per_step", "summed"]
IGNORE_INDEX = -100  # the label of a position that carries no loss (HF's convention)
# (input_ids (B, T), attention_mask (B, T)) → the batch's (ids, texts or None, sources), for loops that do not say them
Identify = Callable[[torch.Tensor, torch.Tensor], tuple[list[str], list, list[str]]]


@dataclass
class _MicroBatch:
    """One forward + backward of the training loop, from the model's forward to the end of its backward."""

    step: int
    ids: list[str]
    texts: list[str]
    sources: list[str]
    counted: torch.Tensor  # (B,) tokens carrying loss per example
    loss_scale: float | None  # c, when the loop states it
    denominator: torch.Tensor | None = None  # N: what the model divided its summed loss by
    outer_gradient: torch.Tensor | None = None  # ∂L/∂(the model's loss), once backward reaches it
    wanted_loss: bool = False
    mask: torch.Tensor | None = None  # (B, T) attention mask
    deferred: bool = False  # its layer tensors are recorded, to be projected once the optimizer has second moments


class _Recorder:
    """Keeps a pass's layer inputs and output gradients in hook order, for projections not known yet."""

    def __init__(self) -> None:
        self.events: list[tuple[bool, str, torch.Tensor]] = []  # (is an input, layer, (B, T, n) tensor)

    def on_input(self, name: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        self.events.append((True, name, x.clone()))  # the model may reuse an activation's storage later

    def on_output_grad(self, name: str, delta: torch.Tensor, mask: torch.Tensor | None) -> None:
        self.events.append((False, name, delta))


@dataclass
class _Summed:
    document: Document
    row: torch.Tensor  # (D,) Σ over its steps
    steps: list[int] = field(default_factory=list)


class TrainingCapture:
    """Writes an index of the examples a model trains on, each row taken from the training loop's own backward
    pass at the weights of that step. Use `capture_training` (any loop) or `AttributionCallback` (HF Trainer).

    `commit()` at each training checkpoint makes the rows so far durable; a capture made with `resume_step` (the
    checkpoint's step) continues from there. Rows go to chunk files as they come; the index (preconditioner,
    FAISS segment, manifest) is written by `close()`, after training.

    Example:
        >>> with capture_training(model, tokenizer, "train-index", load_config("tiny"), optimizer=opt) as capture:
        ...     for batch in loader:  # doctest: +SKIP
        ...         with capture.batch(batch["id"], texts=batch["text"]):
        ...             model(input_ids=..., attention_mask=..., labels=...).loss.backward()
        ...         opt.step(); opt.zero_grad()
        >>> capture.summary.rows  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        out: str | Path,
        config: BuildConfig,
        *,
        rows: RowsMode = "per_step",
        model_path: str | None = None,
        overwrite: bool = False,
        identify: Identify | None = None,
        description: str = "examples seen in training",
        resume_step: int | None = None,
        optimizer_moments: torch.optim.Optimizer | None = None,
        from_step: int = 0,
    ):
        if rows not in ("per_step", "summed"):
            raise AttribIndexError(f"rows must be 'per_step' or 'summed', got {rows!r}.")
        if from_step < 0:
            raise AttribIndexError(f"from_step must be >= 0 (an optimizer step, counted from 0), got {from_step}.")
        if config.exact.enabled:
            raise AttribIndexError(
                "the config's `exact` section needs a pass over the stored examples after training, which a capture "
                "during training does not make. Remove `exact` from the config, or build the index after training."
            )
        if optimizer_moments is not None and config.projection.optimizer_state is not None:
            raise AttribIndexError(
                "the config names an optimizer state file (projection.optimizer_state) and the capture was asked to "
                "fold the training optimizer's own second moments: choose one. Remove projection.optimizer_state to "
                "fold the live ones step by step, or capture without folding them."
            )
        is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        self.model = model.module if is_ddp else model  # the hooks go on the model itself, not on DDP's wrapper
        # HF marks each module that checkpoints (GPT2Model, LlamaModel, …), inside a PEFT wrapper too
        if any(getattr(module, "gradient_checkpointing", False) is True for module in self.model.modules()):
            raise AttribIndexError(
                "gradient checkpointing runs each layer's forward twice, so the capture cannot pair a layer's inputs "
                "with its output gradients. Turn it off (gradient_checkpointing=False) while capturing."
            )
        self.tokenizer, self.config, self.rows_mode = tokenizer, config, rows
        # Where the trained model will be: else where it came from, whose fingerprint then no longer matches, so a
        # query without `model=` is refused by name rather than answered by the untrained weights.
        model_path = model_path or getattr(self.model, "name_or_path", None) or type(self.model).__name__
        self.out, self.model_path, self.description = Path(out), model_path, description
        self.identify = identify
        self.step = 0  # optimizer steps completed: the step of the next micro-batch
        self.from_step = from_step  # steps before it train on examples that get no row
        self.summary: BuildSummary | None = None

        request = BuildRequest(
            model=model_path,
            data=f"training capture ({rows})",
            text_field="text",
            id_field="id",
            limit=None,
            skip_empty=True,
            config=rows_settings(config),
        )
        self._started_at = time.perf_counter()
        self._ranks = Ranks()  # under torchrun, each rank writes a shard of the index and rank 0 merges them at the end
        error = self._prepare(overwrite, request, resume_step) if self._ranks.rank == 0 else None
        error = self._ranks.broadcast_from_first(error)  # every rank stops, or none does
        if error:
            raise AttribIndexError(error)
        self._folder, self._request = self.out, request  # where this process writes: the index, or its shard
        # Summed rows are added up by rank 0 into `out` itself; the other ranks' folders then only hold commits.
        if self._ranks.size > 1 and not (rows == "summed" and self._ranks.rank == 0):
            self._request = dataclasses.replace(
                request, shard=ShardSlot(index=self._ranks.rank, count=self._ranks.size)
            )
            self._folder = self.out / layout.SHARDS_DIR / layout.shard_dir_name(self._ranks.rank, self._ranks.size)
            self._marker, _ = prepare_output(self._folder, False, self._request)
        self.projections, self._optimizer_moments = build_projections(config, self.model)
        self.projections.save(self._folder / layout.PROJECTIONS)
        self._names = [m.name for m in self.projections.modules]
        self._dims = self.projections.block_dims
        self.curvature = CurvatureSums.for_kind(config.hessian.kind, self._names, self.projections.block_shapes)
        dtype = torch.promote_types(next(self.model.parameters()).dtype, torch.float32)
        self._hooks = LoGraCapture(self.model, self.projections, dtype)
        self._hooks.track_factors = self.curvature.tracks_factors
        # Folding the optimizer's live second moments: the plain projections, refolded for each step
        self._moments_of, self._plain_projections = optimizer_moments, self.projections
        self._folded_step: int | None = None
        self._recorder = _Recorder()
        self._recording = LayerHooks(self.model, self._names, dtype, [self._recorder])
        self._deferred: list[tuple[_MicroBatch, float, list]] = []
        self._chunks: list[ChunkRecord] = []
        self._summed: dict[str, _Summed] = {}
        self._per_step_ids: set[str] = set()  # this run's, for the duplicate check
        self._steps_seen: set[int] = set()
        self._gradients = self._tokens = self._no_loss = 0
        self._resumed_rows, self._resumed_at = 0, ""
        if resume_step is not None:
            self._restore(resume_step)
        first_chunk = len(self._chunks)
        self._writer = ChunkWriter(self._folder, self._dims, config.store.dtype, config.store.chunk_rows, first_chunk)
        self._pending: tuple[list[str], list[str] | None, float | None] | None = None
        self._batch: _MicroBatch | None = None
        self._handles = [
            self.model.register_forward_pre_hook(self._on_forward_start, with_kwargs=True),
            self.model.register_forward_hook(self._on_forward_end, with_kwargs=True),
        ]

    # ---- the loop's side ----

    @contextlib.contextmanager
    def batch(
        self, ids: Sequence[str], texts: Sequence[str] | None = None, loss_scale: float | None = None
    ) -> Iterator[None]:
        """Say which examples the next forward + backward trains on (in batch order), then run both inside.

        Args:
            ids: the examples' ids, one per batch row.
            texts: their texts, stored for results (default: the tokenizer's decoding of their tokens).
            loss_scale: c in L = c · Σ_b Σ_t ℓ_bt, for a loss the model does not compute itself (labels not passed
                to the model). Default: read from the model's own loss and the gradient that reaches it.
        """
        self._pending = ([str(i) for i in ids], list(texts) if texts is not None else None, loss_scale)
        try:
            yield
        finally:
            self._pending = None
        self.finish_batch()

    def end_step(self) -> None:
        """An optimizer step was taken: the next micro-batch belongs to the next step. `capture_training` calls it
        through the optimizer's step hook when given the optimizer."""
        self.finish_batch()
        self.flush_deferred()
        self.step += 1

    def finish_batch(self) -> None:
        """Turn the last micro-batch's captured gradients into rows (its backward must have run)."""
        with self._aborting_on_error():
            self._finish_batch()

    @contextlib.contextmanager
    def _aborting_on_error(self) -> Iterator[None]:
        """A refused batch stops the capture: its hooks leave the model, and the folder stays incomplete."""
        try:
            yield
        except AttribIndexError:
            self.abort()
            raise

    def _finish_batch(self) -> None:
        batch, self._batch = self._batch, None
        if batch is None:
            return
        if batch.deferred:
            hooks, backpropagated = self._recording, any(not is_input for is_input, _, _ in self._recorder.events)
        else:
            hooks, backpropagated = self._hooks, bool(self._hooks.gradients)
        if backpropagated:
            hooks.finish_pass()  # layers the loss did not reach get zero gradients
        hooks.__exit__(None, None, None)
        if not backpropagated:
            return  # a training-mode forward with no backward trained on nothing
        if batch.deferred:
            self._deferred.append((batch, self._scale_of(batch), self._recorder.events))
            self._recorder.events = []
            return
        self._add_batch(batch, self._scale_of(batch), self._hooks.gradients, self._hooks.factors)

    def flush_deferred(self, required: bool = False) -> None:
        """Project the micro-batches kept until the optimizer had second moments, once it has them (`required`: it
        must have them by now)."""
        if not self._deferred:
            return
        with self._aborting_on_error():
            if not self._refold():
                if not required:
                    return
                raise AttribIndexError(
                    f"{type(self._moments_of).__name__} holds no second moments to fold into the rows of step "
                    f"{self._deferred[0][0].step}: it has taken no step yet, or it keeps none (only Adam-family "
                    "optimizers and Adafactor do). Commit or close the capture after an optimizer step, or capture "
                    "without folding second moments."
                )
            deferred, self._deferred = self._deferred, []
            for batch, scale, events in deferred:
                self._hooks.start_pass()
                self._hooks.token_mask = batch.mask
                for is_input, name, tensor in events:
                    if is_input:
                        self._hooks.on_input(name, tensor, batch.mask)
                    else:
                        self._hooks.on_output_grad(name, tensor, batch.mask)
                self._add_batch(batch, scale, self._hooks.gradients, self._hooks.factors)

    def _refold(self, measure_error: bool = False) -> bool:
        """Fold the optimizer's current second moments into the projections of this step (once per step); False
        while it holds none (before its first update). True at once without `optimizer_moments`. `measure_error`:
        record how well Adam's v is factorised (a pass over every v, so only for the queries' fold)."""
        if self._moments_of is None or self._folded_step == self.step:
            return True
        scales = live_second_moment_scales(
            self._moments_of,
            self.model,
            self._plain_projections.modules,
            self.config.projection.optimizer_eps,
            measure_error=measure_error,
        )
        if scales is None:
            return False
        self.projections, self._optimizer_moments = self._plain_projections.folded(scales), scales
        self._hooks.use_projections(self.projections)
        self._folded_step = self.step
        return True

    def _add_batch(self, batch: _MicroBatch, scale: float, gradients: dict, factors: dict) -> None:
        """Rows (and curvature terms) of a backpropagated micro-batch from its projected gradients and factors."""
        rows = torch.cat([gradients[name] for name in self._names], dim=1) / scale  # (B, D)
        keep = batch.counted > 0  # an example whose labels are all ignored contributes no gradient
        self._no_loss += int((~keep).sum())
        self._tokens += int(batch.counted.sum())
        if not bool(keep.all()):
            rows, batch = rows[keep], _kept(batch, keep)
            factors = {name: f[keep] for name, f in factors.items()}
        if len(batch.ids) == 0:
            return
        if not bool(torch.isfinite(rows).all()):
            raise AttribIndexError(
                f"step {batch.step}: the captured gradient of an example is not finite (NaN or inf); the loss or "
                "the weights overflowed. Check the training run (e.g. a lower learning rate, or float32)."
            )
        blocks = dict(zip(self._names, rows.split(self._dims, dim=1)))
        factor_rows = None
        if self.curvature.tracks_factors:
            factor_rows = {}
            for name, (_, k_in) in zip(self._names, self.projections.block_shapes):
                both = factors[name].clone()  # (B, k_in² + k_out²): the output factor Σ δ̃δ̃ᵀ holds c²
                both[:, k_in * k_in :] /= scale * scale
                factor_rows[name] = both
        self.curvature.update(blocks, factor_rows)
        self._gradients += len(batch.ids)
        self._steps_seen.add(batch.step)
        self._store(batch, rows)

    def commit(self) -> None:
        """Make the rows of the steps before `self.step` durable: call it when the loop saves a checkpoint at that
        step (the Trainer callback does, whenever the Trainer saves). A capture made again with `resume_step` =
        that step continues it with no row twice and none missing; commits of later steps are dropped then, so a
        run resumed from an earlier checkpoint than the last commit is fine too. Each commit keeps its own copy of
        the curvature sums (and, with rows="summed", of the summed rows) until the index is written."""
        self.finish_batch()
        self.flush_deferred(required=True)
        record = self._writer.close()  # the partial chunk: a commit ends at a chunk's end
        if record is not None:
            self._chunks.append(record)
        note = {
            "step": self.step,
            "chunks": [to_json(chunk) for chunk in self._chunks],
            "gradients": self._gradients,
            "tokens": self._tokens,
            "no_loss": self._no_loss,
            "steps_seen": sorted(self._steps_seen),
        }
        if self.rows_mode == "summed":
            entries = list(self._summed.values())
            rows = torch.stack([e.row for e in entries]) if entries else torch.zeros(0, self.projections.dim)
            documents = [[e.document.id, e.document.text, e.document.source, e.steps] for e in entries]
            save_safetensors(
                {"rows": rows.contiguous()},
                self._folder / layout.capture_summed(self.step),
                {"documents": json.dumps(documents)},
            )
        self.curvature.save(self._folder / layout.capture_commit(self.step), note=note)  # the commit point

    def _restore(self, step: int) -> None:
        """Continue from the commit at `step`: its chunks, sums and counters; whatever was written after it goes."""
        path = self._folder / layout.capture_commit(step)
        if not path.is_file():
            found = sorted({layout.capture_commit_step(f.name) for f in self._folder.glob(layout.CAPTURE_COMMITS)})
            raise AttribIndexError(
                f"training resumes at step {step}, but the capture in {self._folder} committed steps {found} "
                "only (a commit is made whenever a checkpoint is saved). Resume training from one of those "
                "checkpoints, or start the capture over with overwrite=True."
            )
        self.curvature, note = CurvatureSums.load(path)
        self._chunks = [from_json(ChunkRecord, c, f"{path} (note)") for c in note["chunks"]]
        keep_committed_chunks(self._folder, self._chunks)
        self._gradients, self._tokens, self._no_loss = note["gradients"], note["tokens"], note["no_loss"]
        self._steps_seen = set(note["steps_seen"])
        if self.rows_mode == "summed":
            summed = self._folder / layout.capture_summed(step)
            with safe_open(str(summed), framework="pt") as handle:
                documents = json.loads(handle.metadata()["documents"])
                rows = handle.get_tensor("rows")
            for (i, text, source, steps), row in zip(documents, rows):
                self._summed[i] = _Summed(Document(id=i, text=text, source=source), row, steps)
        self.step = step
        self._resumed_rows, self._resumed_at = sum(chunk.rows for chunk in self._chunks), now()
        self._drop_commits_after(step)

    def _drop_commits_after(self, step: int) -> None:
        for file in self._folder.glob(layout.CAPTURE_COMMITS):
            if layout.capture_commit_step(file.name) > step:
                file.unlink()

    def close(self) -> BuildSummary:
        """Finish the last micro-batch, fit the preconditioner and write the index (the manifest last). Under
        torchrun every rank calls it: per_step rows are merged from the ranks' shards, summed rows are sent to
        rank 0 and added up there (an example's steps may fall on several ranks)."""
        self.finish_batch()
        self.flush_deferred(required=True)
        self._remove_hooks()
        if self._moments_of is not None:
            self._fold_for_queries()
        extracted_seconds = time.perf_counter() - self._started_at
        if self._ranks.size == 1:
            self._write(finalize=True)
        elif self.rows_mode == "per_step":
            self._merge_shards()
        else:
            self._sum_over_ranks()
        manifest = read_manifest(self.out)
        training = manifest.training
        processes = f" from {self._ranks.size} processes" if self._ranks.size > 1 else ""
        self.summary = BuildSummary(
            out=self.out,
            index_id=manifest.index_id,
            rows=manifest.rows,
            skipped=manifest.corpus.skipped_empty,
            truncated=0,
            tokens=manifest.corpus.tokens,
            dim=manifest.dim,
            modules=len(manifest.modules),
            extract_seconds=extracted_seconds,
            total_seconds=time.perf_counter() - self._started_at,
            bytes_on_disk=bytes_on_disk(self.out),
            kind=f"index of {training.gradients:,} training gradients over {training.steps:,} steps "
            f"({self.rows_mode}){processes}",
            search=manifest.index.description,
        )
        return self.summary

    def _fold_for_queries(self) -> None:
        """Queries are divided by the √v̂ after the last update: the stored projections get that fold."""
        self._folded_step = None
        if not self._refold(measure_error=True):
            raise AttribIndexError(
                f"{type(self._moments_of).__name__} holds no second moments to fold into the queries: it took no step "
                "during the capture, or it keeps none (only Adam-family optimizers and Adafactor do). Train at least "
                "one step, or capture without folding second moments."
            )
        self.projections.save(self._folder / layout.PROJECTIONS)
        self._optimizer_moments.record = {
            "optimizer": self._optimizer_moments.optimizer,
            "source": "the training optimizer's state, folded in step by step",
            "rows": "the rows of step s are divided by the √v̂ the optimizer holds after max(s, 1) updates",
            "queries": "divided by the √v̂ after the last update (step in this record)",
            **self._optimizer_moments.record,
        }

    def _write(self, finalize: bool) -> None:
        """Write the remaining rows and the curvature sums into this process's folder, then the index
        (`finalize`) or this rank's shard."""
        for entry in self._summed.values():
            shown = ", ".join(map(str, entry.steps[:8])) + (
                f", … ({len(entry.steps)} in all)" if len(entry.steps) > 8 else ""
            )
            document = dataclasses.replace(entry.document, source=f"{entry.document.source}, steps {shown}")
            self._add_rows(entry.row[None], [document])
        record = self._writer.close()
        if record is not None:
            self._chunks.append(record)
        if not self._chunks:
            raise AttribIndexError(
                "no example was captured: no training-mode forward + backward ran on the model inside the capture."
            )
        self.curvature.save(self._folder / layout.CURVATURE)
        self._drop_commits_after(-1)  # the rows are complete from here on: the commits are no longer needed
        header, chunks = self._header(), self._chunks
        resumed = ResumedRecord(rows=self._resumed_rows, time=self._resumed_at) if self._resumed_at else None
        event = BuildEvent(rows=sum(chunk.rows for chunk in chunks), time=self._marker.started, resumed=resumed)
        if finalize:
            finalize_index(self.out, self.config, header, self.curvature, chunks, event, progress=False)
        else:
            window = ShardSlice(index=self._ranks.rank, count=self._ranks.size, documents=(0, 0))  # no corpus slice
            finalize_shard(self._folder, self.config, header, self._request, self.curvature, chunks, window, event)

    def _header(self) -> ManifestHeader:
        steps = sorted(self._steps_seen)
        return ManifestHeader(
            created=self._marker.started,
            attribindex_version=__version__,
            model=ModelRecord(
                name_or_path=self.model_path,
                class_name=type(self.model).__name__,
                revision=None,
                fingerprint=model_fingerprint(self.model),
            ),
            tokenizer=TokenizerRecord(
                name_or_path=self.model_path,
                class_name=type(self.tokenizer).__name__,
                vocab_size=len(self.tokenizer),
            ),
            config=self.config,
            corpus=CorpusRecord(
                description=self.description,
                text_field="text",
                id_field="id",
                skipped_empty=self._no_loss,
                truncated=0,
                tokens=self._tokens,
            ),
            modules=module_records(self.projections),
            dim=self.projections.dim,
            projection=ProjectionRecord(
                seed=self.config.projection.seed,
                hash=self.projections.hash(),
                file=layout.PROJECTIONS,
                optimizer=self._optimizer_moments.record if self._optimizer_moments is not None else None,
            ),
            training=TrainingRecord(
                rows=self.rows_mode,
                steps=len(steps),
                first_step=steps[0] if steps else 0,
                last_step=steps[-1] if steps else 0,
                gradients=self._gradients,
            ),
        )

    def _sum_over_ranks(self) -> None:
        """rows="summed" under torchrun: every rank's sums (rows per example, curvature, counts) go to rank 0, which
        adds them up and writes the index into `out` (its own folder); every rank leaves the same way."""
        mine = {
            "rows": {i: (e.document, e.steps, e.row.cpu()) for i, e in self._summed.items()},
            "curvature": self.curvature,
            "counts": (self._gradients, self._tokens, self._no_loss, sorted(self._steps_seen)),
        }
        everyone = self._ranks.gather_to_first(mine)
        error = None
        if self._ranks.rank == 0:
            try:
                for other in everyone[1:]:
                    self._add_sums(other)
                self._write(finalize=True)
                shutil.rmtree(self.out / layout.SHARDS_DIR, ignore_errors=True)  # the other ranks' commit folders
            except AttribIndexError as err:
                error = str(err)
        error = self._ranks.broadcast_from_first(error)
        if error:
            raise AttribIndexError(error)

    def _add_sums(self, other: dict) -> None:
        for i, (document, steps, row) in other["rows"].items():
            entry = self._summed.get(i)
            if entry is None:
                self._summed[i] = _Summed(document, row.clone(), list(steps))
            else:
                entry.row += row
                entry.steps = sorted(entry.steps + list(steps))
        self.curvature.merge(other["curvature"])
        gradients, tokens, no_loss, steps = other["counts"]
        self._gradients += gradients
        self._tokens += tokens
        self._no_loss += no_loss
        self._steps_seen |= set(steps)

    def _prepare(self, overwrite: bool, request: BuildRequest, resume_step: int | None) -> str | None:
        """Ready the output folder (rank 0 only); the refusal's message, broadcast so that every rank stops."""
        try:
            self._marker, resuming = prepare_output(self.out, overwrite, request)
        except AttribIndexError as err:
            return str(err)
        if resuming and resume_step is None:
            return (
                f"{self.out} holds an interrupted capture. Resume it with the training run (resume_step = the step of "
                "the checkpoint training resumes from; the Trainer callback does this itself), or pass "
                "overwrite=True to start over."
            )
        if not resuming and resume_step is not None:
            return (
                f"training resumes at step {resume_step}, but {self.out} holds no capture of its earlier steps. "
                "Capture the run from its start (or pass resume_step=None to index only the steps from here on)."
            )
        return None

    def _merge_shards(self) -> None:
        """rows="per_step" under torchrun: each rank writes its shard; rank 0 merges them into the index, and every
        rank leaves the same way."""
        error = None
        try:
            self._write(finalize=False)
        except AttribIndexError as err:
            error = f"rank {self._ranks.rank}: {err}"
        errors = [e for e in self._ranks.gather(error) if e]
        if errors:
            raise AttribIndexError(errors[0])
        if self._ranks.rank == 0:
            try:
                root = self.out / layout.SHARDS_DIR
                folders = [root / layout.shard_dir_name(i, self._ranks.size) for i in range(self._ranks.size)]
                shards = check_shards(folders, [read_manifest(folder, kind="shard") for folder in folders])
                merge_into(self.out, shards, progress=False)
                shutil.rmtree(root)
            except AttribIndexError as err:
                error = str(err)
        error = self._ranks.broadcast_from_first(error)
        if error:
            raise AttribIndexError(error)

    def abort(self) -> None:
        """Stop capturing without writing an index: the folder stays incomplete (no manifest)."""
        self._batch = None
        self._hooks.__exit__(None, None, None)
        self._recording.__exit__(None, None, None)
        self._remove_hooks()

    # ---- the model's side ----

    def _on_forward_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.finish_batch()  # the previous micro-batch's backward is done by the time the model runs again
        with self._aborting_on_error():
            self._open_batch(module, args, kwargs)

    def _open_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not (module.training and torch.is_grad_enabled()) or self.step < self.from_step:
            return  # evaluation, generation: nothing is trained on; or a step before the captured ones
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(input_ids, torch.Tensor):
            raise AttribIndexError("the capture needs the model called with input_ids (a tensor of token ids).")
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        labels = kwargs.get("labels")
        ids, texts, sources, loss_scale = self._examples(input_ids, attention_mask)
        if labels is not None:
            counted = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)  # (B,) positions whose next token is predicted
        else:
            counted = attention_mask[:, 1:].sum(dim=1)  # a loss of the loop's own: assume every real token counts
        if self._deferred and self._deferred[0][0].step < self.step:
            self.flush_deferred()  # the optimizer has updated since
        deferred = not self._refold()
        self._batch = _MicroBatch(
            step=self.step,
            ids=ids,
            texts=texts,
            sources=sources,
            counted=counted.detach().cpu(),
            loss_scale=loss_scale,
            wanted_loss=labels is not None,
            mask=attention_mask,
            deferred=deferred,
        )
        hooks = self._recording if deferred else self._hooks
        hooks.token_mask = attention_mask
        self._hooks.start_pass()
        self._recorder.events = []
        hooks.__enter__()

    def _on_forward_end(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        batch = self._batch
        if batch is None:
            return
        loss = getattr(output, "loss", None)
        if batch.loss_scale is not None or loss is None or not loss.requires_grad:
            return
        items = kwargs.get("num_items_in_batch")
        labels = kwargs["labels"]
        if items is None:
            batch.denominator = (labels[:, 1:] != IGNORE_INDEX).sum()  # HF's causal-LM loss: the mean over tokens
        else:
            batch.denominator = torch.as_tensor(items)  # HF's loss with num_items_in_batch: the sum over it

        def record(gradient: torch.Tensor) -> None:
            batch.outer_gradient = gradient.detach()

        loss.register_hook(record)

    def _examples(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        if self._pending is not None:
            ids, texts, loss_scale = self._pending
            if len(ids) != input_ids.shape[0]:
                raise AttribIndexError(
                    f"capture.batch() was given {len(ids)} ids, but the model ran on a batch of {input_ids.shape[0]}. "
                    "Give one id per batch row, in batch order."
                )
            sources = [f"step {self.step}"] * len(ids)
        elif self.identify is not None:
            ids, texts, sources = self.identify(input_ids, attention_mask)
            loss_scale = None
        else:
            raise AttribIndexError(
                "the model ran a training step outside `with capture.batch(ids):`, so the capture cannot tell which "
                "examples it trained on. Run each forward + backward inside it."
            )
        texts = texts or [None] * len(ids)
        texts = [
            text if text is not None else self._decode(row, mask)
            for text, row, mask in zip(texts, input_ids, attention_mask)
        ]
        return ids, texts, sources, loss_scale

    def _decode(self, row: torch.Tensor, mask: torch.Tensor) -> str:
        return self.tokenizer.decode(row[mask.bool()].tolist(), skip_special_tokens=True)

    def _scale_of(self, batch: _MicroBatch) -> float:
        if batch.loss_scale is not None:
            return batch.loss_scale
        if batch.outer_gradient is not None and batch.denominator is not None:
            return (batch.outer_gradient / batch.denominator.to(batch.outer_gradient)).item()
        cause = "was called without labels" if not batch.wanted_loss else "computed a loss that was not backpropagated"
        raise AttribIndexError(
            f"step {batch.step}: the model {cause}, so the loss trained on was computed outside it (label smoothing, "
            "a compute_loss_func or compute_loss of the Trainer, or a loop's own loss), and the capture cannot tell "
            "how it weighs each example. It inverts the model's own cross-entropy times a constant: with the Trainer, "
            "turn off label_smoothing_factor and custom losses; in a loop, pass labels to the model, or state c in "
            "capture.batch(ids, loss_scale=c) for a loss L = c · Σ_b Σ_t ℓ_bt."
        )

    def _store(self, batch: _MicroBatch, rows: torch.Tensor) -> None:
        if self.rows_mode == "per_step":
            documents = [
                Document(id=f"{i}@{batch.step}", text=text, source=source)
                for i, text, source in zip(batch.ids, batch.texts, batch.sources)
            ]
            for document in documents:
                if document.id in self._per_step_ids:
                    raise AttribIndexError(
                        f"example {document.id.rsplit('@', 1)[0]!r} was trained on twice in step {batch.step}: its "
                        "id is not unique. Give every example its own id, or capture with rows='summed'."
                    )
                self._per_step_ids.add(document.id)
            self._add_rows(rows, documents)
            return
        for i, text, source, row in zip(batch.ids, batch.texts, batch.sources, rows):
            entry = self._summed.get(i)
            if entry is None:
                self._summed[i] = _Summed(Document(id=i, text=text, source=source), row.clone(), [batch.step])
            else:
                entry.row += row
                entry.steps.append(batch.step)

    def _add_rows(self, rows: torch.Tensor, documents: list[Document]) -> None:
        start = 0
        while start < len(documents):
            take = min(self._writer.room, len(documents) - start)
            record = self._writer.add(rows[start : start + take].float(), documents[start : start + take])
            if record is not None:
                self._chunks.append(record)
            start += take

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _kept(batch: _MicroBatch, keep: torch.Tensor) -> _MicroBatch:
    picked = [i for i, k in enumerate(keep.tolist()) if k]
    return _MicroBatch(
        step=batch.step,
        ids=[batch.ids[i] for i in picked],
        texts=[batch.texts[i] for i in picked],
        sources=[batch.sources[i] for i in picked],
        counted=batch.counted[keep],
        loss_scale=batch.loss_scale,
    )


@contextlib.contextmanager
def capture_training(
    model: nn.Module,
    tokenizer,
    out: str | Path,
    config: BuildConfig,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    rows: RowsMode = "per_step",
    model_path: str | None = None,
    overwrite: bool = False,
    resume_step: int | None = None,
    fold_second_moments: bool = False,
    from_step: int = 0,
) -> Iterator[TrainingCapture]:
    """Capture an index of what a training loop trains on, in any PyTorch loop: each forward + backward inside
    `with capture.batch(ids):` adds its examples' rows at the current weights; the index is written when the block
    ends (an exception leaves the folder incomplete, never a half index presented as done).

    Args:
        optimizer: its steps advance the capture's step count (otherwise call `capture.end_step()` after each).
        rows: ``per_step`` (one row per example and step, id ``<id>@<step>``) or ``summed`` (one per example).
        model_path: where the trained model will be saved, recorded so `attribindex query` finds it.
        resume_step: training resumes from its checkpoint at this step: continue the capture from the commit made
            there (`capture.commit()` when the loop saved that checkpoint).
        fold_second_moments: divide each step's rows by the optimizer's current √v̂ (Adam family, Adafactor), as
            TrackStar and LESS do; queries by its √v̂ after the last step. Needs `optimizer`.
        from_step: capture the steps from this one on (e.g. the last epoch's, whose weights are near the final
            model's; see docs/quality.md); earlier steps train as usual and add no row.

    Example:
        >>> with capture_training(model, tokenizer, "train-index", load_config("tiny"), optimizer=opt) as capture:
        ...     for batch in loader:  # doctest: +SKIP
        ...         with capture.batch(batch["id"]):
        ...             model(**batch["inputs"]).loss.backward()  # the model's own loss: rows need no extra pass
        ...         opt.step(); opt.zero_grad()
        >>> print(capture.summary.format())  # doctest: +SKIP
    """
    if fold_second_moments and optimizer is None:
        raise AttribIndexError("fold_second_moments=True needs the optimizer: pass optimizer=… to capture_training.")
    capture = TrainingCapture(
        model,
        tokenizer,
        out,
        config,
        rows=rows,
        model_path=model_path,
        overwrite=overwrite,
        resume_step=resume_step,
        optimizer_moments=optimizer if fold_second_moments else None,
        from_step=from_step,
    )
    handle = optimizer.register_step_post_hook(lambda *_: capture.end_step()) if optimizer is not None else None
    try:
        yield capture
    except BaseException:
        capture.abort()
        raise
    finally:
        if handle is not None:
            handle.remove()
    capture.close()
