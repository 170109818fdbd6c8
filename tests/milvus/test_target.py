"""Collection URIs and logins: what each URI form means, what is refused before any connection, and a server that
checks logins (tests/milvus/conftest.py) letting in the right token from the option or the environment."""

from __future__ import annotations

import pytest

from attribindex import AttribIndexError, AttributionIndex, build_index, push_index
from attribindex.milvus import MilvusTarget
from tests.conftest import exact_config
from tests.milvus.conftest import LOGIN


def test_each_uri_form_names_an_address_and_a_collection(tmp_path):
    server = MilvusTarget.parse("milvus://10.0.0.5:19530/wiki_v2")
    assert (server.address, server.collection, server.local) == ("http://10.0.0.5:19530", "wiki_v2", False)
    assert MilvusTarget.parse("milvus+https://cloud.example:443/c").address == "https://cloud.example:443"
    assert MilvusTarget.parse("milvus://db-host/c").address == "http://db-host:19530"  # Milvus's port
    lite = MilvusTarget.parse(str(tmp_path / "a.db"))
    assert (lite.address, lite.collection, lite.local) == (str(tmp_path / "a.db"), "attribindex", True)
    assert MilvusTarget.parse(f"{tmp_path}/a.db#run_7").collection == "run_7"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("http://10.0.0.5:19530/wiki", "is not a Milvus collection URI. Write milvus://HOST:PORT/COLLECTION"),
        ("milvus://10.0.0.5:19530", "names no collection"),
        ("milvus://10.0.0.5:19530/wiki-v2", "'wiki-v2' is not a valid Milvus collection name. Use letters, digits"),
        ("milvus://root:Milvus@10.0.0.5:19530/wiki", "credentials do not belong in the URI"),
        ("milvus://10.0.0.5:port/wiki", "the port is not a number"),
        ("/no/such/folder/a.db", "the folder /no/such/folder does not exist. Create it first"),
    ],
)
def test_a_bad_uri_is_refused_before_connecting(uri, message):
    with pytest.raises(AttribIndexError, match=message.replace(".", r"\.").replace("(", r"\(")):
        MilvusTarget.parse(uri)


def test_a_server_that_checks_logins_lets_in_the_right_token(
    guarded_server, tiny_models, corpus_file, tmp_path, monkeypatch
):
    index_dir = tmp_path / "idx"
    build_index(exact_config(), str(tiny_models["gpt2"]), corpus_file, index_dir, id_field="id", progress=False)
    uri = f"{guarded_server}/guarded"
    with pytest.raises(AttribIndexError, match="refused the login .*--milvus-token"):
        push_index(index_dir, uri, progress=False)  # no token at all
    assert push_index(index_dir, uri, token=LOGIN, progress=False).inserted == 24
    monkeypatch.setenv("MILVUS_TOKEN", LOGIN)
    remote = AttributionIndex.open(index_dir, device="cpu", search=uri)
    local = AttributionIndex.open(index_dir, device="cpu")
    assert [a.id for a in remote.attribute("King queen crown.", k=4).results[0].top] == [
        a.id for a in local.attribute("King queen crown.", k=4).results[0].top
    ]
    monkeypatch.delenv("MILVUS_TOKEN")
    user, password = LOGIN.split(":")
    monkeypatch.setenv("MILVUS_USER", user)
    monkeypatch.setenv("MILVUS_PASSWORD", password)
    assert push_index(index_dir, uri, progress=False).action == "unchanged"
