"""Rows captured from a training loop's own backward pass equal the rows a build computes at the same weights."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from attribindex import AttribIndexError, AttributionIndex, IndexMismatchError, append_documents, build_index
from attribindex.model import load_model
from attribindex.serve import Client
from attribindex.store import RowStore, read_manifest, verify_files
from attribindex.testing import serving, write_jsonl
from attribindex.train import DatasetRows, TrainingCapture, capture_training
from tests.conftest import exact_config


def rows_by_id(folder) -> dict[str, np.ndarray]:
    """{document id: raw stored row} of an index folder, read from its row store (no FAISS needed)."""
    manifest = read_manifest(folder)
    store = RowStore(folder, manifest.block_dims, manifest.store.dtype, manifest.store.chunks)
    rows = np.concatenate([raw.numpy() for _, raw in store.iter_raw()])
    return {doc.id: row for doc, row in zip(store.documents(range(len(rows))), rows)}


def micro_batches(tokenizer, records, size):
    """(records, model inputs) per micro-batch: right-padded, padding's labels ignored."""
    for start in range(0, len(records), size):
        part = records[start : start + size]
        inputs = tokenizer([r["text"] for r in part], padding=True, truncation=True, max_length=32, return_tensors="pt")
        inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        yield part, dict(inputs)


@pytest.fixture
def trainable(tiny_models):
    model, tokenizer = load_model(str(tiny_models["gpt2"]), dtype="float64", device="cpu")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return model.train().requires_grad_(True), tokenizer


def train(model, tokenizer, records, out, config, *, micro=3, accumulation=2, rows="per_step", lr=0.05, **options):
    """SGD over `records` with gradient accumulation, capturing; returns the weights each step trained at."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    weights = []
    with capture_training(model, tokenizer, out, config, optimizer=optimizer, rows=rows, **options) as capture:
        for number, (part, inputs) in enumerate(micro_batches(tokenizer, records, micro)):
            if number % accumulation == 0:
                weights.append(copy.deepcopy(model.state_dict()))
            with capture.batch([r["id"] for r in part], texts=[r["text"] for r in part]):
                (model(**inputs).loss / accumulation).backward()
            if number % accumulation == accumulation - 1:
                optimizer.step()
                optimizer.zero_grad()
    return weights, capture


def assert_rows_equal_builds(captured_dir, weights, model, tokenizer, records, config, tmp_path):
    """Each captured row `<id>@<step>` equals the row `attribindex build` computes (on the CPU, from a saved copy) for
    that example with the weights of that step (`weights[step]`, a state dict of `model`, on any device)."""
    captured = rows_by_id(captured_dir)
    by_id = {r["id"]: r for r in records}
    snapshot = copy.deepcopy(model)
    for step, state in weights.items():
        seen = [key.rsplit("@", 1)[0] for key in captured if key.endswith(f"@{step}")]
        assert seen, f"no row of step {step}"
        snapshot.load_state_dict(state)
        folder = tmp_path / f"model-{step}"
        snapshot.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        corpus = write_jsonl(tmp_path / f"step-{step}.jsonl", [by_id[i] for i in seen])
        build_index(config, str(folder), corpus, tmp_path / f"built-{step}", id_field="id", progress=False)
        built = rows_by_id(tmp_path / f"built-{step}")
        for i in seen:  # HF's causal-LM loss casts the logits to float32: the training side is float32-exact
            scale = np.abs(built[i]).max()
            np.testing.assert_allclose(captured[f"{i}@{step}"], built[i], rtol=1e-5, atol=1e-6 * scale)
    return captured


def saved(model, tokenizer, folder: Path) -> Path:
    """A copy of `model` (as it is now) and its tokenizer in `folder`, as `build_index` loads a model."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def curvature_file(folder: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """(examples counted, {name: fp64 sum}) of an index folder's curvature sums, read as plain safetensors."""
    path = folder / "curvature.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        count = int(handle.metadata()["count"])
    return count, load_file(str(path))


def explicit_whitening(count: int, sums: dict[str, torch.Tensor], name: str, kind: str, alpha: float) -> torch.Tensor:
    """The dense (d, d) W = (H + λI)^{-1/2} of one module from curvature sums, λ = α · mean eigenvalue: `raw` H is
    E[g gᵀ]; `kfac` H has the eigenbasis U_S ⊗ U_A of the mean factors and eigenvalues s_i·a_j scaled to E‖g‖²."""
    if kind == "raw":
        eigenvalues, basis = torch.linalg.eigh(sums[name] / count)
    else:
        a, u_in = torch.linalg.eigh(sums[f"{name}::activations"] / count)
        s, u_out = torch.linalg.eigh(sums[f"{name}::gradients"] / count)
        basis, eigenvalues = torch.kron(u_out, u_in), torch.kron(s.clamp_min(0), a.clamp_min(0))
        eigenvalues = eigenvalues * (sums[f"{name}::trace"] / count / eigenvalues.sum())
    eigenvalues = eigenvalues.clamp_min(0)
    return (basis * (eigenvalues + alpha * eigenvalues.mean()).rsqrt()) @ basis.T


def assert_scores_equal_builds(captured_dir, built_dirs, trained_dir, config, query, tmp_path) -> list[str]:
    """The captured index, queried with the trained model, scores every row n as Σ_modules ⟨W q, W g_n⟩ computed
    from builds alone: g_n the row a build computes at the weights of its step (`built_dirs`: {step: a build over
    that step's examples}, as `assert_rows_equal_builds` leaves them), W explicit dense whitening from the sum of
    the builds' curvature sums (which the capture's own sums must equal), q the query's projected gradient in an
    identity index built at the trained weights (`trained_dir`). Returns the row ids best first."""
    built = [curvature_file(folder) for folder in built_dirs.values()]
    count, sums = sum(c for c, _ in built), {name: sum(s[name] for _, s in built) for name in built[0][1]}
    captured_count, captured_sums = curvature_file(captured_dir)
    assert captured_count == count and captured_sums.keys() == sums.keys()
    for name, total in sums.items():  # the output factor Σ δ̃δ̃ᵀ carries c² in the hooks: divided out exactly
        torch.testing.assert_close(captured_sums[name], total, rtol=1e-5, atol=1e-6 * float(total.abs().max()))

    identity = dataclasses.replace(config, hessian=dataclasses.replace(config.hessian, kind="identity"))
    one = write_jsonl(tmp_path / "query-side.jsonl", [{"id": "q", "text": query}])
    build_index(identity, str(trained_dir), one, tmp_path / "query-side", id_field="id", progress=False)
    q = torch.from_numpy(AttributionIndex.open(tmp_path / "query-side").query_vectors([query]).vectors[0]).double()
    modules = read_manifest(captured_dir).modules
    weights = [explicit_whitening(count, sums, m.name, config.hessian.kind, config.hessian.damping) for m in modules]
    expected = {}
    parts = q.split([m.dim for m in modules])
    for step, folder in built_dirs.items():
        for i, row in rows_by_id(folder).items():
            blocks = torch.from_numpy(row).double().split([m.dim for m in modules])
            expected[f"{i}@{step}"] = sum(float((w @ a) @ (w @ b)) for w, a, b in zip(weights, parts, blocks))

    index = AttributionIndex.open(captured_dir, model=str(trained_dir))
    found = index.attribute(query, k=index.rows).results[0].top
    got = {a.id: a.score for a in found}
    assert got.keys() == expected.keys()
    scale = max(map(abs, expected.values()))
    for key, score in expected.items():
        assert got[key] == pytest.approx(score, rel=1e-4, abs=1e-5 * scale), key
    return [a.id for a in found]


def test_rows_captured_in_a_loop_equal_a_build_at_each_steps_weights(trainable, corpus_records, tmp_path):
    """Gradient accumulation (2 micro-batches of 3 per step, the loss divided by 2) and right padding."""
    model, tokenizer = trainable
    records = corpus_records[:12]
    config = exact_config("dot", kind="kfac")
    weights, capture = train(model, tokenizer, records, tmp_path / "captured", config)
    captured = assert_rows_equal_builds(
        tmp_path / "captured", dict(enumerate(weights)), model, tokenizer, records, config, tmp_path
    )
    assert len(captured) == 12 and capture.summary.rows == 12
    manifest = read_manifest(tmp_path / "captured")
    assert manifest.training.rows == "per_step" and manifest.training.steps == 2 and manifest.training.gradients == 12
    assert not np.allclose(weights[0]["lm_head.weight"], weights[1]["lm_head.weight"])  # the weights did change
    with pytest.raises(IndexMismatchError, match="captured while training.*Pass the trained model"):
        AttributionIndex.open(tmp_path / "captured")  # the manifest names the untrained checkpoint it started from
    trained = saved(model, tokenizer, tmp_path / "trained")
    built = {step: tmp_path / f"built-{step}" for step in range(2)}
    ranked = assert_scores_equal_builds(tmp_path / "captured", built, trained, config, "king", tmp_path)
    found = AttributionIndex.open(tmp_path / "captured", model=model, tokenizer=tokenizer).attribute("king", k=3)
    assert [a.id for a in found.results[0].top] == ranked[:3]  # the trained model in memory queries as its copy


def test_from_step_leaves_the_earlier_steps_out(trainable, corpus_records, tmp_path):
    model, tokenizer = trainable
    records = corpus_records[:12]
    weights, capture = train(model, tokenizer, records, tmp_path / "captured", exact_config(), from_step=1)
    captured = assert_rows_equal_builds(
        tmp_path / "captured", {1: weights[1]}, model, tokenizer, records, exact_config(), tmp_path
    )
    assert sorted(captured) == sorted(f"{r['id']}@1" for r in records[6:])  # step 0 trained on the first 6
    training = read_manifest(tmp_path / "captured").training
    assert (training.first_step, training.last_step, training.gradients) == (1, 1, 6)


def test_a_trainer_with_the_callback_captures_what_a_build_computes(trainable, corpus_records, tmp_path):
    """HF Trainer: shuffled batches, gradient accumulation with num_items_in_batch, the collator's padding, and an
    evaluation after every step (its forward passes, with labels, train on nothing and add no row)."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    from attribindex import AttributionCallback

    model, tokenizer = trainable
    records = corpus_records[:12]
    config = exact_config("dot")
    dataset = Dataset.from_list(records).map(lambda r: tokenizer(r["text"], truncation=True, max_length=32))
    weights = {}

    class Snapshots(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **_):
            weights[state.global_step] = copy.deepcopy(model.state_dict())

    callback = AttributionCallback(tmp_path / "captured", config, dataset=dataset, id_field="id", text_field="text")
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=3,
        gradient_accumulation_steps=2,
        num_train_epochs=2,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        eval_strategy="steps",
        eval_steps=1,
        seed=0,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset.select(range(3)),
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[Snapshots(), callback],
    )
    trainer.train()
    captured = assert_rows_equal_builds(tmp_path / "captured", weights, model, tokenizer, records, config, tmp_path)
    assert len(captured) == 24 and sorted(weights) == [0, 1, 2, 3]  # 2 epochs × 12 examples, 6 per step
    assert {key.rsplit("@", 1)[0] for key in captured} == {r["id"] for r in records}
    trained = saved(model, tokenizer, tmp_path / "trained")
    built = {step: tmp_path / f"built-{step}" for step in weights}
    assert_scores_equal_builds(tmp_path / "captured", built, trained, config, records[0]["text"], tmp_path)


def summed_token_loss(logits, labels):
    """Σ_b Σ_t ℓ_bt: the loss an index row is the gradient of, computed by the loop instead of the model."""
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


def test_a_loss_of_the_loops_own_needs_its_scale_and_then_gives_the_same_rows(trainable, corpus_records, tmp_path):
    model, tokenizer = trainable
    records, config = corpus_records[:6], exact_config("dot")
    initial = copy.deepcopy(model.state_dict())

    def run(out, **batch_options):
        with capture_training(model, tokenizer, out, config) as capture:
            for part, inputs in micro_batches(tokenizer, records, 3):
                labels = inputs.pop("labels")
                with capture.batch([r["id"] for r in part], **batch_options):
                    summed_token_loss(model(**inputs).logits, labels).backward()
                model.zero_grad()

    with pytest.raises(AttribIndexError, match="called without labels.*loss_scale=c"):
        run(tmp_path / "refused")
    assert not (tmp_path / "refused" / "manifest.json").exists()
    assert not model._forward_pre_hooks and not model._forward_hooks  # the refused capture left no hook behind

    run(tmp_path / "scaled", loss_scale=1.0)  # a plain sum: c = 1
    assert_rows_equal_builds(tmp_path / "scaled", {0: initial}, model, tokenizer, records, config, tmp_path)


def test_an_amp_loss_scale_is_read_from_the_gradient_reaching_the_loss(trainable, corpus_records, tmp_path):
    """torch.amp.GradScaler on CPU: the loop backpropagates scale × loss, the scale doubling after every step
    (1024, then 2048); each micro-batch's factor is read from the gradient reaching the model's loss."""
    model, tokenizer = trainable
    records, config = corpus_records[:6], exact_config("dot")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    weights, scales = {}, []
    with capture_training(model, tokenizer, tmp_path / "captured", config, optimizer=optimizer) as capture:
        for step, (part, inputs) in enumerate(micro_batches(tokenizer, records, 3)):
            weights[step] = copy.deepcopy(model.state_dict())
            scales.append(scaler.get_scale())
            with capture.batch([r["id"] for r in part], texts=[r["text"] for r in part]):
                scaler.scale(model(**inputs).loss).backward()
            scaler.step(optimizer)  # unscales the gradients, then steps: the capture's step hook fires
            scaler.update()
            optimizer.zero_grad()
    assert scales == [1024.0, 2048.0] and read_manifest(tmp_path / "captured").training.steps == 2
    assert_rows_equal_builds(tmp_path / "captured", weights, model, tokenizer, records, config, tmp_path)


def test_left_padding_gives_the_rows_of_a_build(trainable, corpus_records, tmp_path):
    """tokenizer.padding_side = "left", as a loop does it right: position ids counted from each row's first real
    token, and labels that ignore the padding and that first token (nothing before it predicts it). The texts are
    not given: the capture decodes each row's real tokens."""
    model, tokenizer = trainable
    tokenizer.padding_side = "left"
    words = (4, 2, 3, 2, 4, 3)  # 8 to 24 tokens: the rows of a batch differ in length
    records = [{"id": r["id"], "text": " ".join(r["text"].split()[:n])} for r, n in zip(corpus_records, words)]
    config = exact_config("dot", kind="kfac")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    weights = {}
    with capture_training(model, tokenizer, tmp_path / "captured", config, optimizer=optimizer) as capture:
        for step, (part, inputs) in enumerate(micro_batches(tokenizer, records, 3)):
            mask = inputs["attention_mask"]
            assert (mask[:, 0] == 0).any() and (mask[:, -1] == 1).all()  # padded, on the left
            inputs["position_ids"] = (mask.cumsum(dim=1) - 1).clamp_min(0)
            inputs["labels"][torch.arange(len(part)), mask.argmax(dim=1)] = -100  # each row's first real token
            weights[step] = copy.deepcopy(model.state_dict())
            with capture.batch([r["id"] for r in part]):
                model(**inputs).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert_rows_equal_builds(tmp_path / "captured", weights, model, tokenizer, records, config, tmp_path)
    index = AttributionIndex.open(tmp_path / "captured", load_model_now=False)
    texts = {d.id: d.text for d in index.store.documents(range(index.rows))}
    assert texts == {f"{r['id']}@{step}": r["text"] for step in range(2) for r in records[3 * step : 3 * step + 3]}
    trained = saved(model, tokenizer, tmp_path / "trained")
    built = {step: tmp_path / f"built-{step}" for step in range(2)}
    assert_scores_equal_builds(tmp_path / "captured", built, trained, config, "king", tmp_path)  # KFAC factors too


def test_a_label_predicted_from_left_padding_is_refused_and_leaves_no_index(trainable, corpus_records, tmp_path):
    """Left padding with each row's first real token labelled (as DataCollatorForLanguageModeling labels it): that
    token is predicted from a pad position, a loss term no build has, so the row could match no build."""
    model, tokenizer = trainable
    tokenizer.padding_side = "left"
    records = [{"id": r["id"], "text": " ".join(r["text"].split()[:n])} for r, n in zip(corpus_records, (4, 2, 3))]
    ((part, inputs),) = micro_batches(tokenizer, records, 3)
    ids = [r["id"] for r in part]
    refused = pytest.raises(AttribIndexError, match="predicted from a padding position.*-100.*pad on the right")
    captured = tmp_path / "captured"
    with refused, capture_training(model, tokenizer, captured, exact_config("dot")) as capture, capture.batch(ids):
        model(**inputs).loss.backward()
    assert not (captured / "manifest.json").exists()


def test_a_trainer_with_label_smoothing_is_refused_and_leaves_no_index(trainable, corpus_records, tmp_path):
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from attribindex import AttributionCallback

    model, tokenizer = trainable
    tokenized = Dataset.from_list(corpus_records[:6]).map(
        lambda r: tokenizer(r["text"], truncation=True, max_length=32)
    )
    dataset = tokenized.remove_columns(["id", "text"])
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=3,
        label_smoothing_factor=0.1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
    )
    callback = AttributionCallback(tmp_path / "captured", exact_config())
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(model, args, train_dataset=dataset, data_collator=collator, processing_class=tokenizer)
    trainer.add_callback(callback)
    with pytest.raises(AttribIndexError, match="label smoothing"):
        trainer.train()
    assert not (tmp_path / "captured" / "manifest.json").exists() and not model._forward_pre_hooks


def test_a_folder_with_another_index_and_gradient_checkpointing_are_refused(
    trainable, tiny_models, corpus_file, tmp_path
):
    model, tokenizer = trainable
    out = tmp_path / "built"
    build_index(exact_config(), str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(AttribIndexError, match="already holds an index. Pass `overwrite=True`"):
        TrainingCapture(model, tokenizer, out, exact_config())
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    model.activation_checkpointing_enable()
    with pytest.raises(AttribIndexError, match="gradient checkpointing"):
        TrainingCapture(model, tokenizer, tmp_path / "new", exact_config())
    assert not (tmp_path / "new").exists() and not model._forward_pre_hooks


def test_dataset_rows_find_batches_by_their_tokens_and_refuse_changed_ones(trainable):
    _, tokenizer = trainable
    dataset = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}, {"input_ids": [5, 6, 7]}]  # rows 0 and 2 alike
    rows = DatasetRows(dataset, tokenizer)
    batch = torch.tensor([[5, 6, 7], [8, 9, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert rows(*batch)[0] == ["0", "1"] and rows(*batch)[0] == ["2", "1"]  # twins are handed out in turn
    with pytest.raises(AttribIndexError, match="no row of the training dataset .* the collator changes the tokens"):
        rows(torch.tensor([[5, 6, 7, 1]]), torch.tensor([[1, 1, 1, 1]]))


def test_summed_rows_are_the_sum_of_an_examples_rows_over_its_steps(trainable, corpus_records, tmp_path):
    model, tokenizer = trainable
    initial = copy.deepcopy(model.state_dict())
    records, config = corpus_records[:6] * 2, exact_config("dot")  # two epochs, one step each
    train(model, tokenizer, records, tmp_path / "per-step", config)
    model.load_state_dict(initial)  # plain SGD: the same run again
    train(model, tokenizer, records, tmp_path / "summed", config, rows="summed")
    per_step, summed = rows_by_id(tmp_path / "per-step"), rows_by_id(tmp_path / "summed")
    assert sorted(summed) == sorted(r["id"] for r in corpus_records[:6])
    for example, row in summed.items():
        parts = [value for key, value in per_step.items() if key.rsplit("@", 1)[0] == example]
        assert len(parts) == 2
        np.testing.assert_allclose(row, parts[0] + parts[1], rtol=1e-5, atol=1e-7)
    training = read_manifest(tmp_path / "summed").training
    assert (training.rows, training.steps, training.gradients) == ("summed", 2, 12)

    # a normal index: append with the trained model (saved), verify, query
    model.save_pretrained(tmp_path / "trained")
    tokenizer.save_pretrained(tmp_path / "trained")
    more = write_jsonl(tmp_path / "more.jsonl", corpus_records[6:9])
    added = append_documents(tmp_path / "summed", more, id_field="id", model=str(tmp_path / "trained"), progress=False)
    assert added.added == 3 and verify_files(tmp_path / "summed", read_manifest(tmp_path / "summed")).ok
    index = AttributionIndex.open(tmp_path / "summed", model=str(tmp_path / "trained"))
    found = index.attribute(corpus_records[7]["text"], k=index.rows).results[0].top
    assert {a.id for a in found} == {r["id"] for r in corpus_records[:9]}  # the captured six and the appended three
    assert read_manifest(tmp_path / "summed").training.rows == "summed"  # the record survives the append


@pytest.fixture(scope="module")
def ddp_runs(tiny_models, corpus_records, tmp_path_factory) -> tuple[Path, Path]:
    """(corpus, folder): one real torchrun launch, 2 processes, gloo, running every scenario of
    `tests.train.ddp_training` in one process group, each into folder/<scenario>."""
    root = tmp_path_factory.mktemp("ddp")
    corpus = write_jsonl(root / "corpus.jsonl", corpus_records[:8])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command += ["-m", "tests.train.ddp_training", str(tiny_models["gpt2"]), str(corpus), str(root / "ddp")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr[-3000:]
    return corpus, root / "ddp"


@pytest.mark.parametrize("scenario", ["per_step", "summed", "accumulation"])
def test_ddp_capture_with_two_ranks_equals_one_process(scenario, ddp_runs, tiny_models, corpus_records, tmp_path):
    """2 epochs in which every example is trained on by both ranks: per_step rows go through each rank's shard and
    a merge, summed rows are added up on rank 0; with gradient accumulation (no_sync on the first micro-batch) the
    loss reaching the capture is scaled by 1/2 under DDP and by 1/4 in one process. The one-process run of the
    accumulation scenario is itself checked against builds at each step's weights."""
    from tests.train.ddp_training import train as train_ddp

    corpus, launched = ddp_runs
    weights = train_ddp(str(tiny_models["gpt2"]), corpus, tmp_path / "single", scenario)
    single, ddp = rows_by_id(tmp_path / "single"), rows_by_id(launched / scenario)
    assert sorted(ddp) == sorted(single) and len(ddp) == (8 if scenario == "summed" else 16)
    for key, row in single.items():
        np.testing.assert_allclose(ddp[key], row, rtol=1e-5, atol=1e-7)
    manifest = read_manifest(launched / scenario)
    assert (manifest.training.steps, manifest.training.gradients, manifest.rows) == (4, 16, len(single))
    assert not (launched / scenario / "shards").exists()  # merged, then removed
    if scenario == "accumulation":
        model, tokenizer = load_model(str(tiny_models["gpt2"]), dtype="float64", device="cpu")
        records = corpus_records[:8]
        assert_rows_equal_builds(
            tmp_path / "single", dict(enumerate(weights)), model, tokenizer, records, exact_config("dot"), tmp_path
        )


def test_a_lora_model_training_captures_its_adapter_rows(tiny_models, corpus_records, tmp_path):
    """A peft LoRA model whose adapters train (the base frozen): rows of the A and B matrices, as a build computes
    them from the adapter folder saved at each step."""
    from tests.logra.test_peft import make_adapter

    adapter = make_adapter(tiny_models["gpt2"], tmp_path / "adapter")
    model, tokenizer = load_model(str(adapter), dtype="float64", device="cpu")
    model.train()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    records, config = corpus_records[:12], exact_config("dot")
    weights, _ = train(model, tokenizer, records, tmp_path / "captured", config)
    names = [m.name for m in read_manifest(tmp_path / "captured").modules]
    assert len(names) == 8 and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert_rows_equal_builds(
        tmp_path / "captured", dict(enumerate(weights)), model, tokenizer, records, config, tmp_path
    )


def test_a_trainer_resumed_from_a_checkpoint_captures_no_row_twice_and_none_missing(
    tiny_models, corpus_records, tmp_path
):
    """Interrupted after the capture committed step 4 but before the Trainer wrote checkpoint-4 (the worst
    moment), training resumes from checkpoint-2: the capture goes back to its commit at 2 and ends with exactly
    the rows of an uninterrupted run. AdamW's second moments are folded in step by step: from the Trainer's own
    (wrapped) optimizer, then from the state it restores from checkpoint-2."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    from attribindex import AttributionCallback

    records, config = corpus_records[:12], exact_config("dot", kind="kfac")

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **_):
            if state.global_step == 4:
                raise KeyboardInterrupt("the machine went away")

    def run(run_dir, out, interrupt=False, resume=None):
        model, tokenizer = load_model(str(tiny_models["gpt2"]), dtype="float64", device="cpu")
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        dataset = Dataset.from_list(records).map(lambda r: tokenizer(r["text"], truncation=True, max_length=32))
        args = TrainingArguments(
            output_dir=str(run_dir),
            per_device_train_batch_size=2,
            num_train_epochs=1,
            learning_rate=1e-3,
            optim="adamw_torch",
            lr_scheduler_type="constant",
            use_cpu=True,
            report_to=[],
            save_strategy="steps",
            save_steps=2,
            logging_strategy="no",
            seed=0,
        )
        capture = AttributionCallback(
            out, config, dataset=dataset, id_field="id", text_field="text", fold_second_moments=True
        )
        callbacks = [capture, Interrupt()] if interrupt else [capture]
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
        trainer = Trainer(model, args, collator, dataset, processing_class=tokenizer, callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume)

    run(tmp_path / "whole-run", tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", tmp_path / "resumed", interrupt=True)
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    assert (tmp_path / "resumed" / "capture.step-000000004.safetensors").is_file()  # committed: the worst moment
    assert not (tmp_path / "run" / "checkpoint-4").exists() and (tmp_path / "run" / "checkpoint-2").is_dir()
    run(tmp_path / "run", tmp_path / "resumed", resume=str(tmp_path / "run" / "checkpoint-2"))

    whole, resumed = rows_by_id(tmp_path / "whole"), rows_by_id(tmp_path / "resumed")
    assert sorted(resumed) == sorted(whole) and len(whole) == 12  # none twice, none missing
    for key, row in whole.items():
        np.testing.assert_allclose(resumed[key], row, rtol=1e-6, atol=1e-9)
    manifest = read_manifest(tmp_path / "resumed")
    assert manifest.rows == manifest.training.gradients == 12 and manifest.log[0].resumed.rows == 4
    assert manifest.projection.optimizer["step"] == 6 and "step by step" in manifest.projection.optimizer["source"]
    assert not list((tmp_path / "resumed").glob("capture.step-*"))  # the commits go once the index is written


@pytest.mark.parametrize("rows", ["per_step", "summed"])
def test_a_loop_capture_resumes_from_its_commit(rows, trainable, corpus_records, tmp_path):
    """Two steps of 2 micro-batches; the loop commits at step 1 and is interrupted inside step 1; restarted from
    its step-1 weights with resume_step=1, the capture ends equal to an uninterrupted one."""
    model, tokenizer = trainable
    initial = copy.deepcopy(model.state_dict())
    records, config = corpus_records[:6] * 2, exact_config("dot")
    train(model, tokenizer, records, tmp_path / "whole", config, rows=rows)
    batches = list(micro_batches(tokenizer, records, 3))  # steps: [0, 1], [2, 3]

    def micro_batch(capture, number):
        part, inputs = batches[number]
        with capture.batch([r["id"] for r in part], texts=[r["text"] for r in part]):
            (model(**inputs).loss / 2).backward()

    model.load_state_dict(initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    out = tmp_path / "resumed"
    with (
        pytest.raises(KeyboardInterrupt),
        capture_training(model, tokenizer, out, config, optimizer=optimizer, rows=rows) as capture,
    ):
        micro_batch(capture, 0)
        micro_batch(capture, 1)
        optimizer.step()
        optimizer.zero_grad()
        capture.commit()  # the loop saves its checkpoint at step 1
        at_step_1 = copy.deepcopy(model.state_dict())
        micro_batch(capture, 2)
        raise KeyboardInterrupt
    with pytest.raises(AttribIndexError, match=r"committed steps \[1\] only"):
        TrainingCapture(model, tokenizer, out, config, rows=rows, resume_step=5)  # no checkpoint there
    model.load_state_dict(at_step_1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with capture_training(model, tokenizer, out, config, optimizer=optimizer, rows=rows, resume_step=1) as capture:
        micro_batch(capture, 2)
        micro_batch(capture, 3)
        optimizer.step()
    whole, resumed = rows_by_id(tmp_path / "whole"), rows_by_id(out)
    assert sorted(resumed) == sorted(whole) and read_manifest(out).rows == len(whole)
    for key, row in whole.items():
        np.testing.assert_allclose(resumed[key], row, rtol=1e-6, atol=1e-9)


def test_an_optimizer_state_in_the_config_is_folded_in_as_in_a_build(trainable, corpus_records, tmp_path):
    """Training that continues from an earlier run's AdamW state: the capture divides by that state's √v (folded
    into the projections) exactly as a build of the same config does."""
    model, tokenizer = trainable
    adam = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _, inputs in micro_batches(tokenizer, corpus_records[12:18], 3):  # the earlier run
        model(**inputs).loss.backward()
        adam.step()
        adam.zero_grad()
    torch.save(adam.state_dict(), tmp_path / "optimizer.pt")
    config = exact_config("dot", optimizer_state=str(tmp_path / "optimizer.pt"))
    records = corpus_records[:12]
    weights, _ = train(model, tokenizer, records, tmp_path / "captured", config)
    assert read_manifest(tmp_path / "captured").projection.optimizer["optimizer"] == "adam"
    assert_rows_equal_builds(
        tmp_path / "captured", dict(enumerate(weights)), model, tokenizer, records, config, tmp_path
    )


def test_the_live_optimizers_second_moments_are_folded_in_step_by_step(trainable, corpus_records, tmp_path):
    """AdamW, 3 steps of 2 micro-batches: the rows of step s equal a build at step s's weights with the optimizer
    state after max(s, 1) updates (the first step waits for its update: Adam has no v before it), and queries are
    folded with the state after the last update."""
    from attribindex.logra import save_named_second_moments

    model, tokenizer = trainable
    records = corpus_records[:18]
    config = exact_config("dot", kind="kfac")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    weights, moments = [], {}
    with capture_training(
        model, tokenizer, tmp_path / "captured", config, optimizer=optimizer, fold_second_moments=True
    ) as capture:
        for number, (part, inputs) in enumerate(micro_batches(tokenizer, records, 3)):
            if number % 2 == 0:
                weights.append(copy.deepcopy(model.state_dict()))
            with capture.batch([r["id"] for r in part], texts=[r["text"] for r in part]):
                (model(**inputs).loss / 2).backward()
            if number % 2 == 1:
                optimizer.step()
                optimizer.zero_grad()
                step = len(weights)
                moments[step] = save_named_second_moments(optimizer, model, tmp_path / f"moments-{step}.safetensors")
    assert capture.summary.rows == 18 and sorted(moments) == [1, 2, 3]
    for step, state in enumerate(weights):
        folded = exact_config("dot", kind="kfac", optimizer_state=str(moments[max(step, 1)]))
        (tmp_path / f"step-{step}").mkdir()
        assert_rows_equal_builds(
            tmp_path / "captured", {step: state}, model, tokenizer, records, folded, tmp_path / f"step-{step}"
        )
    record = read_manifest(tmp_path / "captured").projection
    assert record.optimizer["optimizer"] == "adam" and record.optimizer["step"] == 3
    assert read_manifest(tmp_path / "step-2" / "built-2").projection.hash != record.hash  # after update 2, not 3
    final = exact_config("dot", kind="kfac", optimizer_state=str(moments[3]))
    corpus = write_jsonl(tmp_path / "one.jsonl", records[:1])
    build_index(final, str(tmp_path / "step-2" / "model-2"), corpus, tmp_path / "final", id_field="id", progress=False)
    assert read_manifest(tmp_path / "final").projection.hash == record.hash  # queries: the state after update 3
    trained = saved(model, tokenizer, tmp_path / "trained")
    built = {step: tmp_path / f"step-{step}" / f"built-{step}" for step in range(3)}
    ranked = assert_scores_equal_builds(tmp_path / "captured", built, trained, final, "king", tmp_path)
    found = AttributionIndex.open(tmp_path / "captured", model=model, tokenizer=tokenizer).attribute("king", k=3)
    assert [a.id for a in found.results[0].top] == ranked[:3]
    with serving(tmp_path / "captured", model=str(tmp_path / "trained")) as url, Client(url) as client:
        served = client.attribute(["king"], k=3).results[0].top  # a captured index is served like any other
    assert [a.id for a in served] == [a.id for a in found.results[0].top]


def test_folding_second_moments_needs_an_optimizer_that_keeps_them(trainable, corpus_records, tmp_path):
    model, tokenizer = trainable
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    (part, inputs), *_ = micro_batches(tokenizer, corpus_records[:3], 3)
    with (
        pytest.raises(AttribIndexError, match="SGD holds no second moments.*keeps none.*without folding"),
        capture_training(
            model, tokenizer, tmp_path / "sgd", exact_config(), optimizer=optimizer, fold_second_moments=True
        ) as capture,
    ):
        with capture.batch([r["id"] for r in part]):
            model(**inputs).loss.backward()
        optimizer.step()
    assert not (tmp_path / "sgd" / "manifest.json").exists()
    with pytest.raises(AttribIndexError, match="choose one"):
        TrainingCapture(
            model,
            tokenizer,
            tmp_path / "both",
            exact_config(optimizer_state=str(tmp_path / "x.pt")),
            optimizer_moments=torch.optim.AdamW(model.parameters()),
        )
