"""Search beyond one machine: an index's whitened rows in a Milvus collection (a server, or a Milvus Lite file).

`push_index` writes and updates the collection from the index's log; `MilvusSearch` asks it for candidates, which the
index re-scores from its own store (`AttributionIndex.open(path, search=URI)`). pymilvus is imported only when a
collection is used: the `milvus` extra (a server) or `milvus-lite` (local files).
"""

from attribindex.milvus._collection import KINDS, MAX_DIM, CollectionState, MilvusKind, read_state
from attribindex.milvus._push import PushSummary, push_index
from attribindex.milvus._search import MilvusOperatingPoint, MilvusSearch
from attribindex.milvus._target import MilvusTarget, connect

__all__ = [
    "KINDS",
    "MAX_DIM",
    "CollectionState",
    "MilvusKind",
    "MilvusOperatingPoint",
    "MilvusSearch",
    "MilvusTarget",
    "PushSummary",
    "connect",
    "push_index",
    "read_state",
]
