"""A living index: append, delete, compact and refresh, against full rebuilds and a brute-force model."""

from __future__ import annotations

import fcntl
import json
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from attribindex import (
    AttribIndexError,
    AttributionIndex,
    IndexMismatchError,
    append_documents,
    build_index,
    compact_index,
    delete_ids,
    refresh_index,
)
from attribindex.hessian import CurvatureSums, Preconditioner
from attribindex.index import FlatIndexWriter
from attribindex.store import file_sha256, layout, read_manifest, verify_files
from attribindex.testing import tiny_corpus, write_jsonl
from tests.conftest import exact_config
from tests.killing import run_killed
from tests.reference import assert_same_index, stamped_queries


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """48 documents: the first 16 are built, the rest arrive by appends."""
    records = tiny_corpus(48, seed=5)
    folder = tmp_path_factory.mktemp("pool")
    return records, folder


def _jsonl(folder, name, records):
    return write_jsonl(folder / f"{name}.jsonl", records)


def _build(tiny_models, data, out, config=None):
    return build_index(config or exact_config(), str(tiny_models["gpt2"]), data, out, id_field="id", progress=False)


def _append(out, data, **kwargs):
    return append_documents(out, data, id_field="id", progress=False, **kwargs)


def test_append_equals_a_build_over_old_and_new(tiny_models, corpus_file, corpus_records, tmp_path):
    old, new = corpus_records[:16], corpus_records[16:]
    living, whole = tmp_path / "living", tmp_path / "whole"
    _build(tiny_models, _jsonl(tmp_path, "old", old), living)
    frozen = AttributionIndex.open(living, load_model_now=False).preconditioner
    summary = _append(living, _jsonl(tmp_path, "new", new))
    assert summary.added == 8 and summary.version == 2 and summary.drift.max > 0
    _build(tiny_models, corpus_file, whole)

    appended, rebuilt = (AttributionIndex.open(p, load_model_now=False) for p in (living, whole))
    rows = list(range(24))
    assert [d.id for d in appended.store.documents(rows)] == [d.id for d in rebuilt.store.documents(rows)]
    raw = torch.cat([r for _, r in rebuilt.store.iter_raw()])  # (24, D)
    np.testing.assert_allclose(torch.cat([r for _, r in appended.store.iter_raw()]), raw, rtol=1e-6, atol=1e-12)
    assert len(appended.index.segments) == 2

    # With the preconditioner frozen, scores are the brute-force scores under the old whitening.
    probes = np.random.default_rng(1).standard_normal((4, raw.shape[1])).astype(np.float32)
    expected = probes @ frozen.whiten(raw).numpy().T  # (4, 24)
    for q, (top, _) in enumerate(appended.search(stamped_queries(appended, probes), k=24)):
        assert [a.row for a in top] == list(np.argsort(-expected[q], kind="stable"))
        scale = np.abs(expected[q]).max()  # float32 round-off of sums whose terms reach the largest score
        np.testing.assert_allclose([a.score for a in top], np.sort(expected[q])[::-1], rtol=1e-5, atol=1e-6 * scale)

    # Refreshing re-whitens with the updated sums: then it is the full build's index.
    assert refresh_index(living, progress=False).version == 3
    assert_same_index(whole, living, same_sources=False)
    assert "drift" not in _info(living)


def _info(path) -> str:
    from click.testing import CliRunner

    from attribindex.cli import main

    return CliRunner().invoke(main, ["info", str(path)]).output


class BruteForce:
    """The reference: live ids → raw gradients (from an independent build of the whole pool), the whitening
    in use, and exhaustive scoring. Knows nothing of segments, tombstones or chunks."""

    def __init__(self, raw_by_id: dict[str, torch.Tensor], names: list[str], dims: list[int], damping: float):
        self.raw_by_id, self.names, self.dims, self.damping = raw_by_id, names, dims, damping
        self.live: list[str] = []
        self.whitening: Preconditioner | None = None

    def append(self, ids: list[str]) -> None:
        self.live += ids

    def delete(self, ids: list[str]) -> None:
        self.live = [i for i in self.live if i not in set(ids)]

    def rewhiten(self) -> None:
        sums = CurvatureSums(dict(zip(self.names, self.dims)))
        raw = torch.stack([self.raw_by_id[i] for i in self.live])
        sums.update(dict(zip(self.names, raw.split(self.dims, dim=1))))
        self.whitening = Preconditioner.from_curvature(sums, self.names, self.dims, self.damping)

    def ranking(self, probe: np.ndarray) -> tuple[list[str], np.ndarray]:
        vectors = self.whitening.whiten(torch.stack([self.raw_by_id[i] for i in self.live])).numpy()
        scores = vectors @ probe
        order = np.argsort(-scores, kind="stable")
        return [self.live[i] for i in order], scores[order]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_appends_deletes_compactions_and_queries_match_brute_force(tiny_models, pool, tmp_path, seed):
    records, folder = pool
    reference = tmp_path / "reference"
    _build(tiny_models, _jsonl(folder, "all", records), reference)
    full = AttributionIndex.open(reference, load_model_now=False)
    raw = torch.cat([r for _, r in full.store.iter_raw()])
    model = BruteForce(
        {d.id: raw[row] for row, d in enumerate(full.store.documents(range(len(records))))},
        full.module_names,
        full.block_dims,
        damping=0.1,
    )

    rng = random.Random(seed)
    out = tmp_path / "living"
    _build(tiny_models, _jsonl(tmp_path, "start", records[:16]), out)
    model.append([r["id"] for r in records[:16]])
    model.rewhiten()
    waiting = records[16:]
    deleted: set[str] = set()
    probes = np.random.default_rng(seed).standard_normal((3, raw.shape[1])).astype(np.float32)
    for step in range(12):
        operation = rng.choice(
            ["append", "delete", "delete", "compact", "refresh"] if waiting else ["delete", "refresh"]
        )
        if operation == "append":
            batch, waiting = waiting[: rng.randint(1, 6)], waiting[6:]
            _append(out, _jsonl(tmp_path, f"batch{step}", batch))
            model.append([r["id"] for r in batch])
        elif operation == "delete" and len(model.live) > 3:
            victims = rng.sample(model.live, rng.randint(1, 3))
            summary = delete_ids(out, victims + ["never-indexed"])
            assert summary.unknown_ids == ("never-indexed",) and summary.rows == len(victims)
            model.delete(victims)
            deleted |= set(victims)
        elif operation == "compact":
            compact_index(out, progress=False)
        elif operation == "refresh":
            refresh_index(out, progress=False)
            model.rewhiten()

        index = AttributionIndex.open(out, load_model_now=False)  # a fresh open each time: changes are durable
        assert index.rows == len(model.live), (step, operation)
        found = index.search(stamped_queries(index, probes), k=index.rows, bottom=min(3, index.rows))
        for probe, (top, bottom) in zip(probes, found):
            ids, scores = model.ranking(probe)
            assert [a.id for a in top] == ids, (step, operation)
            np.testing.assert_allclose([a.score for a in top], scores, rtol=1e-4, atol=1e-5)
            assert [a.id for a in bottom] == ids[::-1][: len(bottom)]
            assert not deleted & {a.id for a in top + bottom}
        assert verify_files(out, read_manifest(out)).ok


def test_duplicates_unknown_ids_and_another_model_are_reported(tiny_models, corpus_file, corpus_records, tmp_path):
    out = tmp_path / "idx"
    _build(tiny_models, corpus_file, out)
    again = _jsonl(tmp_path, "again", corpus_records[:3] + [{"id": "fresh", "text": "A new knight rides home."}])
    with pytest.raises(AttribIndexError, match=r"3 documents of .* are already in the index \(first: id 'doc-0000'\)"):
        _append(out, again)
    summary = _append(out, again, skip_duplicates=True)
    assert summary.added == 1 and summary.duplicates_skipped == 3
    assert _append(out, again, skip_duplicates=True).appended_before == 2  # the same append again: nothing to do
    with pytest.raises(AttribIndexError, match="all 4 documents"):
        _append(out, again, skip_duplicates=True, skip_empty=True)
    with pytest.raises(IndexMismatchError, match="model differs"):
        _append(out, _jsonl(tmp_path, "other", [{"id": "x", "text": "Another text."}]), model=str(tiny_models["llama"]))

    nothing = delete_ids(out, ["no-such-id"])
    assert nothing.version is None and nothing.unknown_ids == ("no-such-id",) and "unknown" in nothing.format()
    assert delete_ids(out, ["fresh"]).version == 3
    assert delete_ids(out, ["fresh"]).already_deleted == 1
    with pytest.raises(AttribIndexError, match="would leave .* with no rows"):
        delete_ids(out, [r["id"] for r in corpus_records])
    events = [e.event for e in read_manifest(out).log]
    assert events == ["build", "append", "delete"]


def test_deletion_reaches_the_curvature_and_compaction_frees_space(tiny_models, corpus_file, corpus_records, tmp_path):
    out, survivors = tmp_path / "idx", tmp_path / "survivors"
    _build(tiny_models, corpus_file, out)
    delete_ids(out, [r["id"] for r in corpus_records[::3]])
    _build(tiny_models, _jsonl(tmp_path, "kept", [r for i, r in enumerate(corpus_records) if i % 3]), survivors)
    (left, _), (right, _) = (CurvatureSums.load(p / read_manifest(p).hessian.curvature_file) for p in (out, survivors))
    assert left.count == right.count == 16
    for name in left.sums:
        torch.testing.assert_close(left.sums[name], right.sums[name], rtol=1e-5, atol=1e-7)

    grads_before = sum(p.stat().st_size for p in (out / layout.ROWS_DIR).glob("*.grads.npy"))
    summary = compact_index(out, progress=False)
    assert summary.rows == 8 and summary.bytes_freed > 0
    assert sum(p.stat().st_size for p in (out / layout.ROWS_DIR).glob("*.grads.npy")) == grads_before * 16 // 24
    assert compact_index(out, progress=False).version is None  # nothing left to compact
    refresh_index(out, progress=False)
    # Deleted rows leave the sums as stored (float32 here), so the sums agree to float32 round-off.
    assert_same_index(survivors, out, rtol=1e-5, same_sources=False, curvature_rtol=1e-5)


def test_a_second_writer_is_refused_while_one_holds_the_lock(tiny_models, corpus_file, tmp_path):
    out = tmp_path / "idx"
    _build(tiny_models, corpus_file, out)
    with open(out / layout.LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(AttribIndexError, match="another attribindex process is changing"):
            delete_ids(out, ["doc-0001"])
    assert delete_ids(out, ["doc-0001"]).version == 2


def with_a_whitened_flat_file(out: Path) -> dict:
    """The manifest of index `out` as JSON, its exact segment replaced by the whitened float32 FAISS copy that
    indexes before format 9 held (written here, beside the rows): what an older attribindex left."""
    index = AttributionIndex.open(out, load_model_now=False)
    with FlatIndexWriter(out / layout.FLAT_INDEX, index.manifest.dim) as writer:
        writer.add(index.exact_vectors(np.arange(index.manifest.rows)))
    on_disk = json.loads((out / layout.MANIFEST).read_text())
    (segment,) = on_disk["index"]["segments"]
    files = {n: r for n, r in on_disk["files"].items() if n != segment["file"]}
    files[layout.FLAT_INDEX] = {
        "sha256": file_sha256(out / layout.FLAT_INDEX),
        "bytes": (out / layout.FLAT_INDEX).stat().st_size,
    }
    (out / segment["file"]).unlink()
    return on_disk | {
        "files": files,
        "index": on_disk["index"] | {"segments": [{"file": layout.FLAT_INDEX, "rows": segment["rows"]}]},
    }


def test_a_version_1_index_opens_and_can_be_changed(tiny_models, corpus_file, tmp_path):
    out = tmp_path / "idx"
    _build(tiny_models, corpus_file, out)
    on_disk = with_a_whitened_flat_file(out)  # rewritten as version 1 wrote it
    on_disk |= {"format_version": 1, "index": on_disk["index"] | {"file": layout.FLAT_INDEX}}
    for key in ("version", "deleted"):
        del on_disk[key]
    del on_disk["index"]["segments"]
    (out / layout.MANIFEST).write_text(json.dumps(on_disk))
    assert AttributionIndex.open(out, load_model_now=False).version == 1
    assert delete_ids(out, ["doc-0002"]).version == 2
    assert json.loads((out / layout.MANIFEST).read_text())["format_version"] == layout.FORMAT_VERSION


CRASHES = {
    "append, while writing its segment (the rows' norms)": (
        ("attribindex.pipeline._write_segments", "atomic_open", 1, "before"),
        "append_documents",
    ),
    "append, after its chunks, before the commit": (
        ("attribindex.pipeline._append", "write_store_segment", 1, "before"),
        "append_documents",
    ),
    "compaction, while writing the new index (its norms)": (
        ("attribindex.pipeline._write_segments", "atomic_open", 1, "before"),
        "compact_index",
    ),
    "compaction, after the commit, before cleaning up": (
        ("attribindex.pipeline._mutation", "collect_garbage", 2, "before"),
        "compact_index",
    ),
}


@pytest.mark.parametrize("crash", list(CRASHES))
def test_a_crash_during_append_or_compaction_leaves_a_consistent_index(
    crash, tiny_models, corpus_file, corpus_records, tmp_path
):
    out = tmp_path / "idx"
    _build(tiny_models, corpus_file, out)
    delete_ids(out, ["doc-0003", "doc-0004"])
    before = read_manifest(out)
    new = _jsonl(
        tmp_path, "new", [{"id": f"new-{i}", "text": f"A fresh speech number {i} of kings."} for i in range(5)]
    )
    kill_at, function = CRASHES[crash]
    args = (out, new) if function == "append_documents" else (out,)
    kwargs = {"id_field": "id", "progress": False} if function == "append_documents" else {"progress": False}
    killed = run_killed(kill_at, function, *args, **kwargs)
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    after = read_manifest(out)
    committed = crash.endswith("before cleaning up")
    assert after.version == before.version + (1 if committed else 0)
    index = AttributionIndex.open(out, load_model_now=False)
    ids = {d.id for d in index.store.documents(range(after.rows))}
    live = {r["id"] for r in corpus_records} - {"doc-0003", "doc-0004"}
    assert index.rows == 22 and ids >= live
    # Every live row comes back, once, from the top and from the bottom; the deleted ones never do.
    probes = np.random.default_rng(0).standard_normal((2, after.dim)).astype(np.float32)
    for top, bottom in index.search(stamped_queries(index, probes), k=22, bottom=22):
        assert sorted(a.id for a in top) == sorted(a.id for a in bottom) == sorted(live)
    assert verify_files(out, after).ok

    # The next change cleans up what the crash left and works.
    summary = _append(out, new)
    assert summary.added == 5 and AttributionIndex.open(out, load_model_now=False).rows == 27
    manifest = read_manifest(out)
    named = {name for name, _ in manifest.recorded_files()}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert on_disk == named | {layout.MANIFEST}


def test_a_killed_append_resumes_with_the_same_command(tiny_models, corpus_file, corpus_records, tmp_path):
    old, new = _jsonl(tmp_path, "old", corpus_records[:4]), _jsonl(tmp_path, "new", corpus_records[4:])
    whole, out = tmp_path / "whole", tmp_path / "idx"
    for folder in (whole, out):
        _build(tiny_models, old, folder)
    _append(whole, new)

    # 20 new rows in chunks of 10: killed before the second chunk is written.
    kill_at = ("attribindex.store._rows", "ChunkWriter.flush", 2, "before")
    killed = run_killed(kill_at, "append_documents", out, new, id_field="id", progress=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert read_manifest(out).version == 1 and AttributionIndex.open(out, load_model_now=False).rows == 4
    summary = _append(out, new)
    assert summary.added == 20 and summary.resumed == 10 and "resumed" in summary.format()
    assert_same_index(whole, out)

    # Another change in between discards an interrupted append; the next append starts afresh.
    again = tmp_path / "again"
    _build(tiny_models, old, again)
    run_killed(kill_at, "append_documents", again, new, id_field="id", progress=False)
    delete_ids(again, ["doc-0001"])
    assert not (again / layout.APPEND_REQUEST).exists()
    assert _append(again, new).resumed == 0


EDIT_CRASHES = {
    "delete, after its new files, before the commit": (
        ("attribindex.pipeline._mutation", "write_manifest", 1, "before"),
        "delete_ids",
    ),
    "delete, after the commit, before cleaning up": (
        ("attribindex.pipeline._mutation", "collect_garbage", 2, "before"),
        "delete_ids",
    ),
    "refresh, while writing the re-whitened index (its norms)": (
        ("attribindex.pipeline._write_segments", "atomic_open", 1, "before"),
        "refresh_index",
    ),
    "refresh, after the commit, before cleaning up": (
        ("attribindex.pipeline._mutation", "collect_garbage", 2, "before"),
        "refresh_index",
    ),
}


def _edit(function: str, out):
    if function == "delete_ids":
        return delete_ids(out, ["doc-0005", "doc-0006"])
    return refresh_index(out, progress=False)


def _on_disk(out) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")}


def _assert_serves_like(reference, out) -> None:
    """`out` verifies, and holds `reference`'s index: the same deleted rows, curvature sums and whitening, and the
    same answers to queries."""
    assert verify_files(out, read_manifest(out)).ok
    a, b = (AttributionIndex.open(p, load_model_now=False) for p in (reference, out))
    np.testing.assert_array_equal(a.manifest.deleted_rows(a.root), b.manifest.deleted_rows(b.root))
    (sums_a, _), (sums_b, _) = (CurvatureSums.load(i.root / i.manifest.hessian.curvature_file) for i in (a, b))
    assert sums_a.count == sums_b.count and sums_a.tensors.keys() == sums_b.tensors.keys()
    assert all(torch.equal(t, sums_b.tensors[n]) for n, t in sums_a.tensors.items())
    assert a.manifest.hessian.preconditioner_hash == b.manifest.hessian.preconditioner_hash
    probes = np.random.default_rng(2).standard_normal((2, a.manifest.dim)).astype(np.float32)
    for (top_a, low_a), (top_b, low_b) in zip(
        a.search(stamped_queries(a, probes), k=a.rows, bottom=3),
        b.search(stamped_queries(b, probes), k=b.rows, bottom=3),
    ):
        assert [x.id for x in top_b + low_b] == [x.id for x in top_a + low_a]
        np.testing.assert_allclose([x.score for x in top_b], [x.score for x in top_a], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def edited(tiny_models, corpus_file, tmp_path_factory):
    """An index with two rows deleted (so that a refresh has a whitening to change), copied by each test."""
    out = tmp_path_factory.mktemp("edited") / "idx"
    _build(tiny_models, corpus_file, out)
    delete_ids(out, ["doc-0003", "doc-0004"])
    return out


@pytest.mark.parametrize("crash", list(EDIT_CRASHES))
def test_a_crash_during_delete_or_refresh_leaves_the_old_or_the_new_index(crash, edited, tmp_path):
    out, old, new = tmp_path / "idx", tmp_path / "old", tmp_path / "new"
    for copy in (out, old, new):
        shutil.copytree(edited, copy)
    kill_at, function = EDIT_CRASHES[crash]
    _edit(function, new)  # the same change, uninterrupted
    before = read_manifest(out)
    changed = read_manifest(new)
    assert (changed.live_rows, changed.hessian.preconditioner_hash) != (
        before.live_rows,
        before.hessian.preconditioner_hash,
    )  # the old and the new index can be told apart

    if function == "delete_ids":
        killed = run_killed(kill_at, function, out, ids=["doc-0005", "doc-0006"])
    else:
        killed = run_killed(kill_at, function, out, progress=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    committed = crash.endswith("before cleaning up")
    after = read_manifest(out)
    named = {name for name, _ in after.recorded_files()} | {layout.MANIFEST}
    # Killed mid-way: the next version's files are on disk, uncommitted (before the commit), or the old
    # version's files are still there, unnamed (after it).
    assert _on_disk(out) - named
    assert after.version == before.version + committed
    _assert_serves_like(new if committed else old, out)

    # Running the same change again finishes it, and leaves only the files the manifest names.
    again = _edit(function, out)
    assert again.version == (None if committed else after.version + 1)
    _assert_serves_like(new, out)
    assert _on_disk(out) == {name for name, _ in read_manifest(out).recorded_files()} | {layout.MANIFEST}
