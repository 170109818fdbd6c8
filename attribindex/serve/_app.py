"""The HTTP/JSON attribution server: FastAPI over one loaded index and model (OpenAPI at /docs, /openapi.json).

Every limit is enforced before any model work, and every error is a JSON body
`{"error": {"type", "message"}}` with a 4xx status (5xx only for a real server fault, never a trace).
"""

from __future__ import annotations

import contextlib
import copy
import hmac
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from attribindex._records import to_json
from attribindex.data import PromptCompletion, tokenize
from attribindex.errors import AttribIndexError
from attribindex.query import MAX_EXACT_CANDIDATES, AttributionIndex, Attributions, check_exact
from attribindex.serve._batcher import MicroBatcher, ShuttingDown

API_PREFIX = "/v1"

# The browser explorer: plain files shipped as package data, each at one fixed path (no path parameter, so no
# request can name any other file). They hold no secret and are served without the token; every API call the page
# makes sends it.
_STATIC = Path(__file__).parent / "static"
_PAGES = {
    "/": ("explorer.html", "text/html; charset=utf-8"),
    "/static/explorer.js": ("explorer.js", "text/javascript; charset=utf-8"),
    "/static/explorer.css": ("explorer.css", "text/css; charset=utf-8"),
}
# Only this origin's scripts, styles and API; no inline script, no framing: a corpus text that looks like HTML
# cannot run in the page that holds the token, and no other site can frame it.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

# auto_error=False: a missing header must get this server's 401 JSON error, not FastAPI's own answer.
_BEARER = HTTPBearer(
    scheme_name="bearer", auto_error=False, description="The token the server was started with (`--token`)."
)


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on one request; each violation is a 4xx JSON error naming the limit.

    Example:
        >>> ServerLimits(max_queries=16).max_queries
        16
    """

    max_body_bytes: int = 1 << 20
    max_queries: int = 64  # texts or pairs per request
    max_tokens: int = 2048  # tokens per query text (prompt + completion)
    max_k: int = 1000  # for k and for bottom
    max_exact: int = 1000  # candidates an `exact` re-rank may re-score (each costs a forward + backward pass)
    batch_window_ms: float = 5.0  # how long a request waits for others to share its model pass
    max_batch_queries: int = 64  # queries per model pass

    def __post_init__(self) -> None:
        if isinstance(self.max_exact, bool) or not isinstance(self.max_exact, int):
            raise AttribIndexError(f"`max_exact` must be an integer, got {self.max_exact!r}.")
        if not 0 <= self.max_exact <= MAX_EXACT_CANDIDATES:
            raise AttribIndexError(
                f"`max_exact={self.max_exact}` is outside [0, {MAX_EXACT_CANDIDATES:,}]: each re-scored candidate is "
                f"one forward and backward pass of the model (0 refuses every exact re-rank)."
            )


class PairModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    completion: str


class AttributeRequest(BaseModel):
    """Body of POST /v1/attribute."""

    model_config = ConfigDict(extra="forbid")
    queries: list[str | PairModel] = Field(min_length=1, description="Texts, or {prompt, completion} pairs.")
    k: int = Field(10, ge=1, description="Most influential examples per query.")
    bottom: int = Field(0, ge=0, description="Least influential examples per query.")
    include_text: bool = Field(True, description="Return each example's text (false: ids and scores only).")
    # strict: `true` or "200" is refused rather than read as a number; the bounds are checked (with the library's
    # messages) in `_check_limits`, so that an index without the exact section says so first
    exact: StrictInt | None = Field(
        None,
        description="Re-score the index's top-C (and bottom-C) candidates with exact, unprojected influence "
        "(the index must be built with the `exact` config section); at least max(k, bottom), at most the "
        "server's max_exact.",
    )


class ExplainRequest(BaseModel):
    """Body of POST /v1/explain."""

    model_config = ConfigDict(extra="forbid")
    query: str | PairModel = Field(description="A text, or a {prompt, completion} pair.")
    ids: list[str] = Field(min_length=1, description="Ids of indexed examples, e.g. from /v1/attribute's results.")
    exact: bool = Field(False, description="Split the exact, unprojected scores (the index's `exact` section).")


class _BodyLimit:
    """Pure ASGI middleware: bodies over `limit` bytes get 413 before they are read whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.limit:
            return await _too_large(self.limit)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge:
            await _too_large(self.limit)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int) -> JSONResponse:
    return _error(413, "body_too_large", f"request body exceeds {limit:,} bytes. Send fewer or shorter queries.")


def _error(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def create_app(index: AttributionIndex, limits: ServerLimits | None = None, token: str | None = None) -> FastAPI:
    """An ASGI app answering attribution requests for `index` (opened with its model).

    Example:
        >>> app = create_app(AttributionIndex.open("demo-index"), token="s3cret")  # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
    """
    limits = limits or ServerLimits()
    batcher = MicroBatcher(index, limits.batch_window_ms / 1000, limits.max_batch_queries)
    # Requests are checked on the event loop while the worker thread runs the model: a tokenizer of their own
    # (fast tokenizers refuse concurrent use from two threads).
    tokenizer = copy.deepcopy(index.extractor.tokenizer)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.close()

    app = FastAPI(
        title="attribindex",
        summary="Training-data attribution: which training examples most influenced a model output.",
        version="1",
        lifespan=lifespan,
    )
    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)
    _add_error_handlers(app)

    @app.get("/health", summary="Liveness: the index and model are loaded.")
    async def health():
        return {"status": "ok", "index_id": batcher.index.index_id, "index_version": batcher.index.version}

    app.include_router(_api_routes(batcher, tokenizer, limits), dependencies=_bearer_auth(token))
    app.include_router(_page_routes())
    return app


def _page_routes() -> APIRouter:
    """The explorer's page, script and style at fixed paths (left out of the OpenAPI description: not API)."""
    router = APIRouter(include_in_schema=False)
    for path, (name, media_type) in _PAGES.items():
        router.add_api_route(path, _page(_STATIC / name, media_type), methods=["GET"])
    return router


def _page(file: Path, media_type: str):
    # A closure, not default arguments: FastAPI would read those as query parameters a request could set.
    async def page() -> FileResponse:
        return FileResponse(file, media_type=media_type, headers=_PAGE_HEADERS)

    return page


class _Unauthorized(Exception):
    pass


def _bearer_auth(token: str | None) -> list:
    """Dependencies of the /v1 routes: the bearer token, compared in constant time (none: the API is open)."""
    if token is None:
        return []
    expected = token.encode()

    async def bearer_token(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)]) -> None:
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), expected):
            raise _Unauthorized

    return [Depends(bearer_token)]


# What a refused body should have looked like, per route (the fix a validation message ends with).
_EXAMPLE_BODIES = {
    "": '{"queries": ["a text"], "k": 10}',
    f"{API_PREFIX}/explain": '{"query": "a text", "ids": ["doc-1"]}',
}


def _add_error_handlers(app: FastAPI) -> None:
    """Every refusal and fault as a JSON `{"error": {"type", "message"}}` body, never a trace."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        problems = err.errors()
        example = f"Send a JSON object such as {_EXAMPLE_BODIES.get(request.url.path, _EXAMPLE_BODIES[''])}."
        if any(p["type"] == "json_invalid" for p in problems):
            return _error(400, "malformed_json", f"the request body is not valid JSON. {example}")
        first = problems[0]
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        return _error(422, "invalid_request", f"{where or 'body'}: {first['msg']}. {example}")

    @app.exception_handler(_Unauthorized)
    async def unauthorized(request: Request, err: _Unauthorized):
        message = (
            "missing or wrong bearer token. Send the server's --token as the header `Authorization: Bearer TOKEN`."
        )
        return _error(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(AttribIndexError)
    async def refused(request: Request, err: AttribIndexError):
        if isinstance(err, ShuttingDown):
            return _error(503, "shutting_down", str(err))
        return _error(400, "bad_query", str(err))

    @app.exception_handler(Exception)
    async def fault(request: Request, err: Exception):  # a server fault: say what, never send a trace
        return _error(500, "server_error", f"the server failed on this request ({type(err).__name__}: {err}).")


def _api_routes(batcher: MicroBatcher, tokenizer, limits: ServerLimits) -> APIRouter:
    """The /v1 API: info, attribute and reload, all answered through `batcher`."""
    router = APIRouter()

    @router.get(f"{API_PREFIX}/info", summary="What the index holds, and this server's limits.")
    async def info():
        index = batcher.index
        manifest = index.manifest
        return {
            "index_id": index.index_id,
            "index_version": index.version,
            "rows": index.rows,
            "dim": manifest.dim,
            "model": manifest.model.name_or_path,
            "hessian": manifest.hessian.kind,
            "normalization": index.mode,
            "search": index.search_description,
            "operating_point": to_json(manifest.index.operating_point),
            "exact": _exact_info(manifest.exact),  # null: requests with `exact` are refused
            "limits": asdict(limits),
            "batches_run": batcher.batches,
        }

    @router.post(f"{API_PREFIX}/attribute", summary="Top-k (and bottom-k) training examples for each query.")
    async def attribute(body: AttributeRequest) -> dict:
        started = time.perf_counter()
        queries = [q if isinstance(q, str) else PromptCompletion(q.prompt, q.completion) for q in body.queries]
        _check_limits(body, queries, batcher.index, tokenizer, limits)
        if body.exact is None:
            results, answered_by = await batcher.submit(queries, body.k, body.bottom)
            attributions = Attributions(
                index_id=answered_by.index_id,
                index_version=answered_by.version,
                latency_ms=0.0,
                exact=answered_by.exact_search,
                mode=answered_by.mode,
                results=results,
                search=answered_by.search_description,
            )
        else:
            attributions = await batcher.submit_alone(
                partial(AttributionIndex.attribute, queries=queries, k=body.k, bottom=body.bottom, exact=body.exact)
            )
        latency = (time.perf_counter() - started) * 1000  # the whole request, waiting for the model included
        answer = replace(attributions, latency_ms=latency).to_dict()
        if not body.include_text:
            for result in answer["results"]:
                for attribution in result["top"] + result["bottom"]:
                    attribution["text"] = ""
        return answer

    @router.post(f"{API_PREFIX}/explain", summary="Each example's score on the query, split over both texts' tokens.")
    async def explain(body: ExplainRequest) -> dict:
        started = time.perf_counter()
        query = (
            body.query if isinstance(body.query, str) else PromptCompletion(body.query.prompt, body.query.completion)
        )
        if len(body.ids) > 2 * limits.max_k:  # a query's top k and bottom k, as the explorer asks
            raise AttribIndexError(
                f"{len(body.ids)} ids in one request; this server explains at most {2 * limits.max_k} (its max_k "
                f"{limits.max_k} for the top and as many for the bottom)."
            )
        _check_query(query, 0, batcher.index, tokenizer, limits)
        if body.exact:
            check_exact(batcher.index.manifest, 1, 1, 0)  # before model work: the index may lack the section
        explanation = await batcher.submit_alone(
            partial(AttributionIndex.explain, query=query, ids=body.ids, exact=body.exact)
        )
        return replace(explanation, latency_ms=(time.perf_counter() - started) * 1000).to_dict()

    @router.post(f"{API_PREFIX}/reload", summary="Pick up appends, deletes and refreshes committed on disk now.")
    async def reload():
        index = await batcher.reload_now()
        return {"index_id": index.index_id, "index_version": index.version, "rows": index.rows}

    return router


def _exact_info(record) -> dict | None:
    """How this index re-ranks with `exact` (the manifest's exact record, less its per-layer statistics)."""
    if record is None:
        return None
    return {"kind": record.kind, "fisher": record.fisher, "damping": record.damping}


def _check_limits(body: AttributeRequest, queries: list, index: AttributionIndex, tokenizer, limits: ServerLimits):
    """Bounds and tokenisation, per request, before it joins a batch (one bad query must not fail others)."""
    if len(queries) > limits.max_queries:
        raise AttribIndexError(
            f"{len(queries)} queries in one request; this server takes at most {limits.max_queries}."
        )
    for name, value in (("k", body.k), ("bottom", body.bottom)):
        if value > min(limits.max_k, index.rows):
            raise AttribIndexError(
                f"{name}={value} is over the limit: at most {min(limits.max_k, index.rows)} "
                f"(server max_k {limits.max_k}, {index.rows} indexed rows)."
            )
    if body.exact is not None:
        check_exact(
            index.manifest, body.exact, body.k, body.bottom, limit=limits.max_exact, limit_source="server max_exact"
        )
    for i, query in enumerate(queries):
        _check_query(query, i, index, tokenizer, limits)


def _check_query(query, i: int, index: AttributionIndex, tokenizer, limits: ServerLimits) -> None:
    text = query if isinstance(query, str) else query.prompt + query.completion
    length = len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    if length > limits.max_tokens:
        raise AttribIndexError(
            f"query {i} has {length} tokens; this server takes at most {limits.max_tokens}. Send a shorter query, or "
            "start the server with a larger --max-tokens."
        )
    tokenize(tokenizer, query, index.extract_config.max_length, f"query {i}")  # refuses a query with no loss
