"""Orchestration: the build pipeline that ties data, logra, hessian, store and index together."""

from attribindex.pipeline._build import BuildSummary, build_index

__all__ = ["BuildSummary", "build_index"]
