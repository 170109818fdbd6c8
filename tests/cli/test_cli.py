"""The command line end to end on a tiny model, and its errors (one clean line, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from attribindex.cli import main
from attribindex.cli._base import in_flags
from attribindex.errors import AttribIndexError
from attribindex.store import layout
from attribindex.testing import write_jsonl


def _build_args(model, data, out, *extra: str) -> list[str]:
    return [
        "build",
        "--config",
        "tiny",
        "--model",
        str(model),
        "--data",
        str(data),
        "--id-field",
        "id",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def built(tiny_models, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "idx"
    args = _build_args(tiny_models["gpt2"], corpus_file, out, "--max-length", "48", "--batch-size", "3")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "rows       24" in result.output and "examples/s" in result.output
    return out


def test_query_text_and_pair(built, corpus_records):
    result = CliRunner().invoke(
        main, ["query", str(built), "--text", corpus_records[4]["text"], "-k", "3", "--bottom", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "most influential" in result.output and "least influential" in result.output
    assert "re-ranked" not in result.output  # no --exact, no second stage
    assert corpus_records[4]["id"] in result.output.split("most influential")[1].splitlines()[1]
    result = CliRunner().invoke(main, ["query", str(built), "--prompt", "King queen", "--completion", " crown sword."])
    assert result.exit_code == 0, result.output


def test_query_json(built, corpus_records):
    result = CliRunner().invoke(
        main,
        ["query", str(built), "--text", "Ghost father son.", "--text", corpus_records[0]["text"], "-k", "4", "--json"],
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["index_id"].startswith("ai-") and answer["latency_ms"] > 0 and answer["exact"] is True
    assert len(answer["results"]) == 2 and len(answer["results"][0]["top"]) == 4
    first = answer["results"][1]["top"][0]
    assert first["id"] == corpus_records[0]["id"] and first["text"] == corpus_records[0]["text"]
    scores = [a["score"] for a in answer["results"][0]["top"]]
    assert scores == sorted(scores, reverse=True)


def test_query_exact_rerank_equals_the_library(exact_index):
    from attribindex import AttributionIndex

    question = "King queen crown castle."
    local = AttributionIndex.open(exact_index).attribute(question, k=3, bottom=2, exact=8)
    args = ["query", str(exact_index), "--text", question, "-k", "3", "--bottom", "2", "--exact", "8"]
    answer = json.loads(CliRunner().invoke(main, args + ["--json"]).output)
    assert answer["exact"] is True
    assert answer["rerank"]["method"] == "ekfac, unprojected, empirical Fisher, damping 0.1"
    assert answer["rerank"]["candidates"] == 8 and answer["rerank"]["scored"] == local.rerank.scored
    assert answer["rerank"]["rerank_ms"] > 0
    got, want = answer["results"][0], local.results[0]
    assert [a["id"] for a in got["top"]] == [a.id for a in want.top]
    assert [a["id"] for a in got["bottom"]] == [a.id for a in want.bottom]
    assert [a["score"] for a in got["top"]] == pytest.approx([a.score for a in want.top], rel=1e-9)

    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (
        "re-ranked the top-8 and bottom-8 candidates per query exactly "
        "(ekfac, unprojected, empirical Fisher, damping 0.1) in "
    ) in result.output
    assert want.top[0].id in result.output.split("most influential")[1].splitlines()[1]


def test_query_exact_errors(exact_index, built):
    query = ["query", str(exact_index), "--text", "x y z", "-k", "3"]
    _fails(query + ["--exact", "0"], "exact (candidates to re-score) must be a positive integer, got 0.")
    _fails(query + ["--exact", "-5"], "must be a positive integer, got -5.")
    _fails(query + ["--exact", "2"], "exact=2 candidates cannot fill k=3: re-score at least as many candidates")
    _fails(query + ["--exact", "10001"], "exact=10001 is above the limit of 10000 candidates")
    _fails(query + ["--exact", "many"], "'many' is not a valid integer")
    output = _fails(["query", str(built), "--text", "x y z", "--exact", "20"], "exact.enabled").output
    # the message names the config section (`exact`), not this command's --exact flag
    assert "built without the `exact` section" in output and "rebuild the index" in output


def test_info(built):
    result = CliRunner().invoke(main, ["info", str(built)])
    assert result.exit_code == 0, result.output
    assert "rows         24" in result.output and "GPT2LMHeadModel" in result.output and "MiB" in result.output
    assert "median effective rank" in result.output
    result = CliRunner().invoke(main, ["info", str(built), "--json"])
    assert json.loads(result.output)["rows"] == 24


@pytest.mark.parametrize(
    "command", ["build", "plan", "query", "info", "demo", "merge", "verify", "append", "delete", "compact", "refresh"]
)
def test_help_shows_an_example(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "Example" in result.output and "attribindex " + command in result.output


def _fails(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    return result


def test_query_errors(built):
    _fails(
        ["query", str(built), "--text", "x y z", "-k", "0"], "k must be between 1 and the number of indexed rows (24)"
    )
    _fails(["query", str(built), "--text", "x y z", "-k", "25"], "got 25")
    _fails(["query", str(built), "--text", "x y z", "--bottom", "-1"], "bottom must be between 0")
    _fails(["query", str(built), "--prompt", "x"], "--prompt and --completion go together")
    _fails(["query", str(built)], "give at least one --text")
    _fails(["query", str(built), "--text", ""], "no token carries loss")
    _fails(["info", str(built.parent / "nothing")], "is not an attribindex index")


def test_build_errors(tiny_models, corpus_file, tmp_path, built):
    model = str(tiny_models["gpt2"])
    base = ["build", "--config", "tiny", "--model", model, "--out", str(tmp_path / "o")]
    _fails(base + ["--data", str(tmp_path / "missing.jsonl")], "does not exist")
    (tmp_path / "empty.jsonl").write_text("")
    _fails(base + ["--data", str(tmp_path / "empty.jsonl")], "holds no documents")
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    _fails(base + ["--data", str(tmp_path / "latin.jsonl")], "not valid UTF-8")
    _fails(base + ["--data", str(corpus_file), "--text-field", "body"], "no field 'body' in the record")
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("projection:\n  rnak_in: 4\n")
    _fails(
        [
            "build",
            "--config",
            str(bad_config),
            "--model",
            model,
            "--data",
            str(corpus_file),
            "--out",
            str(tmp_path / "o"),
        ],
        "Did you mean 'rank_in'",
    )
    _fails(base + ["--data", str(corpus_file), "--batch-size", "0"], "batch_size must be >= 1")
    _fails(
        ["build", "--config", "tiny", "--model", model, "--data", str(corpus_file), "--out", str(built)],
        "already holds an index. Pass --overwrite",
    )
    _fails(
        [
            "build",
            "--config",
            "tiny",
            "--out",
            str(tmp_path / "o"),
            "--data",
            str(corpus_file),
            "--model",
            str(tmp_path),
        ],
        "has no config.json",
    )
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # failed builds leave nothing


def test_library_errors_name_parameters_and_the_cli_names_its_flags(tiny_models, corpus_file, built):
    from attribindex import build_index, load_config
    from attribindex.cli._build import build, merge  # the click commands

    with pytest.raises(AttribIndexError, match="Pass `overwrite=True` to replace it") as caught:
        build_index(load_config("tiny"), str(tiny_models["gpt2"]), corpus_file, built, progress=False)
    assert "--" not in str(caught.value)
    assert in_flags("Build it (`num_shards=3, shard_index=1`) and merge.", build) == (
        "Build it (--num-shards 3 --shard-index 1) and merge."
    )
    assert in_flags("Choose it with `text_field`; or `overwrite=True`.", build) == (
        "Choose it with --text-field; or --overwrite."
    )
    # a parameter the command has no flag for, and code that is no parameter, stay as they are
    assert in_flags("Pass `skip_empty=True`, see `attribindex verify`.", merge) == (
        "Pass `skip_empty=True`, see `attribindex verify`."
    )


def test_document_that_tokenises_to_nothing(tiny_models, tmp_path):
    data = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"id": "a", "text": "King queen crown."},
            {"id": "empty", "text": ""},
            {"id": "b", "text": "Ghost father son."},
        ],
    )
    args = _build_args(tiny_models["gpt2"], data, tmp_path / "o")
    _fails(args, "document 'empty' (c.jsonl:2): no token carries loss")
    result = CliRunner().invoke(main, args + ["--skip-empty"])
    assert result.exit_code == 0, result.output
    assert "rows       2  (1 empty documents skipped)" in result.output


def test_real_process_prints_one_clean_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "attribindex", "query", str(tmp_path), "--text", "x"], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "is not an attribindex index" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["txt-folder", "saved-dataset"])
def test_build_from_other_corpus_kinds(tiny_models, corpus_records, tmp_path, kind):
    records = corpus_records[:6]
    if kind == "txt-folder":
        data = tmp_path / "texts"
        data.mkdir()
        for record in records:
            (data / f"{record['id']}.txt").write_text(record["text"], encoding="utf-8")
        extra = []
    else:
        import datasets

        data = tmp_path / "dataset"
        datasets.Dataset.from_list(records).save_to_disk(str(data))
        extra = ["--id-field", "id"]
    out = tmp_path / "idx"
    args = ["build", "--config", "tiny", "--model", str(tiny_models["llama"]), "--data", str(data), "--out", str(out)]
    result = CliRunner().invoke(main, args + extra)
    assert result.exit_code == 0, result.output
    answer = json.loads(
        CliRunner().invoke(main, ["query", str(out), "--text", records[0]["text"], "-k", "6", "--json"]).output
    )
    ids = [a["id"] for a in answer["results"][0]["top"]]
    expected = [f"{r['id']}.txt" for r in records] if kind == "txt-folder" else [r["id"] for r in records]
    assert sorted(ids) == sorted(expected)
    assert ids[0] == expected[0]  # cosine: the text itself comes first


def test_shards_merge_and_verify(tiny_models, corpus_file, tmp_path):
    for i in range(2):
        args = _build_args(tiny_models["gpt2"], corpus_file, tmp_path / f"s{i}", "--num-shards", "2")
        result = CliRunner().invoke(main, args + ["--shard-index", str(i)])
        assert result.exit_code == 0 and f"shard {i} of 2" in result.output, result.output
    result = CliRunner().invoke(
        main, ["merge", str(tmp_path / "s1"), str(tmp_path / "s0"), "--out", str(tmp_path / "i")]
    )
    assert result.exit_code == 0, result.output
    assert "merged     2 shards" in result.output and "rows       24" in result.output

    result = CliRunner().invoke(main, ["verify", str(tmp_path / "i")])
    assert result.exit_code == 0 and "intact" in result.output, result.output
    assert CliRunner().invoke(main, ["verify", str(tmp_path / "s0")]).exit_code == 0  # shards verify too
    result = CliRunner().invoke(main, ["info", str(tmp_path / "s1")])
    assert result.exit_code == 0 and "shard 1 of 2: documents [12, 24)" in result.output, result.output

    norms = tmp_path / "i" / layout.STORE_NORMS
    data = bytearray(norms.read_bytes())
    data[-1] ^= 0x01  # bit rot: same size, different bytes
    norms.write_bytes(bytes(data))
    (tmp_path / "i" / "rows" / "000001.docs.jsonl").unlink()
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "i")])
    assert result.exit_code == 1
    assert "DAMAGED" in result.output and "norms.npy: contents differ from the recorded sha256" in result.output
    assert "000001.docs.jsonl: missing" in result.output and "2 damaged" in result.output
    _fails(["query", str(tmp_path / "i"), "--text", "x y"], "000001.docs.jsonl is damaged (missing)")


def test_opening_an_index_with_a_truncated_file_fails_clearly(built, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    norms = copy / layout.STORE_NORMS
    norms.write_bytes(norms.read_bytes()[:-40])
    _fails(["query", str(copy), "--text", "x y"], "norms.npy is damaged (")
    assert "attribindex verify" in _fails(["query", str(copy), "--text", "x y"], "bytes, the manifest records").output


def test_append_delete_compact_refresh(tiny_models, corpus_file, corpus_records, tmp_path):
    out = tmp_path / "idx"
    first = write_jsonl(tmp_path / "first.jsonl", corpus_records[:20])
    assert CliRunner().invoke(main, _build_args(tiny_models["gpt2"], first, out)).exit_code == 0
    new = write_jsonl(tmp_path / "new.jsonl", corpus_records[18:])  # 2 already indexed
    _fails(["append", str(out), "--data", str(new), "--id-field", "id"], "Pass --skip-duplicates")
    result = CliRunner().invoke(main, ["append", str(out), "--data", str(new), "--id-field", "id", "--skip-duplicates"])
    assert result.exit_code == 0, result.output
    assert "appended   4 rows" in result.output and "2 already indexed" in result.output and "drift" in result.output

    ids = tmp_path / "ids.txt"
    ids.write_text("doc-0021\ndoc-0000\nnot-there\n")
    result = CliRunner().invoke(main, ["delete", str(out), "--ids", str(ids)])
    assert result.exit_code == 0 and "deleted    2 rows" in result.output and "'not-there'" in result.output
    answer = json.loads(
        CliRunner().invoke(main, ["query", str(out), "--text", "King queen crown.", "-k", "22", "--json"]).output
    )
    assert answer["index_version"] == 3
    assert not {"doc-0021", "doc-0000"} & {a["id"] for a in answer["results"][0]["top"]}
    _fails(["query", str(out), "--text", "x y", "-k", "23"], "between 1 and the number of indexed rows (22)")

    info = CliRunner().invoke(main, ["info", str(out)]).output
    assert "version      3" in info and "2 rows deleted" in info and "2 segments" in info and "drift" in info
    assert "compacted  2 rows" in CliRunner().invoke(main, ["compact", str(out)]).output
    assert "refreshed  22 rows" in CliRunner().invoke(main, ["refresh", str(out)]).output
    info = CliRunner().invoke(main, ["info", str(out)]).output
    assert "version      5" in info and "deleted" not in info and "1 segment: store (22 rows))" in info
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0


def test_info_shows_the_exact_section(exact_index):
    result = CliRunner().invoke(main, ["info", str(exact_index)])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("exact"))
    assert "ekfac unprojected, empirical Fisher, damping α=0.1, factors from 24 examples" in line
    assert "corrected on 16 examples" in line and "`query --exact C`" in line
