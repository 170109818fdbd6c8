"""The embedded demo's assets load offline, and the demo command runs end to end (small)."""

from __future__ import annotations

from click.testing import CliRunner

from attribindex.cli import main
from attribindex.demo import load_shakespeare_speeches


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


def test_demo_command_builds_and_answers(tmp_path):
    out = tmp_path / "demo-index"
    result = CliRunner().invoke(main, ["demo", "--speeches", "40", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "rows       40" in result.output
    assert "Richard III" in result.output and "held-out check" in result.output
    again = CliRunner().invoke(main, ["demo", "--speeches", "40", "--out", str(out)])
    assert again.exit_code == 0 and "reusing the index" in again.output


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
