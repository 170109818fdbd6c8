"""Rows captured from a training loop that runs on a CUDA GPU equal the rows `build_index` computes on the CPU at
each step's weights: SGD with gradient accumulation, right padding and an example whose labels are all ignored; and
AdamW with its live second moments (then held on the GPU) folded into each step's rows.

Runs only where CUDA is (`tools/gpu_check.sh` runs it on a GPU machine); skipped elsewhere. The reference is a float64
build on the CPU from a saved copy of the step's weights, through the build's own loss (not the training loop's).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from attribindex.logra import save_named_second_moments
from attribindex.model import load_model
from attribindex.store import read_manifest
from attribindex.train import capture_training
from tests.conftest import exact_config
from tests.train.test_capture import assert_rows_equal_builds

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def micro_batches(tokenizer, records: list[dict], size: int, ignored: frozenset[str] = frozenset()):
    """(records, model inputs on the GPU) per micro-batch: right-padded, padding's labels ignored, and every label of
    the records whose ids are in `ignored`."""
    for start in range(0, len(records), size):
        part = records[start : start + size]
        inputs = tokenizer([r["text"] for r in part], padding=True, truncation=True, max_length=32, return_tensors="pt")
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        for b, record in enumerate(part):
            if record["id"] in ignored:
                labels[b] = -100
        inputs["labels"] = labels
        yield part, {name: tensor.to("cuda") for name, tensor in inputs.items()}


def train_on_gpu(model, tokenizer, records, out, config, optimizer, ignored=frozenset(), **options):
    """Steps of 2 micro-batches of 3 (the loss divided by 2), capturing; the weights each step trained at, and the
    second moments saved after each update when the optimizer keeps them ({updates: file})."""
    weights, moments = [], {}
    with capture_training(model, tokenizer, out, config, optimizer=optimizer, **options) as capture:
        for number, (part, inputs) in enumerate(micro_batches(tokenizer, records, 3, ignored)):
            if number % 2 == 0:
                weights.append(copy.deepcopy(model.state_dict()))
            with capture.batch([r["id"] for r in part], texts=[r["text"] for r in part]):
                (model(**inputs).loss / 2).backward()
            if number % 2 == 1:
                optimizer.step()
                optimizer.zero_grad()
                if options.get("fold_second_moments"):
                    path = Path(out).parent / f"moments-{len(weights)}.safetensors"
                    moments[len(weights)] = save_named_second_moments(optimizer, model, path)
    return weights, moments, capture


@pytest.fixture
def gpu_model(tiny_models):
    model, tokenizer = load_model(str(tiny_models["gpt2"]), dtype="float64", device="cuda")
    assert next(model.parameters()).is_cuda
    return model.train().requires_grad_(True), tokenizer


def test_sgd_rows_captured_on_the_gpu_equal_cpu_builds(gpu_model, corpus_records, tmp_path):
    model, tokenizer = gpu_model
    records = corpus_records[:12]
    ignored = frozenset({records[4]["id"]})  # all its labels are -100: trained on nothing, so no row
    config = exact_config("dot", kind="kfac")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    weights, _, capture = train_on_gpu(model, tokenizer, records, tmp_path / "captured", config, optimizer, ignored)
    assert not torch.allclose(weights[0]["lm_head.weight"], weights[1]["lm_head.weight"])  # the weights did change
    captured = assert_rows_equal_builds(
        tmp_path / "captured", dict(enumerate(weights)), model, tokenizer, records, config, tmp_path
    )
    expected = {f"{r['id']}@{n // 6}" for n, r in enumerate(records) if r["id"] not in ignored}
    assert set(captured) == expected and capture.summary.rows == 11


def test_adamw_second_moments_on_the_gpu_are_folded_in_as_a_cpu_build_does(gpu_model, corpus_records, tmp_path):
    """3 steps: the rows of step s equal a CPU build with the optimizer state after max(s, 1) updates."""
    model, tokenizer = gpu_model
    records = corpus_records[:18]
    config = exact_config("dot", kind="kfac")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    weights, moments, capture = train_on_gpu(
        model, tokenizer, records, tmp_path / "captured", config, optimizer, fold_second_moments=True
    )
    assert capture.summary.rows == 18 and sorted(moments) == [1, 2, 3]
    assert all(state["exp_avg_sq"].is_cuda for state in optimizer.state.values())  # what was folded lived on the GPU
    for step, state in enumerate(weights):
        folded = exact_config("dot", kind="kfac", optimizer_state=str(moments[max(step, 1)]))
        assert_rows_equal_builds(
            tmp_path / "captured", {step: state}, model, tokenizer, records, folded, tmp_path / f"step-{step}"
        )
    record = read_manifest(tmp_path / "captured").projection
    assert record.optimizer["optimizer"] == "adam" and record.optimizer["step"] == 3
