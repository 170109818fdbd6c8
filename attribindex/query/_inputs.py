"""What a query is, and the checks every entry point applies to queries and result counts."""

from __future__ import annotations

from collections.abc import Sequence

from attribindex.data import PromptCompletion
from attribindex.errors import AttribIndexError
from attribindex.query._results import one_line

Query = str | PromptCompletion


def as_queries(queries: Sequence[Query | tuple[str, str]] | Query) -> list[Query]:
    """One query or many; (prompt, completion) tuples become PromptCompletion."""
    if isinstance(queries, (str, PromptCompletion)):
        return [queries]
    return [q if isinstance(q, (str, PromptCompletion)) else PromptCompletion(*q) for q in queries]


def check_count(name: str, value: int, rows: int, minimum: int) -> None:
    """Refuse a count of results (`k`, `bottom`) outside [minimum, rows], naming it and the bounds."""
    if not isinstance(value, int) or value < minimum or value > rows:
        low = "1" if minimum else "0"
        raise AttribIndexError(f"{name} must be between {low} and the number of indexed rows ({rows}), got {value}.")


def preview(query: Query) -> str:
    text = query.completion if isinstance(query, PromptCompletion) else query
    return repr(one_line(text, 31))
