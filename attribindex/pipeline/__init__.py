"""Orchestration: building, merging and changing indexes; ties data, logra, hessian, store and index together."""

from attribindex.pipeline._append import AppendSummary, append_documents
from attribindex.pipeline._build import build_index
from attribindex.pipeline._edit import EditSummary, compact_index, delete_ids, refresh_index, set_operating_point
from attribindex.pipeline._ensemble import build_ensemble, checkpoint_learning_rate
from attribindex.pipeline._merge import merge_shards
from attribindex.pipeline._plan import plan_build
from attribindex.pipeline._plan_report import BuildPlan
from attribindex.pipeline._summary import BuildSummary, MergeSummary

__all__ = [
    "AppendSummary",
    "BuildPlan",
    "BuildSummary",
    "EditSummary",
    "MergeSummary",
    "append_documents",
    "build_ensemble",
    "build_index",
    "checkpoint_learning_rate",
    "compact_index",
    "delete_ids",
    "merge_shards",
    "plan_build",
    "refresh_index",
    "set_operating_point",
]
