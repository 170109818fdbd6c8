"""An index built with the training optimizer's state holds P_out (G ⊘ √v̂) P_inᵀ: gradients divided by the
optimizer's own second-moment estimate before projection, folded into the projections."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM
from transformers.optimization import Adafactor

from attribindex import AttribIndexError, AttributionIndex, build_index
from attribindex.cli import main
from attribindex.logra import ProjectionSet
from attribindex.model import load_model
from attribindex.store import read_manifest
from tests.conftest import exact_config
from tests.reference import explicit_projected_gradients


def _trained_state(model_path, tmp_path, optimizer_name: str):
    """A few real training steps of the tiny GPT-2; returns the saved optimizer.pt and the live optimizer."""
    model = AutoModelForCausalLM.from_pretrained(model_path)
    if optimizer_name == "adafactor":
        optimizer = Adafactor(model.parameters(), lr=1e-3, scale_parameter=False, relative_step=False)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, model.config.vocab_size, (4, 12))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path / f"{optimizer_name}.pt"
    torch.save(optimizer.state_dict(), path)
    return path, optimizer, model


def _config(state_path, bias: bool = True):
    config = exact_config()
    return dataclasses.replace(
        config, projection=dataclasses.replace(config.projection, optimizer_state=str(state_path), bias=bias)
    )


def test_adafactor_state_divides_gradients_by_its_own_preconditioner(
    tiny_models, corpus_file, corpus_records, tmp_path
):
    state_path, optimizer, trained = _trained_state(tiny_models["gpt2"], tmp_path, "adafactor")
    model, tokenizer = load_model(str(tiny_models["gpt2"]), dtype="float64", device="cpu")
    texts = [r["text"] for r in corpus_records[:6]]
    # Reference: full autograd gradients times Adafactor's own 1/√v̂ (transformers' code), then the plain projections.
    names = {p: n for n, p in trained.named_parameters()}
    applied = {
        names[p].removesuffix(".weight"): Adafactor._approx_sq_grad(s["exp_avg_sq_row"], s["exp_avg_sq_col"])
        for p, s in optimizer.state.items()
        if "exp_avg_sq_row" in s
    }
    for bias in (False, True):
        out = tmp_path / f"idx-bias-{bias}"
        build_index(
            _config(state_path, bias), str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False
        )
        index = AttributionIndex.open(out, load_model_now=False)
        record = read_manifest(out).projection.optimizer
        assert record["optimizer"] == "adafactor" and (record["relative_error"] > 0) == bias
        multipliers = dict(applied)
        if bias:  # a bias is one more input column of the factorisation: mean g² = mean(v_bias)
            modules = dict(trained.named_modules())
            for spec in index.projections.modules:
                assert spec.kind == "conv1d"  # (in, out): the input side is row / mean(row), the output side col
                weight_state = optimizer.state[modules[spec.name].weight]
                row, col = weight_state["exp_avg_sq_row"].double(), weight_state["exp_avg_sq_col"].double()
                bias_mean = optimizer.state[modules[spec.name].bias]["exp_avg_sq"].double().mean()
                multipliers[spec.name + ".bias"] = (bias_mean / row.mean()).rsqrt() * col.rsqrt()
        plain = ProjectionSet.generate(index.projections.modules, seed=0, rank_in=3, rank_out=4)
        expected = explicit_projected_gradients(model, tokenizer, texts, plain, max_length=32, multipliers=multipliers)
        stored = torch.cat([raw for _, raw in index.store.iter_raw()])[:6].double()
        # The folded projections are float32 products P·diag(scale): round-off is relative to the largest entries.
        torch.testing.assert_close(stored, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
        uncorrected = explicit_projected_gradients(model, tokenizer, texts, plain, max_length=32)
        assert not torch.allclose(stored, uncorrected, rtol=1e-2)  # the correction really changed the rows


def test_adam_state_is_recorded_with_its_approximation_error_and_the_cli_accepts_it(tiny_models, corpus_file, tmp_path):
    state_path, _, _ = _trained_state(tiny_models["gpt2"], tmp_path, "adamw")
    checkpoint = tmp_path / "checkpoint-3"  # the folder a trainer writes: the optimizer file is found in it
    checkpoint.mkdir()
    state_path.rename(checkpoint / "optimizer.pt")
    state_path = checkpoint
    out = tmp_path / "idx"
    args = ["build", "--config", "tiny", "--model", str(tiny_models["gpt2"]), "--data", str(corpus_file)]
    result = CliRunner().invoke(
        main, [*args, "--out", str(out), "--id-field", "id", "--optimizer-state", str(state_path), "--hessian", "ekfac"]
    )
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    record = manifest.projection.optimizer
    assert record["optimizer"] == "adam" and 0 < record["relative_error"] < 1 and record["step"] == 3
    assert manifest.hessian.kind == "ekfac"
    index = AttributionIndex.open(out)
    best = index.attribute(index.store.documents([3])[0].text, k=1).results[0].top[0]
    assert best.row == 3 and np.isfinite(best.score)  # queries use the corrected projections saved with the index


def test_an_optimizer_state_of_another_model_is_refused_before_any_work(tiny_models, corpus_file, tmp_path):
    state_path, _, _ = _trained_state(tiny_models["llama"], tmp_path, "adamw")
    with pytest.raises(AttribIndexError, match="Fix"):
        build_index(_config(state_path), str(tiny_models["gpt2"]), corpus_file, tmp_path / "idx", progress=False)
    assert not (tmp_path / "idx" / "rows").exists()
