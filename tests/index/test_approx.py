"""Approximate segments: parameters derived from N and d, the MIPS→L2 augmentation, reproducible training,
deleted rows, and exact re-ranking against brute force."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from attribindex.config import IndexConfig
from attribindex.errors import AttribIndexError
from attribindex.index import ApproximateIndex, SegmentPlan, build_segment, default_nlist, rerank
from attribindex.index._approx import training_rows


def gradient_like(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """Low-rank directions with noise, scaled by heavy-tailed (log-normal) norms, like whitened gradients."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((16, dim))
    x = rng.standard_normal((rows, 16)) @ basis + 0.3 * rng.standard_normal((rows, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return (x * rng.lognormal(0.0, 1.0, (rows, 1))).astype(np.float32)


def build(tmp_path, vectors, mode="dot", name="segment.faiss", **config) -> ApproximateIndex:
    plan = SegmentPlan.resolve(IndexConfig(mode=mode, **config), mode, len(vectors), vectors.shape[1])
    blocks = lambda: (vectors[i : i + 500] for i in range(0, len(vectors), 500))  # noqa: E731
    record = build_segment(tmp_path / name, plan, len(vectors), blocks, lambda rows: vectors[rows], progress=False)
    return ApproximateIndex.load(tmp_path / name, record)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def true_top(vectors, queries, k):
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]


def test_defaults_follow_the_size_and_dimension():
    assert [default_nlist(n) for n in (1, 100, 4_000, 1_000_000, 10_000_000)] == [1, 2, 64, 1024, 4096]
    plan = SegmentPlan.resolve(IndexConfig(kind="ivf_flat", mips="augment"), "dot", 1_000_000, 255)
    assert (plan.nlist, plan.nprobe, plan.index_dim, plan.metric) == (1024, 64, 256, "l2_augmented")
    plan = SegmentPlan.resolve(IndexConfig(kind="ivf_pq"), "dot", 1_000_000, 255)
    assert (plan.pq_m, plan.index_dim, plan.metric) == (64, 256, "inner_product")
    assert plan.train_rows == 1024 * 64 and plan.factory == "IVF1024,PQ64"
    cosine = SegmentPlan.resolve(IndexConfig(kind="ivf_flat", nlist=8, nprobe=2), "cosine", 1_000, 64)
    assert (cosine.metric, cosine.index_dim, cosine.factory, cosine.nprobe) == ("inner_product", 64, "IVF8,Flat", 2)
    small_pq = SegmentPlan.resolve(IndexConfig(kind="ivf_pq"), "cosine", 1_000, 64)  # too few rows for 256 codes
    assert small_pq.pq_bits == 4 and small_pq.factory == "IVF25,PQ16x4"  # 32 cells capped at 1000 / 39
    with pytest.raises(AttribIndexError, match="mips=augment needs kind ivf_flat"):
        IndexConfig(kind="hnsw", mips="augment")
    assert SegmentPlan.resolve(IndexConfig(kind="flat", storage="bfloat16"), "dot", 10, 4).factory == "SQbf16"
    assert SegmentPlan.resolve(IndexConfig(kind="hnsw", hnsw_m=16), "dot", 10, 4).factory == "HNSW16"


@pytest.mark.parametrize("mode,mips", [("dot", "augment"), ("dot", "inner_product"), ("cosine", "augment")])
def test_full_probe_ivf_flat_is_exact(tmp_path, mode, mips):
    """Scanning every cell of IVF-Flat visits every vector: the top-k and the inner products must be exact,
    which checks the augmentation and the distance → inner-product conversion."""
    vectors = gradient_like(2_000, 24)
    if mode == "cosine":
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = gradient_like(20, 24, seed=1)
    segment = build(tmp_path, vectors, mode, kind="ivf_flat", nlist=16, nprobe=16, mips=mips)
    scores, rows = segment.candidates(queries, 10)
    truth = true_top(vectors, queries, 10)
    assert recall(rows, truth) == 1.0
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, rows, axis=1), rtol=1e-4, atol=1e-3)
    assert segment.plan.metric == ("l2_augmented" if (mode, mips) == ("dot", "augment") else "inner_product")
    if segment.plan.metric == "l2_augmented":
        assert segment._augment.max_norm >= np.linalg.norm(vectors, axis=1).max()


@pytest.mark.parametrize("kind,least", [("ivf_sq8", 0.9), ("ivf_pq", 0.85), ("hnsw", 0.9)])
def test_each_kind_with_rerank_reaches_high_recall(tmp_path, kind, least):
    vectors, queries = gradient_like(10_000, 32), gradient_like(50, 32, seed=1)  # enough rows for 8-bit PQ codes
    truth = true_top(vectors, queries, 10)
    segment = build(tmp_path, vectors, "dot", kind=kind, nlist=32, nprobe=16)
    assert segment.plan.metric == "inner_product"
    _, candidates = segment.candidates(queries, 40)
    scores, rows = rerank(queries, candidates, lambda r: vectors[r], 10)
    assert recall(rows, truth) >= least  # measured: 0.98 (SQ8), 0.89 (PQ, 4 dims per code), 1.0 (HNSW)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, rows, axis=1), rtol=1e-5)


def test_float16_flat_storage_is_exhaustive(tmp_path):
    vectors, queries = gradient_like(1_000, 16), gradient_like(10, 16, seed=1)
    segment = build(tmp_path, vectors, "dot", kind="flat", storage="float16")
    scores, rows = segment.candidates(queries, 10)
    assert recall(rows, true_top(vectors, queries, 10)) >= 0.98
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, rows, axis=1), rtol=2e-3, atol=2e-3)


def test_the_same_seed_gives_the_same_index(tmp_path):
    vectors = gradient_like(3_000, 16)

    def digest(name, seed):
        build(tmp_path, vectors, "dot", name, kind="ivf_pq", nlist=16, seed=seed)
        return hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()

    assert digest("a.faiss", 0) == digest("b.faiss", 0)
    assert digest("c.faiss", 1) != digest("a.faiss", 0)
    plan = SegmentPlan.resolve(IndexConfig(kind="ivf_flat", nlist=10, train_per_centroid=39), "dot", 3_000, 16)
    sample = training_rows(plan, 3_000)
    assert len(sample) == 390 and len(np.unique(sample)) == 390 and np.all(np.diff(sample) > 0)


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_pq", "hnsw", "flat"])
def test_excluded_rows_never_come_back(tmp_path, kind):
    vectors, queries = gradient_like(600, 16), gradient_like(5, 16, seed=1)
    extra = {"storage": "float16"} if kind == "flat" else {"nlist": 8, "nprobe": 8}
    segment = build(tmp_path, vectors, "dot", kind=kind, **extra)
    excluded = np.unique(true_top(vectors, queries, 5))  # the rows every query wants most
    segment.exclude(excluded)
    _, rows = segment.candidates(queries, 600)
    assert not np.isin(rows, excluded).any()
    assert (rows >= 0).sum(axis=1).max() <= 600 - len(excluded)


def test_rerank_handles_missing_candidates_and_tiles():
    rng = np.random.default_rng(0)
    vectors, queries = rng.standard_normal((50, 8)).astype(np.float32), rng.standard_normal((7, 8)).astype(np.float32)
    candidates = np.array([rng.permutation(50)[:6] for _ in range(7)])
    candidates[0, 2:] = -1  # only two candidates: the rest of the top-4 stays empty
    scores, rows = rerank(queries, candidates, lambda r: vectors[r], 4, max_bytes=64)  # one query per tile
    for q in range(7):
        valid = candidates[q][candidates[q] >= 0]
        best = valid[np.argsort(-(vectors[valid] @ queries[q]), kind="stable")][:4]
        assert rows[q][: len(best)].tolist() == best.tolist()
        np.testing.assert_allclose(scores[q][: len(best)], vectors[best] @ queries[q], rtol=1e-6)
    assert rows[0, 2:].tolist() == [-1, -1] and np.isneginf(scores[0, 2:]).all()
