"""On-disk index folders: layout, manifest, chunked raw-gradient rows, atomic writes."""

from attribindex.store import _layout as layout
from attribindex.store._atomic import atomic_open, atomic_path, file_sha256, write_json
from attribindex.store._codec import decode, encode
from attribindex.store._manifest import read_manifest
from attribindex.store._rows import ChunkWriter, RowStore
from attribindex.store._verify import VerifyReport, check_file, recorded_files, verify_files

__all__ = [
    "ChunkWriter",
    "RowStore",
    "VerifyReport",
    "check_file",
    "atomic_open",
    "atomic_path",
    "decode",
    "encode",
    "file_sha256",
    "layout",
    "read_manifest",
    "recorded_files",
    "verify_files",
    "write_json",
]
