"""PEFT LoRA models: an adapter folder works wherever a model does; rows of the adapters (or of the frozen base
layers under them) equal projected autograd gradients; the fingerprint covers the adapter."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from attribindex import AttribIndexError, AttributionIndex, IndexMismatchError, append_documents, build_index
from attribindex.model import load_model, model_fingerprint
from attribindex.serve import Client
from attribindex.testing import serving, write_jsonl
from tests.conftest import exact_config
from tests.reference import explicit_projected_gradients


def make_adapter(base, out, seed: int = 0):
    """A LoRA adapter (rank 2 on GPT-2's c_attn and c_fc, B not zero) saved in peft's folder convention."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_model(str(base), dtype="float32", device="cpu")
    torch.manual_seed(seed)
    config = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,
        lora_dropout=0.0,
        init_lora_weights=False,  # B ≠ 0, or the A matrices would get no gradient
    )
    adapted = get_peft_model(model, config)
    adapted.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter(tiny_models, tmp_path_factory):
    return make_adapter(tiny_models["gpt2"], tmp_path_factory.mktemp("adapter") / "lora")


def rows_of(path) -> np.ndarray:
    index = AttributionIndex.open(path, load_model_now=False)
    return np.concatenate([raw.numpy() for _, raw in index.store.iter_raw()])


@pytest.mark.parametrize("lora", ["adapters", "base"])
def test_rows_equal_projected_autograd_gradients_of_the_chosen_layers(lora, adapter, corpus_records, tmp_path):
    records = corpus_records[:6]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", records)
    config = exact_config("dot", lora=lora)
    build_index(config, str(adapter), corpus, tmp_path / "idx", id_field="id", progress=False)
    index = AttributionIndex.open(tmp_path / "idx", device="cpu")  # the manifest names the adapter folder
    names = [m.name for m in index.manifest.modules]
    if lora == "adapters":
        assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    else:
        assert names and all(n.endswith(".base_layer") for n in names)
    assert len(names) == (8 if lora == "adapters" else 4)  # 2 blocks × (c_attn, c_fc) × (A, B), or the 4 bases
    model, tokenizer = load_model(str(adapter), dtype="float64", device="cpu")
    expected = explicit_projected_gradients(model, tokenizer, [r["text"] for r in records], index.projections, 32)
    np.testing.assert_allclose(rows_of(tmp_path / "idx"), expected.numpy(), rtol=1e-6, atol=1e-9)


def test_the_fingerprint_covers_the_adapter_and_queries_and_appends_use_it(
    adapter, tiny_models, corpus_records, tmp_path
):
    other = make_adapter(tiny_models["gpt2"], tmp_path / "other", seed=1)
    fingerprints = {model_fingerprint(load_model(str(p), device="cpu")[0]) for p in (adapter, other)}
    assert len(fingerprints) == 2
    corpus = write_jsonl(tmp_path / "corpus.jsonl", corpus_records[:8])
    build_index(exact_config("cosine"), str(adapter), corpus, tmp_path / "idx", id_field="id", progress=False)
    with pytest.raises(IndexMismatchError, match="another checkpoint"):
        AttributionIndex.open(tmp_path / "idx", model=str(other))
    found = AttributionIndex.open(tmp_path / "idx").attribute(corpus_records[0]["text"], k=1).results[0]
    assert found.top[0].id == corpus_records[0]["id"]  # an example is its own nearest (cosine)
    more = write_jsonl(tmp_path / "more.jsonl", corpus_records[8:10])
    assert append_documents(tmp_path / "idx", more, id_field="id", progress=False).added == 2


def test_a_broken_adapter_folder_is_refused_with_the_fix(adapter, tmp_path, corpus_file):
    moved = tmp_path / "moved"
    shutil.copytree(adapter, moved)
    settings = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps(settings | {"base_model_name_or_path": "/nowhere/base"}))
    with pytest.raises(AttribIndexError, match="base model of adapter .* Fix base_model_name_or_path"):
        build_index(exact_config(), str(moved), corpus_file, tmp_path / "a", progress=False)
    assert not (tmp_path / "a" / "manifest.json").exists()
    missing = tmp_path / "missing"
    shutil.copytree(adapter, missing)
    (missing / "adapter_model.safetensors").unlink()
    with pytest.raises(AttribIndexError, match="adapter in .* could not be loaded"):
        build_index(exact_config(), str(missing), corpus_file, tmp_path / "b", progress=False)


def test_the_cli_plans_builds_queries_and_serves_an_adapter_folder(adapter, corpus_file, tmp_path):
    from click.testing import CliRunner

    from attribindex.cli import main

    out = str(tmp_path / "idx")
    common = ["--config", "tiny", "--model", str(adapter), "--data", str(corpus_file), "--id-field", "id"]
    planned = CliRunner().invoke(main, ["plan", *common, "--json", "--probe-batches", "1"])
    assert planned.exit_code == 0, planned.output
    built = CliRunner().invoke(main, ["build", *common, "--out", out])
    assert built.exit_code == 0, built.output
    manifest = AttributionIndex.open(out, load_model_now=False).manifest
    plan = json.loads(planned.stdout)
    assert [m["name"] for m in plan["modules"]] == [m.name for m in manifest.modules]  # the adapters' A and B
    assert all(".lora_" in m.name for m in manifest.modules) and plan["dim"] == manifest.dim

    answer = CliRunner().invoke(main, ["query", out, "--text", "king queen crown", "-k", "2", "--json"])
    assert answer.exit_code == 0, answer.output
    top = [a["id"] for a in json.loads(answer.output)["results"][0]["top"]]
    assert len(top) == 2
    with serving(out) as url, Client(url) as client:  # the server loads the adapter named in the manifest
        served = client.attribute(["king queen crown"], k=2).results[0].top
    assert [a.id for a in served] == top
