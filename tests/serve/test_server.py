"""The real server over HTTP on a free loopback port: the app and uvicorn server `attribindex serve` runs, from a
thread of this process where the answers are under test, and as its own process (`attribindex serve` with its
flags) where the process is: its command line and its shutdown on SIGTERM."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from click.testing import CliRunner

from attribindex import (
    AttribIndexError,
    AttributionIndex,
    Attributions,
    Client,
    PromptCompletion,
    append_documents,
    build_index,
    delete_ids,
    push_index,
)
from attribindex.cli import main
from attribindex.config import IndexConfig
from attribindex.serve import ServerLimits
from attribindex.testing import server_log, serving, start_server, write_jsonl
from tests.conftest import exact_config

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def index_dir(tiny_models, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("served") / "idx"
    build_index(exact_config("cosine"), str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
    return out


LIMITS = ServerLimits(max_queries=8, max_tokens=40, max_body_bytes=4 * 1024)


@pytest.fixture(scope="module")
def server(index_dir):
    with serving(index_dir, token=TOKEN, limits=LIMITS) as url:
        yield url


MAX_EXACT = 12


@pytest.fixture(scope="module")
def exact_server(exact_index):
    with serving(exact_index, limits=ServerLimits(max_exact=MAX_EXACT)) as url:
        yield url


QUERIES = [
    "King queen crown castle.",
    PromptCompletion("Ghost father", " son mind heart."),
    "Storm war peace sister brother.",
]


def _assert_same(remote: Attributions, local: Attributions) -> None:
    assert (remote.index_id, remote.index_version, remote.exact, remote.mode) == (
        local.index_id,
        local.index_version,
        local.exact,
        local.mode,
    )
    for got, want in zip(remote.results, local.results, strict=True):
        assert got.query == want.query
        assert [a.id for a in got.top] == [a.id for a in want.top]
        assert [a.id for a in got.bottom] == [a.id for a in want.bottom]
        assert [a.text for a in got.top] == [a.text for a in want.top]
        assert [a.score for a in got.top] == pytest.approx([a.score for a in want.top], rel=1e-5)
        assert got.loss == pytest.approx(want.loss, rel=1e-6)


def test_answers_equal_the_local_library(server, index_dir):
    local = AttributionIndex.open(index_dir).attribute(QUERIES, k=5, bottom=2)
    with Client(server, token=TOKEN) as client:
        remote = client.attribute(QUERIES, k=5, bottom=2)
        info = client.info()
    assert isinstance(remote, Attributions) and isinstance(remote.results[1].query, PromptCompletion)
    _assert_same(remote, local)
    assert info["rows"] == 24 and info["limits"]["max_queries"] == 8
    assert httpx.get(f"{server}/openapi.json").json()["paths"].keys() >= {"/v1/attribute", "/v1/info", "/health"}


MAX_BATCH = 8


def test_32_concurrent_clients_all_succeed_and_share_model_passes(index_dir):
    # A batch closes when it holds MAX_BATCH queries or after its window; the window is long enough for every
    # client to arrive, so 32 one-query requests make exactly 32 / MAX_BATCH passes, each one shared by 8.
    texts = [f"{w} king {w} queen crown." for w in ("war", "peace", "storm", "heart") * 8]
    local = AttributionIndex.open(index_dir).attribute(texts, k=3)
    limits = ServerLimits(max_batch_queries=MAX_BATCH, batch_window_ms=2000)
    with serving(index_dir, limits=limits) as url:

        def ask(i: int) -> Attributions:
            with Client(url) as client:
                return client.attribute(texts[i], k=3)

        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(ask, range(32)))
        with Client(url) as client:
            batches = client.info()["batches_run"]
    for i, answer in enumerate(answers):
        assert [a.id for a in answer.results[0].top] == [a.id for a in local.results[i].top]
        assert [a.score for a in answer.results[0].top] == pytest.approx([a.score for a in local.results[i].top])
    assert batches == math.ceil(len(texts) / MAX_BATCH)  # 4 model passes for 32 requests


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ('{"queries": [', 400, "not valid JSON"),
        ('{"queries": ["a b c"], "k": 0}', 422, "k: Input should be greater than or equal to 1"),
        ('{"queries": []}', 422, "queries"),
        ('{"queries": ["a b c"], "colour": 1}', 422, "colour"),
        ('{"queries": ["a b c"], "k": 25}', 400, "k=25 is over the limit: at most 24"),
        ('{"queries": ["a b c"], "bottom": 1001}', 400, "bottom=1001 is over the limit"),
        ('{"queries": ["a b", "c d", "e f", "g h", "i j", "k l", "m n", "o p", "q r"]}', 400, "at most 8"),
        ('{"queries": ["' + "king " * 60 + '"]}', 400, "tokens; this server takes at most 40"),
        ('{"queries": [""]}', 400, "no token carries loss"),
        ('{"queries": ["' + "x" * 5000 + '"]}', 413, "exceeds 4,096 bytes"),
    ],
)
def test_bad_requests_get_a_4xx_json_error(server, body, status, message):
    headers = {"content-type": "application/json", "authorization": f"Bearer {TOKEN}"}
    response = httpx.post(f"{server}/v1/attribute", content=body, headers=headers)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


def test_the_token_is_required_and_paths_are_fixed(server):
    body = {"queries": ["a b c"]}
    assert httpx.post(f"{server}/v1/attribute", json=body).status_code == 401
    wrong = httpx.post(f"{server}/v1/attribute", json=body, headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server}/v1/attribute", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 405
    assert httpx.get(f"{server}/../../etc/passwd").status_code == 404
    # the explorer's page, script and style are the only paths outside /v1 and /health, and need no token
    for page in ("/", "/static/explorer.js", "/static/explorer.css"):
        assert httpx.get(f"{server}{page}").status_code == 200, page
    for path in ("/static/", "/static/explorer.html", "/static/../_app.py", "/static/%2e%2e/_app.py", "/index.html"):
        assert httpx.get(f"{server}{path}").status_code == 404, path
    assert httpx.post(f"{server}/", json=body).status_code == 405
    with pytest.raises(AttribIndexError, match=r"missing or wrong bearer token\. Send .* \(401 unauthorized\)"):
        Client(server).attribute("a b c")


def test_openapi_shows_the_bearer_scheme_on_the_v1_routes(server):
    spec = httpx.get(f"{server}/openapi.json").json()
    scheme = spec["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            assert operation.get("security") == ([{"bearer": []}] if path.startswith("/v1/") else None), path
    assert httpx.get(f"{server}/health").status_code == 200


def test_cli_query_through_the_server(server, index_dir):
    args = ["query", "--server", server, "--token", TOKEN, "--text", "King queen crown castle.", "-k", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    local = AttributionIndex.open(index_dir).attribute("King queen crown castle.", k=2)
    assert local.results[0].top[0].id in result.output
    bad = CliRunner().invoke(main, ["query", str(index_dir), "--server", server, "--text", "x"])
    assert bad.exit_code != 0 and "not both" in bad.output


def test_explain_through_the_server_equals_the_local_library(server, index_dir):
    query = QUERIES[1]
    local_index = AttributionIndex.open(index_dir)
    ids = [a.id for a in local_index.attribute(query, k=2).results[0].top]
    local = local_index.explain(query, ids)
    with Client(server, token=TOKEN) as client:
        remote = client.explain(query, ids)
        with pytest.raises(AttribIndexError, match="not in index"):
            client.explain(query, ["no-such-id"])
    assert remote.query == query and remote.index_version == local.index_version
    for got, want in zip(remote.examples, local.examples, strict=True):
        assert got.id == want.id and got.score == pytest.approx(want.score, rel=1e-9)
        assert [(t.text, t.start) for t in got.tokens] == [(t.text, t.start) for t in want.tokens]
        assert [t.contribution for t in got.query_tokens] == pytest.approx([t.contribution for t in want.query_tokens])
    unauthorised = httpx.post(f"{server}/v1/explain", json={"query": "x", "ids": ids})
    assert unauthorised.status_code == 401
    args = ["query", "--server", server, "--token", TOKEN, "--text", "King queen crown castle.", "-k", "1", "--explain"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "query tokens:" in result.output and "[+" in result.output, result.output


def _listening(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except ConnectionRefusedError:
        return False
    return True


# Run by the server process before its command line: every model pass waits until the file named by the
# environment's ATTRIBINDEX_TEST_GATE exists, so a test decides when a pass ends, whatever the machine's speed.
HOLD_MODEL_PASSES = """
import os, pathlib, time
from attribindex.query import AttributionIndex
gate, original = pathlib.Path(os.environ["ATTRIBINDEX_TEST_GATE"]), AttributionIndex.query_vectors
def held(self, *args, **kwargs):
    while not gate.exists():
        time.sleep(0.01)
    return original(self, *args, **kwargs)
AttributionIndex.query_vectors = held
"""


def test_the_serve_command_takes_its_flags_and_shutdown_finishes_the_request_in_its_model_pass(
    index_dir, tmp_path, monkeypatch
):
    """`attribindex serve` as a process: its flags become its limits; on SIGTERM it stops listening at once, refuses
    new requests, finishes the request whose model pass is running, then exits."""
    gate = tmp_path / "gate"
    monkeypatch.setenv("ATTRIBINDEX_TEST_GATE", str(gate))
    flags = ["--token", TOKEN, "--max-queries", "8", "--max-tokens", "40", "--max-body-kb", "4", "--max-exact", "7"]
    process, url = start_server(index_dir, *flags, prelude=HOLD_MODEL_PASSES)
    texts = [f"{w} king {w} queen crown castle." for w in ("war", "peace", "storm", "heart") * 2]
    answered: list = []

    def ask():
        with Client(url, token=TOKEN) as client:
            answered.append(client.attribute(texts, k=3))
        answered.append(time.monotonic())

    inflight = threading.Thread(target=ask)
    with Client(url, token=TOKEN) as watcher:
        info = watcher.info()
        assert info["limits"] | {"max_exact": 7} == dataclasses.asdict(LIMITS) | {"max_exact": 7}
        inflight.start()
        deadline = time.monotonic() + 60
        while watcher.info()["batches_run"] == info["batches_run"] and time.monotonic() < deadline:
            time.sleep(0.01)  # until its pass has begun (and waits at the gate)
    terminated = time.monotonic()
    process.send_signal(signal.SIGTERM)
    while _listening(url) and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(AttribIndexError, match="cannot reach the attribindex server"):
        Client(url, timeout=5).attribute("a b c")
    assert inflight.is_alive() and not answered, "the request ended before its model pass did"
    gate.touch()  # the pass may end now
    inflight.join(timeout=120)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so that supervisors see why it stopped
    assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert len(answered) == 2 and answered[1] > terminated, server_log(process)
    local = AttributionIndex.open(index_dir).attribute(texts[:4], k=3)  # the four distinct texts
    assert [[a.id for a in r.top] for r in answered[0].results] == [[a.id for a in r.top] for r in local.results] * 2
    assert "Traceback" not in server_log(process)


def test_serve_search_takes_candidates_from_milvus_and_answers_as_the_library_does(index_dir, tmp_path):
    """`attribindex serve --search DB` as a process, then the library through the same collection (a Milvus Lite file
    is opened by one process at a time, so one after the other)."""
    pytest.importorskip("milvus_lite", reason="Milvus Lite runs on CPU machines only (the milvus-lite extra)")
    db = str(tmp_path / "served.db")
    push_index(index_dir, db, kind="HNSW", progress=False)
    process, url = start_server(index_dir, "--search", db)
    try:
        with Client(url) as client:
            served = client.attribute(QUERIES, k=5, bottom=2)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    assert f"Milvus HNSW ({db}), 4 × k re-scored exactly" in server_log(process)
    assert served.search.startswith(f"Milvus HNSW ({db})") and not served.exact
    _assert_same(served, AttributionIndex.open(index_dir, search=db).attribute(QUERIES, k=5, bottom=2))


def test_a_server_searching_through_milvus_refuses_while_the_collection_lags_and_recovers_once_pushed(
    tiny_models, corpus_file, tmp_path
):
    """An append committed while `serve --search` runs: the next requests are refused with the fix (the collection
    lacks the new rows) until `attribindex push` sends them; then the server answers from them, without a restart."""
    pytest.importorskip("milvus_lite", reason="Milvus Lite runs on CPU machines only (the milvus-lite extra)")
    from tests.milvus.conftest import start_lite_server

    out = tmp_path / "living"
    build_index(exact_config(), str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
    server, db, port = start_lite_server(tmp_path / "milvus")  # a server: the push runs beside the serving thread
    uri = f"milvus://127.0.0.1:{port}/living"
    try:
        push_index(out, uri, progress=False)
        with serving(out, search=uri) as url, Client(url) as client:
            assert client.attribute("King queen crown castle.", k=3).index_version == 1
            more = write_jsonl(tmp_path / "more.jsonl", [{"id": "new-1", "text": "King queen crown castle crown."}])
            append_documents(out, more, id_field="id", progress=False)
            with pytest.raises(AttribIndexError, match=f"lacks append .*attribindex push INDEX {uri}"):
                client.attribute("King queen crown castle.", k=3)
            push_index(out, uri, progress=False)
            assert client.attribute("King queen crown castle.", k=3).index_version == 2  # this batch reopens
            answer = client.attribute("King queen crown castle crown.", k=25)  # every live row, the new one too
            assert "new-1" in [a.id for a in answer.results[0].top]
    finally:
        server.stop(grace=1)
        db.close()


def test_a_running_server_serves_deletes_and_appends_committed_while_it_runs(tiny_models, corpus_file, tmp_path):
    out = tmp_path / "living"
    build_index(exact_config("cosine"), str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
    question = "King queen crown castle."
    with serving(out) as url:
        with Client(url) as client:
            first = client.attribute(question, k=24)
            assert first.index_version == 1
            gone = first.results[0].top[0].id
            delete_ids(out, [gone])
            after_delete = client.attribute(question, k=23)
            assert after_delete.index_version == 2 and gone not in {a.id for a in after_delete.results[0].top}
            with pytest.raises(AttribIndexError, match="at most 23"):
                client.attribute(question, k=24)

            append_documents(
                out, write_jsonl(tmp_path / "new.jsonl", [{"id": "new-1", "text": question}]), id_field="id"
            )
            after_append = client.attribute(question, k=3)
            assert after_append.index_version == 3
            assert after_append.results[0].top[0].id == "new-1" and after_append.results[0].top[0].score > 0.999

            # Without a request, nothing reloads the index (a batch reloads it): /v1/reload must.
            delete_ids(out, ["new-1"])
            assert (client.info()["index_version"], client.info()["rows"]) == (3, 24)
        assert httpx.post(f"{url}/v1/reload").json() == {"index_id": first.index_id, "index_version": 4, "rows": 23}
        with Client(url) as client:
            assert (client.info()["index_version"], client.info()["rows"]) == (4, 23)
        assert "securitySchemes" not in httpx.get(f"{url}/openapi.json").json().get("components", {})  # no token


def test_an_approximate_index_is_served_as_approximate(tiny_models, corpus_file, tmp_path):
    config = exact_config("cosine")
    config = dataclasses.replace(config, index=IndexConfig(mode="cosine", kind="hnsw", device="cpu"))
    out = tmp_path / "hnsw"
    build_index(config, str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
    with serving(out) as url, Client(url) as client:
        remote = client.attribute(QUERIES, k=5)
        info = client.info()
    local = AttributionIndex.open(out).attribute(QUERIES, k=5)
    _assert_same(remote, local)
    assert not remote.exact and remote.search == local.search == "HNSW32 efSearch=64, 4 × k re-scored exactly"
    assert info["search"] == remote.search and info["operating_point"] is None


def _assert_same_rerank(remote: Attributions, local: Attributions) -> None:
    _assert_same(remote, local)
    assert remote.exact and remote.rerank is not None
    assert (remote.rerank.method, remote.rerank.candidates) == (local.rerank.method, local.rerank.candidates)
    assert remote.rerank.rerank_ms > 0
    for got, want in zip(remote.results, local.results, strict=True):
        assert [a.score for a in got.bottom] == pytest.approx([a.score for a in want.bottom], rel=1e-9)


def test_exact_rerank_equals_the_local_library_even_among_batched_requests(exact_server, exact_index):
    local = AttributionIndex.open(exact_index)
    reranked = local.attribute(QUERIES, k=3, bottom=2, exact=8)
    plain = local.attribute(QUERIES, k=3, bottom=2)
    assert reranked.rerank.method == "ekfac, unprojected, empirical Fisher, damping 0.1"

    def ask(i: int) -> Attributions:  # re-ranks and plain requests at once: they share one model thread
        with Client(exact_server) as client:
            return client.attribute(QUERIES, k=3, bottom=2, exact=8 if i % 2 else None)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(4)))
    for i, answer in enumerate(answers):
        if i % 2:
            _assert_same_rerank(answer, reranked)
        else:
            _assert_same(answer, plain)
            assert answer.rerank is None
    with Client(exact_server) as client:
        info = client.info()
    assert info["exact"] == {"kind": "ekfac", "fisher": "empirical", "damping": 0.1}
    assert info["limits"]["max_exact"] == MAX_EXACT


@pytest.mark.parametrize(
    ("exact", "status", "message"),
    [
        (0, 400, "exact (candidates to re-score) must be a positive integer, got 0."),
        (-3, 400, "must be a positive integer, got -3."),
        (2, 400, "exact=2 candidates cannot fill k=3"),
        (MAX_EXACT + 1, 400, f"exact={MAX_EXACT + 1} is above the limit of {MAX_EXACT} candidates"),
        (2.5, 422, "exact: Input should be a valid integer"),
        ("8", 422, "exact: Input should be a valid integer"),
        (True, 422, "exact: Input should be a valid integer"),
    ],
)
def test_bad_exact_requests_get_a_4xx_json_error(exact_server, exact, status, message):
    body = json.dumps({"queries": ["King queen crown."], "k": 3, "exact": exact})
    response = httpx.post(f"{exact_server}/v1/attribute", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


def test_exact_on_an_index_without_the_exact_section_is_refused(server):
    with Client(server, token=TOKEN) as client:
        with pytest.raises(AttribIndexError, match=r"exact\.enabled.*\(400 bad_query\)") as caught:
            client.attribute("King queen crown.", k=3, exact=20)
        assert client.info()["exact"] is None
    assert "built without the `exact` section" in str(caught.value) and "rebuild the index" in str(caught.value)


def test_cli_query_exact_through_the_server(exact_server, exact_index, server):
    question = "King queen crown castle."
    local = AttributionIndex.open(exact_index).attribute(question, k=3, exact=8)
    args = ["query", "--server", exact_server, "--text", question, "-k", "3", "--exact", "8"]
    answer = json.loads(CliRunner().invoke(main, args + ["--json"]).output)
    assert answer["rerank"]["method"] == local.rerank.method and answer["rerank"]["candidates"] == 8
    assert [a["id"] for a in answer["results"][0]["top"]] == [a.id for a in local.results[0].top]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "re-ranked the top-8 candidates per query exactly (ekfac, unprojected, empirical Fisher, damping 0.1)" in (
        result.output
    )
    over = CliRunner().invoke(main, args[:-1] + [str(MAX_EXACT + 1)])
    assert over.exit_code == 1 and f"above the limit of {MAX_EXACT} candidates" in over.output
    plain = ["query", "--server", server, "--token", TOKEN, "--text", question, "--exact", "20"]
    refused = CliRunner().invoke(main, plain)
    assert refused.exit_code == 1 and "exact.enabled" in refused.output and "Traceback" not in refused.output


def test_exact_explanations_through_the_server_and_the_cli(exact_server, exact_index, server):
    query = QUERIES[0]
    local_index = AttributionIndex.open(exact_index)
    ids = [a.id for a in local_index.attribute(query, k=2, exact=6).results[0].top]
    local = local_index.explain(query, ids, exact=True)
    with Client(exact_server) as client:
        remote = client.explain(query, ids, exact=True)
    assert [e.score for e in remote.examples] == pytest.approx([e.score for e in local.examples], rel=1e-9)
    assert remote.method == local.method and remote.method.startswith("exact:")
    with Client(server, token=TOKEN) as client, pytest.raises(AttribIndexError, match="exact.enabled"):
        client.explain(query, ids, exact=True)
    args = ["query", str(exact_index), "--text", query, "-k", "2", "--exact", "6", "--explain", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    explained = json.loads(result.output)["explanations"][0]["examples"]
    assert [e["score"] for e in explained] == pytest.approx([e.score for e in local.examples], rel=1e-9)


def test_max_exact_is_bounded_by_the_library_limit(index_dir):
    assert ServerLimits().max_exact == 1000 and ServerLimits(max_exact=0).max_exact == 0
    with pytest.raises(AttribIndexError, match="outside"):
        ServerLimits(max_exact=10_001)
    result = CliRunner().invoke(main, ["serve", str(index_dir), "--max-exact", "10001"])
    assert result.exit_code == 1 and "--max-exact 10001 is outside [0, 10,000]" in result.output


def test_explain_takes_a_top_k_and_a_bottom_k_of_ids(index_dir):
    """The explorer explains what a query shows, its top k and bottom k: up to 2 × max_k ids, and no more."""
    query = QUERIES[0]
    with serving(index_dir, limits=ServerLimits(max_k=2)) as url, Client(url) as client:
        shown = client.attribute(query, k=2, bottom=2).results[0]
        ids = [a.id for a in shown.top + shown.bottom]
        assert [e.id for e in client.explain(query, ids).examples] == ids
        with pytest.raises(AttribIndexError, match="5 ids in one request; this server explains at most 4"):
            client.explain(query, ids + [shown.top[0].id])
