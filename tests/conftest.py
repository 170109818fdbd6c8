"""Shared fixtures: tiny real HF models (GPT-2 with Conv1D, Llama with Linear) and tiny corpora,
all created locally; nothing is downloaded."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

from attribindex import AttributionIndex
from attribindex.config import (
    BuildConfig,
    ExactConfig,
    ExtractConfig,
    HessianConfig,
    IndexConfig,
    ProjectionConfig,
    StoreConfig,
)
from attribindex.testing import make_tiny_model, tiny_corpus, write_jsonl

# Two cores: under pytest-xdist (-n 2) each worker gets one, and so do the processes it starts.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def corpus_records() -> list[dict]:
    return tiny_corpus(24, seed=1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, corpus_records) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    texts = [r["text"] for r in tiny_corpus(200)]
    return {arch: make_tiny_model(root / arch, arch=arch, texts=texts, hidden=16) for arch in ("gpt2", "llama")}


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, corpus_records) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", corpus_records)


@pytest.fixture(scope="session")
def exact_index(tiny_models, corpus_file, tmp_path_factory) -> Path:
    """A read-only index with the `exact` section (EK-FAC, 16 of the 24 documents in its correction sample)."""
    from attribindex import build_index

    out = tmp_path_factory.mktemp("exact-index") / "idx"
    build_index(exact_section_config(), str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
    return out


@pytest.fixture(scope="module")
def exact_index_on_cpu_and_cuda(exact_index) -> tuple[AttributionIndex, AttributionIndex]:
    """The session's exact index (EK-FAC, float64, dot mode) opened twice: model on the CPU, and on the GPU."""
    cpu = AttributionIndex.open(exact_index, device="cpu")
    cuda = AttributionIndex.open(exact_index, device="cuda")
    assert cpu.extractor.device.type == "cpu" and cuda.extractor.device.type == "cuda"
    assert cpu.extractor.dtype == cuda.extractor.dtype == torch.float64
    return cpu, cuda


def exact_section_config(mode: str = "dot", kind: str = "ekfac", batch_size: int = 4, **exact) -> BuildConfig:
    """`exact_config(mode)` plus the `exact` section (unprojected `kind`, correction sample 16 unless given)."""
    config = exact_config(mode)
    return dataclasses.replace(
        config,
        extract=dataclasses.replace(config.extract, batch_size=batch_size),
        exact=ExactConfig(enabled=True, kind=kind, **({"sample": 16} | exact)),
    )


def exact_config(mode: str = "dot", kind: str = "raw", **projection) -> BuildConfig:
    """Float64 compute and float32 storage: the build is exact up to fp32 round-off of the stored vectors."""
    return BuildConfig(
        projection=ProjectionConfig(**({"rank_in": 3, "rank_out": 4} | projection)),
        hessian=HessianConfig(kind=kind, damping=0.1),
        extract=ExtractConfig(batch_size=4, max_length=32, dtype="float64", device="cpu"),
        store=StoreConfig(dtype="float32", chunk_rows=10),
        index=IndexConfig(mode=mode, device="cpu"),
    )


def with_store(config: BuildConfig, **store) -> BuildConfig:
    return dataclasses.replace(config, store=dataclasses.replace(config.store, **store))


# --- a wheel of this checkout, installed on its own (tests/test_packaging.py, tests/demo) ---

ROOT = Path(__file__).resolve().parents[1]


def run_checked(command: list, cwd: Path, env: dict, timeout: float = 300) -> str:
    """Run `command`; its stdout, or a failure that shows the end of both outputs."""
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory) -> tuple[Path, dict]:
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
    run_checked([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", source], root, env)
    (wheel,) = (root / "dist").glob("attribindex-*.whl")

    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {p.name for p in (ROOT / "index_configs").glob("*.yaml")}
    assert {n.removeprefix("attribindex/presets/") for n in names if n.startswith("attribindex/presets/")} == presets
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "attribindex").rglob("*.py")}
    assert sources <= names, sorted(sources - names)
    static = {p.relative_to(ROOT).as_posix() for p in (ROOT / "attribindex" / "serve" / "static").iterdir()}
    assert static and static <= names, sorted(static - names)  # the explorer page `attribindex serve` answers at /

    venv = root / "venv"
    run_checked([sys.executable, "-m", "venv", "--without-pip", venv], root, env)
    python = venv / "bin" / "python"
    run_checked([*pip, "--python", python, "install", "--no-deps", wheel], root, env)
    site = Path(
        run_checked([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env).strip()
    )
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))  # one folder in a venv
    (site / "dependencies.pth").write_text("".join(f"{path}\n" for path in ours))
    return venv, env


BROWSER_INSTALL = "apt-get install -y chromium chromium-driver (or run tools/setup.sh), and pip install selenium"


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from the OS packages, driven by selenium (tests of the explorer and of reports)."""
    # A missing browser fails, never skips: a skipped test would let the page break unnoticed.
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is not installed; {BROWSER_INSTALL}")
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.fail(f"Chromium or chromedriver is not on PATH; {BROWSER_INSTALL}")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1400"):
        options.add_argument(flag)
    # both paths given: selenium's driver manager would otherwise try to download a matching driver
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    yield chrome
    chrome.quit()
