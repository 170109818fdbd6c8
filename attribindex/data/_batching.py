"""Tokenisation of documents and (prompt, completion) pairs, and right-padded batches.

A token counts in the loss when its `loss_mask` is 1: every token after the first for a plain
document; for a (prompt, completion) pair, tokenised as the joined text, the tokens holding at least one
completion character (see `tokenize`). Padding never counts.
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


def tokenize(
    tokenizer, item: str | PromptCompletion, max_length: int, name: str, ids: list[int] | None = None
) -> TokenizedExample:
    """Tokenise a text or a (prompt, completion) pair, truncated to `max_length` tokens.

    A pair is tokenised as one text, `prompt + completion`, exactly as a model reads it: tokenising the two
    halves apart would add a spurious word-start marker ("▁" for SentencePiece) and change merges at the
    boundary. A token carries loss when its character span reaches past the end of the prompt, i.e. it holds at
    least one completion character: a token straddling the boundary (prompt "A: " + completion "Hamlet" fuse into
    " Hamlet") counts, so a completion never loses its only token. Special tokens (BOS, EOS) never count.

    A pair whose completion starts past `max_length` keeps the end of its prompt instead (`_completion_in_reach`).
    Raises AttribIndexError when no token is left to carry loss, naming the item `name`. `ids`: a text's ids from
    `encode_texts` (one call for many texts), instead of tokenising it here.

    Example:
        >>> from transformers import AutoTokenizer
        >>> tokenizer = AutoTokenizer.from_pretrained("gpt2")
        >>> example = tokenize(tokenizer, PromptCompletion("Who is the Dane?", " Hamlet"), 64, "query 0")
        >>> example.input_ids == tokenizer("Who is the Dane? Hamlet")["input_ids"]
        True
    """
    if isinstance(item, PromptCompletion):
        full, mask = _tokenize_joined(tokenizer, item)
        truncated = len(full) > max_length
        full, mask = _completion_in_reach(tokenizer, full, mask, max_length)
        mask = mask[:max_length]
    else:
        full = ids if ids is not None else encode_texts(tokenizer, [item])[0]
        truncated = len(full) > max_length
        mask = [1] * min(len(full), max_length)
    ids = full[:max_length]
    if mask:
        mask[0] = 0  # the first token is never predicted
    if sum(mask) == 0:
        what = (
            "its completion is empty, or its first token is the only one max_length leaves"
            if isinstance(item, PromptCompletion)
            else ("it tokenises to fewer than 2 tokens")
        )
        raise AttribIndexError(
            f"{name}: no token carries loss ({what}). Remove it, lengthen it, or raise max_length ({max_length})."
        )
    return TokenizedExample(input_ids=ids, loss_mask=mask, truncated=truncated)


def _completion_in_reach(tokenizer, ids: list[int], mask: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """A pair whose completion starts past `max_length` (a long few-shot prompt) loses the start of its prompt
    instead of its whole completion: the prompt's first tokens are dropped (a leading special token, BOS, stays
    first) until the whole pair fits, or the whole prompt is gone. Any other pair is returned as it is."""
    first = mask.index(1) if 1 in mask else len(mask)
    if first < max_length or first == len(mask):
        return ids, mask
    keep = 1 if ids and ids[0] in set(tokenizer.all_special_ids) else 0
    drop = min(len(ids) - max_length, first - keep)  # prompt tokens [keep, keep + drop) go
    return ids[:keep] + ids[keep + drop :], mask[:keep] + mask[keep + drop :]


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """The whole ids of each text (special tokens added, nothing cut), in one call: a fast tokenizer encodes the
    batch in parallel, as it would each text alone."""
    # Truncation is intended (slicing keeps the ids of a tokenisation of the whole text, with no end-of-text token
    # put after a cut), so the "longer than the specified maximum sequence length" warning is noise: `verbose=False`
    # turns off that one warning for this call, not transformers' logging.
    return tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"] if texts else []


def _tokenize_joined(tokenizer, item: PromptCompletion) -> tuple[list[int], list[int]]:
    """Ids of `prompt + completion` and a 0/1 mask of the tokens holding a completion character (see `tokenize`)."""
    text, boundary = item.prompt + item.completion, len(item.prompt)
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(
            text, add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True, verbose=False
        )
        ids = encoded["input_ids"]
        mask = [
            int(end > boundary and not special)
            for (_, end), special in zip(encoded["offset_mapping"], encoded["special_tokens_mask"])
        ]
        return ids, mask
    # A slow (pure Python) tokenizer gives no character offsets. The joined tokens usually start with the prompt's
    # own tokens up to the last one the completion merges with, so the tokens after the longest common prefix are
    # those holding completion characters, the straddling one included (as above). Should the prompt alone tokenise
    # differently earlier on, the tokens from there on count as well: never fewer than the completion's.
    encoded = tokenizer(text, add_special_tokens=True, return_special_tokens_mask=True, verbose=False)
    ids, special = encoded["input_ids"], encoded["special_tokens_mask"]
    prompt_ids = tokenizer(item.prompt, add_special_tokens=True, verbose=False)["input_ids"] if item.prompt else []
    common = 0
    while common < min(len(ids), len(prompt_ids)) and ids[common] == prompt_ids[common]:
        common += 1
    return ids, [int(i >= common and not s) for i, s in enumerate(special)]


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
