"""`push_index` into real Milvus Lite files: the collection holds exactly the index's live, whitened rows after every
kind of change, a rerun sends nothing, and a push SIGKILLed at random moments and run again ends as an
uninterrupted one."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from attribindex import (
    AttribIndexError,
    AttributionIndex,
    append_documents,
    build_index,
    compact_index,
    delete_ids,
    push_index,
    refresh_index,
)
from attribindex.milvus import MilvusTarget, connect, read_state
from attribindex.milvus._collection import write_state
from attribindex.milvus._target import disconnect
from attribindex.testing import tiny_corpus, write_jsonl
from tests.conftest import exact_config
from tests.killing import run_killed

pytest.importorskip("milvus_lite", reason="Milvus Lite runs on CPU machines only (the milvus-lite extra)")

SMALL_BATCHES = 4_500  # bytes: 5 rows of 96 dims per insert, so a push of 24 rows takes 5 batches


def collection_contents(uri: str):
    """(rows, ids, sources, vectors) the collection holds, in row order, and its record."""
    target = MilvusTarget.parse(uri)
    client = connect(target)
    try:
        state = read_state(client, target)
        client.load_collection(target.collection)
        found = client.query(
            target.collection, filter="row >= 0", output_fields=["row", "id", "source", "vector"], limit=16_384
        )
    finally:
        disconnect(client, target)
    found = sorted(found, key=lambda hit: hit["row"])
    vectors = np.array([hit["vector"] for hit in found], dtype=np.float32).reshape(len(found), -1)
    return [h["row"] for h in found], [h["id"] for h in found], [h["source"] for h in found], vectors, state


def assert_mirrors(uri: str, index_dir) -> None:
    """The collection holds every live row of the index once, with its id, source and whitened vector."""
    rows, ids, sources, vectors, state = collection_contents(uri)
    index = AttributionIndex.open(index_dir, load_model_now=False, device="cpu")
    live = np.setdiff1d(np.arange(index.manifest.rows), index.index.deleted)
    documents = index.store.documents(live.tolist())
    assert rows == live.tolist()
    assert (ids, sources) == ([d.id for d in documents], [d.source for d in documents])
    expected = state.vectors(index.exact_vectors(live))
    np.testing.assert_allclose(vectors, expected, rtol=1e-6, atol=1e-6)
    assert (state.version, state.rows, state.pushing) == (index.version, index.manifest.rows, 0)


@pytest.fixture
def index_dir(tiny_models, corpus_file, tmp_path):
    out = tmp_path / "idx"
    build_index(exact_config(), str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
    return out


@pytest.fixture
def more_documents(tmp_path):
    return write_jsonl(tmp_path / "more.jsonl", [r | {"id": f"new-{r['id']}"} for r in tiny_corpus(7, seed=9)])


def test_every_change_reaches_the_collection_and_a_rerun_sends_nothing(index_dir, more_documents, tmp_path):
    db = str(tmp_path / "a.db")
    first = push_index(index_dir, db, kind="HNSW", progress=False, batch_bytes=SMALL_BATCHES)
    assert (first.action, first.inserted) == ("rewrite", 24)
    assert_mirrors(db, index_dir)
    assert push_index(index_dir, db, progress=False).action == "unchanged"

    append_documents(index_dir, more_documents, id_field="id", progress=False)
    delete_ids(index_dir, ["doc-0002", "new-doc-0001"])
    pushed = push_index(index_dir, db, progress=False)
    assert (pushed.action, pushed.inserted, pushed.deleted, pushed.kind) == ("incremental", 6, 2, "HNSW"), pushed.reason
    assert_mirrors(db, index_dir)

    delete_ids(index_dir, ["doc-0005"])
    assert push_index(index_dir, db, progress=False).inserted == 0
    assert_mirrors(db, index_dir)

    for change, reason in ((compact_index, "compact in version 5"), (refresh_index, "the Hessian was refreshed")):
        change(index_dir, progress=False)
        summary = push_index(index_dir, db, progress=False)
        assert (summary.action, summary.reason) == ("rewrite", reason)
        assert_mirrors(db, index_dir)
    assert push_index(index_dir, db, progress=False).action == "unchanged"


def test_appended_rows_longer_than_the_augmentation_allows_rewrite_the_collection(index_dir, more_documents, tmp_path):
    db = str(tmp_path / "a.db")
    push_index(index_dir, db, kind="IVF_FLAT", progress=False)
    target = MilvusTarget.parse(db)
    client = connect(target)
    state = read_state(client, target)
    write_state(client, target, dataclasses.replace(state, max_norm=1e-3))  # as if every new row were longer
    disconnect(client, target)
    append_documents(index_dir, more_documents, id_field="id", progress=False)
    summary = push_index(index_dir, db, progress=False)
    assert summary.action == "rewrite" and "> M = 0.001" in summary.reason
    assert_mirrors(db, index_dir)
    assert collection_contents(db)[4].max_norm > 1


def test_another_index_is_refused_unless_replaced(index_dir, tiny_models, corpus_file, tmp_path):
    db = str(tmp_path / "a.db")
    push_index(index_dir, db, progress=False)
    other = tmp_path / "other"
    build_index(exact_config("cosine"), str(tiny_models["llama"]), corpus_file, other, id_field="id", progress=False)
    with pytest.raises(AttribIndexError, match=r"holds another index \(ai-.*Push with --replace") as refused:
        push_index(other, db, progress=False)
    assert "\n" not in str(refused.value)
    assert push_index(other, db, replace=True, progress=False).reason.startswith("replacing ai-")
    assert_mirrors(db, other)


# Where a push can die: before or after any insert, delete or record update (the nth call of each).
KILL_POINTS = [
    (module, attr, nth, when)
    for module, attr, calls in (
        ("pymilvus", "MilvusClient.insert", 5),
        ("pymilvus", "MilvusClient.delete", 2),
        ("attribindex.milvus._push", "write_state", 6),
        ("pymilvus", "MilvusClient.create_collection", 1),
        ("pymilvus", "MilvusClient.drop_collection", 1),
    )
    for nth in range(1, calls + 1)
    for when in ("before", "after")
]


def _push_killed_then_rerun(index_dir, db: str, rng: random.Random, kills: int, **options) -> None:
    for kill_at in rng.sample(KILL_POINTS, kills):
        done = run_killed(kill_at, "push_index", index_dir, db, progress=False, batch_bytes=SMALL_BATCHES, **options)
        assert done.returncode in (-9, 0), done.stderr[-2000:]  # 0: that call never came in this push
    push_index(index_dir, db, progress=False, batch_bytes=SMALL_BATCHES)


def test_a_push_killed_at_random_moments_then_rerun_equals_an_uninterrupted_one(index_dir, more_documents, tmp_path):
    rng = random.Random(26)
    killed, clean = str(tmp_path / "killed.db"), str(tmp_path / "clean.db")
    _push_killed_then_rerun(index_dir, killed, rng, kills=4, kind="IVF_FLAT")
    push_index(index_dir, clean, kind="IVF_FLAT", progress=False)
    assert_mirrors(killed, index_dir)

    append_documents(index_dir, more_documents, id_field="id", progress=False)
    delete_ids(index_dir, ["doc-0001", "new-doc-0003"])
    _push_killed_then_rerun(index_dir, killed, rng, kills=3)
    push_index(index_dir, clean, progress=False)
    assert_mirrors(killed, index_dir)
    got, want = collection_contents(killed), collection_contents(clean)
    assert got[:3] == want[:3]
    np.testing.assert_allclose(got[3], want[3], rtol=1e-6, atol=1e-7)  # whitened in other batches: fp32 rounding
    assert dataclasses.replace(got[4], operating_point="") == want[4]


def test_a_push_killed_between_an_insert_and_its_mark_resumes_without_duplicates(index_dir, tmp_path):
    """The random kills above mean something only if a killed push dies there and leaves work undone; this one dies
    after its third insert, before recording it: the rerun must not insert those rows twice."""
    db = str(tmp_path / "a.db")
    kill_at = ("pymilvus", "MilvusClient.insert", 3, "after")
    done = run_killed(kill_at, "push_index", index_dir, db, progress=False, batch_bytes=SMALL_BATCHES)
    assert done.returncode == -9
    rows, _, _, _, state = collection_contents(db)
    assert state.pushing == 1 and state.rewrite and len(rows) == 15 and state.pushed_through == 10
    with pytest.raises(AttribIndexError, match="being rewritten by a push, or one was interrupted"):
        AttributionIndex.open(index_dir, load_model_now=False, search=db)
    summary = push_index(index_dir, db, progress=False, batch_bytes=SMALL_BATCHES)
    assert (summary.action, summary.reason, summary.inserted) == ("rewrite", "resuming an interrupted rewrite", 14)
    assert_mirrors(db, index_dir)
