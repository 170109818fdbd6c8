"""Exact, unprojected influence: full Kronecker factors, the KFAC / EK-FAC inverse Hessian in its eigenbasis,
and scores of training examples against queries (the second stage that re-ranks an index's candidates)."""

from attribindex.exact._factors import (
    FactorBatch,
    FactorListener,
    LayerShape,
    factor_rate,
    factor_selection,
    layer_shapes,
    with_bias,
)
from attribindex.exact._scores import ContractedScores, ExactScorer, PreparedQueries, RotatedGradients
from attribindex.exact._whitening import (
    ExactPreconditioner,
    LayerCurvature,
    fit_exact_preconditioner,
    kfac_bases,
)

__all__ = [
    "ContractedScores",
    "ExactPreconditioner",
    "ExactScorer",
    "FactorBatch",
    "FactorListener",
    "LayerCurvature",
    "LayerShape",
    "PreparedQueries",
    "RotatedGradients",
    "factor_rate",
    "factor_selection",
    "fit_exact_preconditioner",
    "kfac_bases",
    "layer_shapes",
    "with_bias",
]
