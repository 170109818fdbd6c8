"""Evaluation of an index: recall@k of approximate search against exact search; counterfactual ground truth."""

from attribindex.eval._ground_truth import (
    GroundTruth,
    TrainingRecipe,
    make_ground_truth,
    retrain_on_subsets,
    train_causal_lm,
)
from attribindex.eval._lds import LdsResult, lds_records, lds_table, linear_datamodeling_score, plot_lds
from attribindex.eval._recall import (
    RecallPoint,
    RecallReport,
    default_settings,
    exact_top_k,
    measure_recall,
    plot_recall,
)
from attribindex.eval._scores import training_scores

__all__ = [
    "GroundTruth",
    "LdsResult",
    "RecallPoint",
    "RecallReport",
    "TrainingRecipe",
    "default_settings",
    "exact_top_k",
    "lds_records",
    "lds_table",
    "linear_datamodeling_score",
    "make_ground_truth",
    "measure_recall",
    "retrain_on_subsets",
    "plot_lds",
    "plot_recall",
    "train_causal_lm",
    "training_scores",
]
