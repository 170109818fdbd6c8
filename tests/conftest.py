"""Shared fixtures: tiny real HF models (GPT-2 with Conv1D, Llama with Linear) and tiny corpora,
all created locally; nothing is downloaded."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from attribindex.config import (
    BuildConfig,
    ExactConfig,
    ExtractConfig,
    HessianConfig,
    IndexConfig,
    ProjectionConfig,
    StoreConfig,
)
from attribindex.testing import make_tiny_model, tiny_corpus, write_jsonl

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def corpus_records() -> list[dict]:
    return tiny_corpus(24, seed=1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, corpus_records) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    texts = [r["text"] for r in tiny_corpus(200)]
    return {arch: make_tiny_model(root / arch, arch=arch, texts=texts, hidden=16) for arch in ("gpt2", "llama")}


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, corpus_records) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", corpus_records)


@pytest.fixture(scope="session")
def exact_index(tiny_models, corpus_file, tmp_path_factory) -> Path:
    """A read-only index with the `exact` section (EK-FAC, 16 of the 24 documents in its correction sample)."""
    from attribindex import build_index

    out = tmp_path_factory.mktemp("exact-index") / "idx"
    build_index(exact_section_config(), str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
    return out


def exact_section_config(mode: str = "dot", kind: str = "ekfac", batch_size: int = 4, **exact) -> BuildConfig:
    """`exact_config(mode)` plus the `exact` section (unprojected `kind`, correction sample 16 unless given)."""
    config = exact_config(mode)
    return dataclasses.replace(
        config,
        extract=dataclasses.replace(config.extract, batch_size=batch_size),
        exact=ExactConfig(enabled=True, kind=kind, **({"sample": 16} | exact)),
    )


def exact_config(mode: str = "dot", kind: str = "raw", **projection) -> BuildConfig:
    """Float64 compute and float32 storage: the build is exact up to fp32 round-off of the stored vectors."""
    return BuildConfig(
        projection=ProjectionConfig(**({"rank_in": 3, "rank_out": 4} | projection)),
        hessian=HessianConfig(kind=kind, damping=0.1),
        extract=ExtractConfig(batch_size=4, max_length=32, dtype="float64", device="cpu"),
        store=StoreConfig(dtype="float32", chunk_rows=10),
        index=IndexConfig(mode=mode, device="cpu"),
    )


def with_store(config: BuildConfig, **store) -> BuildConfig:
    return dataclasses.replace(config, store=dataclasses.replace(config.store, **store))
