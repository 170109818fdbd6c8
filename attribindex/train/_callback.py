"""`AttributionCallback`: an HF `transformers.Trainer` writes an attribution index of what it trains on."""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from attribindex.config import BuildConfig
from attribindex.errors import AttribIndexError
from attribindex.pipeline import BuildSummary
from attribindex.train._capture import RowsMode, TrainingCapture
from attribindex.train._dataset_rows import DatasetRows


class AttributionCallback(TrainerCallback):
    """Capture an index while `transformers.Trainer` trains: each example's LoGra row from the Trainer's own
    backward pass, at the weights of the step that trained on it (see `TrainingCapture`). The index is written
    when training ends; `summary` then says what it holds. Whenever the Trainer saves a checkpoint the capture
    commits first, and `trainer.train(resume_from_checkpoint=...)` resumes the capture from that commit: no row
    twice, none missing.

    Args:
        out: the index folder.
        config: the build config (projection, Hessian, store, index; its `extract` settings are the Trainer's).
        dataset: the training dataset with its id / text columns (default: the Trainer's, whose columns the model
            does not take are already dropped, so ids are row numbers and texts the tokens decoded).
        id_field, text_field: the dataset's id and text columns.
        rows: ``per_step`` (one row per example and step, id ``<id>@<step>``) or ``summed`` (one per example).
        model_path: where the trained model is saved, for `attribindex query` (default: the Trainer's output_dir).
        fold_second_moments: divide each step's rows by the Trainer's optimizer's current √v̂ (AdamW, Adafactor), as
            TrackStar and LESS do, and queries by its √v̂ after the last step.
        from_step: capture the steps from this global step on (e.g. the last epoch's); earlier ones add no row.

    Example:
        >>> callback = AttributionCallback("train-index", load_config("tiny"), dataset=train, id_field="id",
        ...                                text_field="text")  # doctest: +SKIP
        >>> Trainer(model, args, train_dataset=train, data_collator=collator, processing_class=tokenizer,
        ...         callbacks=[callback]).train()  # doctest: +SKIP
        >>> AttributionIndex.open("train-index", model=model, tokenizer=tokenizer).attribute("a text", k=5)  # doctest: +SKIP
    """

    def __init__(
        self,
        out: str | Path,
        config: BuildConfig,
        *,
        dataset=None,
        id_field: str | None = None,
        text_field: str | None = None,
        rows: RowsMode = "per_step",
        model_path: str | None = None,
        overwrite: bool = False,
        fold_second_moments: bool = False,
        from_step: int = 0,
    ):
        self.out, self.config, self.dataset = Path(out), config, dataset
        self.id_field, self.text_field, self.rows = id_field, text_field, rows
        self.model_path, self.overwrite, self.fold_second_moments = model_path, overwrite, fold_second_moments
        self.from_step = from_step
        self.capture: TrainingCapture | None = None
        self.summary: BuildSummary | None = None

    def on_train_begin(
        self, args, state, control, model=None, processing_class=None, train_dataloader=None, optimizer=None, **_
    ):
        if processing_class is None or not hasattr(processing_class, "decode"):
            raise AttribIndexError(
                "AttributionCallback needs the tokenizer: pass processing_class=tokenizer to Trainer."
            )
        dataset = self.dataset if self.dataset is not None else getattr(train_dataloader, "dataset", None)
        rows = DatasetRows(dataset, processing_class, id_field=self.id_field, text_field=self.text_field)
        self.capture = TrainingCapture(
            model,
            processing_class,
            self.out,
            self.config,
            rows=self.rows,
            model_path=self.model_path or str(Path(args.output_dir).resolve()),
            overwrite=self.overwrite,
            identify=rows,
            description=f"examples a transformers.Trainer trained on ({args.num_train_epochs:g} epochs)",
            resume_step=state.global_step or None,  # resume_from_checkpoint: continue the capture's commit there
            optimizer_moments=optimizer if self.fold_second_moments else None,
            from_step=self.from_step,
        )

    def on_step_begin(self, args, state, control, **_):
        self.capture.finish_batch()
        self.capture.step = state.global_step

    def on_substep_end(self, args, state, control, **_):
        self.capture.finish_batch()  # one micro-batch of a gradient-accumulation step is done

    def on_step_end(self, args, state, control, **_):
        self.capture.finish_batch()
        self.capture.flush_deferred()  # the optimizer has just updated: a first step's rows can be projected
        self._commit_if_saving(state, control)

    def on_epoch_end(self, args, state, control, **_):
        self._commit_if_saving(state, control)

    def _commit_if_saving(self, state, control) -> None:
        # The Trainer saves checkpoint-<global_step> right after this event when `should_save` is set (by its
        # DefaultFlowCallback, which runs before this one): commit the rows of the steps before it first, so that
        # resuming from that checkpoint resumes the capture too.
        if control.should_save:
            self.capture.step = state.global_step
            self.capture.commit()

    def on_train_end(self, args, state, control, **_):
        self.summary = self.capture.close()
        if state.is_world_process_zero:
            print(self.summary.format())
