"""Whole index folders written by an older format version (v2, commit cebf4c7: see fixtures/README.md) open with
today's code, give the answers the old code gave, verify, show their info, and take a change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from attribindex import AttributionIndex, delete_ids
from attribindex.cli import main
from attribindex.store import layout, read_manifest, verify_files

FOLDERS = Path(__file__).parent / "fixtures" / "v2-index-folders"  # model/, index/, living/, answers.json
ANSWERS = json.loads((FOLDERS / "answers.json").read_text())
# What each folder holds: `index` the 24 documents of corpus.jsonl; `living` those plus 12 appended, less 5 deleted.
LIVE = {
    "index": {f"doc-{i:04d}" for i in range(24)},
    "living": {f"doc-{i:04d}" for i in range(36)} - {"doc-0003", "doc-0010", "doc-0025", "doc-0005", "doc-0033"},
}


@pytest.fixture
def v2(tmp_path) -> Path:
    """A copy, so that a test that writes leaves the fixture as the old code wrote it."""
    shutil.copytree(FOLDERS, tmp_path / "v2")
    return tmp_path / "v2"


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def open_v2(v2: Path, name: str) -> AttributionIndex:
    # The manifest records the model where the fixture was made (/tmp/fx15/gpt2): the bundled copy stands in for it.
    return AttributionIndex.open(v2 / name, model=v2 / "model", device="cpu")


def assert_answers(found, expected: list[dict]) -> None:
    assert len(found.results) == len(expected)
    for result, want in zip(found.results, expected):
        for got, wanted in ((result.top, want["top"]), (result.bottom, want["bottom"])):
            assert [a.id for a in got] == [i for i, _ in wanted]
            np.testing.assert_allclose([a.score for a in got], [s for _, s in wanted], rtol=1e-5, atol=1e-6)
        assert result.loss == pytest.approx(want["loss"], rel=1e-9)


@pytest.mark.parametrize("name", ["index", "living"])
def test_a_v2_folder_answers_as_the_v2_code_did(v2, name):
    before = files(v2 / name)
    manifest = read_manifest(v2 / name)
    assert manifest.read_from_version == 2 and manifest.format_version == layout.FORMAT_VERSION
    index = open_v2(v2, name)
    found = index.attribute(ANSWERS["queries"], k=5, bottom=2)
    assert_answers(found, ANSWERS["answers"][name])
    for result in found.results:  # sane on its own: proponents first, opponents last
        top, bottom = [a.score for a in result.top], [a.score for a in result.bottom]
        assert top == sorted(top, reverse=True) and bottom == sorted(bottom) and top[0] > 0 > bottom[0]
    everything = index.attribute(ANSWERS["queries"][0], k=manifest.live_rows).results[0].top
    ids = [a.id for a in everything]
    assert len(ids) == manifest.live_rows and set(ids) == LIVE[name]  # each live row once, deleted ones never
    assert (name == "living") == bool(manifest.deleted.rows) and len(manifest.index.segments) == (
        2 if name == "living" else 1
    )
    assert files(v2 / name) == before  # reading an old folder writes nothing into it


def test_verify_and_info_read_a_v2_folder(v2):
    for name in ("index", "living"):
        result = CliRunner().invoke(main, ["verify", str(v2 / name)])
        assert result.exit_code == 0 and "intact" in result.output, result.output
    info = CliRunner().invoke(main, ["info", str(v2 / "living")])
    assert info.exit_code == 0, info.output
    assert "format v2" in info.output and "2 rows deleted" in info.output and "96 dims from 8 modules" in info.output
    grads = sorted((v2 / "living" / "rows").glob("*.grads.npy"))[0]
    data = bytearray(grads.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in a v2 chunk: verify must be reading its recorded checksums
    grads.write_bytes(bytes(data))
    damaged = CliRunner().invoke(main, ["verify", str(v2 / "living")])
    assert damaged.exit_code == 1 and grads.name in damaged.output, damaged.output


def test_a_change_to_a_v2_folder_writes_the_current_version(v2):
    """Deleting the top proponent of the first query: the rest of that answer is the v2 answer, one place up."""
    first = ANSWERS["answers"]["living"][0]
    delete_ids(v2 / "living", [first["top"][0][0]])
    written = json.loads((v2 / "living" / layout.MANIFEST).read_text())
    manifest = read_manifest(v2 / "living")
    assert written["format_version"] == layout.FORMAT_VERSION and verify_files(v2 / "living", manifest).ok
    found = open_v2(v2, "living").attribute(ANSWERS["queries"][0], k=4, bottom=2)
    assert_answers(found, [first | {"top": first["top"][1:]}])
