"""Answering attribution queries: open an index with its model, search, typed results."""

from attribindex.query._index import AttributionIndex, QueryVectors, as_queries, check_count
from attribindex.query._results import Attribution, Attributions, QueryResult, attributions_from_dict, one_line

__all__ = [
    "Attribution",
    "AttributionIndex",
    "Attributions",
    "QueryResult",
    "QueryVectors",
    "as_queries",
    "attributions_from_dict",
    "check_count",
    "one_line",
]
