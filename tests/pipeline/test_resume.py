"""Crash safety: a build killed (SIGKILL) at any point resumes with the same command, losing and duplicating nothing."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    "inside a checkpoint write": ("attribindex.hessian._curvature", "write_safetensors", 2, "after"),
    "while writing the index (its norms)": ("attribindex.pipeline._write_segments", "atomic_open", 1, "before"),
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
    if point == "inside a checkpoint write":  # killed inside safetensors, its own temporary would be left too
        (out / ".tmpAb12Cd").write_bytes(b"the first bytes of a checkpoint")
    with pytest.raises(AttribIndexError, match="incomplete build"):
        AttributionIndex.open(out, load_model_now=False)

    summary = build_index(CONFIG, str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
    assert summary.rows == 24
    if point != "before the second chunk is written":
        assert summary.resumed_rows >= 5  # work was kept, not redone
    assert not any(layout.is_temporary(p.name) for p in out.rglob("*"))
    assert_same_index(uninterrupted, out)
    # Byte for byte, too: a file is a function of its contents, not of which process wrote it or when.
    assert_same_bytes(uninterrupted, out)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file of an index folder but its manifest (which records when and how long the build ran)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != layout.MANIFEST
    }


def assert_same_bytes(expected: Path, actual: Path, context: str = "") -> None:
    """A resumed build is the uninterrupted build byte for byte (the manifest aside): the same files, and
    each one identical, safetensors headers included."""
    want, got = _files(expected), _files(actual)
    assert sorted(got) == sorted(want), context
    differing = [name for name in want if got[name] != want[name]]
    assert not differing, f"{context} these files differ from the uninterrupted build: {differing}"


def _build_command(tiny_models, corpus_file, config_file, out) -> list[str]:
    inputs = ["--model", str(tiny_models["gpt2"]), "--data", str(corpus_file), "--id-field", "id"]
    return [sys.executable, "-m", "attribindex", "build", "--config", str(config_file), *inputs, "--out", str(out)]


def _progress(out: Path) -> set[str]:
    """The files (not temporaries) a running build has completed so far, the manifest aside."""
    try:
        return {
            p.relative_to(out).as_posix()
            for p in out.rglob("*")
            if p.name != layout.MANIFEST and not layout.is_temporary(p.name)
        }
    except FileNotFoundError:  # the folder, or a file being renamed, as the build works
        return set()


def test_kill_from_outside_at_a_random_moment(tiny_models, corpus_file, config_file, uninterrupted, tmp_path):
    # The moment is a step of the build's visible progress: killed as soon as its `step`-th file exists. Any step
    # before the last leaves the manifest unwritten. Set ATTRIBINDEX_TEST_SEED to replay a failing seed.
    seed = int(os.environ.get("ATTRIBINDEX_TEST_SEED", random.SystemRandom().randrange(2**32)))
    steps = len(_progress(uninterrupted)) + 1  # and the build marker, which a complete folder no longer has
    step = random.Random(seed).randint(1, steps - 1)
    why = f"seed {seed}: killed at step {step} of {steps}"
    print(why)  # shown with a failure of the comparisons below too
    out = tmp_path / "idx"
    command = _build_command(tiny_models, corpus_file, config_file, out)
    log = tmp_path / "build.log"  # a file, not a pipe: nobody reads a pipe while the build runs
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 120
    while len(_progress(out)) < step and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, f"{why}; not killed mid-way: {log.read_text()[-2000:]}"
    assert len(_progress(out)) >= step and not layout.is_index_dir(out), why

    result = subprocess.run(command, capture_output=True, text=True)  # the same command, again
    assert result.returncode == 0, f"{why}: {result.stderr}"
    assert "rows       24" in result.stdout, why
    assert_same_index(uninterrupted, out)
    assert_same_bytes(uninterrupted, out, why)


def test_resume_refuses_a_different_command_and_allows_another_batch_size(
    tiny_models, corpus_file, config_file, uninterrupted, tmp_path
):
    out = tmp_path / "idx"
    killed = build_killed(
        KILL_POINTS["after a chunk, before its checkpoint"], tiny_models["gpt2"], corpus_file, out, config_file
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    other_rank = dataclasses.replace(CONFIG, projection=dataclasses.replace(CONFIG.projection, rank_in=5))
    with pytest.raises(
        AttribIndexError, match=r"interrupted build of a different command \(config.projection.rank_in: 3"
    ):
        build_index(other_rank, str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
    bigger_batch = dataclasses.replace(CONFIG, extract=dataclasses.replace(CONFIG.extract, batch_size=8))
    summary = build_index(bigger_batch, str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
    assert summary.resumed_rows == 10 and summary.rows == 24
    # Batches of 8 pad and sum differently from batches of 1: the same ids in the same order, and rows and
    # curvature equal to float64 round-off (the rows are stored as float32).
    assert_same_index(uninterrupted, out, curvature_rtol=1e-10)


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
