"""attribindex: training-data attribution at corpus scale (LoGra gradients in a FAISS index).

Example:
    >>> import attribindex
    >>> attribindex.build_index(attribindex.load_config("tiny"), "./tiny-gpt2", "corpus.jsonl", "idx")  # doctest: +SKIP
    >>> index = attribindex.AttributionIndex.open("idx")  # doctest: +SKIP
    >>> index.attribute(["a query text"], k=5).results[0].top  # doctest: +SKIP
"""

__version__ = "0.1.0"

from attribindex.config import BuildConfig, load_config  # noqa: E402
from attribindex.data import PromptCompletion  # noqa: E402
from attribindex.errors import AttribIndexError, IndexMismatchError  # noqa: E402
from attribindex.eval import RecallReport, measure_recall  # noqa: E402
from attribindex.pipeline import (  # noqa: E402
    AppendSummary,
    BuildSummary,
    EditSummary,
    MergeSummary,
    append_documents,
    build_index,
    compact_index,
    delete_ids,
    merge_shards,
    refresh_index,
    set_operating_point,
)
from attribindex.query import Attribution, AttributionIndex, Attributions, QueryResult, QueryVectors  # noqa: E402
from attribindex.serve import Client  # noqa: E402

__all__ = [
    "AppendSummary",
    "AttribIndexError",
    "Attribution",
    "AttributionIndex",
    "Attributions",
    "BuildConfig",
    "BuildSummary",
    "Client",
    "EditSummary",
    "IndexMismatchError",
    "MergeSummary",
    "PromptCompletion",
    "QueryResult",
    "QueryVectors",
    "RecallReport",
    "append_documents",
    "build_index",
    "compact_index",
    "delete_ids",
    "load_config",
    "measure_recall",
    "merge_shards",
    "refresh_index",
    "set_operating_point",
]
