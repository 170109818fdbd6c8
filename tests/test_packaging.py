"""A wheel is complete: installed on its own (no checkout in sight), its presets load and `attribindex build
--config tiny` and `attribindex demo` run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from attribindex.testing import make_tiny_model, tiny_corpus, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    # pyproject lists the packages (it must, to map index_configs/ into attribindex.presets): a new subpackage
    # left off the list would be missing from wheels while every editable-install test still passed.
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "attribindex").rglob("__init__.py")}
    assert on_disk | {"attribindex.presets"} == listed


def _run(command: list, cwd: Path, env: dict, timeout: float = 300) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """A fresh venv holding only the wheel built from this checkout; the dependencies come from the test's own
    environment through a path line in a .pth file (which, unlike a .pth there, runs no editable-install hook)."""
    root = tmp_path_factory.mktemp("packaging")
    # Build from a copy of what a release holds, so no build/ or egg-info lands in the shared checkout.
    source = root / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "attribindex", source / "attribindex", ignore=ignore)
    shutil.copytree(ROOT / "index_configs", source / "index_configs")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_NO_INDEX"] = "1"  # everything is local: nothing may come from a registry
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # --no-build-isolation: the build backend (setuptools) comes from this environment, offline.
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", source], root, env)
    (wheel,) = (root / "dist").glob("attribindex-*.whl")

    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {p.name for p in (ROOT / "index_configs").glob("*.yaml")}
    assert {n.removeprefix("attribindex/presets/") for n in names if n.startswith("attribindex/presets/")} == presets
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "attribindex").rglob("*.py")}
    assert sources <= names, sorted(sources - names)
    static = {p.relative_to(ROOT).as_posix() for p in (ROOT / "attribindex" / "serve" / "static").iterdir()}
    assert static and static <= names, sorted(static - names)  # the explorer page `attribindex serve` answers at /

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], root, env)
    python = venv / "bin" / "python"
    _run([*pip, "--python", python, "install", "--no-deps", wheel], root, env)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env).strip())
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))  # one folder in a venv
    (site / "dependencies.pth").write_text("".join(f"{path}\n" for path in ours))
    return venv, env


def test_the_installed_wheel_carries_its_presets(installed, tmp_path):
    venv, env = installed
    where = _run(
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
    _run([venv / "bin" / "attribindex", *build], tmp_path, env)
    assert (tmp_path / "idx" / "manifest.json").is_file()


def test_the_installed_wheel_runs_the_demo(installed, tmp_path):
    venv, env = installed
    output = _run([venv / "bin" / "attribindex", "demo", "--speeches", "40", "--out", "demo-index"], tmp_path, env)
    assert "rows       46" in output and "held-out check" in output  # 40 sampled + the 6 query sources
