"""A wheel is complete: installed on its own (no checkout in sight), its presets load and `attribindex build
--config tiny` runs (tests/demo runs `attribindex demo` from it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from attribindex.testing import make_tiny_model, tiny_corpus, write_jsonl
from tests.conftest import ROOT, run_checked


def test_every_package_folder_is_listed_in_pyproject():
    # pyproject lists the packages (it must, to map index_configs/ into attribindex.presets): a new subpackage
    # left off the list would be missing from wheels while every editable-install test still passed.
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "attribindex").rglob("__init__.py")}
    assert on_disk | {"attribindex.presets"} == listed


def test_the_core_needs_neither_harness(tmp_path):
    """lm-eval and Inspect are extras: without them installed (imports of both refused), attribindex and its
    harness module import, and reading an Inspect log says which extra to install."""
    script = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lm_eval", "inspect_ai"):
            raise ImportError(f"no module named {name}")
sys.meta_path.insert(0, Refuse())
import attribindex, attribindex.cli
from attribindex.harness import read_eval_results
try:
    read_eval_results(sys.argv[1])
except attribindex.AttribIndexError as err:
    print(err)
"""
    log = tmp_path / "run.eval"
    log.write_bytes(b"PK")
    printed = run_checked([sys.executable, "-c", script, str(log)], cwd=tmp_path, env=dict(os.environ))
    assert "pip install 'attribindex[inspect]'" in printed


def test_the_milvus_extras_keep_faiss_gpu_machines_working():
    """A GPU machine installs `milvus` (the client) next to faiss-gpu; Milvus Lite is CPU-only because it requires
    faiss-cpu, whose `faiss` module would overwrite faiss-gpu's (pyproject.toml, tools/setup.sh)."""
    import importlib.metadata as metadata

    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [r.split(">")[0] for r in extras["milvus"]] == ["pymilvus"]
    assert [r.split(">")[0] for r in extras["milvus-lite"]] == ["pymilvus", "milvus-lite"]
    pytest.importorskip("milvus_lite", reason="Milvus Lite runs on CPU machines only (the milvus-lite extra)")
    requires = {d: [r.split(";")[0].strip() for r in metadata.requires(d) or []] for d in ("pymilvus", "milvus-lite")}
    assert not any("faiss" in r for r in requires["pymilvus"]), requires["pymilvus"]
    assert any(r.startswith("faiss-cpu") for r in requires["milvus-lite"]), requires["milvus-lite"]


def test_the_installed_wheel_carries_its_presets(installed_wheel, tmp_path):
    venv, env = installed_wheel
    where = run_checked(
        [
            venv / "bin" / "python",
            "-c",
            "import attribindex, attribindex.config._load as c; print(attribindex.__file__); print(c.PRESETS_DIR); "
            "print(' '.join(c.preset_names()))",
        ],
        tmp_path,
        env,
    ).splitlines()
    assert all(Path(line).is_relative_to(venv) for line in where[:2]), where  # the wheel's copy, not the checkout
    assert Path(where[1]).name == "presets"
    assert set(where[2].split()) == {p.stem for p in (ROOT / "index_configs").glob("*.yaml")}

    model = make_tiny_model(tmp_path / "model", texts=[d["text"] for d in tiny_corpus(50)], hidden=8, layers=1)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", tiny_corpus(12))
    build = ["build", "--config", "tiny", "--model", model, "--data", corpus, "--id-field", "id", "--out", "idx"]
    run_checked([venv / "bin" / "attribindex", *build], tmp_path, env)
    assert (tmp_path / "idx" / "manifest.json").is_file()
