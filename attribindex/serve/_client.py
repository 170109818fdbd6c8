"""The query client: the local library's query methods and result types, over HTTP.

A harness swaps `AttributionIndex.open(path)` for `Client(url)` and keeps the rest of its code.
"""

from __future__ import annotations

from collections.abc import Sequence

import httpx

from attribindex.data import PromptCompletion
from attribindex.errors import AttribIndexError
from attribindex.query import Attributions, Explanation, as_queries, attributions_from_dict, explanation_from_dict


class Client:
    """Talks to `attribindex serve`.

    Example:
        >>> from attribindex import Client, PromptCompletion
        >>> with Client("http://127.0.0.1:8000") as index:  # doctest: +SKIP
        ...     answer = index.attribute(["Friends, Romans, countrymen"], k=5, bottom=2)
        ...     answer.results[0].top[0].id, answer.index_version
        ...     index.attribute("To be, or not to be", k=10, exact=200).rerank  # exact re-rank of 200 candidates
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 120.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def attribute(
        self,
        queries: Sequence[str | PromptCompletion | tuple[str, str]] | str | PromptCompletion,
        k: int = 10,
        bottom: int = 0,
        include_text: bool = True,
        exact: int | None = None,
    ) -> Attributions:
        """The k most (and `bottom` least) influential training examples per query, as `AttributionIndex.attribute`.

        Args:
            include_text: False: ids and scores only (each attribution's text is empty).
            exact: re-score the index's top-`exact` (and bottom-`exact`) candidates with exact, unprojected
                influence, as `AttributionIndex.attribute(..., exact=...)`; the answer's `rerank` says how.
                At most the server's `max_exact` (see `info()["limits"]`).
        """
        body = {
            "queries": [
                q if isinstance(q, str) else {"prompt": q.prompt, "completion": q.completion}
                for q in as_queries(queries)
            ],
            "k": k,
            "bottom": bottom,
            "include_text": include_text,
        }
        if exact is not None:
            body["exact"] = exact
        return attributions_from_dict(self._call("POST", "/v1/attribute", json=body))

    def explain(
        self, query: str | PromptCompletion | tuple[str, str], ids: Sequence[str], exact: bool = False
    ) -> Explanation:
        """Each of `ids`' score on `query`, split over the example's tokens and the query's, as
        `AttributionIndex.explain` (`exact`: the exact, unprojected scores).

        Example:
            >>> with Client("http://127.0.0.1:8000") as index:  # doctest: +SKIP
            ...     explained = index.explain("To be, or not to be", ["hamlet-3-1"]).examples[0]
            ...     [(t.text, t.contribution) for t in explained.strongest(3)]
        """
        query = PromptCompletion(*query) if isinstance(query, tuple) else query
        body = {
            "query": query if isinstance(query, str) else {"prompt": query.prompt, "completion": query.completion},
            "ids": [ids] if isinstance(ids, str) else list(ids),
            "exact": exact,
        }
        return explanation_from_dict(self._call("POST", "/v1/explain", json=body))

    def info(self) -> dict:
        """The index's id, version, rows, model and the server's limits."""
        return self._call("GET", "/v1/info")

    def health(self) -> dict:
        return self._call("GET", "/health")

    def _call(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as err:
            raise AttribIndexError(
                f"cannot reach the attribindex server at {self.url} ({type(err).__name__}: {err or 'no answer'}). "
                f"Is `attribindex serve` running there?"
            ) from None
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                message = f"{error['message'].rstrip('.')} ({response.status_code} {error['type']})."
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {response.status_code}: {response.text[:200]}"
            raise AttribIndexError(f"the server refused the request: {message}")
        return response.json()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
