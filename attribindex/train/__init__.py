"""Attribution where models are trained: LoGra rows captured from a training loop's own backward pass."""

from attribindex.train._capture import TrainingCapture, capture_training
from attribindex.train._dataset_rows import DatasetRows

__all__ = ["AttributionCallback", "DatasetRows", "TrainingCapture", "capture_training"]


def __getattr__(name: str):
    if name == "AttributionCallback":  # on first use: importing transformers' Trainer machinery takes a second or two
        from attribindex.train._callback import AttributionCallback

        return AttributionCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
