"""Capture LoGra rows while a model trains, from the training loop's own backward pass: no second backward.

Each row is the gradient a training loop's own backward pass brings to the layer hooks, divided by the loss's
constant (`attribindex.train._loss_scale`); rows are kept and committed at checkpoints by
`attribindex.train._captured_rows`, and the index is written after training by `attribindex.train._write_capture`.
This module ties them to the model: the forward hooks that open and close each micro-batch, and the loop's side.

With `optimizer_moments`, the training optimizer's current second moments are folded into the projections step by
step (TrackStar / LESS divide by √v̂; see `attribindex.logra._optimizer`): the rows of step s are divided by the √v̂
the optimizer holds after max(s, 1) updates, the newest it has when the step's gradient is computed. Adam has none
before its first update, so the first step's layer inputs and output gradients are kept until that update and
projected then. Queries are divided by the √v̂ after the last update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from attribindex.config import BuildConfig, rows_settings
from attribindex.errors import AttribIndexError, resource_failures
from attribindex.hessian import CurvatureSums
from attribindex.logra import LayerHooks, LoGraCapture, live_second_moment_scales
from attribindex.pipeline._output import build_projections, bytes_on_disk, prepare_output
from attribindex.pipeline._ranks import Ranks
from attribindex.pipeline._summary import BuildSummary
from attribindex.store import BuildRequest, ManifestHeader, ShardSlot, layout, read_manifest
from attribindex.train._captured_rows import CapturedRows, RowsMode
from attribindex.train._loss_scale import (
    IGNORE_INDEX,
    MicroBatch,
    counted_tokens,
    kept,
    loss_scale_of,
    unscaled_factors,
    watch_model_loss,
)
from attribindex.train._write_capture import CaptureTarget, capture_header, write_capture

# (input_ids (B, T), attention_mask (B, T)) → the batch's (ids, texts or None, sources), for loops that do not say them
Identify = Callable[[torch.Tensor, torch.Tensor], tuple[list[str], list, list[str]]]


class _Recorder:
    """Keeps a pass's layer inputs and output gradients in hook order, for projections not known yet."""

    def __init__(self) -> None:
        self.events: list[tuple[bool, str, torch.Tensor]] = []  # (is an input, layer, (B, T, n) tensor)

    def on_input(self, name: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        self.events.append((True, name, x.clone()))  # the model may reuse an activation's storage later

    def on_output_grad(self, name: str, delta: torch.Tensor, mask: torch.Tensor | None) -> None:
        self.events.append((False, name, delta))


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
        curvature = CurvatureSums.for_kind(config.hessian.kind, self._names, self.projections.block_shapes)
        dtype = torch.promote_types(next(self.model.parameters()).dtype, torch.float32)
        self._hooks = LoGraCapture(self.model, self.projections, dtype)
        self._hooks.track_factors = curvature.tracks_factors
        # Folding the optimizer's live second moments: the plain projections, refolded for each step
        self._moments_of, self._plain_projections = optimizer_moments, self.projections
        self._folded_step: int | None = None
        self._recorder = _Recorder()
        self._recording = LayerHooks(self.model, self._names, dtype, [self._recorder])
        self._deferred: list[tuple[MicroBatch, float, list]] = []
        dims = self.projections.block_dims
        self._rows = CapturedRows(self._folder, config, rows, self._names, dims, curvature, resume_step)
        if resume_step is not None:
            self.step = resume_step
        self._target = CaptureTarget(self.out, self._folder, config, self._request, self._marker.started, self._ranks)
        self._pending: tuple[list[str], list[str] | None, float | None] | None = None
        self._batch: MicroBatch | None = None
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
            self._deferred.append((batch, loss_scale_of(batch), self._recorder.events))
            self._recorder.events = []
            return
        self._add_batch(batch, loss_scale_of(batch), self._hooks.gradients, self._hooks.factors)

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

    def _add_batch(self, batch: MicroBatch, scale: float, gradients: dict, factors: dict) -> None:
        """Rows (and curvature terms) of a backpropagated micro-batch from its projected gradients and factors."""
        rows = torch.cat([gradients[name] for name in self._names], dim=1) / scale  # (B, D)
        keep = batch.counted > 0  # an example whose labels are all ignored contributes no gradient
        self._rows.no_loss += int((~keep).sum())
        self._rows.tokens += int(batch.counted.sum())
        if not bool(keep.all()):
            rows, batch = rows[keep], kept(batch, keep)
            factors = {name: f[keep] for name, f in factors.items()}
        if len(batch.ids) == 0:
            return
        if not bool(torch.isfinite(rows).all()):
            raise AttribIndexError(
                f"step {batch.step}: the captured gradient of an example is not finite (NaN or inf); the loss or "
                "the weights overflowed. Check the training run (e.g. a lower learning rate, or float32)."
            )
        factor_rows = None
        if self._rows.curvature.tracks_factors:
            factor_rows = unscaled_factors(factors, self._names, self.projections.block_shapes, scale)
        self._rows.add(batch, rows, factor_rows)

    def commit(self) -> None:
        """Make the rows of the steps before `self.step` durable: call it when the loop saves a checkpoint at that
        step (the Trainer callback does, whenever the Trainer saves). A capture made again with `resume_step` =
        that step continues it with no row twice and none missing; commits of later steps are dropped then, so a
        run resumed from an earlier checkpoint than the last commit is fine too. Each commit keeps its own copy of
        the curvature sums (and, with rows="summed", of the summed rows) until the index is written."""
        self.finish_batch()
        self.flush_deferred(required=True)
        with resource_failures(self.out, then="the capture resumes from its last commit with the training run"):
            self._rows.commit(self.step, self.projections.dim)

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
        kept = "the commits made so far are kept: resume the training run from its last checkpoint to capture the rest"
        with resource_failures(self.out, then=kept):
            write_capture(self._target, self._rows, self._header)
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

    def _header(self) -> ManifestHeader:
        return capture_header(
            started=self._marker.started,
            model=self.model,
            model_path=self.model_path,
            tokenizer=self.tokenizer,
            config=self.config,
            description=self.description,
            projections=self.projections,
            optimizer_moments=self._optimizer_moments,
            rows=self._rows,
        )

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
        if labels is not None and ((attention_mask[:, :-1] == 0) & (labels[:, 1:] != IGNORE_INDEX)).any():
            # a build never predicts a token from padding: such a row would be no build's row, so no query's
            raise AttribIndexError(
                "a label is predicted from a padding position (left padding, each row's first token labelled, as "
                "DataCollatorForLanguageModeling labels it): set the label of each row's first real token to -100, "
                "or pad on the right."
            )
        ids, texts, sources, loss_scale = self._examples(input_ids, attention_mask)
        counted = counted_tokens(labels, attention_mask)
        if self._deferred and self._deferred[0][0].step < self.step:
            self.flush_deferred()  # the optimizer has updated since
        deferred = not self._refold()
        self._batch = MicroBatch(
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
        watch_model_loss(batch, kwargs, output)

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

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


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
