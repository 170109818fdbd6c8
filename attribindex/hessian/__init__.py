"""Curvature accumulation, damping and whitening in the projected space."""

from attribindex.hessian._curvature import FACTOR_KINDS, CurvatureSums, factor_width
from attribindex.hessian._precondition import (
    KroneckerWhitening,
    Preconditioner,
    fit_preconditioner,
    normalize_rows,
    relative_damping,
)

__all__ = [
    "FACTOR_KINDS",
    "CurvatureSums",
    "KroneckerWhitening",
    "Preconditioner",
    "factor_width",
    "fit_preconditioner",
    "normalize_rows",
    "relative_damping",
]
