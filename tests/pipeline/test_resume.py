"""Crash safety: a build killed (SIGKILL) at any point resumes with the same command, losing and duplicating nothing."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import time

import pytest
import yaml

from attribindex import AttribIndexError, AttributionIndex, build_index
from attribindex.config import config_to_dict
from attribindex.store import layout
from tests.conftest import exact_config, with_store
from tests.killing import build_killed
from tests.reference import assert_same_index

CONFIG = with_store(
    dataclasses.replace(exact_config(), extract=dataclasses.replace(exact_config().extract, batch_size=1)),
    chunk_rows=5,
)  # 24 documents → chunks of 5, 5, 5, 5, 4; windows of 16 documents

KILL_POINTS = {
    "before the second chunk is written": ("attribindex.store._rows", "ChunkWriter.flush", 2, "before"),
    "after a chunk, before its checkpoint": ("attribindex.store._rows", "ChunkWriter.flush", 3, "after"),
    "inside a checkpoint write": ("attribindex.hessian._curvature", "save_file", 2, "after"),
    "while writing the FAISS index": ("attribindex.index._flat", "FlatIndexWriter.add", 2, "before"),
    "before the manifest": ("attribindex.pipeline._finalize", "write_manifest", 1, "before"),
}


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "idx"
    build_index(CONFIG, str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
    return out


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "resume.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(CONFIG)))
    return path


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_build_resumes_to_the_uninterrupted_result(
    point, tiny_models, corpus_file, config_file, uninterrupted, tmp_path
):
    out = tmp_path / "idx"
    killed = build_killed(KILL_POINTS[point], tiny_models["gpt2"], corpus_file, out, config_file)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not layout.is_index_dir(out)
    with pytest.raises(AttribIndexError, match="incomplete build"):
        AttributionIndex.open(out, load_model_now=False)

    summary = build_index(CONFIG, str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
    assert summary.rows == 24
    if point != "before the second chunk is written":
        assert summary.resumed_rows >= 5  # work was kept, not redone
    assert not any(layout.is_temporary(p.name) for p in out.rglob("*"))
    assert_same_index(uninterrupted, out)


def test_kill_from_outside_at_a_random_moment(tiny_models, corpus_file, config_file, uninterrupted, tmp_path):
    out = tmp_path / "idx"
    command = [sys.executable, "-m", "attribindex", "build", "--config", str(config_file)]
    command += ["--model", str(tiny_models["gpt2"]), "--data", str(corpus_file), "--id-field", "id", "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / layout.CURVATURE).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    result = subprocess.run(command, capture_output=True, text=True)  # the same command, again
    assert result.returncode == 0, result.stderr
    assert "rows       24" in result.stdout
    assert_same_index(uninterrupted, out)


def test_resume_refuses_a_different_command_and_allows_another_batch_size(
    tiny_models, corpus_file, config_file, tmp_path
):
    out = tmp_path / "idx"
    build_killed(
        KILL_POINTS["after a chunk, before its checkpoint"], tiny_models["gpt2"], corpus_file, out, config_file
    )
    other_rank = dataclasses.replace(CONFIG, projection=dataclasses.replace(CONFIG.projection, rank_in=5))
    with pytest.raises(
        AttribIndexError, match=r"interrupted build of a different command \(config.projection.rank_in: 3"
    ):
        build_index(other_rank, str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
    bigger_batch = dataclasses.replace(CONFIG, extract=dataclasses.replace(CONFIG.extract, batch_size=8))
    summary = build_index(bigger_batch, str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
    assert summary.resumed_rows == 10 and summary.rows == 24


def test_killed_multi_shard_build_keeps_finished_shards_and_resumes_the_interrupted_one(
    tiny_models, corpus_file, config_file, uninterrupted, tmp_path
):
    out = tmp_path / "idx"
    # 3 shards of 8 documents in chunks of 5: shard 0 writes chunks 1-2, shard 1 chunk 3 … killed before chunk 4.
    kill_at = ("attribindex.store._rows", "ChunkWriter.flush", 4, "before")
    killed = build_killed(kill_at, tiny_models["gpt2"], corpus_file, out, config_file, num_shards=3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert layout.is_index_dir(out / layout.SHARDS_DIR / layout.shard_dir_name(0, 3))
    summary = build_index(
        CONFIG, str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False, num_shards=3
    )
    assert summary.resumed_rows == 8 + 5  # shard 0 kept whole, shard 1 from its first chunk
    assert_same_index(uninterrupted, out)
