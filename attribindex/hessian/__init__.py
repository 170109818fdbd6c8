"""Curvature accumulation, damping and whitening in the projected space."""

from attribindex.hessian._curvature import CurvatureSums
from attribindex.hessian._precondition import ModuleStats, Preconditioner, normalize_rows

__all__ = ["CurvatureSums", "ModuleStats", "Preconditioner", "normalize_rows"]
