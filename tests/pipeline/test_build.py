"""Build-level equivalences and failure safety."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from attribindex import AttribIndexError, AttributionIndex, build_index
from attribindex.store import ChunkWriter, layout, read_manifest
from tests.conftest import exact_config


def _raw_rows(path) -> np.ndarray:
    index = AttributionIndex.open(path, load_model_now=False)
    return np.concatenate([raw.numpy() for _, raw in index.store.iter_raw()])


def test_batch_size_does_not_change_the_index(tiny_models, corpus_file, corpus_records, tmp_path):
    """Documents of varied lengths are regrouped by length for speed; rows still follow the corpus."""
    config = exact_config()
    for name, batch_size in (("b1", 1), ("b7", 7)):
        extract = dataclasses.replace(config.extract, batch_size=batch_size, max_length=128)
        cfg = dataclasses.replace(config, extract=extract)
        build_index(cfg, str(tiny_models["gpt2"]), corpus_file, tmp_path / name, id_field="id", progress=False)
    manifest = read_manifest(tmp_path / "b7")
    assert manifest.corpus.truncated < 12  # most lengths differ, so length-batching really reorders
    np.testing.assert_allclose(_raw_rows(tmp_path / "b1"), _raw_rows(tmp_path / "b7"), rtol=1e-6, atol=1e-9)
    assert manifest.projection.hash == read_manifest(tmp_path / "b1").projection.hash
    store = AttributionIndex.open(tmp_path / "b7", load_model_now=False).store
    assert [d.id for d in store.documents(list(range(24)))] == [r["id"] for r in corpus_records]


def test_interrupted_build_never_looks_complete(tiny_models, corpus_file, tmp_path, monkeypatch):
    original = ChunkWriter.flush
    calls = []

    def failing_flush(self):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash while writing chunk 2")
        return original(self)

    monkeypatch.setattr(ChunkWriter, "flush", failing_flush)
    out = tmp_path / "idx"
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_index(exact_config(), str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
    assert not layout.is_index_dir(out)
    with pytest.raises(AttribIndexError, match="incomplete build"):
        AttributionIndex.open(out, load_model_now=False)
    monkeypatch.setattr(ChunkWriter, "flush", original)
    summary = build_index(exact_config(), str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
    assert summary.resumed_rows == 10 and read_manifest(out).rows == 24  # the same command resumes
    assert [e.event for e in read_manifest(out).log] == ["build"] and read_manifest(out).log[0].resumed is not None


def test_manifest_records_what_built_the_index(tiny_models, corpus_file, corpus_records, tmp_path):
    summary = build_index(
        exact_config("cosine"), str(tiny_models["llama"]), corpus_file, tmp_path / "i", progress=False
    )
    manifest = read_manifest(tmp_path / "i")
    assert manifest.format_version == layout.FORMAT_VERSION
    assert manifest.rows == summary.rows == 24
    assert manifest.normalization == "cosine" and manifest.hessian.damping == 0.1
    assert manifest.model.fingerprint.startswith("sha256:")
    assert sum(m.dim for m in manifest.modules) == manifest.dim == 14 * 12
    assert len(manifest.store.chunks) == 3  # 24 rows in chunks of 10
    assert not (tmp_path / "i" / layout.BUILD_MARKER).exists()
    assert "rows" in summary.format()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    lengths = [len(tokenizer(r["text"])["input_ids"]) for r in corpus_records]
    assert manifest.corpus.truncated == summary.truncated == sum(n > 32 for n in lengths)
    assert manifest.corpus.tokens == summary.tokens == sum(min(n, 32) for n in lengths)


@pytest.mark.parametrize(
    ("dtype", "kind", "damping", "warned"),
    [("bfloat16", "raw", 0.01, True), ("bfloat16", "raw", 0.1, False), ("float16", "raw", 0.01, False)],
)
def test_a_bfloat16_store_under_small_raw_damping_is_warned_about(dtype, kind, damping, warned, tmp_path, recwarn):
    config = exact_config()
    config = dataclasses.replace(
        config,
        store=dataclasses.replace(config.store, dtype=dtype),
        hessian=dataclasses.replace(config.hessian, kind=kind, damping=damping),
    )
    with pytest.raises(AttribIndexError):  # the warning comes before the corpus is opened
        build_index(config, "no-model", tmp_path / "missing.jsonl", tmp_path / "idx", progress=False)
    messages = [str(w.message) for w in recwarn if issubclass(w.category, UserWarning)]
    assert any("store.dtype: float16" in m for m in messages) == warned
