"""Real torchrun: 2 processes (gloo on CPU) build 3 shards and merge them into the single-process index."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from attribindex import build_index
from attribindex.config import config_to_dict
from attribindex.store import layout, read_manifest
from tests.conftest import exact_config
from tests.reference import assert_same_index


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "exact.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(exact_config())))
    return path


def _torchrun(processes: int, tmp_path: Path, *commands: list[str]) -> list[tuple[int, str, str]]:
    """Each command line's (exit status, stdout, stderr), all run in turn in one launch of `processes` ranks (see
    torchrun_commands.py): the status of largest magnitude over the ranks, and their outputs joined in rank order."""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    driver = [str(Path(__file__).with_name("torchrun_commands.py")), str(tmp_path / "store"), str(outputs)]
    result = subprocess.run([*launch, *driver, json.dumps(commands)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    def read(number: int, suffix: str) -> list[str]:
        return [(outputs / f"{number}.{rank}.{suffix}").read_text() for rank in range(processes)]

    return [
        (max((int(s) for s in read(i, "status")), key=abs), "".join(read(i, "stdout")), "".join(read(i, "stderr")))
        for i in range(len(commands))
    ]


def test_two_ranks_three_shards_equal_one_process(tiny_models, corpus_file, config_file, tmp_path):
    """One launch: an EK-FAC build (its Kronecker factor sums travel through the shards; attribindex starts and
    ends the process group) and a raw build (in a group of the caller's), each equal to its single-process build,
    then a build into a folder that already holds an index, refused on every rank."""
    model = str(tiny_models["gpt2"])
    common = ["build", "--config", str(config_file), "--model", model, "--data", str(corpus_file), "--id-field", "id"]
    hessians = ("ekfac", "raw")
    outs = {hessian: tmp_path / hessian for hessian in hessians}
    builds = [[*common, "--hessian", h, "--num-shards", "3", "--keep-shards", "--out", str(outs[h])] for h in hessians]
    again = [*common, "--hessian", "raw", "--num-shards", "3", "--out", str(outs["raw"])]
    *built, refused = _torchrun(2, tmp_path, *builds, again)
    for hessian, (status, stdout, stderr) in zip(hessians, built):
        assert status == 0, stderr[-3000:]
        _assert_equals_one_process(hessian, outs[hessian], stdout, stderr, model, corpus_file, tmp_path)
    status, _, stderr = refused
    assert status != 0 and "already holds an index" in stderr


def _assert_equals_one_process(hessian, out, stdout, stderr, model, corpus_file, tmp_path):
    assert stdout.count("index of 3 shards on 2 processes") == 1  # one summary, from rank 0
    for rank, shard in ((0, 0), (1, 1), (0, 2)):  # rank r builds shards r, r + 2, …, each with its own bar
        assert f"rank {rank} shard {shard}/3" in stderr
    single = tmp_path / f"single-{hessian}"
    build_index(exact_config(kind=hessian), model, corpus_file, single, id_field="id", progress=False)
    assert_same_index(single, out)
    assert read_manifest(out).hessian.kind == hessian

    # Projections are identical on every rank by construction: same files, same hashes.
    shards = [out / layout.SHARDS_DIR / layout.shard_dir_name(i, 3) for i in range(3)]
    projection_files = {(s / layout.PROJECTIONS).read_bytes() for s in shards}
    assert len(projection_files) == 1
    assert {read_manifest(s, kind="shard").projection.hash for s in shards} == {read_manifest(out).projection.hash}
