"""KFAC / EK-FAC through the whole pipeline: sharded and batched builds agree, searches equal brute force under
the factored whitening, a killed build resumes, appends refresh to a full build, deletes are reported."""

from __future__ import annotations

import dataclasses
import shutil
import signal

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from attribindex import AttributionIndex, append_documents, build_index, delete_ids, refresh_index
from attribindex.cli import main
from attribindex.config import config_to_dict
from attribindex.hessian import CurvatureSums
from attribindex.model import load_model
from attribindex.pipeline._mutation import mutation
from attribindex.store import read_manifest
from attribindex.testing import write_jsonl
from tests.conftest import exact_config, with_store
from tests.killing import build_killed
from tests.reference import assert_same_index, explicit_exact_scores, stamped_queries

QUERIES = ["the quick brown fox jumps", "a b c d e f g", "To be, or not to be"]


def _config(kind: str, batch_size: int = 4):
    config = exact_config(kind=kind)
    return dataclasses.replace(config, extract=dataclasses.replace(config.extract, batch_size=batch_size))


def _build(tiny_models, data, out, config, **kwargs):
    return build_index(config, str(tiny_models["gpt2"]), data, out, id_field="id", progress=False, **kwargs)


@pytest.fixture(scope="module")
def ekfac(tiny_models, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ekfac") / "idx"
    _build(tiny_models, corpus_file, out, _config("ekfac"))
    return out


def test_sharded_build_with_another_batch_size_equals_the_single_build(ekfac, tiny_models, corpus_file, tmp_path):
    _build(tiny_models, corpus_file, tmp_path / "sharded", _config("ekfac", batch_size=7), num_shards=3)
    assert_same_index(ekfac, tmp_path / "sharded", curvature_rtol=1e-9)
    a, b = (read_manifest(p).hessian for p in (ekfac, tmp_path / "sharded"))
    assert a.kind == "ekfac" and a.modules.keys() == b.modules.keys()
    for name, stats in a.modules.items():
        assert vars(stats) == pytest.approx(vars(b.modules[name]), rel=1e-6)
    sums, _ = CurvatureSums.load(ekfac / a.curvature_file)
    assert sums.tracks_factors and not sums.sums  # factors only: no d×d gradient sums are kept


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_search_equals_brute_force_influence_under_the_factored_whitening(
    kind, ekfac, tiny_models, corpus_file, tmp_path
):
    path = ekfac if kind == "ekfac" else tmp_path / "kfac"
    if kind == "kfac":
        _build(tiny_models, corpus_file, path, _config("kfac"))
    index = AttributionIndex.open(path, load_model_now=False)
    assert index.preconditioner.kind == kind and index.preconditioner.kronecker
    raw = torch.cat([r for _, r in index.store.iter_raw()]).double()  # (24, D)
    metric = torch.block_diag(*(index.preconditioner.kronecker[n].dense().double() for n in index.module_names))
    expected = raw[:5] @ metric @ metric @ raw.T  # (5, 24) g_qᵀ W² g_t with W from the stored factors
    probes = (raw[:5] @ metric).float().numpy()
    scores, rows = index.index.search(probes, 24)
    for q in range(5):
        assert list(rows[q]) == list(np.argsort(-expected[q].numpy(), kind="stable"))
        np.testing.assert_allclose(scores[q], np.sort(expected[q].numpy())[::-1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("kind", "mode"), [("kfac", "dot"), ("ekfac", "dot"), ("ekfac", "cosine")])
def test_scores_and_top_k_equal_an_independent_dense_kronecker_computation(
    kind, mode, ekfac, tiny_models, corpus_file, corpus_records, tmp_path
):
    """Independent of the index's own factors and `dense()`: autograd per-example gradients (weights and biases),
    projected explicitly, an explicit d × d (H + λI)⁻¹ from `torch.kron` of the factor means' eigenbases, and
    EK-FAC's eigenvalue correction from scratch, all in float64 (tests/reference.py)."""
    path = ekfac if (kind, mode) == ("ekfac", "dot") else tmp_path / "idx"
    if path != ekfac:
        _build(tiny_models, corpus_file, path, dataclasses.replace(_config(kind), index=exact_config(mode).index))
    index = AttributionIndex.open(path)
    model, tokenizer = load_model(str(tiny_models["gpt2"]), "float64", "cpu")
    assert any(spec.bias for spec in index.manifest.modules)  # GPT-2's Conv1D biases are in the rows
    expected = explicit_exact_scores(
        model,
        tokenizer,
        [r["text"] for r in corpus_records],
        QUERIES,
        index.manifest.module_names,
        kind,
        0.1,
        mode,
        32,
        projections=index.projections,
    ).numpy()  # (Q, N)
    rows = len(corpus_records)
    answer = index.attribute(QUERIES, k=5, bottom=5)
    every = index.attribute(QUERIES, k=rows)
    for q, (result, full) in enumerate(zip(answer.results, every.results)):
        order = np.argsort(-expected[q], kind="stable")
        assert [a.row for a in result.top] == list(order[:5])
        assert [a.row for a in result.bottom] == list(order[::-1][:5])
        got = np.empty(rows)
        got[[a.row for a in full.top]] = [a.score for a in full.top]
        np.testing.assert_allclose(got, expected[q], rtol=1e-4, atol=1e-6 * np.abs(expected[q]).max())


def test_a_killed_kfac_build_resumes_to_the_uninterrupted_result(tiny_models, corpus_file, tmp_path):
    config = with_store(_config("kfac", batch_size=1), chunk_rows=5)
    _build(tiny_models, corpus_file, tmp_path / "whole", config)
    config_file = tmp_path / "kfac.yaml"
    config_file.write_text(yaml.safe_dump(config_to_dict(config)))
    at_checkpoint = ("attribindex.hessian._curvature", "write_safetensors", 2, "after")
    killed = build_killed(at_checkpoint, tiny_models["gpt2"], corpus_file, tmp_path / "idx", config_file)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    summary = _build(tiny_models, corpus_file, tmp_path / "idx", config)
    assert summary.resumed_rows >= 5
    assert_same_index(tmp_path / "whole", tmp_path / "idx")


def test_append_then_refresh_equals_a_full_build_and_deletes_are_reported(ekfac, tiny_models, corpus_records, tmp_path):
    living = tmp_path / "living"
    _build(tiny_models, write_jsonl(tmp_path / "old.jsonl", corpus_records[:16]), living, _config("ekfac"))
    summary = append_documents(
        living, write_jsonl(tmp_path / "new.jsonl", corpus_records[16:]), id_field="id", progress=False
    )
    assert summary.added == 8 and summary.drift.max > 0  # the implied EK-FAC whitening moved
    refresh_index(living, progress=False)
    assert_same_index(ekfac, living, same_sources=False)
    assert read_manifest(living).hessian.preconditioner_hash == read_manifest(ekfac).hessian.preconditioner_hash

    delete_ids(living, [corpus_records[0]["id"], corpus_records[5]["id"]])
    hessian = read_manifest(living).hessian
    assert hessian.retained_deleted == 2 and hessian.examples == 24 and hessian.drift.max > 0
    refresh_index(living, progress=False)  # eigenvalues corrected over the 22 live rows; factors keep all 24
    assert read_manifest(living).hessian.retained_deleted == 2
    info = CliRunner().invoke(main, ["info", str(living)])
    assert info.exit_code == 0 and "still count 2 deleted examples" in info.output
    index = AttributionIndex.open(living, load_model_now=False)
    top = index.search(stamped_queries(index, index.exact_vectors(np.array([2]))), k=3)[0][0]
    assert top[0].row == 2 and {a.row for a in top}.isdisjoint({0, 5})


def test_drift_samples_live_rows_instead_of_reading_the_whole_store(ekfac, corpus_records, tmp_path):
    living = tmp_path / "idx"
    shutil.copytree(ekfac, living)
    delete_ids(living, [corpus_records[3]["id"]])
    with mutation(living) as change:  # never committed: the index stays as it was
        every = torch.cat(list(change.live_rows()()))  # (23, D)
        sampled = torch.cat(list(change.live_rows(sample=10)()))  # (10, D)
        deleted = change.store().raw_rows(np.array([3]))[0]
        assert every.shape[0] == 23 and sampled.shape[0] == 10
        assert all(any(torch.equal(row, live) for live in every) for row in sampled)
        assert not any(torch.equal(row, deleted) for row in sampled)
