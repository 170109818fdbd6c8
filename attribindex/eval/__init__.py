"""Evaluation of an index: recall@k of approximate search against exact search."""

from attribindex.eval._recall import RecallPoint, RecallReport, exact_top_k, measure_recall, plot_recall

__all__ = ["RecallPoint", "RecallReport", "exact_top_k", "measure_recall", "plot_recall"]
