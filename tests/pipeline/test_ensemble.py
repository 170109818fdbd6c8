"""Checkpoint ensembles: one index over several checkpoints; a query's score is the weighted sum of the
single-checkpoint scores, found by one exact inner-product search."""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

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
from attribindex.logra import ProjectionSet
from attribindex.model import load_model
from attribindex.serve import Client
from attribindex.store import read_manifest, verify_files
from attribindex.testing import serving, write_jsonl
from tests.conftest import exact_config
from tests.reference import assert_same_index, explicit_projected_gradients

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


def explicit_cosines(folder: Path, checkpoints: list[str], weights: list[float], query: str) -> dict[str, float]:
    """{id: score} of every stored row of a cosine-mode ensemble of `raw` Hessian, from plain tensors: the stored raw
    rows, the dense whitening matrices of the preconditioner file and the query's autograd gradient at each
    checkpoint. Both sides are the concatenation of the whitened blocks, the query's blocks of checkpoint k times
    w_k, each normalised as a whole: one cosine, not a mean of the checkpoints' cosines."""
    index = AttributionIndex.open(folder, load_model_now=False)
    whitening = load_file(str(folder / "preconditioner.safetensors"))  # {module: (d, d) W}, for a `raw` Hessian
    modules = index.manifest.modules
    query_blocks = []
    for k, (model_path, weight) in enumerate(zip(checkpoints, weights)):
        prefix = f"checkpoint-{k}/"
        mine = [m for m in index.projections.modules if m.name.startswith(prefix)]
        member = ProjectionSet(
            [dataclasses.replace(m, name=m.name.removeprefix(prefix)) for m in mine],
            {m.name.removeprefix(prefix): index.projections.p_in[m.name] for m in mine},
            {m.name.removeprefix(prefix): index.projections.p_out[m.name] for m in mine},
        )
        model, tokenizer = load_model(model_path, dtype="float64", device="cpu")
        gradient = explicit_projected_gradients(model, tokenizer, [query], member, max_length=32)[0]
        query_blocks += [weight * b for b in gradient.split([m.dim for m in modules if m.name.startswith(prefix)])]
    assert len(query_blocks) == len(modules)
    dims = [m.dim for m in modules]
    matrices = [whitening[m.name].double() for m in modules]
    q = torch.cat([w @ b for w, b in zip(matrices, query_blocks)])
    rows = torch.from_numpy(np.concatenate([raw.numpy() for _, raw in index.store.iter_raw()])).double()
    whitened = torch.cat([block @ w for w, block in zip(matrices, rows.split(dims, dim=1))], dim=1)  # W symmetric
    scores = (whitened / whitened.norm(dim=1, keepdim=True)) @ (q / q.norm())
    return {d.id: float(v) for d, v in zip(index.store.documents(range(len(rows))), scores)}


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
    checkpoints, tiny_models, corpus_records, corpus_file, tmp_path
):
    with pytest.raises(AttribIndexError, match="not one architecture .model_type: 'gpt2' vs 'llama'"):
        build_ensemble(exact_config(), [checkpoints[0], str(tiny_models["llama"])], corpus_file, tmp_path / "mixed")
    with pytest.raises(AttribIndexError, match="does not exist or has no config.json"):
        build_ensemble(exact_config(), [checkpoints[0], str(tmp_path / "gone")], corpus_file, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()  # refused before anything was written
    config, weights = exact_config("cosine"), [1.0, 0.25]
    build_ensemble(config, checkpoints, corpus_file, tmp_path / "ens", weights=weights, id_field="id", progress=False)
    index = AttributionIndex.open(tmp_path / "ens")
    found = index.attribute("king queen", k=index.rows).results[0].top
    expected = explicit_cosines(tmp_path / "ens", checkpoints, weights, "king queen")
    assert {a.id for a in found} == expected.keys()
    for a in found:  # the cosine of the weighted concatenation
        assert a.score == pytest.approx(expected[a.id], rel=1e-4, abs=1e-5), a.id
    with pytest.raises(AttribIndexError, match="explain is not supported for a checkpoint ensemble"):
        index.explain("king queen", [index.attribute("king", k=1).results[0].top[0].id])
    with pytest.raises(AttribIndexError, match="appending to one is not supported yet"):
        append_documents(tmp_path / "ens", corpus_file, id_field="id", progress=False)
    with pytest.raises(AttribIndexError, match="cannot stand in for them"):
        AttributionIndex.open(tmp_path / "ens", model=checkpoints[0])

    # mutations work on stored rows and per-block curvature, as for any index: the result is the ensemble built
    # over the remaining documents
    gone = found[0].id
    delete_ids(tmp_path / "ens", [gone])
    compact_index(tmp_path / "ens")
    refresh_index(tmp_path / "ens")
    assert verify_files(tmp_path / "ens", read_manifest(tmp_path / "ens")).ok
    remaining = write_jsonl(tmp_path / "remaining.jsonl", [r for r in corpus_records if r["id"] != gone])
    build_ensemble(config, checkpoints, remaining, tmp_path / "fresh", weights=weights, id_field="id", progress=False)
    assert_same_index(tmp_path / "ens", tmp_path / "fresh", same_sources=False, curvature_rtol=1e-6)
    assert read_manifest(tmp_path / "ens").ensemble == read_manifest(tmp_path / "fresh").ensemble
    mutated, fresh = AttributionIndex.open(tmp_path / "ens"), AttributionIndex.open(tmp_path / "fresh")
    for query in QUERIES:
        a, b = mutated.attribute(query, k=23).results[0].top, fresh.attribute(query, k=23).results[0].top
        assert [x.id for x in a] == [x.id for x in b] and gone not in {x.id for x in a}
        np.testing.assert_allclose([x.score for x in a], [x.score for x in b], rtol=1e-5, atol=1e-6)


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

    with serving(out) as url, Client(url) as client:  # a real server answers as the library does
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


def ensemble_command(checkpoints: list[str], corpus_file: Path, out: Path) -> list[str]:
    """`attribindex build` arguments of a two-checkpoint ensemble of the tiny preset."""
    models = ["--model", checkpoints[0], "--model", checkpoints[1]]
    return ["build", "--config", "tiny", *models, "--data", str(corpus_file), "--id-field", "id", "--out", str(out)]


@pytest.fixture(scope="module")
def whole_ensemble(checkpoints, corpus_file, tmp_path_factory) -> Path:
    """The uninterrupted CLI build that the killed-and-resumed ones must equal (read only)."""
    from click.testing import CliRunner

    from attribindex.cli import main

    out = tmp_path_factory.mktemp("whole-ensemble") / "whole"
    built = CliRunner().invoke(main, ensemble_command(checkpoints, corpus_file, out))
    assert built.exit_code == 0, built.output
    return out


def folder_contents(folder: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `folder`; the manifest's build timestamps (`created` and each log
    event's `time`, the wall clock of the run that wrote it) are blanked, the rest of it is kept."""
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    manifest = json.loads(files["manifest.json"])
    manifest["created"] = None
    for event in manifest["log"]:
        event["time"] = None
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


@pytest.mark.parametrize(
    "kill_at",
    [
        ("attribindex.pipeline._ensemble", "build_folder", 2, "before"),  # the first checkpoint done, the second not
        ("attribindex.pipeline._ensemble", "finalize_index", 1, "before"),  # rows stitched, nothing indexed
    ],
    ids=["between checkpoints", "before the index"],
)
def test_a_killed_ensemble_build_resumes_to_the_uninterrupted_result(
    kill_at, checkpoints, corpus_file, whole_ensemble, tmp_path
):
    """Every file of the resumed index equals the uninterrupted build's, byte for byte; of the manifest, all but
    the times it was written at."""
    from click.testing import CliRunner

    from attribindex.cli import main
    from tests.killing import cli_killed

    killed = cli_killed(kill_at, *ensemble_command(checkpoints, corpus_file, tmp_path / "resumed"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    again = CliRunner().invoke(main, ensemble_command(checkpoints, corpus_file, tmp_path / "resumed"))
    assert again.exit_code == 0, again.output
    whole, resumed = folder_contents(whole_ensemble), folder_contents(tmp_path / "resumed")
    assert sorted(resumed) == sorted(whole)
    for name, content in whole.items():
        assert resumed[name] == content, name
