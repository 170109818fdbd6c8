"""Which rows of a tokenized training dataset a collated batch holds, told by their tokens.

The HF Trainer drops every dataset column its model does not take (ids, texts) before collating, and a batch
reaches the model as padded token ids only. The unpadded token ids of each row are what survives, so they are
the key: the rows of the dataset are hashed by their tokens once, and each batch row is looked up. Rows with
identical tokens have identical gradients at a step; they are handed out in turn, so each is used once per epoch.
"""

from __future__ import annotations

import collections
import hashlib

import torch

from attribindex.errors import AttribIndexError


def _key(tokens: list[int]) -> bytes:
    return hashlib.blake2b(repr(tokens).encode(), digest_size=16).digest()


class DatasetRows:
    """Looks up the dataset row of each example in a batch, by its token ids (padding dropped).

    Args:
        dataset: a map-style dataset whose rows hold `tokens_field` (an HF `datasets.Dataset`, or any sized,
            indexable collection of dicts).
        id_field, text_field: columns with each row's id and text (default: the row number, and the tokenizer's
            decoding of the tokens).

    Example:
        >>> rows = DatasetRows(train_dataset, tokenizer, id_field="id", text_field="text")  # doctest: +SKIP
        >>> ids, texts, sources = rows(batch["input_ids"], batch["attention_mask"])  # doctest: +SKIP
    """

    def __init__(
        self,
        dataset,
        tokenizer,
        *,
        id_field: str | None = None,
        text_field: str | None = None,
        tokens_field: str = "input_ids",
    ):
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise AttribIndexError(
                f"the training dataset ({type(dataset).__name__}) has no length or rows to look up (a stream?). "
                "Capture from your own loop with attribindex.capture_training, saying each batch's ids."
            )
        columns = _columns(dataset, [f for f in (tokens_field, id_field, text_field) if f])
        self.tokenizer = tokenizer
        self._ids, self._texts = columns.get(id_field), columns.get(text_field)
        self._rows: dict[bytes, list[int]] = collections.defaultdict(list)
        for row, tokens in enumerate(columns[tokens_field]):
            self._rows[_key(list(tokens))].append(row)
        self._uses: collections.Counter[bytes] = collections.Counter()

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[list[str], list, list[str]]:
        """(ids, texts, sources) of the batch's rows; a text is None where the dataset has no text column."""
        ids, texts, sources = [], [], []
        for tokens, mask in zip(input_ids, attention_mask):
            real = tokens[mask.bool()].tolist()
            key = _key(real)
            rows = self._rows.get(key)
            if not rows:
                raise AttribIndexError(
                    f"a training batch holds a sequence that is no row of the training dataset (it starts with token "
                    f"ids {real[:8]}): the collator changes the tokens (packing, truncation, added special tokens). "
                    "Collate without changing them, or capture from your own loop with attribindex.capture_training."
                )
            row = rows[self._uses[key] % len(rows)]
            self._uses[key] += 1
            ids.append(str(self._ids[row]) if self._ids is not None else str(row))
            texts.append(self._texts[row] if self._texts is not None else None)
            sources.append(f"train[{row}]")
        return ids, texts, sources


def _columns(dataset, fields: list[str]) -> dict[str, list]:
    names = getattr(dataset, "column_names", None)
    if names is not None:  # an HF datasets.Dataset: whole columns at once
        missing = [f for f in fields if f not in names]
        if missing:
            raise AttribIndexError(f"the training dataset has no column {missing[0]!r}; its columns are {names}.")
        return {f: dataset[f] for f in fields}
    rows = [dataset[i] for i in range(len(dataset))]
    for field in fields:
        if rows and field not in rows[0]:
            raise AttribIndexError(f"the training dataset's rows have no {field!r}; they have {sorted(rows[0])}.")
    return {f: [r[f] for r in rows] for f in fields}
