"""The query API used by people and evaluation harnesses."""

from attribindex.query._index import AttributionIndex, QueryVectors
from attribindex.query._results import Attribution, Attributions, QueryResult, one_line

__all__ = ["Attribution", "AttributionIndex", "Attributions", "QueryResult", "QueryVectors", "one_line"]
