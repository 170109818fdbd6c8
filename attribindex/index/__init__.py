"""FAISS inner-product indexes over whitened gradient vectors."""

from attribindex.index._flat import FlatIndex, FlatIndexWriter, gpu_available, import_faiss
from attribindex.index._segments import SegmentedIndex

__all__ = ["FlatIndex", "FlatIndexWriter", "SegmentedIndex", "gpu_available", "import_faiss"]
