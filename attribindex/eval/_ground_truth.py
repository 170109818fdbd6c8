"""Counterfactual ground truth for attribution: retrain a causal LM on random subsets of its training data and
record each subset model's loss on the queries (the input of the linear datamodeling score).

On-disk (a folder, written atomically after every subset, so an interrupted run resumes):
  ground_truth.json   what was trained: init model, training ids, queries, fraction, seeds, recipe, progress
  subsets.npy         (M, N) bool: subset m holds training example i (drawn up front from `seed`)
  losses.npy          (M, Q) float64: summed token loss of query q under the model trained on subset m (NaN = not yet)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attribindex._progress import progress as progress_bar
from attribindex.data import Document, PromptCompletion, batched, collate, tokenize
from attribindex.errors import AttribIndexError
from attribindex.logra import per_example_loss
from attribindex.model import load_model, model_fingerprint
from attribindex.store import atomic_open, write_json

GROUND_TRUTH_FORMAT = "attribindex-ground-truth"
META, SUBSETS, LOSSES = "ground_truth.json", "subsets.npy", "losses.npy"


@dataclass(frozen=True)
class TrainingRecipe:
    """How every subset model is trained from the same initial weights (AdamW, shuffled mini-batches).

    Example:
        >>> TrainingRecipe(epochs=4, learning_rate=3e-3).batch_size
        8
    """

    epochs: int = 3
    batch_size: int = 8
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    max_length: int = 64

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 2 or self.learning_rate <= 0:
            raise AttribIndexError(f"invalid training recipe {self}: epochs, batch_size >= 1, max_length >= 2, lr > 0.")


def train_causal_lm(
    model,
    tokenizer,
    documents: list[Document],
    recipe: TrainingRecipe,
    seed: int,
    optimizer_out: str | Path | None = None,
    checkpoints: int = 0,
    checkpoint_dir: str | Path | None = None,
    capture: Callable[[torch.optim.Optimizer], contextlib.AbstractContextManager] | None = None,
):
    """Train `model` in place on `documents` (mean token loss per batch, AdamW), data order from `seed`.

    `optimizer_out`: also save the optimizer's final `state_dict()` there (for optimizer-aware attribution,
    `projection.optimizer_state`). `checkpoints` > 0: save the model (with `tokenizer`) after each of that many equal
    parts of the run into `checkpoint_dir/checkpoint-<step>` (the last one is the final model), for ensembles.
    `capture`: given the optimizer, a `capture_training(...)` context that indexes the run as it trains."""
    generator = torch.Generator().manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = [(d, tokenize(tokenizer, d.text, recipe.max_length, d.id)) for d in documents]
    examples = [(d, e) for d, e in examples if sum(e.loss_mask)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    model.train().requires_grad_(True)
    steps = recipe.epochs * -(-len(examples) // recipe.batch_size)
    save_at = {round(steps * (part + 1) / checkpoints) for part in range(checkpoints)} if checkpoints else set()
    step = 0
    with capture(optimizer) if capture is not None else contextlib.nullcontext() as capturing:
        for _ in range(recipe.epochs):
            order = torch.randperm(len(examples), generator=generator).tolist()
            for group in batched([examples[i] for i in order], recipe.batch_size):
                batch = collate([e for _, e in group], pad)
                tokens = batch.loss_mask[:, 1:].sum()
                with (
                    capturing.batch([d.id for d, _ in group], [d.text for d, _ in group], loss_scale=1 / float(tokens))
                    if capturing is not None
                    else contextlib.nullcontext()
                ):
                    losses = per_example_loss(
                        model, batch.input_ids, batch.attention_mask, batch.loss_mask, chunked_head=False
                    )
                    loss = losses.sum() / tokens  # mean over target tokens
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
                step += 1
                if step in save_at:
                    folder = Path(checkpoint_dir) / f"checkpoint-{step}"
                    model.save_pretrained(folder)
                    tokenizer.save_pretrained(folder)
    if optimizer_out is not None:
        with atomic_open(Path(optimizer_out)) as handle:
            torch.save(optimizer.state_dict(), handle)
    return model.eval().requires_grad_(False)


def query_losses(model, tokenizer, queries: list[str | PromptCompletion], max_length: int) -> np.ndarray:
    """(Q,) summed token loss of each query (completion tokens only for PromptCompletion): the loss whose
    gradient attribution explains."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = [tokenize(tokenizer, q, max_length, f"query {i}") for i, q in enumerate(queries)]
    out = []
    with torch.no_grad():
        for group in batched(examples, 16):
            batch = collate(group, pad)
            out.append(per_example_loss(model, batch.input_ids, batch.attention_mask, batch.loss_mask, False).double())
    return torch.cat(out).numpy()


@dataclass
class GroundTruth:
    """Subsets and per-subset query losses, as `make_ground_truth` writes them.

    Example:
        >>> truth = GroundTruth.load("gt")  # doctest: +SKIP
        >>> truth.subsets.shape, truth.losses.shape  # doctest: +SKIP
        ((50, 400), (50, 40))
    """

    meta: dict
    subsets: np.ndarray  # (M, N) bool
    losses: np.ndarray  # (M, Q) float64, NaN where not trained yet

    @property
    def completed(self) -> int:
        return int((~np.isnan(self.losses)).all(axis=1).sum())

    @property
    def train_ids(self) -> list[str]:
        return self.meta["train_ids"]

    @property
    def queries(self) -> list[str | PromptCompletion]:
        return [PromptCompletion(**q) if isinstance(q, dict) else q for q in self.meta["queries"]]

    @classmethod
    def load(cls, folder: str | Path) -> GroundTruth:
        folder = Path(folder)
        if not (folder / META).is_file():
            raise AttribIndexError(
                f"{folder} holds no ground truth ({META} is missing). Create it with make_ground_truth "
                f"(tools/lds_shakespeare.py shows how)."
            )
        meta = json.loads((folder / META).read_text())
        if meta.get("format") != GROUND_TRUTH_FORMAT:
            raise AttribIndexError(
                f"{folder / META} is not an attribindex ground truth (format {meta.get('format')!r})."
            )
        return cls(meta, np.load(folder / SUBSETS), np.load(folder / LOSSES))

    def complete(self) -> GroundTruth:
        """Only the subsets whose models are trained (an interrupted run still gives a usable, smaller truth)."""
        done = ~np.isnan(self.losses).any(axis=1)
        return GroundTruth(self.meta, self.subsets[done], self.losses[done])


def make_ground_truth(
    init_model: str | Path,
    documents: list[Document],
    queries: list[str | PromptCompletion],
    out: str | Path,
    *,
    subsets: int = 50,
    fraction: float = 0.5,
    recipe: TrainingRecipe = TrainingRecipe(),
    seed: int = 0,
    progress: bool = True,
) -> GroundTruth:
    """Train `subsets` models from `init_model`'s weights, each on a random `fraction` of `documents`, and
    store their losses on `queries`. Rerunning the same call resumes after the last finished subset; a call
    with other settings is refused.

    Example:
        >>> docs = list(open_corpus("train.jsonl", id_field="id"))  # doctest: +SKIP
        >>> truth = make_ground_truth("tiny-llama-init", docs, ["To be, or not to be"], "gt", subsets=30)  # doctest: +SKIP
    """
    model, tokenizer = load_model(str(init_model), "float32", "cpu")
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    def retrain(members: np.ndarray, subset_seed: int) -> np.ndarray:
        model.load_state_dict(initial)
        train_causal_lm(model, tokenizer, [documents[i] for i in members], recipe, seed=subset_seed)
        return query_losses(model, tokenizer, queries, recipe.max_length)

    described = {
        "init_model": {"path": str(Path(init_model).resolve()), "fingerprint": model_fingerprint(model)},
        "recipe": dataclasses.asdict(recipe),
    }
    serialised = [dataclasses.asdict(q) if isinstance(q, PromptCompletion) else q for q in queries]
    return retrain_on_subsets(
        out, described, [d.id for d in documents], serialised, retrain, subsets, fraction, seed, progress
    )


def retrain_on_subsets(
    out: str | Path,
    described: dict,
    train_ids: list[str],
    queries: list,
    retrain: Callable[[np.ndarray, int], np.ndarray],
    subsets: int = 50,
    fraction: float = 0.5,
    seed: int = 0,
    progress: bool = True,
) -> GroundTruth:
    """The resumable loop behind any ground truth: draw `subsets` random `fraction`s of the training examples
    (seeded), call `retrain(member_indices, subset_seed)` → (Q,) query losses for each, save after each one.

    `described` (JSON) says what is trained, e.g. the initial model and recipe; with `train_ids` and `queries`
    (JSON-able) it must equal a resumed folder's, or the call is refused.

    Example:
        >>> truth = retrain_on_subsets("gt", {"model": "mlp"}, ids, queries, train_and_evaluate)  # doctest: +SKIP
    """
    if subsets < 3 or not 0 < fraction < 1:
        raise AttribIndexError(f"need >= 3 subsets and 0 < fraction < 1, got {subsets} and {fraction}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    meta = {
        "format": GROUND_TRUTH_FORMAT,
        "version": 1,
        **described,
        "train_ids": list(train_ids),
        "queries": list(queries),
        "subsets": subsets,
        "fraction": fraction,
        "seed": seed,
        "subset_seeds": [int(s) for s in rng.integers(0, 2**31 - 1, size=subsets)],
    }
    if (out / META).is_file():
        truth = GroundTruth.load(out)
        if {k: v for k, v in truth.meta.items() if k != "completed"} != meta:
            raise AttribIndexError(
                f"{out} holds ground truth made with other settings. Use another folder, or delete it to start over."
            )
    else:
        membership = np.zeros((subsets, len(train_ids)), dtype=bool)  # (M, N)
        for m, subset_seed in enumerate(meta["subset_seeds"]):
            chosen = np.random.default_rng(subset_seed).choice(len(train_ids), round(fraction * len(train_ids)), False)
            membership[m, chosen] = True
        truth = GroundTruth(meta, membership, np.full((subsets, len(queries)), np.nan))
        _save(out, truth)
    with progress_bar(total=subsets, desc="subsets", unit="model", enabled=progress) as bar:
        bar.update(truth.completed)
        for m in range(truth.completed, subsets):
            truth.losses[m] = retrain(np.flatnonzero(truth.subsets[m]), meta["subset_seeds"][m])
            _save(out, truth)  # one finished subset at a time: a kill loses at most the model in training
            bar.update(1)
    return truth


def _save(out: Path, truth: GroundTruth) -> None:
    for name, array in ((SUBSETS, truth.subsets), (LOSSES, truth.losses)):
        with atomic_open(out / name) as handle:
            np.save(handle, array)
    write_json(out / META, truth.meta | {"completed": truth.completed})  # last: it names what the arrays hold
