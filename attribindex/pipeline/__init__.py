"""Orchestration: the build pipeline that ties data, logra, hessian, store and index together."""

from attribindex.pipeline._build import BuildSummary, build_index
from attribindex.pipeline._merge import MergeSummary, merge_shards

__all__ = ["BuildSummary", "MergeSummary", "build_index", "merge_shards"]
