"""Answering attribution queries: open an index with its model, search, typed results."""

from attribindex.query._exact import MAX_EXACT_CANDIDATES, check_exact
from attribindex.query._explain import ExplainedExample, Explanation, TokenContribution, explanation_from_dict
from attribindex.query._index import AttributionIndex, QueryVectors
from attribindex.query._inputs import as_queries, check_count
from attribindex.query._results import (
    Attribution,
    Attributions,
    ExactRerank,
    QueryResult,
    attributions_from_dict,
    one_line,
)

__all__ = [
    "MAX_EXACT_CANDIDATES",
    "Attribution",
    "AttributionIndex",
    "Attributions",
    "ExactRerank",
    "ExplainedExample",
    "Explanation",
    "QueryResult",
    "QueryVectors",
    "TokenContribution",
    "as_queries",
    "attributions_from_dict",
    "check_count",
    "check_exact",
    "explanation_from_dict",
    "one_line",
]
