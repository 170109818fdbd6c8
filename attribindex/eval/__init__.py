"""Evaluation of an index: recall@k of approximate search against exact search."""

from attribindex.eval._recall import (
    RecallPoint,
    RecallReport,
    default_settings,
    exact_top_k,
    measure_recall,
    plot_recall,
)

__all__ = ["RecallPoint", "RecallReport", "default_settings", "exact_top_k", "measure_recall", "plot_recall"]
