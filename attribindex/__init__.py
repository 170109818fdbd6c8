"""attribindex: training-data attribution at corpus scale (LoGra gradients in a FAISS index).

Example:
    >>> import attribindex
    >>> attribindex.build_index(attribindex.load_config("tiny"), "./tiny-gpt2", "corpus.jsonl", "idx")  # doctest: +SKIP
    >>> index = attribindex.AttributionIndex.open("idx")  # doctest: +SKIP
    >>> index.attribute(["a query text"], k=5).results[0].top  # doctest: +SKIP
"""

from attribindex._version import __version__
from attribindex.config import BuildConfig, load_config
from attribindex.data import PromptCompletion
from attribindex.errors import (
    AttribIndexError,
    DiskFullError,
    IndexMismatchError,
    OutOfMemoryError,
    PermissionDeniedError,
    ResourceError,
)
from attribindex.eval import RecallReport, measure_recall
from attribindex.harness import SampleTrace, read_eval_results, trace_eval
from attribindex.milvus import PushSummary, push_index
from attribindex.pipeline import (
    AppendSummary,
    BuildPlan,
    BuildSummary,
    EditSummary,
    MergeSummary,
    append_documents,
    build_ensemble,
    build_index,
    compact_index,
    delete_ids,
    merge_shards,
    plan_build,
    refresh_index,
    set_operating_point,
)
from attribindex.query import (
    Attribution,
    AttributionIndex,
    Attributions,
    ExplainedExample,
    Explanation,
    QueryResult,
    QueryVectors,
    TokenContribution,
)
from attribindex.serve import Client
from attribindex.train import TrainingCapture, capture_training

__all__ = [
    "__version__",
    "AppendSummary",
    "AttribIndexError",
    "AttributionCallback",
    "Attribution",
    "AttributionIndex",
    "Attributions",
    "BuildConfig",
    "BuildPlan",
    "BuildSummary",
    "Client",
    "DiskFullError",
    "EditSummary",
    "ExplainedExample",
    "Explanation",
    "IndexMismatchError",
    "MergeSummary",
    "OutOfMemoryError",
    "PermissionDeniedError",
    "PromptCompletion",
    "PushSummary",
    "QueryResult",
    "QueryVectors",
    "RecallReport",
    "ResourceError",
    "SampleTrace",
    "TokenContribution",
    "TrainingCapture",
    "append_documents",
    "build_ensemble",
    "build_index",
    "capture_training",
    "compact_index",
    "delete_ids",
    "load_config",
    "measure_recall",
    "read_eval_results",
    "merge_shards",
    "plan_build",
    "push_index",
    "refresh_index",
    "set_operating_point",
    "trace_eval",
]


def __getattr__(name: str):
    if name == "AttributionCallback":  # imported on first use, like transformers' Trainer it plugs into
        from attribindex.train import AttributionCallback

        return AttributionCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
