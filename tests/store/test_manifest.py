"""The typed manifest: every committed fixture (real manifests written by each format version) parses, upgrades,
and round-trips; damaged manifests are refused with the place that is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attribindex._records import to_json
from attribindex.config import ExactConfig
from attribindex.errors import AttribIndexError
from attribindex.store import (
    BuildMarker,
    BuildRequest,
    IndexManifest,
    ShardManifest,
    layout,
    parse_manifest,
    read_manifest,
    read_marker,
    upgraded,
    write_manifest,
)

FIXTURES = Path(__file__).parent / "fixtures"
MANIFESTS = sorted(FIXTURES.glob("*.manifest.json"))
CURRENT = [p for p in MANIFESTS if json.loads(p.read_text())["format_version"] == layout.FORMAT_VERSION]


def _written(data) -> str:
    return json.dumps(data, indent=2) + "\n"  # what `write_json` writes


def test_there_are_fixtures_of_every_readable_version():
    versions = {json.loads(p.read_text())["format_version"] for p in MANIFESTS}
    assert versions == set(layout.READABLE_VERSIONS) and len(CURRENT) >= 10


@pytest.mark.parametrize("path", CURRENT, ids=lambda p: p.name)
def test_a_current_manifest_round_trips_byte_for_byte(path, tmp_path):
    text = path.read_text()
    manifest = parse_manifest(upgraded(json.loads(text)))
    assert _written(to_json(manifest)) == text
    (tmp_path / layout.MANIFEST).write_text(text)
    write_manifest(tmp_path, read_manifest(tmp_path, kind="any"))  # the one reader, then the one writer
    assert (tmp_path / layout.MANIFEST).read_text() == text


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_version_upgrades_to_a_current_manifest_losing_nothing(path, tmp_path):
    data = json.loads(path.read_text())
    (tmp_path / layout.MANIFEST).write_text(path.read_text())
    manifest = read_manifest(tmp_path, kind="any")
    assert manifest.format_version == layout.FORMAT_VERSION and manifest.read_from_version == data["format_version"]
    assert to_json(manifest) == upgraded(data)  # every key the upgrade gives is kept (order aside)
    assert parse_manifest(to_json(manifest)) == manifest  # and the upgraded form reads back the same
    for key in ("index_id", "created", "rows", "dim"):
        assert getattr(manifest, key) == data[key]
    assert isinstance(manifest, ShardManifest if data["format"] == layout.SHARD_FORMAT_NAME else IndexManifest)
    if isinstance(manifest, IndexManifest):
        assert manifest.live_rows == data["rows"] - data.get("deleted", {"rows": 0})["rows"]
        assert sum(s.rows for s in manifest.index.segments) == manifest.rows
    assert [name for name, _ in manifest.recorded_files()][-len(data["files"]) :] == list(data["files"])


def test_the_fixtures_hold_every_optional_part():
    """So that the round trip above covers them."""
    current = [parse_manifest(json.loads(p.read_text())) for p in CURRENT]
    indexes = [m for m in current if isinstance(m, IndexManifest)]
    events = {e.event for m in current for e in m.log}
    assert events == {"build", "merge", "append", "delete", "compact", "refresh", "operating_point"}
    assert any(e.event == "build" and e.resumed for m in current for e in m.log)
    assert any(e.event == "append" and e.request for m in current for e in m.log)
    assert any(s.from_store for m in indexes for s in m.index.segments)
    assert any(m.projection.optimizer for m in current)
    assert any(m.index.operating_point for m in indexes) and any(s.plan for m in indexes for s in m.index.segments)
    assert any(m.hessian.drift for m in indexes) and any(m.hessian.retained_deleted for m in indexes)
    assert any(m.deleted.file for m in indexes) and any(isinstance(m, ShardManifest) for m in current)
    assert any(m.ensemble is not None and len(m.ensemble.checkpoints) == 2 for m in indexes)
    training = [m for m in indexes if m.training is not None]
    assert {m.training.rows for m in training} == {"per_step", "summed"}
    assert any(e.event == "delete" for m in training for e in m.log)  # a mutation keeps the training record
    exact = [m.exact for m in indexes if m.exact is not None]
    assert {e.kind for e in exact} == {"kfac", "ekfac"} and {e.fisher for e in exact} == {"empirical", "true"}


def test_exact_sections_before_version_10_read_as_factors_over_every_example(tmp_path):
    """Their factors summed every example; the current default (a factor sample) would describe them wrongly."""
    for version, expected in ((9, None), (10, ExactConfig().factor_sample)):
        path = FIXTURES / f"v{version}-index-exact-kfac-cosine.manifest.json"
        (tmp_path / layout.MANIFEST).write_text(path.read_text())
        assert read_manifest(tmp_path).config.exact.factor_sample == expected


def test_the_build_marker_round_trips(tmp_path):
    text = (FIXTURES / "v6-building.json").read_text()
    (tmp_path / layout.BUILD_MARKER).write_text(text)
    marker = read_marker(tmp_path)
    assert isinstance(marker, BuildMarker) and isinstance(marker.request, BuildRequest)
    assert _written(to_json(marker)) == text


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("rows"), "missing key 'rows'"),
        (lambda m: m["hessian"].update(examples="many"), r"manifest.hessian.examples: expected an integer"),
        (lambda m: m["store"]["chunks"][0].update(rowz=1), "unknown key 'rowz'. Did you mean 'rows'"),
        (lambda m: m.update(normalization="l2"), "normalization: 'l2' is not allowed"),
        (lambda m: m["log"].append({"event": "rename"}), r"manifest.log\[1\]: matches none of the known forms"),
    ],
)
def test_a_damaged_manifest_is_refused_saying_where(edit, message, tmp_path):
    data = json.loads((FIXTURES / "v6-index.manifest.json").read_text())
    edit(data)
    (tmp_path / layout.MANIFEST).write_text(json.dumps(data))
    with pytest.raises(AttribIndexError, match=message) as caught:
        read_manifest(tmp_path)
    assert "was edited by hand" in str(caught.value) and "Rebuild the index" in str(caught.value)


def test_an_unknown_version_is_refused_with_the_readable_ones(tmp_path):
    data = json.loads((FIXTURES / "v6-index.manifest.json").read_text()) | {"format_version": 99}
    (tmp_path / layout.MANIFEST).write_text(json.dumps(data))
    with pytest.raises(AttribIndexError, match=r"format version 99; this attribindex reads versions 1, 2, 3, 4, 5"):
        read_manifest(tmp_path)


@pytest.mark.parametrize(
    "path", [p for p in MANIFESTS if json.loads(p.read_text())["format_version"] < 6], ids=lambda p: p.name
)
def test_before_version_6_the_rows_hold_no_bias_and_the_head_was_excluded_by_name_only(path, tmp_path):
    (tmp_path / layout.MANIFEST).write_text(path.read_text())
    manifest = read_manifest(tmp_path, kind="any")
    assert manifest.config.projection.bias is False and manifest.config.projection.include_head is True
    assert not any(m.bias for m in manifest.modules)
    assert all(m.rank_in <= m.in_features for m in manifest.modules)
