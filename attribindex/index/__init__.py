"""Inner-product search over whitened vectors: exact over the row store, FAISS segments (approximate, and the exact
flat files of older indexes), exact re-ranking.

Every segment kind implements the `Segment` protocol, which is all `SegmentedIndex` relies on.
"""

from attribindex.index._approx import (
    ApproximateIndex,
    SegmentPlan,
    augmentation_column,
    build_segment,
    default_nlist,
)
from attribindex.index._blockwise import TorchFlatIndex, read_flat_vectors
from attribindex.index._flat import FlatIndex, FlatIndexWriter, gpu_available, import_faiss
from attribindex.index._rerank import rerank
from attribindex.index._segment import Segment
from attribindex.index._segments import SegmentedIndex
from attribindex.index._store_flat import StoreAccess, StoreFlatIndex

__all__ = [
    "ApproximateIndex",
    "FlatIndex",
    "FlatIndexWriter",
    "Segment",
    "SegmentPlan",
    "SegmentedIndex",
    "StoreAccess",
    "StoreFlatIndex",
    "TorchFlatIndex",
    "augmentation_column",
    "build_segment",
    "default_nlist",
    "gpu_available",
    "import_faiss",
    "read_flat_vectors",
    "rerank",
]
