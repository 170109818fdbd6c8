"""FAISS inner-product indexes over whitened gradient vectors."""

from attribindex.index._flat import FlatIndex, gpu_available, import_faiss

__all__ = ["FlatIndex", "gpu_available", "import_faiss"]
