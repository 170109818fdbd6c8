"""Per-token explanations computed with the model on a CUDA GPU equal those computed on the CPU: the same tokens and
spans, the same score and the same contribution for every token of the example and of the query, projected and
exact.

Runs only where CUDA is (`tools/gpu_check.sh` runs it on a GPU machine); skipped elsewhere. The CPU side is the
reference: tests/query/test_explain.py checks it against autograd token by token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribindex import PromptCompletion

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

QUERIES = ["King queen crown sword love death night.", PromptCompletion("Father son daughter", " mother lord lady.")]
# float64 on both sides, reductions in another order on the GPU: ~1e-13 of the largest score. 1e-9 of it (also per
# token, so a token carrying little is not held to a relative bound it cannot meet) keeps three orders of margin, and
# a float32 step anywhere on the GPU side (~1e-7) still fails.
FLOAT64_TOL = 1e-9


def spans(tokens) -> list[tuple[str, str, int, int]]:
    """What a token list says apart from the numbers: (token, text, start, end) of each."""
    return [(t.token, t.text, t.start, t.end) for t in tokens]


@pytest.mark.parametrize("exact", [False, True], ids=["projected", "exact"])
@pytest.mark.parametrize("query", QUERIES, ids=["text", "prompt-completion"])
def test_token_contributions_on_the_gpu_equal_the_cpus(exact_index_on_cpu_and_cuda, corpus_records, query, exact):
    cpu, cuda = exact_index_on_cpu_and_cuda
    ids = [r["id"] for r in corpus_records[:4]]
    expected = cpu.explain(query, ids, exact=exact)
    actual = cuda.explain(query, ids, exact=exact)
    assert actual.method == expected.method and actual.method.startswith("exact:") == exact
    assert [e.id for e in actual.examples] == [e.id for e in expected.examples] == ids
    scale = max(abs(e.score) for e in expected.examples)
    assert scale > 0
    for got, want in zip(actual.examples, expected.examples):
        assert (got.row, got.text) == (want.row, want.text)
        assert spans(got.tokens) == spans(want.tokens) and len(got.tokens) > 3
        assert spans(got.query_tokens) == spans(want.query_tokens) and len(got.query_tokens) > 3
        tolerance = {"rtol": FLOAT64_TOL, "atol": FLOAT64_TOL * scale}
        np.testing.assert_allclose(got.score, want.score, **tolerance)
        np.testing.assert_allclose(
            [t.contribution for t in got.tokens], [t.contribution for t in want.tokens], **tolerance
        )
        np.testing.assert_allclose(
            [t.contribution for t in got.query_tokens], [t.contribution for t in want.query_tokens], **tolerance
        )
