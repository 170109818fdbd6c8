"""Micro-batching: concurrent submissions share model passes, answers stay per request, shutdown refuses cleanly."""

from __future__ import annotations

import asyncio

import pytest

from attribindex import AttributionIndex, build_index
from attribindex.serve._batcher import MicroBatcher, ShuttingDown
from tests.conftest import exact_config


@pytest.fixture(scope="module")
def index(tiny_models, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("batcher") / "idx"
    build_index(exact_config(), str(tiny_models["llama"]), corpus_file, out, id_field="id", progress=False)
    return AttributionIndex.open(out)


def test_concurrent_requests_share_a_batch_and_get_their_own_answers(index):
    requests = [
        (["King queen crown."], 2, 0),
        (["Storm war peace.", "Ghost father son."], 5, 3),
        (["Heart mind."], 1, 1),
    ]

    async def scenario():
        batcher = MicroBatcher(index, window_s=0.05, max_queries=64)
        batcher.start()
        answers = await asyncio.gather(*(batcher.submit(*r) for r in requests))
        await batcher.close()
        with pytest.raises(ShuttingDown, match="shutting down"):
            await batcher.submit(["King queen crown."], 1, 0)
        return batcher.batches, answers

    batches, answers = asyncio.run(scenario())
    assert batches == 1
    for (queries, k, bottom), (answer, answered_by) in zip(requests, answers):
        assert answered_by is index
        alone = index.attribute(queries, k=k, bottom=bottom)
        for got, want in zip(answer, alone.results, strict=True):
            assert [a.id for a in got.top] == [a.id for a in want.top] and len(got.top) == k
            assert [a.id for a in got.bottom] == [a.id for a in want.bottom] and len(got.bottom) == bottom
            assert [a.score for a in got.top] == pytest.approx([a.score for a in want.top], rel=1e-5)
