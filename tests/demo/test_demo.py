"""The embedded demo's assets load offline, and the demo traces each of its queries to its own source speech."""

from __future__ import annotations

import os
import re

import pytest
from click.testing import CliRunner

from attribindex.cli import main
from attribindex.demo import (
    DEFAULT_SPEECHES,
    DEMO_QUERIES,
    demo_corpus,
    load_shakespeare_speeches,
    shakespeare_speeches_by_id,
)
from attribindex.errors import AttribIndexError
from attribindex.query import AttributionIndex
from tests.conftest import run_checked


def test_speeches_are_clean_stable_and_cover_every_play():
    speeches = load_shakespeare_speeches(limit=76)
    assert speeches == load_shakespeare_speeches(limit=76)
    assert len({s["id"] for s in speeches}) == 76
    assert len({s["play"] for s in speeches}) == 38  # two per play
    assert {s["genre"] for s in speeches} >= {"comedy", "tragedy", "history"}
    for speech in speeches:
        assert 80 <= len(speech["text"]) <= 600
        assert not any(mark in speech["text"] for mark in ("##", "**", "\\["))
    assert load_shakespeare_speeches(limit=10) == speeches[:10]


def test_speeches_by_id_keep_whole_opening_lines():
    (richard,) = shakespeare_speeches_by_id(["richard-iii/1.1/0000"], max_chars=120)
    assert richard["play"] == "Richard III" and len(richard["text"]) <= 120
    whole = next(s for s in load_shakespeare_speeches(min_chars=0, max_chars=10**9) if s["id"] == richard["id"])
    assert whole["text"].startswith(richard["text"] + "\n")  # a prefix of whole lines
    assert len(whole["text"].split("\n")[len(richard["text"].split("\n"))]) + len(richard["text"]) + 1 > 120
    with pytest.raises(AttribIndexError, match="ids look like 'hamlet/3.1/0470'"):
        shakespeare_speeches_by_id(["hamlet/9.9/9999"])


def test_demo_corpus_holds_every_source_once_and_keeps_held_out_apart():
    indexed, held_out = demo_corpus(40)
    ids = [s["id"] for s in indexed]
    assert len(ids) == len(set(ids)) == 40 + len(DEMO_QUERIES)
    assert {q.source for q in DEMO_QUERIES} <= set(ids)
    assert not {s["id"] for s in held_out} & set(ids)
    for query in DEMO_QUERIES:  # each query's text is (a version of) its source's opening
        source = next(s for s in indexed if s["id"] == query.source)
        assert len(source["text"]) <= 600
        first_words = (query.query if isinstance(query.query, str) else query.query.completion).split()[:2]
        assert any(word.strip(",.;") in source["text"] for word in first_words)


# 40 sampled speeches keep the test at ~20 s; `tools/check_demo.sh` runs it on the default demo (300 speeches).
SPEECHES = int(os.environ.get("ATTRIBINDEX_DEMO_SPEECHES", "40"))


def test_demo_traces_every_query_to_its_own_speech_at_rank_1(installed_wheel, tmp_path):
    """The demo, as a user runs it from an installed wheel: every famous line, the paraphrase and the prompt →
    completion find their own speech first, in the printed output and in the index itself."""
    venv, env = installed_wheel
    out = tmp_path / "demo-index"
    command = [venv / "bin" / "attribindex", "demo", "--out", out]
    if SPEECHES != DEFAULT_SPEECHES:
        command += ["--speeches", str(SPEECHES)]
    output = run_checked(command, tmp_path, env, timeout=600)
    assert f"rows       {SPEECHES + len(DEMO_QUERIES)}" in output  # the sampled speeches + the query sources
    for query in DEMO_QUERIES:
        heading = output.index(f"— {query.label}\n")
        first = output[heading:].split("\n")[1]
        assert first.lstrip().startswith("1.") and first.endswith("← its source"), first
        assert "why #1, its strongest tokens" in output[heading:].split("\n")[5]
    assert re.search(r"\[\+[^\]]+\]", output)  # strongest tokens marked (stdout is not a terminal)
    assert "A score is the cosine" in output and "held-out check" in output
    assert f"attribindex serve {out}" in output and "http://127.0.0.1:8000/" in output

    index = AttributionIndex.open(out)
    answer = index.attribute([q.query for q in DEMO_QUERIES], k=2)
    for query, found in zip(DEMO_QUERIES, answer.results):
        first, second = found.top
        assert first.id == query.source, (query.label, [a.id for a in found.top])
        assert first.score > 1.5 * max(second.score, 0), (query.label, first.score, second.score)  # a clear first

    rerun = ["demo", "--out", str(out)] + (["--speeches", str(SPEECHES)] if SPEECHES != DEFAULT_SPEECHES else [])
    again = CliRunner().invoke(main, rerun)
    assert again.exit_code == 0 and "reusing the index" in again.output
    assert again.output.count("← its source") == output.count("← its source")


def test_demo_never_replaces_another_index(tiny_models, corpus_file, tmp_path):
    out = tmp_path / "mine"
    build = [
        "build",
        "--config",
        "tiny",
        "--model",
        str(tiny_models["gpt2"]),
        "--data",
        str(corpus_file),
        "--out",
        str(out),
    ]
    assert CliRunner().invoke(main, build).exit_code == 0
    result = CliRunner().invoke(main, ["demo", "--speeches", "40", "--out", str(out)])
    assert result.exit_code != 0 and "holds another index" in result.output
    assert (out / "manifest.json").exists()
