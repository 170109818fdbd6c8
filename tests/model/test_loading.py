"""Model loading from local folders, fingerprints, and errors for bad paths."""

from __future__ import annotations

import pytest
import torch

from attribindex.errors import AttribIndexError
from attribindex.model import load_model, model_fingerprint


def test_fingerprint_is_stable_across_dtypes_and_changes_with_weights(tiny_models):
    model32, _ = load_model(str(tiny_models["gpt2"]), dtype="float32", device="cpu")
    model64, _ = load_model(str(tiny_models["gpt2"]), dtype="float64", device="cpu")
    assert model_fingerprint(model32) == model_fingerprint(model64)
    with torch.no_grad():
        model32.transformer.h[0].mlp.c_fc.weight[0, 0] += 1.0  # the first element is always sampled
    assert model_fingerprint(model32) != model_fingerprint(model64)
    other, _ = load_model(str(tiny_models["llama"]), device="cpu")
    assert model_fingerprint(other) != model_fingerprint(model64)


def test_missing_model_folder(tmp_path):
    with pytest.raises(AttribIndexError, match="does not exist or has no config.json"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(AttribIndexError, match="has no config.json"):
        load_model(str(tmp_path))


def test_tokenizer_has_pad_token(tiny_models):
    _, tokenizer = load_model(str(tiny_models["llama"]), device="cpu")
    assert tokenizer.pad_token_id is not None


def test_hub_id_without_network_is_a_clean_error():
    with pytest.raises(AttribIndexError, match="(?s)could not load model .someone/no-such-model.*hub ids need network"):
        load_model("someone/no-such-model")
