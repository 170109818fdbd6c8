"""How samples are batched for `attribute`: never more texts than a server takes, a sample's texts together."""

from __future__ import annotations

from attribindex.harness import EvalSample, SampleQuery
from attribindex.harness._trace import _batches


def _sample(number: int, texts: int) -> EvalSample:
    queries = tuple(SampleQuery("response", "Q:", f" answer {i}") for i in range(texts))
    return EvalSample("lm-eval", "qa", str(number), "none", "generate_until", queries)


def test_batches_hold_at_most_the_cap_and_keep_a_sample_whole():
    samples = [_sample(i, n) for i, n in enumerate([2, 2, 1, 3, 5, 0, 1])]
    batches = list(_batches(samples, 4))
    assert [[int(s.sample_id) for s in b] for b in batches] == [[0, 1], [2, 3], [4], [5, 6]]
    assert all(sum(len(s.queries) for s in b) <= 4 or len(b) == 1 for b in batches)
