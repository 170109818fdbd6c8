"""The loss-scale inversion: the constant c that a micro-batch's captured gradients carry, read from the model's loss.

A training loop backpropagates L = c · Σ_b ℓ_b, where ℓ_b is example b's summed token loss (the loss an index row
is the gradient of) and c a constant of the micro-batch: HF's causal-LM loss is Σ ℓ / N with N the batch's counted
tokens (or the Trainer's `num_items_in_batch`), and the loop may scale it further (1 / accumulation steps, a world
size, an AMP loss scale). The layer hooks see δ = c · ∂ℓ_b/∂y for each example's positions, so every projected
gradient and KFAC output factor they form carries c (c² for the factor). c is read, not assumed: N from the labels
or `num_items_in_batch` the model was given, and the loop's own factor as the gradient arriving at the model's
loss. Dividing by c gives exactly the rows `attribindex build` computes at the same weights.

A loss the model did not compute itself (label smoothing, a custom `compute_loss`) has no such c, and is refused
unless the loop states it (`loss_scale`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attribindex.errors import AttribIndexError

IGNORE_INDEX = -100  # the label of a position that carries no loss (HF's convention)


@dataclass
class MicroBatch:
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


def counted_tokens(labels: torch.Tensor | None, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) the positions of each example that carry loss."""
    if labels is not None:
        return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)  # (B,) positions whose next token is predicted
    return attention_mask[:, 1:].sum(dim=1)  # a loss of the loop's own: assume every real token counts


def watch_model_loss(batch: MicroBatch, kwargs: dict, output) -> None:
    """At the end of the model's forward: record N, what its loss divided the summed token loss by, and hook the
    loss for the gradient that backward brings to it (the loop's own factor)."""
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


def loss_scale_of(batch: MicroBatch) -> float:
    """c of a backpropagated micro-batch: stated by the loop, or the gradient reaching the model's loss over N."""
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


def kept(batch: MicroBatch, keep: torch.Tensor) -> MicroBatch:
    """The examples of `batch` where `keep` (B,) is true."""
    picked = [i for i, k in enumerate(keep.tolist()) if k]
    return MicroBatch(
        step=batch.step,
        ids=[batch.ids[i] for i in picked],
        texts=[batch.texts[i] for i in picked],
        sources=[batch.sources[i] for i in picked],
        counted=batch.counted[keep],
        loss_scale=batch.loss_scale,
    )


def unscaled_factors(
    factors: dict[str, torch.Tensor], names: list[str], block_shapes: list[tuple[int, int]], scale: float
) -> dict[str, torch.Tensor]:
    """The KFAC factor rows (B, k_in² + k_out²) of each layer without c: the output factor Σ δ̃δ̃ᵀ holds c²."""
    factor_rows = {}
    for name, (_, k_in) in zip(names, block_shapes):
        both = factors[name].clone()  # (B, k_in² + k_out²): the output factor Σ δ̃δ̃ᵀ holds c²
        both[:, k_in * k_in :] /= scale * scale
        factor_rows[name] = both
    return factor_rows
