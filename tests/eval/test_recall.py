"""`eval recall`: recall against an exact scan, the operating point in the manifest, the plot."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal

import numpy as np
import pytest
from click.testing import CliRunner

from attribindex import AttribIndexError, AttributionIndex, build_index, measure_recall, set_operating_point
from attribindex.cli import main
from attribindex.config import IndexConfig
from attribindex.eval import default_settings, exact_top_k
from attribindex.store import layout, read_manifest, verify_files
from attribindex.testing import tiny_corpus, write_jsonl
from tests.conftest import exact_config
from tests.killing import cli_killed


def build(tiny_models, data, out, **index):
    config = dataclasses.replace(exact_config(mode="dot"), index=IndexConfig(mode="dot", device="cpu", **index))
    build_index(config, str(tiny_models["gpt2"]), data, out, id_field="id", progress=False)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recall")
    records = tiny_corpus(160, seed=3)
    train = write_jsonl(folder / "train.jsonl", records[:120])
    held_out = write_jsonl(folder / "held_out.jsonl", records[120:])
    return folder, train, held_out


@pytest.fixture(scope="module")
def ivf(tiny_models, corpus):
    folder, train, _ = corpus
    return build(tiny_models, train, folder / "ivf", kind="ivf_flat", nlist=8, rerank=2)


def held_out_vectors(index, corpus) -> np.ndarray:
    _, _, held_out = corpus
    texts = [json.loads(line)["text"] for line in held_out.read_text().splitlines()]
    return index.query_vectors(texts).vectors


def test_recall_grows_with_nprobe_and_is_one_at_full_probe(ivf, corpus):
    index = AttributionIndex.open(ivf, device="cpu")
    report = measure_recall(index, held_out_vectors(index, corpus), k=5)
    assert [p.settings["nprobe"] for p in report.points] == [1, 2, 4, 8]
    recalls = [p.recall for p in report.points]
    assert recalls == sorted(recalls) and recalls[-1] == 1.0  # IVF-Flat: more cells ⊇ the candidates
    assert recalls[0] < 1.0  # one cell of eight misses neighbours: the measurement can fail
    assert report.chosen.recall >= 0.95 and report.chosen.ms_per_query > 0
    assert index.index.segments[0].nprobe == 1  # the sweep leaves the index's own setting as it was (nlist/16 → 1)


def test_exact_scan_equals_an_exact_index(tiny_models, corpus, ivf):
    folder, train, _ = corpus
    exact = AttributionIndex.open(build(tiny_models, train, folder / "exact"), device="cpu")
    approximate = AttributionIndex.open(ivf, device="cpu")
    vectors = held_out_vectors(exact, corpus)
    scores, rows = exact_top_k(approximate, vectors, 7)
    expected_scores, expected_rows = exact.index.search(vectors, 7)
    assert (rows == expected_rows).all()
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-6)
    with pytest.raises(AttribIndexError, match="exact flat segments only"):
        measure_recall(exact, vectors, k=5)


def test_cli_records_the_operating_point_and_draws_the_plot(tiny_models, corpus, tmp_path):
    folder, train, held_out = corpus
    out = build(tiny_models, train, tmp_path / "ivf", kind="ivf_flat", nlist=8, rerank=2)
    plot = tmp_path / "recall.png"
    args = [
        "eval",
        "recall",
        str(out),
        "--queries",
        str(held_out),
        "--text-field",
        "text",
        "-k",
        "5",
        "--plot",
        str(plot),
    ]
    result = CliRunner().invoke(main, args + ["--nprobe", "1,8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "nprobe=8" in result.output and "← operating point" in result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = read_manifest(out)
    point = manifest.index.operating_point
    assert point.nprobe == 8 and point.recall == 1.0 and point.k == 5 and manifest.version == 2
    assert manifest.log[-1].event == "operating_point"
    assert AttributionIndex.open(out, load_model_now=False).index.segments[0].nprobe == 8  # searches use it
    assert "operating    nprobe=8: recall@5 1.000" in CliRunner().invoke(main, ["info", str(out)]).output
    query = ["query", str(out), "--text", "a held-out query", "-k", "3", "--device", "cpu"]
    assert "approximate: IVF8,Flat nprobe=8, 2 × k re-scored exactly" in CliRunner().invoke(main, query).output
    overridden = CliRunner().invoke(main, query + ["--nprobe", "2"]).output
    assert "approximate: IVF8,Flat nprobe=2, 2 × k re-scored exactly" in overridden
    with pytest.raises(AttribIndexError, match="after recall was measured on version 1"):
        set_operating_point(out, point, measured_version=1)
    assert (out / layout.MANIFEST).is_file() and read_manifest(out).version == 2


def test_hnsw_sweeps_efsearch_from_the_candidate_count(tiny_models, corpus, tmp_path):
    _, train, _ = corpus
    index = AttributionIndex.open(build(tiny_models, train, tmp_path / "hnsw", kind="hnsw", rerank=2), device="cpu")
    settings = default_settings(index, k=5)  # 2 × 5 candidates: HNSW never searches with fewer
    assert settings == [{"ef_search": 10}] + [{"ef_search": 2**i} for i in range(4, 10)]
    report = measure_recall(index, held_out_vectors(index, corpus), k=5, settings=settings[:2])
    assert len(report.points) == 2 and all(0 < p.recall <= 1 for p in report.points)


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_crash_at_the_operating_point_commit_leaves_the_old_or_the_new_index(ivf, corpus, tmp_path, when):
    _, _, held_out = corpus
    out = tmp_path / "ivf"
    shutil.copytree(ivf, out)
    args = ["eval", "recall", str(out), "--queries", str(held_out), "-k", "5", "--nprobe", "1,8", "--device", "cpu"]
    # SIGKILL just before or just after the new manifest is written: the commit of `set_operating_point`.
    killed = cli_killed(("attribindex.pipeline._mutation", "write_manifest", 1, when), *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # Mid-way: the sweep was measured and printed, then the process died before it reported the recording.
    assert "← operating point" in killed.stdout and "recorded" not in killed.stdout

    manifest = read_manifest(out)
    committed = when == "after"
    assert manifest.version == 1 + committed
    point = manifest.index.operating_point
    if committed:
        assert (point.nprobe, point.k, point.recall) == (8, 5, 1.0)
    else:
        assert point is None
    assert verify_files(out, manifest).ok
    index = AttributionIndex.open(out, device="cpu")
    assert index.index.segments[0].nprobe == (8 if committed else 1)  # searches use what the manifest says
    found = index.attribute("a held-out query", k=3)
    assert len(found.results[0].top) == 3 and found.index_version == manifest.version

    # Running it again records the operating point, as an uninterrupted run does.
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"(version {manifest.version + 1})" in result.output
    again = read_manifest(out)
    assert again.index.operating_point.nprobe == 8 and again.log[-1].event == "operating_point"
    assert verify_files(out, again).ok
    assert AttributionIndex.open(out, load_model_now=False).index.segments[0].nprobe == 8
