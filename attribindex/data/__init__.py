"""Reading (and writing) corpora, stable ids, tokenisation and batching."""

from attribindex.data._batching import (
    Batch,
    PromptCompletion,
    TokenizedExample,
    batched,
    collate,
    encode_texts,
    tokenize,
)
from attribindex.data._documents import Corpus, Document, content_id, open_corpus, shard_window, write_jsonl

__all__ = [
    "Batch",
    "Corpus",
    "Document",
    "PromptCompletion",
    "TokenizedExample",
    "batched",
    "collate",
    "content_id",
    "encode_texts",
    "open_corpus",
    "shard_window",
    "tokenize",
    "write_jsonl",
]
