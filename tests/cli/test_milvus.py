"""`attribindex push`, and `query`, `info` and `eval recall` with --search, against real Milvus Lite files."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from attribindex import build_index
from attribindex.cli import main
from attribindex.testing import tiny_corpus, write_jsonl
from tests.conftest import exact_config

pytest.importorskip("milvus_lite", reason="Milvus Lite runs on CPU machines only (the milvus-lite extra)")

TEXT = "King queen crown castle."


@pytest.fixture(scope="module")
def index_dir(tiny_models, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-milvus") / "idx"
    build_index(exact_config(), str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
    return out


def run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_push_then_query_through_milvus_in_three_lines(index_dir, tmp_path):
    db = str(tmp_path / "a.db")
    assert f"→ {db} (FLAT, rewrite: new collection): 24 rows inserted" in run("push", str(index_dir), db, "--quiet")
    assert json.loads(run("push", str(index_dir), db, "--json"))["action"] == "unchanged"
    local = json.loads(run("query", str(index_dir), "--text", TEXT, "-k", "4", "--bottom", "2", "--json"))
    remote = json.loads(
        run("query", str(index_dir), "--search", db, "--text", TEXT, "-k", "4", "--bottom", "2", "--json")
    )
    for side in ("top", "bottom"):
        assert [a["id"] for a in remote["results"][0][side]] == [a["id"] for a in local["results"][0][side]]
    assert remote["search"].startswith(f"Milvus FLAT ({db})") and remote["exact"]
    assert f"(dot, exact: Milvus FLAT ({db}), 4 × k re-scored exactly)" in run(
        "query", str(index_dir), "--search", db, "--text", TEXT, "-k", "2"
    )
    shown = run("info", str(index_dir), "--search", db)
    assert f"milvus       {db}: FLAT (inner product), 24 vectors of 96 dims" in shown
    assert "holds ai-" in shown and "answers for this index (version 1)" in shown


def test_eval_recall_through_milvus_records_the_operating_point_in_the_collection(index_dir, tmp_path):
    db = str(tmp_path / "hnsw.db")
    run("push", str(index_dir), db, "--kind", "HNSW", "--quiet")
    queries = write_jsonl(tmp_path / "held-out.jsonl", tiny_corpus(6, seed=5))
    output = run(
        "eval", "recall", str(index_dir), "--search", db, "--queries", str(queries), "-k", "3", "--ef-search", "3,24"
    )
    assert "Milvus HNSW" in output and "← operating point" in output and "recorded     operating point" in output
    assert "operating point ef=" in run("info", str(index_dir), "--search", db)
    assert "Milvus HNSW ef=" in run("query", str(index_dir), "--search", db, "--text", TEXT, "-k", "2")
