"""Safetensors files are a function of their contents: safetensors orders metadata keys by a per-process hash
seed, so the same file written by two processes differed in bytes before `save_safetensors` sorted them."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors import safe_open

WRITE = """
import sys, torch
from pathlib import Path
from attribindex.store import save_safetensors
metadata = {f"key{i}": str(i) for i in range(12)} | {"note": "é ü"}
save_safetensors({"b": torch.arange(5.0), "a": torch.ones(2, 3)}, Path(sys.argv[1]), metadata)
"""


def test_two_processes_write_the_same_bytes_that_read_back(tmp_path):
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for path in paths:
        subprocess.run([sys.executable, "-c", WRITE, str(path)], check=True)
    contents = {path.read_bytes() for path in paths}
    assert len(contents) == 1
    with safe_open(str(paths[0]), "pt") as handle:
        assert handle.metadata() == {f"key{i}": str(i) for i in range(12)} | {"note": "é ü"}
        torch.testing.assert_close(handle.get_tensor("b"), torch.arange(5.0))
    data = paths[0].read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])


def test_files_written_by_any_writer_get_the_mode_open_gives(tmp_path):
    """safetensors writes through an owner-only temporary of its own; an index built by one user must stay readable
    by the others who query it, like its numpy and JSON files."""
    import numpy as np
    import torch

    from attribindex.store import atomic_open, save_safetensors

    save_safetensors({"w": torch.ones(3)}, tmp_path / "sums.safetensors")
    with atomic_open(tmp_path / "rows.npy") as handle:
        np.save(handle, np.ones(3))
    (tmp_path / "plain").write_bytes(b"")
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["sums.safetensors", "rows.npy", "plain"], modes["plain"])
