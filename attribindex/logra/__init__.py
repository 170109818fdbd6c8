"""LoGra: Kronecker-projected per-example gradients of Linear / Conv1D layers."""

from attribindex.logra._capture import LoGraCapture
from attribindex.logra._extractor import ExtractedBatch, GradientExtractor, per_example_loss
from attribindex.logra._modules import ModuleSpec, select_modules
from attribindex.logra._projection import ProjectionSet, gaussian_projection

__all__ = [
    "ExtractedBatch",
    "GradientExtractor",
    "LoGraCapture",
    "ModuleSpec",
    "ProjectionSet",
    "gaussian_projection",
    "per_example_loss",
    "select_modules",
]
