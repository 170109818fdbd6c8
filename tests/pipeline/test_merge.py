"""Shards and merge: a merged index equals the single-process build; shards that do not belong together are refused."""

from __future__ import annotations

import dataclasses

import pytest

from attribindex import AttribIndexError, AttributionIndex, build_index, merge_shards
from attribindex.store import ShardSlice, layout, read_manifest
from tests.conftest import exact_config
from tests.reference import assert_same_index


def _build(tiny_models, corpus_file, out, config=None, **kwargs):
    return build_index(
        config or exact_config(), str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False, **kwargs
    )


@pytest.fixture(scope="module")
def single(tiny_models, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "idx"
    _build(tiny_models, corpus_file, out)
    return out


@pytest.fixture(scope="module")
def shards(tiny_models, corpus_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    for i in range(3):
        summary = _build(tiny_models, corpus_file, root / f"s{i}", num_shards=3, shard_index=i)
        assert summary.kind == f"shard {i} of 3" and summary.rows == 8
    return [root / f"s{i}" for i in range(3)]


def test_merged_shards_equal_the_single_build(single, shards, tmp_path):
    summary = merge_shards(list(reversed(shards)), tmp_path / "merged", progress=False)  # any order on the command line
    assert summary.rows == 24 and [rows for _, rows in summary.shard_rows] == [8, 8, 8]
    assert "shard 2" in summary.format()
    assert_same_index(single, tmp_path / "merged")
    merged = read_manifest(tmp_path / "merged")
    assert merged.log[0].event == "merge" and [s.documents for s in merged.log[0].shards] == [
        (0, 8),
        (8, 16),
        (16, 24),
    ]
    assert merged.corpus.tokens == read_manifest(single).corpus.tokens


def test_a_shard_is_not_a_searchable_index(shards):
    with pytest.raises(AttribIndexError, match="shard 1 of 3 of a sharded build, not a searchable index"):
        AttributionIndex.open(shards[1], load_model_now=False)
    assert read_manifest(shards[1], kind="shard").shard == ShardSlice(index=1, count=3, documents=(8, 16))


def test_all_shards_in_one_process_equal_the_single_build(single, tiny_models, corpus_file, tmp_path):
    summary = _build(tiny_models, corpus_file, tmp_path / "idx", num_shards=3)
    assert summary.rows == 24 and summary.merge is not None
    assert not (tmp_path / "idx" / layout.SHARDS_DIR).exists()  # merged shards are removed unless kept
    assert_same_index(single, tmp_path / "idx")


def test_missing_and_repeated_shards_are_refused(shards, tmp_path):
    with pytest.raises(AttribIndexError, match=r"shard 1 of 3 is missing .*`num_shards=3, shard_index=1`"):
        merge_shards([shards[0], shards[2]], tmp_path / "m", progress=False)
    with pytest.raises(AttribIndexError, match="are both shard 0 of 3"):
        merge_shards([shards[0], shards[0], shards[1], shards[2]], tmp_path / "m", progress=False)


def test_a_finished_index_is_not_a_shard(single, shards, tmp_path):
    with pytest.raises(AttribIndexError, match="is a finished index, not a shard"):
        merge_shards([shards[0], single], tmp_path / "m", progress=False)


def test_shards_of_another_build_are_refused_naming_the_difference(shards, tiny_models, corpus_file, tmp_path):
    other_seed = exact_config(seed=7)
    _build(tiny_models, corpus_file, tmp_path / "seed7", config=other_seed, num_shards=3, shard_index=1)
    with pytest.raises(AttribIndexError, match=r"disagree on the projection hash"):
        merge_shards([shards[0], tmp_path / "seed7", shards[2]], tmp_path / "m", progress=False)

    build_index(
        exact_config(),
        str(tiny_models["llama"]),
        corpus_file,
        tmp_path / "llama",
        id_field="id",
        progress=False,
        num_shards=3,
        shard_index=1,
    )
    with pytest.raises(AttribIndexError, match=r"disagree on the model fingerprint \('sha256:"):
        merge_shards([shards[0], tmp_path / "llama", shards[2]], tmp_path / "m", progress=False)

    bigger_batch = dataclasses.replace(
        exact_config(), extract=dataclasses.replace(exact_config().extract, batch_size=9)
    )
    _build(tiny_models, corpus_file, tmp_path / "b9", config=bigger_batch, num_shards=3, shard_index=1)
    merge_shards([shards[0], tmp_path / "b9", shards[2]], tmp_path / "m", progress=False)  # batch size may differ

    _build(tiny_models, corpus_file, tmp_path / "limit", num_shards=3, shard_index=1, limit=21)
    with pytest.raises(AttribIndexError, match=r"covers documents \[7, 14\) but the shards before it end at 8"):
        merge_shards([shards[0], tmp_path / "limit", shards[2]], tmp_path / "m2", progress=False)


def test_a_damaged_shard_file_is_named_and_nothing_is_written(shards, tmp_path):
    damaged = tmp_path / "s1"
    import shutil

    shutil.copytree(shards[1], damaged)
    grads = damaged / layout.chunk_file("000000", layout.CHUNK_GRADS)
    data = bytearray(grads.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte, same size
    grads.write_bytes(bytes(data))
    with pytest.raises(AttribIndexError, match=r"000000\.grads\.npy is damaged \(contents differ"):
        merge_shards([shards[0], damaged, shards[2]], tmp_path / "m", progress=False)
    assert not layout.is_index_dir(tmp_path / "m")
