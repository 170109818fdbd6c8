"""tools/gpu_check.sh on a machine without a CUDA GPU: one line saying why and that nothing ran, exit 0, and a report
file saying the same; no Python is started (nothing is imported or installed). The GPU branch runs on GPU machines."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "gpu_check.sh"


def executable(path: Path, body: str) -> Path:
    """A shell script at `path` with `body`."""
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def no_python(tmp_path) -> tuple[dict, Path]:
    """An environment whose python, python3 and pip only leave a mark when run: the CPU path must start none."""
    shims, mark = tmp_path / "shims", tmp_path / "python-was-run"
    shims.mkdir()
    for name in ("python", "python3", "pip", "pip3"):
        executable(shims / name, f'echo "$0 $*" >> "{mark}"\nexit 97\n')
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "CUDA_VISIBLE_DEVICES", "GPU_CHECK_NVIDIA_SMI")}
    env["PATH"] = f"{shims}{os.pathsep}{env['PATH']}"
    return env, mark


def run(script: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60)


# case: (what the nvidia-smi asked prints and its exit status, or None for none at all; the reason the script gives)
CASES = {
    "no-nvidia-smi": (None, "nvidia-smi not found"),
    "nvidia-smi-fails": (
        ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", 9),
        "nvidia-smi failed (exit 9): NVIDIA-SMI has failed because it couldn't communicate",
    ),
    "no-gpu-listed": (("No devices were found", 0), "nvidia-smi lists no GPU: No devices were found"),
    "gpus-hidden": (("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)", 0), "CUDA_VISIBLE_DEVICES='-1' hides every GPU"),
}


@pytest.mark.parametrize("case", CASES)
def test_without_a_cuda_device_it_says_why_runs_nothing_and_exits_0(no_python, tmp_path, case):
    env, mark = no_python
    answer, why = CASES[case]
    smi = tmp_path / "absent" / "nvidia-smi"
    if answer is not None:
        message, status = answer
        smi = executable(tmp_path / "nvidia-smi", f'echo "{message}"\nexit {status}\n')
    env["GPU_CHECK_NVIDIA_SMI"] = str(smi)
    if case == "gpus-hidden":
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    report = tmp_path / "reports" / "gpu.md"
    done = run(SCRIPT, env, "--report", str(report))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"no CUDA device: {why}"), done.stdout
    assert lines[0].endswith(f"; nothing run (report: {report})")
    text = report.read_text()
    assert text.startswith("# attribindex GPU check\n")
    assert f"- result: not run: no CUDA device: {why}" in text
    assert "nothing was set up or run" in text
    assert not mark.exists(), f"the CPU path started Python: {mark.read_text()}"


def test_the_report_goes_to_out_or_else_into_the_checkout(no_python, tmp_path):
    """Without --report: $OUT/gpu-report.md when $OUT is a folder (a device run's files), else gpu-check/ in the
    checkout the script belongs to (a copy here, so that the shared one is not written to)."""
    env, mark = no_python
    env["GPU_CHECK_NVIDIA_SMI"] = str(tmp_path / "absent")
    checkout = tmp_path / "checkout"
    (checkout / "tools").mkdir(parents=True)
    script = Path(shutil.copy(SCRIPT, checkout / "tools" / "gpu_check.sh"))
    out = tmp_path / "out"
    out.mkdir()
    sent = run(script, {**env, "OUT": str(out)})
    assert sent.returncode == 0 and sent.stdout.endswith(f"(report: {out / 'gpu-report.md'})\n")
    assert sorted(p.name for p in out.iterdir()) == ["gpu-report.md"]  # one file
    kept = run(script, env)
    default = checkout / "gpu-check" / "gpu-report.md"
    assert kept.returncode == 0 and kept.stdout.endswith(f"(report: {default})\n")
    assert "no CUDA device: nvidia-smi not found" in default.read_text()
    assert not mark.exists()
    assert "/gpu-check/" in (SCRIPT.parents[1] / ".gitignore").read_text().splitlines()  # never committed


def test_the_script_parses_whole():
    """bash reads a script command by command: a syntax error in the GPU branch would show only on a GPU machine."""
    checked = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
