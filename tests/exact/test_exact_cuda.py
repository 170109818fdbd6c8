"""Exact, unprojected influence computed on a CUDA GPU equals the same computation on the CPU: every stored row's
score on each query (dot mode through the token-contracted path, cosine mode through rotated full gradients), a
re-rank, and a float32 query against the float64 truth.

Runs only where CUDA is (`tools/gpu_check.sh` runs it on a GPU machine); skipped elsewhere. The CPU side is the
reference: tests/exact and tests/pipeline/test_exact.py check it against dense references.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribindex import AttributionIndex, PromptCompletion

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

QUERIES = ["King queen crown sword love death night.", PromptCompletion("Father son daughter", " mother lord lady.")]
# Both sides compute in float64 and differ only in the order of their reductions (cuBLAS and CUDA kernels vs the CPU
# BLAS): float64 round-off, ~1e-13 of the largest score even through the damped inverse's conditioning (~1e3 here).
# 1e-9 of it keeps three orders of margin, and a float32 step anywhere on the GPU side (~1e-7) still fails.
FLOAT64_TOL = 1e-9
# float32 on the GPU against float64 on the CPU: the tolerance users get when they query in fp32 (issue 24 §1).
FLOAT32_TOL = 1e-3


def assert_close_to_scale(actual, expected, tol: float) -> None:
    """Equal to `tol` of the largest |expected| (entry by entry)."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * np.abs(expected).max())


def test_every_rows_exact_score_equals_the_cpus(exact_index_on_cpu_and_cuda):
    cpu, cuda = exact_index_on_cpu_and_cuda
    expected = cpu.exact_scores(QUERIES)  # (Q, rows), every live row in row order
    actual = cuda.exact_scores(QUERIES)
    assert expected.shape == (len(QUERIES), cpu.rows) and np.abs(expected).max() > 0
    assert_close_to_scale(actual, expected, FLOAT64_TOL)


def test_cosine_scores_from_rotated_gradients_equal_the_cpus(exact_index_on_cpu_and_cuda, corpus_records):
    """Cosine mode forms each example's full gradient in the eigenbasis (`RotatedGradients`), another route."""
    scores = []
    for index in exact_index_on_cpu_and_cuda:
        scorer = index.reranker.scorer
        examples = index.extractor.tokenize([r["text"] for r in corpus_records])
        scores.append(scorer.scores(scorer.prepare(index.extractor.tokenize(QUERIES)), examples, "cosine").numpy())
    expected, actual = scores
    assert np.abs(expected).max() <= 1 + 1e-12 and np.abs(expected).min() > 0  # cosines, none degenerate
    assert_close_to_scale(actual, expected, FLOAT64_TOL)


def test_a_rerank_of_every_row_ranks_and_scores_as_on_the_cpu(exact_index_on_cpu_and_cuda):
    """C = all rows: the GPU's bfloat16 first stage cannot change what is re-scored, so the answers must agree.
    Each returned row's score is that row's CPU score, and the i-th score is the CPU's i-th (near-ties may swap)."""
    cpu, cuda = exact_index_on_cpu_and_cuda
    truth = cpu.exact_scores(QUERIES)  # (Q, rows); column = row (no deleted rows)
    scale = np.abs(truth).max()
    expected = cpu.attribute(QUERIES, k=5, bottom=3, exact=cpu.rows)
    actual = cuda.attribute(QUERIES, k=5, bottom=3, exact=cpu.rows)
    assert actual.rerank is not None and actual.rerank.scored == expected.rerank.scored == cpu.rows
    for q, (got, want) in enumerate(zip(actual.results, expected.results)):
        for side in ("top", "bottom"):
            got_side, want_side = getattr(got, side), getattr(want, side)
            assert len(got_side) == len(want_side) == (5 if side == "top" else 3)
            own = [truth[q, a.row] for a in got_side]
            np.testing.assert_allclose([a.score for a in got_side], own, rtol=0, atol=FLOAT64_TOL * scale)
            np.testing.assert_allclose(own, [a.score for a in want_side], rtol=0, atol=FLOAT64_TOL * scale)


def test_a_float32_query_on_the_gpu_stays_within_1e3_of_float64(exact_index, exact_index_on_cpu_and_cuda):
    cpu, _ = exact_index_on_cpu_and_cuda
    fp32 = AttributionIndex.open(exact_index, device="cuda", dtype="float32")
    assert fp32.extractor.dtype == torch.float32 and next(fp32.extractor.model.parameters()).dtype == torch.float32
    expected = cpu.exact_scores(QUERIES)
    actual = fp32.exact_scores(QUERIES)
    assert_close_to_scale(actual, expected, FLOAT32_TOL)
    scale = np.abs(expected).max()
    for q in range(len(QUERIES)):  # same top-5, except rows whose float64 scores are within the tolerance
        ranked = np.sort(expected[q])[::-1]
        found = np.argsort(-actual[q], kind="stable")[:5]
        np.testing.assert_allclose(expected[q, found], ranked[:5], rtol=0, atol=2 * FLOAT32_TOL * scale)
