"""On-disk index folders: layout, manifest, chunked raw-gradient rows, atomic writes."""

from attribindex.store import _layout as layout
from attribindex.store._atomic import atomic_open, file_sha256, write_json
from attribindex.store._codec import decode, encode
from attribindex.store._manifest import read_manifest
from attribindex.store._rows import ChunkWriter, RowStore

__all__ = [
    "ChunkWriter",
    "RowStore",
    "atomic_open",
    "decode",
    "encode",
    "file_sha256",
    "layout",
    "read_manifest",
    "write_json",
]
