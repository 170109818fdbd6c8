"""Index answers equal brute-force influence computed independently; mismatches are refused."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from attribindex import AttribIndexError, AttributionIndex, IndexMismatchError, PromptCompletion, build_index
from attribindex.logra import ProjectionSet
from attribindex.store import layout, read_manifest, write_manifest
from tests.conftest import exact_config
from tests.reference import brute_force_scores, explicit_projected_gradients

QUERIES = ["King queen crown sword love.", PromptCompletion("Ghost father son", " daughter mother brother.")]


@pytest.fixture(scope="module")
def indexes(tiny_models, corpus_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("indexes")
    built = {}
    for mode, kind in (("dot", "raw"), ("cosine", "raw"), ("dot", "identity")):
        out = root / f"{mode}-{kind}"
        build_index(exact_config(mode, kind), str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
        built[(mode, kind)] = out
    return built


@pytest.mark.parametrize(("mode", "kind"), [("dot", "raw"), ("cosine", "raw"), ("dot", "identity")])
def test_top_and_bottom_k_equal_brute_force_influence(indexes, corpus_records, mode, kind):
    index = AttributionIndex.open(indexes[(mode, kind)], dtype="float64")
    extractor = index._extractor
    texts = [r["text"] for r in corpus_records]
    train = explicit_projected_gradients(extractor.model, extractor.tokenizer, texts, index.projections, 32)
    queries = explicit_projected_gradients(extractor.model, extractor.tokenizer, QUERIES, index.projections, 32)
    expected = brute_force_scores(train, queries, index.block_dims, 0.1 if kind == "raw" else None, mode)  # (Q, N)

    answer = index.attribute(QUERIES, k=5, bottom=3)
    assert answer.exact and answer.index_id == index.index_id and answer.latency_ms > 0
    for q, result in enumerate(answer.results):
        order = torch.argsort(expected[q], descending=True)
        assert [a.id for a in result.top] == [corpus_records[int(i)]["id"] for i in order[:5]]
        np.testing.assert_allclose([a.score for a in result.top], expected[q, order[:5]].numpy(), rtol=2e-4)
        assert [a.id for a in result.bottom] == [corpus_records[int(i)]["id"] for i in order.flip(0)[:3]]
        np.testing.assert_allclose([a.score for a in result.bottom], expected[q, order.flip(0)[:3]].numpy(), rtol=2e-4)
        assert result.top[0].text == corpus_records[int(order[0])]["text"]


def test_training_text_finds_itself_first_in_cosine_mode(indexes, corpus_records):
    index = AttributionIndex.open(indexes[("cosine", "raw")])
    picks = [corpus_records[i] for i in (0, 9, 17)]
    answer = index.attribute([r["text"] for r in picks], k=1)
    for record, result in zip(picks, answer.results):
        assert result.top[0].id == record["id"]
        assert result.top[0].score == pytest.approx(1.0, abs=1e-3)


def test_query_from_another_model_is_refused(indexes, tiny_models):
    with pytest.raises(IndexMismatchError, match="model differs"):
        AttributionIndex.open(indexes[("dot", "raw")], model=str(tiny_models["llama"]))


def test_query_vectors_from_another_hessian_are_refused(indexes):
    raw = AttributionIndex.open(indexes[("dot", "raw")])
    identity = AttributionIndex.open(indexes[("dot", "identity")], load_model_now=False)
    vectors = raw.query_vectors(["King queen crown."])
    with pytest.raises(IndexMismatchError, match="Hessian"):
        identity.search(vectors, k=3)
    other_projection = dataclasses.replace(vectors, projection_hash="sha256:0000")
    with pytest.raises(IndexMismatchError, match="projection hash differs"):
        raw.search(other_projection, k=3)


@pytest.mark.parametrize("swap", ["projection", "preconditioner"])
def test_index_files_from_another_build_are_refused(indexes, tmp_path, swap):
    copy = tmp_path / "copy"
    shutil.copytree(indexes[("dot", "raw")], copy)
    if swap == "projection":
        index = AttributionIndex.open(copy, load_model_now=False)
        specs = index.projections.modules
        ProjectionSet.generate(specs, seed=99, rank_in=3, rank_out=4).save(copy / layout.PROJECTIONS)
    else:
        shutil.copy(indexes[("dot", "identity")] / layout.PRECONDITIONER, copy / layout.PRECONDITIONER)
    with pytest.raises(IndexMismatchError, match=f"{swap} hash differs"):
        AttributionIndex.open(copy, load_model_now=False)


def test_an_already_loaded_model_can_answer(indexes, corpus_records):
    from attribindex.model import load_model

    path = AttributionIndex.open(indexes[("cosine", "raw")], load_model_now=False).manifest.model.name_or_path
    model, tokenizer = load_model(path, dtype="float64", device="cpu")
    index = AttributionIndex.open(indexes[("cosine", "raw")], model, tokenizer)
    assert index.attribute(corpus_records[2]["text"], k=1).results[0].top[0].id == corpus_records[2]["id"]


def test_moved_model_is_reported_with_the_fix(indexes, tiny_models, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(indexes[("dot", "raw")], copy)
    manifest = read_manifest(copy)
    assert manifest.model.name_or_path == str(tiny_models["gpt2"].resolve())  # recorded absolute
    moved = dataclasses.replace(manifest.model, name_or_path=str(tmp_path / "moved-away"))
    write_manifest(copy, dataclasses.replace(manifest, model=moved))
    with pytest.raises(AttribIndexError, match="no longer there. Point at a copy"):
        AttributionIndex.open(copy)
    assert AttributionIndex.open(copy, model=str(tiny_models["gpt2"])).rows == 24


def test_query_vectors_come_back_in_query_order_whatever_the_lengths(indexes):
    """Queries are batched longest-first internally; vectors and losses still follow the caller's order."""
    index = AttributionIndex.open(indexes[("dot", "raw")])
    queries = ["Ghost.", "King queen crown sword love death night fear hope trust doubt.", "War peace heart weep."]
    together = index.query_vectors(queries, batch_size=2)
    for i, query in enumerate(queries):
        alone = index.query_vectors([query])
        np.testing.assert_allclose(together.vectors[i], alone.vectors[0], rtol=1e-9, atol=1e-12)
        assert together.losses[i] == pytest.approx(alone.losses[0], rel=1e-12)
