"""Run a causal LM on texts and return per-example projected gradients, one block per module."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attribindex.data import PromptCompletion, TokenizedExample, collate, tokenize
from attribindex.logra._capture import LoGraCapture
from attribindex.logra._projection import ProjectionSet


@dataclass
class ExtractedBatch:
    blocks: dict[str, torch.Tensor]  # module name -> (B, k_out * k_in)
    losses: torch.Tensor  # (B,) summed token cross-entropy over the tokens that count

    def concatenated(self, order: Sequence[str]) -> torch.Tensor:
        return torch.cat([self.blocks[name] for name in order], dim=1)  # (B, D)


def per_example_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor):
    """Summed next-token cross-entropy per example over positions where `loss_mask` is set. Shape (B,)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # (B, T-1, V)
    targets = input_ids[:, 1:]  # (B, T-1)
    token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (token_loss.view(targets.shape) * loss_mask[:, 1:]).sum(dim=1)  # (B,)


class GradientExtractor:
    """Tokenises texts, runs forward + backward once per batch, returns projected gradients.

    Example:
        >>> extractor = GradientExtractor(model, tokenizer, projections, max_length=128)  # doctest: +SKIP
        >>> batch = extractor.extract(extractor.tokenize(["To be, or not to be"]))  # doctest: +SKIP
        >>> batch.concatenated([m.name for m in projections.modules]).shape  # doctest: +SKIP
        torch.Size([1, 1024])
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        projections: ProjectionSet,
        max_length: int,
        dtype: torch.dtype = torch.float32,
    ):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.projections = projections
        self.max_length = max_length
        # Projections run at least in fp32 even for bf16/fp16 models: the projected values are summed over tokens.
        self.dtype = torch.promote_types(dtype, torch.float32)
        self.device = next(model.parameters()).device
        self._capture = LoGraCapture(self.model, projections, self.dtype)  # projections moved to device once
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = pad if pad is not None else 0

    def tokenize(
        self, items: Sequence[str | PromptCompletion], names: Sequence[str] | None = None
    ) -> list[TokenizedExample]:
        names = names or [f"query {i}" for i in range(len(items))]
        return [tokenize(self.tokenizer, item, self.max_length, name) for item, name in zip(items, names)]

    def extract(self, examples: list[TokenizedExample]) -> ExtractedBatch:
        batch = collate(examples, self.pad_token_id)
        with torch.enable_grad(), self._capture as capture:
            losses = per_example_loss(
                self.model,
                batch.input_ids.to(self.device),
                batch.attention_mask.to(self.device),
                batch.loss_mask.to(self.device),
            )
            blocks = capture.backward(losses.sum())
        return ExtractedBatch(blocks={k: v.detach() for k, v in blocks.items()}, losses=losses.detach())
