"""The build's exact section and the exact re-rank: equal to an independent dense computation, the all-N top-k
when it lies inside the candidates, the same across shards, batch sizes and appends; refused when too large."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from attribindex import AttribIndexError, AttributionIndex, append_documents, build_index, merge_shards
from attribindex.config import config_to_dict
from attribindex.exact import ExactPreconditioner
from attribindex.hessian import CurvatureSums
from attribindex.model import load_model
from attribindex.store import layout, read_manifest
from attribindex.testing import write_jsonl
from tests.conftest import exact_config, exact_section_config
from tests.killing import build_killed
from tests.reference import explicit_exact_scores

QUERIES = ["the quick brown fox jumps", "a b c d e f g", "To be, or not to be"]


def _build(model, corpus_file, out, config, **kwargs):
    return build_index(config, str(model), corpus_file, out, id_field="id", progress=False, **kwargs)


@pytest.mark.parametrize(
    ("arch", "kind", "mode"), [("gpt2", "ekfac", "dot"), ("gpt2", "kfac", "cosine"), ("llama", "ekfac", "cosine")]
)
def test_exact_scores_equal_a_dense_kronecker_computation(
    arch, kind, mode, tiny_models, corpus_file, corpus_records, tmp_path
):
    """GPT-2's Conv1D layers carry biases (a column of G), Llama's Linear layers none; batches of 4 pad."""
    _build(tiny_models[arch], corpus_file, tmp_path / "idx", exact_section_config(mode, kind, sample=64))
    index = AttributionIndex.open(tmp_path / "idx")
    manifest = index.manifest
    assert manifest.exact.kind == kind and manifest.exact.sample == (24 if kind == "ekfac" else 0)
    assert bool(manifest.exact.biased) == (arch == "gpt2")
    model, tokenizer = load_model(str(tiny_models[arch]), "float64", "cpu")
    expected = explicit_exact_scores(
        model, tokenizer, [r["text"] for r in corpus_records], QUERIES, manifest.module_names, kind, 0.1, mode, 32
    )
    torch.testing.assert_close(torch.from_numpy(index.exact_scores(QUERIES)), expected, rtol=1e-7, atol=1e-9)


def test_the_rerank_is_the_exact_top_k_whenever_it_lies_inside_the_candidates(exact_index):
    index = AttributionIndex.open(exact_index)
    reference = index.exact_scores(QUERIES)  # (Q, N)
    k, checked, answer_at = 3, {6: 0, 24: 0}, {}
    for candidates in checked:
        answer = answer_at[candidates] = index.attribute(QUERIES, k=k, bottom=2, exact=candidates)
        first_stage = index.attribute(QUERIES, k=candidates, bottom=candidates)
        assert answer.exact and answer.rerank.candidates == candidates and "ekfac" in answer.rerank.method
        assert candidates <= answer.rerank.scored <= min(2 * candidates, 24)
        for q, (result, stage) in enumerate(zip(answer.results, first_stage.results)):
            pool = {a.row for a in stage.top + stage.bottom}
            best, worst = np.argsort(-reference[q])[:k], np.argsort(reference[q])[:2]
            for rows, got in ((best, result.top), (worst, result.bottom)):
                assert {a.row for a in got} <= pool
                np.testing.assert_allclose(
                    [a.score for a in got],
                    sorted(reference[q][[a.row for a in got]], reverse=got is result.top),
                    rtol=1e-9,
                )
                if set(rows.tolist()) <= pool:
                    checked[candidates] += 1
                    assert [a.row for a in got] == rows.tolist()
    assert checked == {6: checked[6], 24: 6} and checked[6] >= 1  # at C = N every list is inside; at C = 6 some
    again = index.attribute(QUERIES, k=k, bottom=2, exact=6)  # the same C on the same index: the same answer
    assert again.results == answer_at[6].results


def test_shards_and_merge_equal_the_single_build(exact_index, tiny_models, corpus_file, tmp_path):
    for i in range(2):
        _build(
            tiny_models["gpt2"], corpus_file, tmp_path / f"s{i}", exact_section_config(), num_shards=2, shard_index=i
        )
    merge_shards([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged", progress=False)
    single, merged = read_manifest(exact_index), read_manifest(tmp_path / "merged")
    (a, _), (b, _) = (CurvatureSums.load(root / layout.CURVATURE) for root in (exact_index, tmp_path / "merged"))
    assert a.tracks_exact and set(a.tensors) == set(b.tensors)
    for name in a.exact_activations:
        for part in ("exact_activations", "exact_gradients", "exact_traces"):
            torch.testing.assert_close(getattr(a, part)[name], getattr(b, part)[name], rtol=1e-12, atol=1e-14)
    assert merged.exact.sample == single.exact.sample == 16
    assert dataclasses.replace(merged.exact, preconditioner_hash="", modules={}) == dataclasses.replace(
        single.exact, preconditioner_hash="", modules={}
    )  # the same record (hashes differ by eigenvector signs at most)
    _same_exact_preconditioner(exact_index, tmp_path / "merged")


def test_batch_size_does_not_change_the_exact_section(exact_index, tiny_models, corpus_file, tmp_path):
    _build(tiny_models["gpt2"], corpus_file, tmp_path / "idx", exact_section_config(batch_size=3))
    _same_exact_preconditioner(exact_index, tmp_path / "idx")


def test_true_fisher_draws_labels_from_the_model_reproducibly(exact_index, tiny_models, corpus_file, tmp_path):
    for batch_size in (4, 5):
        _build(
            tiny_models["gpt2"],
            corpus_file,
            tmp_path / f"b{batch_size}",
            exact_section_config(batch_size=batch_size, fisher="true"),
        )
    _same_exact_preconditioner(tmp_path / "b4", tmp_path / "b5")  # sampled per example, not per batch
    true, empirical = (read_manifest(p).exact for p in (tmp_path / "b4", exact_index))
    assert true.fisher == "true" and empirical.fisher == "empirical"
    assert true.preconditioner_hash != empirical.preconditioner_hash
    # Activations do not depend on the labels; output gradients do.
    (t, _), (e, _) = (CurvatureSums.load(p / layout.CURVATURE) for p in (tmp_path / "b4", exact_index))
    name = next(iter(t.exact_activations))
    torch.testing.assert_close(t.exact_activations[name], e.exact_activations[name])
    assert not torch.allclose(t.exact_gradients[name], e.exact_gradients[name])


def test_appended_documents_add_to_the_exact_factors(tiny_models, corpus_records, tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", corpus_records[:16])
    rest = write_jsonl(tmp_path / "rest.jsonl", corpus_records[16:])
    everything = write_jsonl(tmp_path / "all.jsonl", corpus_records)
    _build(tiny_models["gpt2"], first, tmp_path / "grown", exact_section_config())
    append_documents(tmp_path / "grown", rest, id_field="id", progress=False)
    _build(tiny_models["gpt2"], everything, tmp_path / "whole", exact_section_config())
    (a, _), (b, _) = (
        CurvatureSums.load(p / read_manifest(p).hessian.curvature_file)
        for p in (tmp_path / "grown", tmp_path / "whole")
    )
    assert a.count == b.count == 24
    for name, total in a.exact_gradients.items():
        torch.testing.assert_close(total, b.exact_gradients[name], rtol=1e-10, atol=1e-14)
    grown = AttributionIndex.open(tmp_path / "grown")
    assert grown.exact_scores(QUERIES[:1]).shape == (1, 24)  # appended rows are re-ranked too


def test_an_extraction_interrupted_resumes_with_the_exact_sums_of_the_written_chunks(
    exact_index, tiny_models, corpus_file, tmp_path
):
    out = _killed_build(
        ("attribindex.hessian._curvature", "CurvatureSums.save", 1, "after"), tiny_models, corpus_file, tmp_path
    )
    partial, _ = CurvatureSums.load(out / layout.CURVATURE)
    assert partial.tracks_exact and partial.count == 10  # the first chunk's rows only
    summary = _build(tiny_models["gpt2"], corpus_file, out, exact_section_config())
    assert summary.resumed_rows == 10
    (a, _), (b, _) = (CurvatureSums.load(root / layout.CURVATURE) for root in (exact_index, out))
    for name, total in a.exact_activations.items():
        torch.testing.assert_close(total, b.exact_activations[name], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(a.exact_traces[name], b.exact_traces[name], rtol=1e-12, atol=0)
    _same_exact_preconditioner(exact_index, out)


def test_a_correction_pass_interrupted_resumes_to_the_same_result(exact_index, tiny_models, corpus_file, tmp_path):
    out = _killed_build(
        ("attribindex.pipeline._exact", "_write_correction", 1, "after"), tiny_models, corpus_file, tmp_path
    )
    assert (out / layout.EXACT_CORRECTION).is_file() and not (out / layout.MANIFEST).exists()
    _build(tiny_models["gpt2"], corpus_file, out, exact_section_config())
    _same_exact_preconditioner(exact_index, out)
    assert not (out / layout.EXACT_CORRECTION).exists()


def test_a_section_too_large_for_memory_is_refused_before_anything_is_written(tiny_models, corpus_file, tmp_path):
    with pytest.raises(AttribIndexError, match=r"exact section needs 4 × .* GiB .* limit is .* exact.memory_gb"):
        _build(tiny_models["gpt2"], corpus_file, tmp_path / "idx", exact_section_config(memory_gb=1e-6))
    assert not (tmp_path / "idx").exists() or not any((tmp_path / "idx").iterdir())


def test_bad_rerank_requests_are_refused_with_the_fix(exact_index, tiny_models, corpus_file, tmp_path):
    index = AttributionIndex.open(exact_index)
    for exact, message in (
        (0, "positive integer"),
        (-3, "positive integer"),
        (10_001, "above the limit"),
        (2, "exact >= 3"),
    ):
        with pytest.raises(AttribIndexError, match=message):
            index.attribute(QUERIES[0], k=3, exact=exact)
    _build(tiny_models["gpt2"], corpus_file, tmp_path / "plain", exact_config("dot"))
    with pytest.raises(AttribIndexError, match=r"without the `exact` section.*exact.enabled.*rebuild"):
        AttributionIndex.open(tmp_path / "plain").attribute(QUERIES[0], k=3, exact=10)


def _killed_build(kill_at, tiny_models, corpus_file, tmp_path):
    """The shared exact build, run in a subprocess SIGKILLed at `kill_at` (tests/killing.py); its folder."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text(json.dumps(config_to_dict(exact_section_config())))
    out = tmp_path / "idx"
    killed = build_killed(kill_at, tiny_models["gpt2"], corpus_file, out, config_file)
    assert killed.returncode == -9, killed.stderr[-2000:]
    return out


def _same_exact_preconditioner(root_a, root_b) -> None:
    a, b = (ExactPreconditioner.load(root / layout.EXACT_PRECONDITIONER) for root in (root_a, root_b))
    assert a.kind == b.kind and a.layers.keys() == b.layers.keys() and a.shapes == b.shapes
    for name, layer in a.layers.items():
        other = b.layers[name]
        # Eigenvectors are defined up to sign: compare the inverse Hessian they form.
        inverse_a = (
            torch.kron(layer.u_out, layer.u_in)
            @ torch.diag(layer.inverse.reshape(-1))
            @ torch.kron(layer.u_out, layer.u_in).T
        )
        inverse_b = (
            torch.kron(other.u_out, other.u_in)
            @ torch.diag(other.inverse.reshape(-1))
            @ torch.kron(other.u_out, other.u_in).T
        )
        torch.testing.assert_close(inverse_a, inverse_b, rtol=1e-6, atol=1e-8 * float(inverse_a.abs().max()))


def test_a_tight_memory_bound_changes_batches_not_scores(exact_index):
    default = AttributionIndex.open(exact_index).exact_scores(QUERIES)
    tight = AttributionIndex.open(exact_index)
    tight.exact_memory_bytes = 1  # one candidate per batch
    np.testing.assert_allclose(tight.exact_scores(QUERIES), default, rtol=1e-10)
