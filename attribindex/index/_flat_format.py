"""The bytes of a flat inner-product FAISS file: written by `FlatIndexWriter`, read by `read_flat_vectors`.

The file is this header followed by the float32 vectors row by row (little-endian), exactly what
`faiss.write_index` writes for an `IndexFlatIP` (tests/index checks byte equality against the installed
faiss). Only `struct` is imported here: `_blockwise.py` must load without the rest of the package.
"""

from __future__ import annotations

import struct

# The exact byte layout faiss.write_index uses for IndexFlatIP, little-endian, no padding (45 bytes):
#   4s  fourcc         b"IxFI" (IndexFlatIP; IndexFlatL2 is b"IxF2")
#   i   d              vector dimension (int32)
#   q   ntotal         number of vectors (int64)
#   q   dummy          reserved, faiss writes FLAT_RESERVED (int64)
#   q   dummy          reserved, faiss writes FLAT_RESERVED (int64)
#   ?   is_trained     always True for a flat index (1 byte)
#   i   metric_type    FLAT_METRIC_INNER_PRODUCT (int32)
#   q   size           number of floats that follow, ntotal * d (int64)
FLAT_HEADER = struct.Struct("<4siqqq?iq")
FLAT_FOURCC = b"IxFI"
FLAT_RESERVED = 1 << 20  # the value faiss writes in both reserved fields
FLAT_METRIC_INNER_PRODUCT = 0  # faiss.METRIC_INNER_PRODUCT
