"""Ground truth by retraining (deterministic, resumable) and `eval lds` on an index built over the same documents."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from attribindex import AttribIndexError, AttributionIndex, build_index
from attribindex.cli import main
from attribindex.config import ProjectionConfig
from attribindex.data import Document
from attribindex.eval import (
    GroundTruth,
    TrainingRecipe,
    linear_datamodeling_score,
    make_ground_truth,
    retrain_on_subsets,
    train_causal_lm,
    training_scores,
)
from attribindex.eval import _ground_truth as ground_truth_module
from attribindex.logra import load_second_moment_scales, select_modules
from attribindex.model import load_model
from attribindex.testing import tiny_corpus, write_jsonl
from tests.conftest import exact_config

RECIPE = TrainingRecipe(epochs=2, batch_size=4, learning_rate=1e-2, max_length=24)


@pytest.fixture(scope="module")
def documents() -> list[Document]:
    return [Document(r["id"], r["text"], f"corpus:{i}") for i, r in enumerate(tiny_corpus(16, seed=7))]


QUERIES = ["king queen crown", "storm war peace"]


def test_subsets_and_losses_are_recorded_and_reproducible(tiny_models, documents, tmp_path):
    truth = make_ground_truth(
        tiny_models["llama"], documents, QUERIES, tmp_path / "a", subsets=4, recipe=RECIPE, progress=False
    )
    assert truth.subsets.shape == (4, 16) and (truth.subsets.sum(axis=1) == 8).all()
    assert truth.losses.shape == (4, 2) and np.isfinite(truth.losses).all() and truth.completed == 4
    assert len({row.tobytes() for row in truth.subsets}) == 4  # different subsets
    assert np.ptp(truth.losses, axis=0).min() > 0  # the subsets lead to different models
    again = make_ground_truth(
        tiny_models["llama"], documents, QUERIES, tmp_path / "b", subsets=4, recipe=RECIPE, progress=False
    )
    np.testing.assert_array_equal(again.subsets, truth.subsets)
    np.testing.assert_allclose(again.losses, truth.losses, rtol=1e-6)
    loaded = GroundTruth.load(tmp_path / "a")
    assert loaded.train_ids == [d.id for d in documents] and loaded.queries == QUERIES
    np.testing.assert_array_equal(loaded.losses, truth.losses)


def test_an_interrupted_run_resumes(tiny_models, documents, tmp_path, monkeypatch):
    whole = make_ground_truth(
        tiny_models["llama"], documents, QUERIES, tmp_path / "whole", subsets=4, recipe=RECIPE, progress=False
    )
    original, calls = ground_truth_module.train_causal_lm, []

    def dies_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(ground_truth_module, "train_causal_lm", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        make_ground_truth(
            tiny_models["llama"], documents, QUERIES, tmp_path / "gt", subsets=4, recipe=RECIPE, progress=False
        )
    partial = GroundTruth.load(tmp_path / "gt")
    assert partial.completed == 2 and partial.complete().losses.shape == (2, 2)
    monkeypatch.setattr(ground_truth_module, "train_causal_lm", original)
    resumed = make_ground_truth(
        tiny_models["llama"], documents, QUERIES, tmp_path / "gt", subsets=4, recipe=RECIPE, progress=False
    )
    np.testing.assert_allclose(resumed.losses, whole.losses, rtol=1e-6)
    with pytest.raises(AttribIndexError, match="other settings"):
        make_ground_truth(
            tiny_models["llama"],
            documents,
            QUERIES,
            tmp_path / "gt",
            subsets=4,
            fraction=0.25,
            recipe=RECIPE,
            progress=False,
        )


def test_eval_lds_scores_every_training_example_and_reports_a_ci(tiny_models, documents, tmp_path):
    truth = make_ground_truth(
        tiny_models["llama"], documents, QUERIES, tmp_path / "gt", subsets=5, recipe=RECIPE, progress=False
    )
    corpus = write_jsonl(tmp_path / "train.jsonl", [{"id": d.id, "text": d.text} for d in documents])
    index_dir = tmp_path / "idx"
    build_index(exact_config("dot"), str(tiny_models["llama"]), corpus, index_dir, id_field="id", progress=False)
    index = AttributionIndex.open(index_dir, device="cpu")
    scores = training_scores(index, QUERIES, truth.train_ids)
    assert scores.shape == (2, 16)
    top = index.attribute(QUERIES, k=3)
    for row, result in zip(scores, top.results):  # the index's top-3 are the 3 largest training scores
        ids = [truth.train_ids[i] for i in np.argsort(-row)[:3]]
        assert [a.id for a in result.top] == ids
        np.testing.assert_allclose([a.score for a in result.top], np.sort(row)[::-1][:3], rtol=1e-6)

    plot = tmp_path / "lds.png"
    args = ["eval", "lds", str(index_dir), "--ground-truth", str(tmp_path / "gt"), "--device", "cpu"]
    result = CliRunner().invoke(main, args + ["--json", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[: result.output.rindex("}") + 1])
    assert -1 <= report["score"] <= 1 and report["low"] <= report["score"] <= report["high"]
    expected = linear_datamodeling_score(scores, truth.subsets, truth.losses)  # the CLI scores what the library does
    assert report["score"] == pytest.approx(expected.score) and report["low"] == pytest.approx(expected.low)
    assert report["per_query"] == pytest.approx(expected.per_query.tolist())
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = CliRunner().invoke(main, ["eval", "lds", str(index_dir), "--ground-truth", str(tmp_path)])
    assert other.exit_code == 1 and "holds no ground truth" in other.output

    # Planted truths, where the answer is known: each subset's loss is the sum of the index's own scores (as
    # `attribute` reports them, by id) over the examples it holds, minus for a perfect method. A proponent (positive
    # score) then lowers the loss and the LDS is +1; plus gives -1. The ids are listed in another order than the
    # index holds them, so the CLI must match scores to examples by id.
    everything = index.attribute(QUERIES, k=len(documents)).results
    by_id = [{a.id: a.score for a in result.top} for result in everything]
    shuffled = [truth.train_ids[i] for i in np.random.default_rng(0).permutation(len(truth.train_ids))]
    for sign, planted in ((-1, 1.0), (1, -1.0)):

        def retrain(members, seed, sign=sign):
            return np.array([sign * sum(row[shuffled[i]] for i in members) + 50.0 for row in by_id])

        folder = tmp_path / f"planted{sign:+d}"
        retrain_on_subsets(folder, {"planted": sign}, shuffled, QUERIES, retrain, subsets=12, progress=False)
        result = CliRunner().invoke(main, ["eval", "lds", str(index_dir), "--ground-truth", str(folder), "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert report["per_query"] == pytest.approx([planted] * len(QUERIES)) and report["subsets"] == 12


def test_any_model_retrained_on_subsets_resumes_and_is_refused_with_other_settings(tmp_path):
    """The generic loop (used for the digits MLP): a closure that trains anything and returns (Q,) losses."""
    calls = []

    def retrain(members, seed):
        calls.append(seed)
        if len(calls) == 4:
            raise KeyboardInterrupt  # an interruption while the fourth model trains
        return np.array([members.sum(), float(seed % 97)], dtype=float)

    ids = [str(i) for i in range(10)]
    with pytest.raises(KeyboardInterrupt):
        retrain_on_subsets(tmp_path, {"model": "toy"}, ids, [0, 1], retrain, subsets=6, progress=False)
    assert GroundTruth.load(tmp_path).completed == 3
    truth = retrain_on_subsets(tmp_path, {"model": "toy"}, ids, [0, 1], retrain, subsets=6, progress=False)
    assert truth.completed == 6 and len(calls) == 4 + 3  # only the unfinished subsets were trained again
    assert (truth.subsets.sum(axis=1) == 5).all()  # fraction 0.5 of 10
    np.testing.assert_array_equal(truth.losses[:, 0], [np.flatnonzero(row).sum() for row in truth.subsets])
    with pytest.raises(AttribIndexError, match="other settings"):
        retrain_on_subsets(tmp_path, {"model": "other"}, ids, [0, 1], retrain, subsets=6, progress=False)


def test_training_can_save_its_optimizer_state_for_optimizer_aware_attribution(tiny_models, documents, tmp_path):
    model, tokenizer = load_model(str(tiny_models["llama"]), "float32", "cpu")
    train_causal_lm(model, tokenizer, documents[:8], RECIPE, seed=0, optimizer_out=tmp_path / "optimizer.pt")
    specs = select_modules(model, ProjectionConfig())
    scales = load_second_moment_scales(tmp_path / "optimizer.pt", model, specs)
    assert scales.optimizer == "adam" and scales.record["step"] == 4  # 8 documents, batch 4, 2 epochs
    assert set(scales.out_scale) == {s.name for s in specs}


def test_training_saves_checkpoints_along_the_run_for_ensembles(tiny_models, documents, tmp_path):
    model, tokenizer = load_model(str(tiny_models["llama"]), "float32", "cpu")
    train_causal_lm(model, tokenizer, documents[:8], RECIPE, seed=0, checkpoints=2, checkpoint_dir=tmp_path)
    saved = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert saved == ["checkpoint-2", "checkpoint-4"]  # 4 steps (8 documents, batch 4, 2 epochs), in halves
    last, _ = load_model(str(tmp_path / "checkpoint-4"), "float32", "cpu")
    first, _ = load_model(str(tmp_path / "checkpoint-2"), "float32", "cpu")
    final = dict(model.named_parameters())
    assert all(torch.equal(p, final[n]) for n, p in last.named_parameters())  # the last one is the trained model
    assert not all(torch.equal(p, final[n]) for n, p in first.named_parameters())


def test_a_capture_indexes_the_run_without_changing_it(tiny_models, documents, tmp_path):
    """What the capture LDS rows of docs/quality.md rest on: capturing a training run leaves its weights bit for bit
    as they were, and sums every document's gradient over the epochs that trained on it."""
    from attribindex.store import read_manifest
    from attribindex.train import capture_training

    plain, tokenizer = load_model(str(tiny_models["llama"]), "float32", "cpu")
    train_causal_lm(plain, tokenizer, documents[:8], RECIPE, seed=0)
    model, _ = load_model(str(tiny_models["llama"]), "float32", "cpu")

    def capture(optimizer):
        return capture_training(
            model, tokenizer, tmp_path / "captured", exact_config(), optimizer=optimizer, rows="summed"
        )

    train_causal_lm(model, tokenizer, documents[:8], RECIPE, seed=0, capture=capture)
    trained = dict(plain.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())
    manifest = read_manifest(tmp_path / "captured")
    assert manifest.rows == 8 and manifest.training.gradients == 16 and manifest.training.steps == 4
