"""Tokenisation of documents and (prompt, completion) pairs, and right-padded batches.

A token counts in the loss when its `loss_mask` is 1: every token after the first for a plain
document; only completion tokens for a (prompt, completion) pair. Padding never counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from attribindex.errors import AttribIndexError


@dataclass(frozen=True)
class PromptCompletion:
    """A query whose loss counts only the completion tokens.

    Example:
        >>> PromptCompletion(prompt="Q: Who wrote Hamlet?\\nA:", completion=" Shakespeare")
        PromptCompletion(prompt='Q: Who wrote Hamlet?\\nA:', completion=' Shakespeare')
    """

    prompt: str
    completion: str


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where token j is a prediction target that counts (loss_mask[0] is always 0)
    truncated: bool = False  # tokens beyond max_length were dropped


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long
    loss_mask: torch.Tensor  # (B, T) bool, target positions that count


def tokenize(tokenizer, item: str | PromptCompletion, max_length: int, name: str) -> TokenizedExample:
    """Tokenise a text or a (prompt, completion) pair, truncated to `max_length` tokens.

    Raises AttribIndexError when no token is left to carry loss, naming the item `name`.
    """
    if isinstance(item, PromptCompletion):
        prompt_ids = tokenizer(item.prompt, add_special_tokens=True)["input_ids"]
        completion_ids = tokenizer(item.completion, add_special_tokens=False)["input_ids"]
        full = prompt_ids + completion_ids
        mask = ([0] * len(prompt_ids) + [1] * len(completion_ids))[:max_length]
    else:
        full = tokenizer(item, add_special_tokens=True)["input_ids"]
        mask = [1] * min(len(full), max_length)
    ids = full[:max_length]
    if mask:
        mask[0] = 0  # the first token is never predicted
    if sum(mask) == 0:
        what = (
            "its completion is empty or truncated away by max_length"
            if isinstance(item, PromptCompletion)
            else ("it tokenises to fewer than 2 tokens")
        )
        raise AttribIndexError(
            f"{name}: no token carries loss ({what}). Remove it, lengthen it, or raise max_length ({max_length})."
        )
    return TokenizedExample(input_ids=ids, loss_mask=mask, truncated=len(full) > max_length)


def collate(examples: list[TokenizedExample], pad_token_id: int) -> Batch:
    """Right-pad a list of examples into one batch (right padding keeps position ids unchanged)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    loss_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention[row, :n] = 1
        loss_mask[row, :n] = torch.tensor(example.loss_mask, dtype=torch.bool)
    return Batch(input_ids=input_ids, attention_mask=attention, loss_mask=loss_mask)


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Group an iterable into lists of `size` (the last may be shorter)."""
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
