"""Search through a real Milvus Lite collection (the real `MilvusClient`): the answers equal a local flat search's,
in dot and cosine mode, with approximate kinds through the MIPS→L2 augmentation, and under the exact re-rank;
a deleted row never comes back while the collection lags behind; anything else that lags is refused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from attribindex import (
    AttributionIndex,
    IndexMismatchError,
    PromptCompletion,
    append_documents,
    build_index,
    compact_index,
    delete_ids,
    push_index,
    refresh_index,
)
from attribindex.testing import tiny_corpus, write_jsonl
from tests.conftest import exact_config

pytest.importorskip("milvus_lite", reason="Milvus Lite runs on CPU machines only (the milvus-lite extra)")

QUERIES = ["King queen crown castle.", PromptCompletion("Ghost father", " son mind heart."), "Storm war peace."]


@pytest.fixture(scope="module", params=["dot", "cosine"])
def built(request, tiny_models, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"milvus-{request.param}") / "idx"
    build_index(exact_config(request.param), str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
    return out


def assert_same_answers(remote: AttributionIndex, local: AttributionIndex, k: int = 5, bottom: int = 3) -> None:
    got, want = remote.attribute(QUERIES, k=k, bottom=bottom), local.attribute(QUERIES, k=k, bottom=bottom)
    assert got.index_version == want.index_version
    for g, w in zip(got.results, want.results, strict=True):
        assert [a.id for a in g.top] == [a.id for a in w.top]
        assert [a.id for a in g.bottom] == [a.id for a in w.bottom]
        scores = [a.score for a in g.top + g.bottom], [a.score for a in w.top + w.bottom]
        np.testing.assert_allclose(*scores, rtol=1e-5, atol=1e-6)


def test_flat_search_through_milvus_answers_as_a_local_flat_search(built, tmp_path):
    db = str(tmp_path / "a.db")
    summary = push_index(built, db, progress=False)
    assert (summary.action, summary.inserted, summary.kind) == ("rewrite", 24, "FLAT")
    local = AttributionIndex.open(built, device="cpu")
    remote = AttributionIndex.open(built, device="cpu", search=db)
    assert remote.search_description.startswith(f"Milvus FLAT ({db})")
    assert_same_answers(remote, local)
    assert remote.attribute(QUERIES[0], k=3).exact


@pytest.mark.parametrize(("kind", "mips"), [("HNSW", "auto"), ("HNSW", "augment"), ("IVF_FLAT", "auto")])
def test_approximate_kinds_search_by_inner_product_or_the_augmentation(built, tmp_path, kind, mips):
    """Candidates = k exactly (rerank 1): a wrong metric or augmentation would change the membership of the top-3."""
    db = str(tmp_path / "a.db")
    push_index(built, db, kind=kind, mips=mips, progress=False)
    local = AttributionIndex.open(built, device="cpu")
    remote = AttributionIndex.open(built, device="cpu", search=db)
    remote.configure_search(rerank=1, nprobe=remote.remote.state.nlist or None)
    augmented = local.mode == "dot" and (mips == "augment" or kind == "IVF_FLAT")
    assert (remote.remote.state.augmented, remote.remote.state.max_norm > 0) == (augmented, augmented)
    assert not remote.attribute(QUERIES[0], k=3).exact
    assert_same_answers(remote, local, k=3, bottom=2)


@pytest.mark.parametrize("kind", ["FLAT", "IVF_FLAT"])
def test_an_index_wider_than_the_server_takes_is_searched_through_a_sketch(built, tmp_path, kind):
    db = str(tmp_path / "a.db")
    push_index(built, db, kind=kind, max_dim=64, progress=False)  # 96 dims here: a server taking 64 at most
    remote = AttributionIndex.open(built, device="cpu", search=db)
    state = remote.remote.state
    assert state.augmented == (kind == "IVF_FLAT" and remote.mode == "dot")
    assert (state.sketch_dim, state.vector_dim()) == (64 - state.augmented, 64)  # room for the extra coordinate
    assert f"over a {state.sketch_dim}-dim sketch" in remote.search_description
    assert "40 × k re-scored exactly" in remote.search_description  # the sketch's candidates, re-scored
    remote.configure_search(nprobe=state.nlist or None)  # every cell: the sketch alone decides the candidates
    assert_same_answers(remote, AttributionIndex.open(built, device="cpu"))


def test_the_exact_rerank_works_on_milvus_candidates(exact_index, tmp_path):
    db = str(tmp_path / "a.db")
    push_index(exact_index, db, progress=False)
    local = AttributionIndex.open(exact_index, device="cpu")
    remote = AttributionIndex.open(exact_index, device="cpu", search=db)
    got, want = (index.attribute(QUERIES[:2], k=3, exact=8) for index in (remote, local))
    for g, w in zip(got.results, want.results, strict=True):
        assert [a.id for a in g.top] == [a.id for a in w.top]
        np.testing.assert_allclose([a.score for a in g.top], [a.score for a in w.top], rtol=1e-9)


@pytest.fixture
def living(tiny_models, corpus_file, tmp_path):
    """A copy of a dot-mode index to change, pushed to a fresh Milvus Lite file."""
    out = tmp_path / "idx"
    build_index(exact_config(), str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
    db = str(tmp_path / "a.db")
    push_index(out, db, progress=False)
    return out, db


def test_a_deleted_row_never_comes_back_while_the_collection_lags(living):
    index_dir, db = living
    first = AttributionIndex.open(index_dir, device="cpu").attribute(QUERIES, k=1)
    delete_ids(index_dir, [r.top[0].id for r in first.results])  # every query's best row, not pushed yet
    lagging = AttributionIndex.open(index_dir, device="cpu", search=db)
    assert lagging.remote.state.version == 1 and lagging.version == 2
    assert_same_answers(lagging, AttributionIndex.open(index_dir, device="cpu"), k=5, bottom=3)
    lagging.remote.close()
    assert push_index(index_dir, db, progress=False).deleted == len({r.top[0].id for r in first.results})
    pushed = AttributionIndex.open(index_dir, device="cpu", search=db)
    assert pushed.remote.state.version == 2
    assert_same_answers(pushed, AttributionIndex.open(index_dir, device="cpu"))


@pytest.mark.parametrize("change", ["append", "compact", "refresh"])
def test_a_collection_that_lacks_rows_is_refused_until_pushed(living, tmp_path, change):
    index_dir, db = living
    delete_ids(index_dir, ["doc-0003"])
    more = write_jsonl(tmp_path / "more.jsonl", [r | {"id": f"new-{r['id']}"} for r in tiny_corpus(6, seed=9)])
    if change == "append":
        append_documents(index_dir, more, id_field="id", progress=False)
    elif change == "compact":
        compact_index(index_dir, progress=False)
    else:
        append_documents(index_dir, more, id_field="id", progress=False)
        refresh_index(index_dir, progress=False)
    with pytest.raises(IndexMismatchError, match=f"lacks .*{change} .*attribindex push INDEX {db}") as refused:
        AttributionIndex.open(index_dir, device="cpu", search=db)
    assert "\n" not in str(refused.value)
    summary = push_index(index_dir, db, progress=False)
    assert summary.action == ("incremental" if change == "append" else "rewrite")
    remote = AttributionIndex.open(index_dir, device="cpu", search=db)
    assert_same_answers(remote, AttributionIndex.open(index_dir, device="cpu"))


def test_a_running_search_notices_a_collection_rewritten_since(living, lite_server):
    """The record is read before every search, not only at open: a server that stays up refuses rather than answer
    from a collection that no longer mirrors its index."""
    index_dir, _ = living
    uri = f"{lite_server}/running"
    push_index(index_dir, uri, progress=False)
    remote = AttributionIndex.open(index_dir, device="cpu", search=uri)
    assert_same_answers(remote, AttributionIndex.open(index_dir, device="cpu"))
    newer = index_dir.parent / "newer"
    shutil.copytree(index_dir, newer)
    delete_ids(newer, ["doc-0001"])
    compact_index(newer, progress=False)  # the same index, rows renumbered: the push rewrites the collection
    assert push_index(newer, uri, progress=False).action == "rewrite"
    with pytest.raises(IndexMismatchError, match="version 3 .* newer than this copy"):
        remote.attribute(QUERIES[0], k=2)
