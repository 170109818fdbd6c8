"""FAISS inner-product indexes over whitened vectors: exact flat, approximate segments, exact re-ranking."""

from attribindex.index._approx import ApproximateIndex, SegmentPlan, build_segment, default_nlist
from attribindex.index._blockwise import TorchFlatIndex, read_flat_vectors
from attribindex.index._flat import FlatIndex, FlatIndexWriter, gpu_available, import_faiss
from attribindex.index._rerank import rerank
from attribindex.index._segments import SegmentedIndex, describe_segments, segment_is_exact

__all__ = [
    "ApproximateIndex",
    "FlatIndex",
    "FlatIndexWriter",
    "SegmentPlan",
    "SegmentedIndex",
    "TorchFlatIndex",
    "build_segment",
    "default_nlist",
    "describe_segments",
    "gpu_available",
    "import_faiss",
    "read_flat_vectors",
    "rerank",
    "segment_is_exact",
]
