"""LoGra: Kronecker-projected per-example gradients of Linear / Conv1D layers."""

from attribindex.logra._capture import LoGraCapture, project_inputs
from attribindex.logra._extractor import (
    ExtractedBatch,
    GradientExtractor,
    Labels,
    capture_gradients,
    per_example_loss,
    sampled_label_loss,
)
from attribindex.logra._hooks import LayerHooks, TokenListener, masked_tokens
from attribindex.logra._modules import ModuleSpec, select_modules
from attribindex.logra._optimizer import (
    SecondMomentScales,
    live_second_moment_scales,
    load_second_moment_scales,
    save_named_second_moments,
)
from attribindex.logra._projection import ProjectionSet, gaussian_projection

__all__ = [
    "ExtractedBatch",
    "GradientExtractor",
    "Labels",
    "LayerHooks",
    "LoGraCapture",
    "ModuleSpec",
    "ProjectionSet",
    "TokenListener",
    "SecondMomentScales",
    "capture_gradients",
    "gaussian_projection",
    "live_second_moment_scales",
    "load_second_moment_scales",
    "masked_tokens",
    "per_example_loss",
    "project_inputs",
    "sampled_label_loss",
    "save_named_second_moments",
    "select_modules",
]
