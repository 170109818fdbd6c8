"""FAISS inner-product indexes over whitened gradient vectors."""

from attribindex.index._flat import FlatIndex, FlatIndexWriter, gpu_available, import_faiss

__all__ = ["FlatIndex", "FlatIndexWriter", "gpu_available", "import_faiss"]
