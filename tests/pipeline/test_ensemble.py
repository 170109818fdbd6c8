"""Checkpoint ensembles: one index over several checkpoints; a query's score is the weighted sum of the
single-checkpoint scores, found by one exact inner-product search."""

from __future__ import annotations

import signal

import pytest
import torch

from attribindex import (
    AttribIndexError,
    AttributionIndex,
    append_documents,
    build_ensemble,
    build_index,
    compact_index,
    delete_ids,
    refresh_index,
)
from attribindex.config import load_config
from attribindex.model import load_model
from attribindex.serve import Client
from attribindex.store import read_manifest, verify_files
from attribindex.testing import running_server, write_jsonl
from tests.conftest import exact_config

QUERIES = ["king queen crown sword", "storm war peace love death night"]


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory):
    """The tiny GPT-2 and a later "checkpoint" of it: the same weights moved by a seeded perturbation."""
    later = tmp_path_factory.mktemp("checkpoints") / "later"
    model, tokenizer = load_model(str(tiny_models["gpt2"]), device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(later)
    tokenizer.save_pretrained(later)
    return [str(tiny_models["gpt2"]), str(later)]


def scores_by_id(index: AttributionIndex, query: str) -> dict[str, float]:
    found = index.attribute(query, k=index.rows).results[0]
    return {a.id: a.score for a in found.top}


def test_an_ensemble_score_is_the_weighted_sum_of_the_checkpoints_scores(checkpoints, corpus_file, tmp_path):
    config, weights = exact_config("dot", kind="kfac"), [1.0, 0.25]
    summary = build_ensemble(config, checkpoints, corpus_file, tmp_path / "ens", weights=weights, id_field="id")
    singles = []
    for k, model in enumerate(checkpoints):
        build_index(config, model, corpus_file, tmp_path / f"single-{k}", id_field="id", progress=False)
        singles.append(AttributionIndex.open(tmp_path / f"single-{k}"))
    ensemble = AttributionIndex.open(tmp_path / "ens")
    manifest = read_manifest(tmp_path / "ens")
    assert summary.rows == 24 and manifest.dim == sum(s.manifest.dim for s in singles)
    recorded = [(c.name_or_path, c.fingerprint, c.weight) for c in manifest.ensemble.checkpoints]
    assert recorded == [(m, s.manifest.model.fingerprint, w) for m, s, w in zip(checkpoints, singles, weights)]
    assert not (tmp_path / "ens" / "members").exists()
    for query in QUERIES:
        combined = scores_by_id(ensemble, query)
        parts = [scores_by_id(single, query) for single in singles]
        for example, score in combined.items():
            expected = sum(w * part[example] for w, part in zip(weights, parts))
            assert score == pytest.approx(expected, rel=1e-4, abs=1e-6 * max(map(abs, combined.values())))
        ranked = sorted(combined, key=lambda i: -combined[i])
        assert ranked[:5] == sorted(combined, key=lambda i: -sum(w * p[i] for w, p in zip(weights, parts)))[:5]


def test_an_ensemble_refuses_other_architectures_and_what_it_cannot_do_yet(
    checkpoints, tiny_models, corpus_file, tmp_path
):
    with pytest.raises(AttribIndexError, match="not one architecture .model_type: 'gpt2' vs 'llama'"):
        build_ensemble(exact_config(), [checkpoints[0], str(tiny_models["llama"])], corpus_file, tmp_path / "mixed")
    with pytest.raises(AttribIndexError, match="does not exist or has no config.json"):
        build_ensemble(exact_config(), [checkpoints[0], str(tmp_path / "gone")], corpus_file, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()  # refused before anything was written
    build_ensemble(exact_config("cosine"), checkpoints, corpus_file, tmp_path / "ens", id_field="id", progress=False)
    index = AttributionIndex.open(tmp_path / "ens")
    assert index.attribute("king queen", k=3).results[0].top[0].score <= 1.0 + 1e-6  # cosine of the concatenation
    with pytest.raises(AttribIndexError, match="explain is not supported for a checkpoint ensemble"):
        index.explain("king queen", [index.attribute("king", k=1).results[0].top[0].id])
    with pytest.raises(AttribIndexError, match="appending to one is not supported yet"):
        append_documents(tmp_path / "ens", corpus_file, id_field="id", progress=False)
    with pytest.raises(AttribIndexError, match="cannot stand in for them"):
        AttributionIndex.open(tmp_path / "ens", model=checkpoints[0])

    # mutations work on stored rows and per-block curvature, as for any index
    top = index.attribute("king queen", k=2).results[0].top
    delete_ids(tmp_path / "ens", [top[0].id])
    compact_index(tmp_path / "ens")
    refresh_index(tmp_path / "ens")
    assert verify_files(tmp_path / "ens", read_manifest(tmp_path / "ens")).ok
    after = AttributionIndex.open(tmp_path / "ens").attribute("king queen", k=1).results[0].top
    assert after[0].id != top[0].id  # the deleted best is gone


def test_the_cli_builds_an_ensemble_from_repeated_models_and_shows_it(checkpoints, corpus_file, tmp_path):
    from click.testing import CliRunner

    from attribindex.cli import main

    out = str(tmp_path / "ens")
    command = ["build", "--config", "tiny", "--model", checkpoints[0], "--model", checkpoints[1]]
    built = CliRunner().invoke(
        main, command + ["--checkpoint-weights", "2,1", "--data", str(corpus_file), "--out", out]
    )
    assert built.exit_code == 0, built.output
    assert "ensemble of 2 checkpoints" in built.output
    info = CliRunner().invoke(main, ["info", out])
    assert "ensemble     2 checkpoints" in info.output and "(×2)" in info.output
    answer = CliRunner().invoke(main, ["query", out, "--text", "king queen crown", "-k", "3"])
    assert answer.exit_code == 0 and "3. +" in answer.output, answer.output

    with running_server(out) as url, Client(url) as client:  # a real server answers as the library does
        served = client.attribute(["king queen crown"], k=3).results[0].top
    local = AttributionIndex.open(out).attribute(["king queen crown"], k=3).results[0].top
    assert [a.id for a in served] == [a.id for a in local]


def test_trainer_checkpoints_are_weighed_by_their_learning_rate(tiny_models, corpus_records, checkpoints, tmp_path):
    """TracIn's weights: `--checkpoint-weights lr` reads the rate each Trainer checkpoint was saved at (warm-up makes
    them differ); a folder that is not a Trainer checkpoint is refused with the fix."""
    from click.testing import CliRunner
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    from attribindex.cli import main

    model, tokenizer = load_model(str(tiny_models["gpt2"]), device="cpu")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    dataset = Dataset.from_list(corpus_records[:8]).map(lambda r: tokenizer(r["text"], truncation=True, max_length=32))
    rates = {}

    class Rates(TrainerCallback):
        def on_save(self, args, state, control, lr_scheduler=None, **_):
            rates[state.global_step] = lr_scheduler.get_last_lr()[0]

    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        max_steps=4,
        learning_rate=1e-3,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=3,
        use_cpu=True,
        report_to=[],
        save_strategy="steps",
        save_steps=2,
        logging_strategy="no",
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    Trainer(model, args, collator, dataset, processing_class=tokenizer, callbacks=[Rates()]).train()
    assert rates[2] < rates[4] == 1e-3

    corpus = write_jsonl(tmp_path / "corpus.jsonl", corpus_records[:6])
    out = str(tmp_path / "ens")
    members = ["--model", str(tmp_path / "run" / "checkpoint-2"), "--model", str(tmp_path / "run" / "checkpoint-4")]
    command = ["build", "--config", "tiny", *members, "--data", str(corpus), "--out", out]
    built = CliRunner().invoke(main, command + ["--checkpoint-weights", "lr"])
    assert built.exit_code == 0, built.output
    weights = [c.weight for c in read_manifest(out).ensemble.checkpoints]
    assert weights == pytest.approx([rates[2], rates[4]], rel=1e-12)

    plain = ["build", "--config", "tiny", "--model", checkpoints[0], "--model", checkpoints[1], "--data", str(corpus)]
    refused = CliRunner().invoke(main, plain + ["--out", str(tmp_path / "no"), "--checkpoint-weights", "lr"])
    assert refused.exit_code != 0 and "not a transformers.Trainer checkpoint" in refused.output, refused.output
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize(
    "kill_at",
    [
        ("attribindex.pipeline._ensemble", "build_folder", 2, "before"),  # the first checkpoint done, the second not
        ("attribindex.pipeline._ensemble", "finalize_index", 1, "before"),  # rows stitched, nothing indexed
    ],
    ids=["between checkpoints", "before the index"],
)
def test_a_killed_ensemble_build_resumes_to_the_uninterrupted_result(kill_at, checkpoints, corpus_file, tmp_path):
    from tests.killing import cli_killed

    def command(out):
        return ["build", "--config", "tiny", "--model", checkpoints[0], "--model", checkpoints[1]] + [
            "--data",
            str(corpus_file),
            "--id-field",
            "id",
            "--out",
            str(out),
        ]

    build_ensemble(load_config("tiny"), checkpoints, corpus_file, tmp_path / "whole", id_field="id", progress=False)
    killed = cli_killed(kill_at, *command(tmp_path / "resumed"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    from click.testing import CliRunner

    from attribindex.cli import main

    again = CliRunner().invoke(main, command(tmp_path / "resumed"))
    assert again.exit_code == 0, again.output
    whole, resumed = AttributionIndex.open(tmp_path / "whole"), AttributionIndex.open(tmp_path / "resumed")
    assert resumed.manifest.store.chunks == whole.manifest.store.chunks  # the same rows, byte for byte
    for query in QUERIES:
        a, b = whole.attribute(query, k=5).results[0].top, resumed.attribute(query, k=5).results[0].top
        assert [x.id for x in a] == [x.id for x in b]
