"""Running a command again: after it committed (its process killed just after the commit), it finishes the job and
changes nothing; after it ran out of disk space, permission or memory, it failed with one line naming the cause and
the fix, and once the cause is gone the same command completes, equal to an uninterrupted run."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from attribindex import (
    AttribIndexError,
    AttributionIndex,
    append_documents,
    build_index,
    delete_ids,
    merge_shards,
    refresh_index,
)
from attribindex.cli import main
from attribindex.config import config_to_dict
from attribindex.store import layout, read_manifest
from attribindex.testing import tiny_corpus, write_jsonl
from tests.conftest import exact_config
from tests.forking import forked
from tests.killing import cli_killed


@pytest.fixture(scope="module")
def base(tiny_models, corpus_file, tmp_path_factory) -> Path:
    """The 24-document index every test starts from (read only: tests copy it), built in this process; beside it
    its config as a file, for the command line."""
    folder = tmp_path_factory.mktemp("base")
    (folder / "config.yaml").write_text(yaml.safe_dump(config_to_dict(exact_config())))
    build_index(exact_config(), str(tiny_models["gpt2"]), corpus_file, folder / "idx", id_field="id", progress=False)
    return folder / "idx"


@pytest.fixture(scope="module")
def new_documents(tmp_path_factory) -> Path:
    """12 documents the base index does not hold (ids doc-0024 … doc-0035): two chunks of 10 rows when appended."""
    return write_jsonl(tmp_path_factory.mktemp("new") / "new.jsonl", tiny_corpus(36, seed=1)[24:])


@pytest.fixture(scope="module")
def appended(base, new_documents, tmp_path_factory) -> Path:
    """The base index with the new documents appended, uninterrupted, in this process."""
    out = tmp_path_factory.mktemp("appended") / "idx"
    shutil.copytree(base, out)
    append_documents(out, new_documents, id_field="id", progress=False)
    return out


def copy_of(index: Path, tmp_path: Path, name: str = "idx") -> Path:
    """A copy of `index` to change."""
    shutil.copytree(index, tmp_path / name)
    return tmp_path / name


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too: the lock, leftover temporaries) by relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _timeless(value):
    """Manifest JSON less what tells two runs apart by when they ran: `created`, each event's `time`, and a build
    event's `resumed` (the time and rows of the run it continued)."""
    if isinstance(value, dict):
        return {k: _timeless(v) for k, v in value.items() if k not in ("created", "time", "resumed")}
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    return value


def assert_same_as_uninterrupted(folder: Path, reference: Path) -> None:
    """`folder` holds exactly the files of `reference`, byte for byte, and the same manifest apart from timestamps."""
    got, want = files(folder), files(reference)
    assert sorted(got) == sorted(want)
    differing = [name for name in want if name != layout.MANIFEST and got[name] != want[name]]
    assert not differing, differing
    manifests = (json.loads(f[layout.MANIFEST]) for f in (got, want))
    assert _timeless(next(manifests)) == _timeless(next(manifests))


def committed_files(folder: Path, snapshot: dict[str, bytes]) -> dict[str, bytes]:
    """The files of `snapshot` (taken of `folder`) that its manifest names, with the manifest and the lock."""
    named = {name for name, _ in read_manifest(folder).recorded_files()} | {layout.MANIFEST, layout.LOCK}
    return {name: data for name, data in snapshot.items() if name in named}


def one_error_line(result) -> str:
    """The message of a command that failed cleanly: exit status 1, one `Error:` line, no traceback."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.exception, result.output)
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


# ---- a command run again after it committed ----


def test_an_append_run_again_after_its_commit_changes_nothing_and_says_so(base, appended, new_documents, tmp_path):
    out = copy_of(base, tmp_path)
    append = ["append", str(out), "--data", str(new_documents), "--id-field", "id"]
    # Killed just after the manifest rename (the commit point), before the old version's files were removed.
    killed = cli_killed(("attribindex.pipeline._mutation", "write_manifest", 1, "after"), *append)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert read_manifest(out).version == 2
    snapshot = files(out)
    committed = committed_files(out, snapshot)
    assert set(snapshot) - set(committed) >= {layout.APPEND_REQUEST, layout.CURVATURE}  # left behind by the kill

    again = CliRunner().invoke(main, append)
    assert again.exit_code == 0, again.output
    assert "already appended as version 2; nothing to do" in again.output
    assert files(out) == committed  # what the killed run committed, byte for byte, and nothing else
    assert_same_as_uninterrupted(out, appended)

    # Other documents under ids already indexed are refused as before (the same ids, one text changed).
    changed = tiny_corpus(36, seed=1)[24:]
    changed[3]["text"] += " Changed."
    other = write_jsonl(tmp_path / "other.jsonl", changed)
    refused = CliRunner().invoke(main, ["append", str(out), "--data", str(other), "--id-field", "id"])
    assert "12 documents of" in one_error_line(refused) and "--skip-duplicates" in refused.output
    assert files(out) == committed


def test_documents_appended_again_after_their_rows_were_deleted_come_back(appended, new_documents, tmp_path):
    """Only the append that made the current version counts as done: after a delete of its rows, the same append is
    new work, not a rerun; and a deleted id may come back with a new text (a document updated by delete + append),
    its new row the one that answers."""
    out = copy_of(appended, tmp_path)
    records = [json.loads(line) for line in new_documents.read_text().splitlines()]
    delete_ids(out, [r["id"] for r in records])
    again = append_documents(out, new_documents, id_field="id", progress=False)
    assert (again.appended_before, again.added, again.version) == (None, 12, 4)

    updated = {"id": records[0]["id"], "text": "Storm storm storm crown."}
    delete_ids(out, [updated["id"]])
    append_documents(out, write_jsonl(tmp_path / "updated.jsonl", [updated]), id_field="id", progress=False)
    index = AttributionIndex.open(out)
    assert read_manifest(out).live_rows == 36 and read_manifest(out).version == 6
    top = index.attribute(updated["text"], k=36).results[0].top
    assert [a.text for a in top if a.id == updated["id"]] == [updated["text"]]  # once, with its new text
    assert index.explain(updated["text"], [updated["id"]]).examples[0].score == pytest.approx(top[0].score)


def test_a_refresh_run_again_after_its_commit_writes_no_version(base, tmp_path):
    edited = copy_of(base, tmp_path, "edited")
    delete_ids(edited, ["doc-0003", "doc-0004"])  # so that the refresh has a whitening to change
    out, whole = copy_of(edited, tmp_path), copy_of(edited, tmp_path, "whole")
    refresh_index(whole, progress=False)
    killed = cli_killed(("attribindex.pipeline._edit", "commit", 1, "after"), "refresh", str(out))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert read_manifest(out).version == 3
    snapshot = files(out)
    assert_same_as_uninterrupted(out, whole)

    again = CliRunner().invoke(main, ["refresh", str(out)])
    assert again.exit_code == 0, again.output
    assert "its whitening (version 3) already is the one its curvature sums give; nothing to do" in again.output
    assert files(out) == snapshot


# ---- resource failures ----

# A child process in a mount namespace of its own (as root, or as root of a user namespace of its own), so that
# the file systems it mounts are seen by nothing else: a tmpfs of 4 MiB, filled up but for a few pages before a
# build and an append, and a read-only bind mount of the index for a delete. Each command runs through the command
# line twice: on the full (or read-only) file system, and again once the filler is deleted (the bind mount is gone).
# It prints what happened as JSON and keeps the folders it made.
_RESOURCE_DRIVER = r"""
import ctypes, json, os, shutil, subprocess, sys
from pathlib import Path
mount, keep, config, model, corpus, new, ids = map(Path, sys.argv[1:8])

def private_tmpfs():
    uid, gid = os.getuid(), os.getgid()
    new_namespaces = 0x00020000 | (0 if uid == 0 else 0x10000000)  # CLONE_NEWNS, and CLONE_NEWUSER unless root
    if ctypes.CDLL(None, use_errno=True).unshare(new_namespaces) != 0:
        return "unshare: " + os.strerror(ctypes.get_errno())
    if uid != 0:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
        Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    # private first: a mount must not propagate back to the namespace the tests run in
    for command in (["mount", "--make-rprivate", "/"], ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)]):
        try:
            done = subprocess.run(command, capture_output=True, text=True)
        except OSError as err:
            return f"{command[0]}: {err}"
        if done.returncode != 0:
            return " ".join(command) + ": " + done.stderr.strip()
    return None

problem = private_tmpfs()
if problem:
    print(json.dumps({"skip": f"cannot mount a private tmpfs here ({problem})"}))
    sys.exit(0)
from click.testing import CliRunner
from attribindex.cli import main

def fill(leave):
    # the filler takes all the free space but `leave` bytes (whole pages)
    status = os.statvfs(mount)
    with open(mount / "filler", "wb") as handle:
        handle.write(b"\0" * max(0, status.f_bavail * status.f_frsize - leave))

def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    clean = result.exception is None or isinstance(result.exception, SystemExit)
    listing = sorted(p.relative_to(index).as_posix() for p in index.rglob("*") if p.is_file()) if index.exists() else []
    return {"exit": result.exit_code, "output": result.output, "clean": clean, "files": listing}

index = mount / "idx"
report = {}
fill(28_672)
build = ["build", "--config", config, "--model", model, "--data", corpus, "--out", index, "--id-field", "id"]
report["build on a full disk"] = cli(*build)
(mount / "filler").unlink()
report["build again"] = cli(*build)
shutil.copytree(index, keep / "built")
fill(30_000)
append = ["append", index, "--data", new, "--id-field", "id"]
report["append on a full disk"] = cli(*append)
(mount / "filler").unlink()
report["append again"] = cli(*append)
shutil.copytree(index, keep / "appended")
subprocess.run(["mount", "--bind", "-o", "ro", str(index), str(index)], check=True)
delete = ["delete", index, "--ids", ids]
report["delete on a read-only file system"] = cli(*delete)
subprocess.run(["umount", str(index)], check=True)
report["delete again"] = cli(*delete)
shutil.copytree(index, keep / "deleted")
print(json.dumps(report))
"""


def test_a_full_disk_and_a_read_only_file_system_fail_in_one_line_and_the_same_command_then_completes(
    base, appended, tiny_models, corpus_file, new_documents, tmp_path
):
    """The real conditions, which deny root too: the kernel's ENOSPC on a full tmpfs, met by whichever write comes
    when the space runs out (here a chunk file's, an OSError, in the build, and the checkpoint's, inside safetensors'
    own error, in the append), and EROFS on a read-only bind mount. Skipped where no private mount namespace with a
    tmpfs can be made (unshare(2) and mount(8), as root or in a user namespace)."""
    ids = tmp_path / "ids.txt"
    ids.write_text("doc-0005\ndoc-0030\n")
    (tmp_path / "mount").mkdir()
    (tmp_path / "keep").mkdir()
    arguments = [tmp_path / "mount", tmp_path / "keep", base.parent / "config.yaml", tiny_models["gpt2"]]
    done = forked(_RESOURCE_DRIVER, *arguments, corpus_file, new_documents, ids)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    if "skip" in report:
        pytest.skip(report["skip"])

    for failed, again, message in (
        ("build on a full disk", "build again", "no space left on device while writing"),
        ("append on a full disk", "append again", "no space left on device while writing"),
        ("delete on a read-only file system", "delete again", "is on a read-only file system"),
    ):
        run = report[failed]
        assert run["exit"] == 1 and run["clean"], run
        errors = [line for line in run["output"].splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and message in errors[0] and "run the same command again" in errors[0], run["output"]
        assert "Traceback" not in run["output"] and "Errno" not in run["output"] and "os error" not in run["output"]
        assert report[again]["exit"] == 0 and report[again]["clean"], report[again]
    # Nothing half-written is presented as complete: the build has no manifest, the index stayed version 1 and 2.
    assert layout.MANIFEST not in report["build on a full disk"]["files"]
    assert "it resumes from its last written chunk" in report["build on a full disk"]["output"]
    assert "the index is version 1, unchanged" in report["append on a full disk"]["output"]
    assert "the index is still version 2, unchanged" in report["delete on a read-only file system"]["output"]

    assert_same_as_uninterrupted(tmp_path / "keep" / "built", base)
    assert_same_as_uninterrupted(tmp_path / "keep" / "appended", appended)
    deleted = copy_of(appended, tmp_path, "deleted")
    delete_ids(deleted, ["doc-0005", "doc-0030"])
    assert_same_as_uninterrupted(tmp_path / "keep" / "deleted", deleted)


def test_out_of_memory_in_a_build_fails_in_one_line_and_the_same_build_resumes(
    base, tiny_models, corpus_file, tmp_path
):
    """Fault injection: the real condition cannot be had cheaply (a tiny model needs too little memory for a memory
    limit to fail in one predictable place), so the whitening's fit, once every row is extracted and checkpointed,
    first asks torch's allocator for 1 PiB, which it cannot give: torch's own error, from the real allocator."""
    import attribindex.pipeline._finalize as finalize

    fit_preconditioner = finalize.fit_preconditioner

    def fit_short_of_memory(*args, **kwargs):
        torch.empty(2**50, dtype=torch.uint8)
        return fit_preconditioner(*args, **kwargs)

    out = tmp_path / "idx"
    build = ["build", "--config", str(base.parent / "config.yaml"), "--model", str(tiny_models["gpt2"])]
    build += ["--data", str(corpus_file), "--out", str(out), "--id-field", "id"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finalize, "fit_preconditioner", fit_short_of_memory)
        failed = CliRunner().invoke(main, build)
    message = one_error_line(failed)
    assert message.startswith("Error: out of memory (an allocation of 1.0 PiB failed). Lower extract.batch_size")
    assert "--batch-size 2; it is 4" in message and message.endswith("it resumes from its last written chunk.")
    with pytest.raises(AttribIndexError, match="holds an incomplete build"):
        read_manifest(out)

    again = CliRunner().invoke(main, build)
    assert again.exit_code == 0 and "(24 from the interrupted run, resumed)" in again.output, again.output
    assert_same_as_uninterrupted(out, base)


class _RenameDenied:
    """`os` as `attribindex.store._atomic` sees it, except that renaming a written file onto `target` is denied
    (EACCES), as in a folder this user may no longer write to."""

    def __init__(self, target: Path):
        self.target = target

    def __getattr__(self, name: str):
        return getattr(os, name)

    def replace(self, source, target) -> None:
        if Path(target) == self.target:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))
        os.replace(source, target)


def test_permission_denied_in_a_merge_fails_in_one_line_and_the_same_merge_completes(
    tiny_models, corpus_file, tmp_path
):
    """Fault injection: root (as CI runs) may write anywhere whatever the permissions say, so the last atomic write of
    the merge, its manifest's rename into the merged folder, is made to fail with EACCES, as a folder without write
    permission makes it fail: everything but the manifest is written."""
    import attribindex.store._atomic as atomic

    shards = [tmp_path / f"shard{i}" for i in range(2)]
    for i, shard in enumerate(shards):
        build_index(
            exact_config(), str(tiny_models["gpt2"]), corpus_file, shard, id_field="id", progress=False,
            num_shards=2, shard_index=i,
        )  # fmt: skip
    merge_shards(shards, tmp_path / "whole", progress=False)
    out = tmp_path / "merged"
    merge = ["merge", *map(str, shards), "--out", str(out)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(atomic, "os", _RenameDenied(out / layout.MANIFEST))
        failed = CliRunner().invoke(main, merge)
    message = one_error_line(failed)
    assert message.startswith(f"Error: permission denied on {out / layout.MANIFEST}. Let this user read and write")
    assert message.endswith("run the same command again; the merge starts again (the shards are left as they are).")
    with pytest.raises(AttribIndexError, match="holds an incomplete build"):
        read_manifest(out)

    again = CliRunner().invoke(main, merge)
    assert again.exit_code == 0, again.output
    assert_same_as_uninterrupted(out, tmp_path / "whole")
