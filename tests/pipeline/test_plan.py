"""`plan_build` / `attribindex plan` against real tiny builds of the same config, model and corpus."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from attribindex import build_index, load_config, plan_build
from attribindex.cli import main
from attribindex.config import ExactConfig, HessianConfig, IndexConfig
from attribindex.store import read_manifest
from attribindex.testing import tiny_corpus, write_jsonl
from tests.conftest import exact_section_config


def _parts(folder: Path) -> dict[str, int]:
    """Bytes of an index folder by the parts a plan estimates."""
    parts: dict[str, int] = {}
    for path in folder.rglob("*"):
        if path.is_file():
            top = path.relative_to(folder).parts[0]
            key = ("docs" if path.name.endswith(".jsonl") else "rows") if top == "rows" else top
            parts[key] = parts.get(key, 0) + path.stat().st_size
    return parts


@pytest.mark.parametrize(
    "config",
    [
        load_config("tiny"),
        dataclasses.replace(load_config("tiny"), hessian=HessianConfig(kind="kfac")),
        dataclasses.replace(load_config("tiny"), index=IndexConfig(kind="ivf_pq", nlist=2)),
        dataclasses.replace(load_config("tiny"), index=IndexConfig(kind="hnsw")),
    ],
    ids=["raw-flat", "kfac", "ivf_pq", "hnsw"],
)
def test_disk_estimate_matches_the_build(config, tiny_models, corpus_file, tmp_path):
    # Every file of the folder is estimated (the manifest from its records' sizes): the total is compared, and the
    # parts that scale with the corpus (rows, texts, index) one by one.
    model = str(tiny_models["gpt2"])
    plan = plan_build(config, model, corpus_file, id_field="id", progress=False)
    summary = build_index(config, model, corpus_file, tmp_path / "idx", id_field="id", progress=False)
    parts = _parts(tmp_path / "idx")
    assert plan.corpus.counted and plan.corpus.documents == summary.rows == 24
    assert plan.corpus.tokens == summary.tokens and plan.corpus.truncated == summary.truncated
    assert plan.dim == summary.dim and len(plan.modules) == summary.modules
    assert plan.disk.total == pytest.approx(summary.bytes_on_disk, rel=0.10)
    for part, estimate in (("rows", plan.disk.rows), ("docs", plan.disk.docs), ("index", plan.disk.index)):
        assert estimate == pytest.approx(parts[part], rel=0.10), part
    assert plan.disk.rows == parts["rows"] and plan.disk.docs == parts["docs"]  # both exact for a counted corpus


def test_time_estimate_within_a_factor_of_two(tiny_models, tmp_path):
    # 200 documents: about a second of extraction, enough that timing noise is not the whole measurement.
    corpus = write_jsonl(tmp_path / "corpus.jsonl", tiny_corpus(200, seed=3))
    config, model = load_config("tiny"), str(tiny_models["gpt2"])
    ratios = []
    for attempt in range(2):  # the machine is shared: one retry if another process stole the CPU meanwhile
        plan = plan_build(config, model, corpus, progress=False)
        summary = build_index(config, model, corpus, tmp_path / f"idx{attempt}", progress=False)
        ratios.append(plan.time.extract_seconds / summary.extract_seconds)
        if 0.5 <= ratios[-1] <= 2.0:
            break
    assert 0.5 <= ratios[-1] <= 2.0, ratios
    assert plan.time.device.startswith(("cpu", "cuda")) and plan.time.probe_batches >= 3


def test_exact_section_memory_is_reported(tiny_models, corpus_file, tmp_path):
    model = str(tiny_models["gpt2"])
    config = exact_section_config()
    plan = plan_build(config, model, corpus_file, id_field="id", progress=False)
    build_index(config, model, corpus_file, tmp_path / "idx", id_field="id", progress=False)
    manifest = read_manifest(tmp_path / "idx", kind="any")
    assert plan.exact is not None and plan.exact.refusal is None
    assert plan.exact.factor_bytes == manifest.exact.factor_bytes  # the build's own count
    assert plan.exact.needed == plan.exact.copies * plan.exact.factor_bytes == plan.memory.exact
    assert plan.disk.exact_preconditioner == pytest.approx(
        (tmp_path / "idx" / manifest.exact.file).stat().st_size, rel=0.05
    )
    assert "exact" in plan.format()

    tiny = dataclasses.replace(config, exact=dataclasses.replace(config.exact, memory_gb=1e-6))
    refused = plan_build(tiny, model, corpus_file, id_field="id", progress=False)
    assert "exact section needs" in refused.exact.refusal and "refused" in refused.format()


def test_no_exact_section_without_one(tiny_models, corpus_file):
    plan = plan_build(load_config("tiny"), str(tiny_models["gpt2"]), corpus_file, progress=False)
    assert plan.exact is None and plan.memory.exact == 0 and plan.disk.exact_preconditioner == 0
    assert ExactConfig().enabled is False


def test_cli_plan_and_json(tiny_models, corpus_file, tmp_path):
    args = ["plan", "--config", "tiny", "--model", str(tiny_models["gpt2"]), "--data", str(corpus_file)]
    result = CliRunner().invoke(main, args + ["--out", str(tmp_path / "idx")])
    assert result.exit_code == 0, result.output
    assert "vector" in result.stdout and "disk" in result.stdout and "time" in result.stdout
    assert "probing" in result.stderr  # what it is doing goes to stderr
    assert not (tmp_path / "idx").exists()  # a plan writes nothing

    result = CliRunner().invoke(main, args + ["--json", "--hessian", "ekfac"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"modules", "dim", "bytes_per_example", "corpus", "disk", "memory", "time", "exact", "notes"} <= set(data)
    assert data["hessian"] == "ekfac" and data["corpus"]["documents"] == 24
    assert data["dim"] == sum(m["dim"] for m in data["modules"])
    assert {"total", "rows", "index", "curvature"} <= set(data["disk"])
    assert {"build", "query", "model"} <= set(data["memory"])
    assert data["time"]["extract_seconds"] > 0


def test_plan_help_shows_an_example():
    result = CliRunner().invoke(main, ["plan", "--help"])
    assert result.exit_code == 0 and "attribindex plan" in result.output
    assert "attribindex plan" in CliRunner().invoke(main, ["--help"]).output


@pytest.mark.parametrize(
    "bad",
    [["--batch-size", "0"], ["--config", "no-such-preset"], ["--config", "BAD_YAML"], ["--max-length", "1"]],
    ids=["batch-size", "preset", "yaml", "max-length"],
)
def test_bad_config_refused_as_build_refuses_it(bad, tiny_models, corpus_file, tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("hessian:\n  kind: raw\n  dampng: 0.1\n", encoding="utf-8")
    bad = [str(bad_yaml) if arg == "BAD_YAML" else arg for arg in bad]
    common = ["--model", str(tiny_models["gpt2"]), "--data", str(corpus_file), "--out", str(tmp_path / "idx")]
    common = (["--config", "tiny"] if "--config" not in bad else []) + common + bad
    built = CliRunner().invoke(main, ["build", *common])
    planned = CliRunner().invoke(main, ["plan", *common])
    assert built.exit_code == planned.exit_code != 0
    assert built.stderr == planned.stderr and "Error" in planned.stderr, planned.stderr
    assert not (tmp_path / "idx").exists()
