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
from attribindex.pipeline import BuildSummary, MergeSummary, build_index, merge_shards  # noqa: E402
from attribindex.query import Attribution, AttributionIndex, Attributions, QueryResult, QueryVectors  # noqa: E402

__all__ = [
    "AttribIndexError",
    "Attribution",
    "AttributionIndex",
    "Attributions",
    "BuildConfig",
    "BuildSummary",
    "IndexMismatchError",
    "MergeSummary",
    "PromptCompletion",
    "QueryResult",
    "QueryVectors",
    "build_index",
    "load_config",
    "merge_shards",
]
