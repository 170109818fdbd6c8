"""Real torchrun: 2 processes (gloo on CPU) build 3 shards and merge them into the single-process index."""

from __future__ import annotations

import subprocess
import sys

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


def _torchrun(processes: int, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return subprocess.run(command + ["-m", "attribindex", "build", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("hessian", ["raw", "ekfac"])  # ekfac: Kronecker factor sums travel through the shards
def test_two_ranks_three_shards_equal_one_process(hessian, tiny_models, corpus_file, config_file, tmp_path):
    single = tmp_path / "single"
    config = exact_config(kind=hessian)
    build_index(config, str(tiny_models["gpt2"]), corpus_file, single, id_field="id", progress=False)
    out = tmp_path / "idx"
    common = ["--config", str(config_file), "--model", str(tiny_models["gpt2"]), "--data", str(corpus_file)]
    common += ["--hessian", hessian]
    result = _torchrun(2, *common, "--id-field", "id", "--num-shards", "3", "--keep-shards", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("index of 3 shards on 2 processes") == 1  # one summary, from rank 0
    for rank, shard in ((0, 0), (1, 1), (0, 2)):  # rank r builds shards r, r + 2, …, each with its own bar
        assert f"rank {rank} shard {shard}/3" in result.stderr
    assert_same_index(single, out)
    assert read_manifest(out).hessian.kind == hessian

    # Projections are identical on every rank by construction: same files, same hashes.
    shards = [out / layout.SHARDS_DIR / layout.shard_dir_name(i, 3) for i in range(3)]
    projection_files = {(s / layout.PROJECTIONS).read_bytes() for s in shards}
    assert len(projection_files) == 1
    assert {read_manifest(s, kind="shard").projection.hash for s in shards} == {read_manifest(out).projection.hash}

    again = _torchrun(2, *common, "--id-field", "id", "--num-shards", "3", "--out", str(out))
    assert again.returncode != 0 and "already holds an index" in again.stderr
