"""The reference LDS workloads run end to end (tiny settings): they must not rot between measurement runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from attribindex.eval import lds_records, lds_table, linear_datamodeling_score

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def test_digits_workload_scores_every_kind_with_and_without_the_optimizer_correction_and_exactly(tmp_path):
    command = [sys.executable, str(TOOLS / "lds_digits.py"), "--train", "120", "--queries", "12", "--subsets", "5"]
    command += ["--ranks", "4", "--dampings", "0.1", "--epochs", "3", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "lds.json").read_text())
    settings = {(r["gradients"], r["hessian"]) for r in rows}
    kinds = ("identity", "raw", "kfac", "ekfac")
    exact = {("plain", "exact kfac"), ("plain", "exact ekfac")}  # the unprojected method, over all N
    assert settings == {("-", "random scores")} | {(g, k) for g in ("plain", "adam √v") for k in kinds} | exact
    assert all(np.isfinite(r["lds"]) and r["low"] <= r["lds"] <= r["high"] for r in rows)
    assert (tmp_path / "lds-scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| plain | kfac | 4 | 0.1 |" in done.stdout


def test_lds_table_and_records():
    rng = np.random.default_rng(0)
    subsets = rng.random((6, 10)) < 0.5
    scores = rng.standard_normal((3, 10))
    losses = -(subsets @ scores.T)  # (M, Q): a perfect linear datamodel
    result = linear_datamodeling_score(scores, subsets, losses, bootstrap=50)
    rows = [{"hessian": "raw", "rank": 8, "lds": result}]
    table = lds_table(rows, ["hessian", "rank"]).splitlines()
    assert table[0] == "| hessian | rank | LDS | 95 % CI |" and table[2].startswith("| raw | 8 | 1.000 |")
    assert lds_records(rows) == [{"hessian": "raw", "rank": 8, "lds": 1.0, "low": 1.0, "high": 1.0}]
