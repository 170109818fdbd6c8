"""Bad input, one table: each row is a malformed corpus, model, config, index, command or request, put through
the real command line (a process of its own, so the exit status and stderr are what a user sees; see
_FORK_SERVER), the library (in this process, for what only the library takes: ids to explain, a training loop to
capture) or the server's app (`attribindex serve`'s app, in this process; the process itself is tests/serve's).

Every row must end with a non-zero exit status (or a 4xx answer, or an AttribIndexError), one line of error that
names the problem and the fix, no traceback, and nothing on disk that looks complete: a failed build leaves no
manifest, and an index or shard that was already there is byte for byte unchanged.

Refusals tested elsewhere, not repeated here: a Trainer with label smoothing and a model with gradient checkpointing
under a capture (tests/train/test_capture.py: `test_a_trainer_with_label_smoothing_is_refused_and_leaves_no_index`,
`test_a_folder_with_another_index_and_gradient_checkpointing_are_refused`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from attribindex import (
    AttribIndexError,
    AttributionIndex,
    append_documents,
    build_ensemble,
    build_index,
    capture_training,
    delete_ids,
)
from attribindex.store import layout
from attribindex.testing import make_tiny_model, tiny_corpus, write_jsonl
from tests.conftest import exact_config, exact_section_config
from tests.forking import forked

TOKEN = "s3cret-token"
QUERY = "King queen crown sword."


@dataclass
class World:
    """What the rows share, built once: models, corpora, an index, shards."""

    root: Path
    model: Path  # the tiny GPT-2 every index here was built with
    other_model: Path  # same architecture, other weights: another checkpoint
    corpus: Path
    index: Path  # read-only: rows that damage an index damage a copy
    shards: tuple[Path, Path]  # shard 0 of corpus A, shard 1 of corpus B: not one build
    llama: Path  # another architecture
    small_corpus: Path  # 8 documents (corpus B)
    made: dict = field(default_factory=dict)  # inputs a few rows share, made on first use (see `_once`)


@dataclass
class Run:
    """One row's command (`args` for the CLI, `http` for the server or `call` for the library) and what it must
    leave on disk."""

    args: list[str] | None = None
    # a POST: the client's content= or json=, "path" (default /v1/attribute) and "token" to send another
    http: dict | None = None
    call: Callable[[], object] | None = None  # a library call that must raise AttribIndexError
    unchanged: list[Path] = field(default_factory=list)  # folders that must be byte for byte the same afterwards
    incomplete: Path | None = None  # a folder the failed command must not leave looking complete
    absent: Path | None = None  # a path the failed command must not create at all


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[World, Path], Run]
    cause: tuple[str, ...]  # words of the message that name the problem
    fix: tuple[str, ...]  # words of the message that name the fix
    status: int | None = None  # HTTP status, for server rows


# ---------------------------------------------------------------------------------------------------------------
# Helpers that make the bad inputs


def _build(
    w: World,
    tmp: Path,
    *,
    data: Path | None = None,
    config: str = "tiny",
    model: Path | None = None,
    out: Path | None = None,
    extra: tuple[str, ...] = (),
) -> Run:
    out = out or tmp / "out"
    args = ["build", "--config", config, "--model", str(model or w.model), "--data", str(data or w.corpus)]
    args += ["--id-field", "id", "--out", str(out), "--batch-size", "8", *extra]
    return Run(args=args, incomplete=out)


def _corpus(tmp: Path, lines: list[str] | bytes, name: str = "bad.jsonl") -> Path:
    path = tmp / name
    path.write_bytes(lines if isinstance(lines, bytes) else "".join(line + "\n" for line in lines).encode())
    return path


def _good(n: int = 3, start: int = 0) -> list[str]:
    return [json.dumps({"id": f"new-{i}", "text": f"King queen crown sword number {i}."}) for i in range(start, n)]


def _config(tmp: Path, text: str) -> str:
    path = tmp / "config.yaml"
    path.write_text(text)
    return str(path)


_TINY = "projection:\n  rank_in: 4\n  rank_out: 4\nextract:\n  max_length: 32\n"


def _copy_index(w: World, tmp: Path) -> Path:
    copy = tmp / "idx"
    shutil.copytree(w.index, copy)
    return copy


def _query(index: Path, *extra: str, unchanged: list[Path] | None = None) -> Run:
    return Run(
        args=["query", str(index), "--text", QUERY, *extra], unchanged=[index] if unchanged is None else unchanged
    )


def _damaged(w: World, tmp: Path, damage: Callable[[Path], None], *command: str) -> Run:
    """A copy of the index, damaged, then `command` on it (the copy must stay as damaged as it was)."""
    copy = _copy_index(w, tmp)
    damage(copy)
    args = [command[0], str(copy), *command[1:]] if command else ["query", str(copy), "--text", QUERY]
    return Run(args=args, unchanged=[copy])


def _truncate(relative: str) -> Callable[[Path], None]:
    def damage(index: Path) -> None:
        path = index / relative
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return damage


def _future_manifest(index: Path) -> None:
    manifest = json.loads((index / layout.MANIFEST).read_text())
    manifest["format_version"] = max(layout.READABLE_VERSIONS) + 1
    (index / layout.MANIFEST).write_text(json.dumps(manifest, indent=2))


def _flip_last_byte(relative: str) -> Callable[[Path], None]:
    def damage(index: Path) -> None:
        data = bytearray((index / relative).read_bytes())
        data[-1] ^= 0x01
        (index / relative).write_bytes(bytes(data))

    return damage


def _interrupted(index: Path) -> None:
    (index / layout.MANIFEST).unlink()
    (index / layout.BUILD_MARKER).write_text("{}")


def _model_with(w: World, tmp: Path, value: float) -> Path:
    """The tiny model with one weight of the first MLP set to `value` (NaN, inf): every gradient becomes NaN."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(w.model)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = value
    path = tmp / "poisoned-model"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(w.model).save_pretrained(path)
    return path


def _zero_byte_model(w: World, tmp: Path) -> Path:
    """A model folder whose files are all there, but 0 bytes (an interrupted copy or download)."""
    path = tmp / "zero-model"
    path.mkdir()
    for file in w.model.iterdir():
        (path / file.name).touch()
    return path


def _foreign_tokenizer(w: World, tmp: Path) -> Path:
    """The tiny model with a tokenizer of a larger vocabulary: ids past the embedding table (another model's)."""
    from attribindex.testing import make_tokenizer

    path = tmp / "foreign-tokenizer-model"
    shutil.copytree(w.model, path)
    for file in path.glob("*token*"):
        file.unlink()
    for file in ("vocab.json", "merges.txt"):
        (path / file).unlink(missing_ok=True)
    texts = [d["text"] for d in tiny_corpus(200)] + ["".join(chr(c) for c in range(0x400, 0x500))]
    make_tokenizer(texts, vocab_size=600).save_pretrained(path)
    return path


def _appended(w: World, tmp: Path, *extra: str, data: Path | None = None) -> Run:
    copy = _copy_index(w, tmp)
    data = data or _corpus(tmp, _good(3))
    return Run(args=["append", str(copy), "--data", str(data), "--id-field", "id", *extra], unchanged=[copy])


def _empty_folder(path: Path) -> Path:
    path.mkdir()
    return path


def _once(w: World, name: str, make: Callable[[Path], object]):
    """`make(w.root / name)`, made by the first row that needs it and shared by the rows after (read-only)."""
    if name not in w.made:
        w.made[name] = make(w.root / name)
    return w.made[name]


def _opened(w: World) -> AttributionIndex:
    return _once(w, "opened", lambda _: AttributionIndex.open(w.index))


def _ensemble(w: World) -> Path:
    """An index over two checkpoints of one architecture (the model and the other checkpoint), 8 documents."""

    def make(out: Path) -> Path:
        checkpoints = [str(w.model), str(w.other_model)]
        build_ensemble(exact_config("cosine"), checkpoints, w.small_corpus, out, id_field="id", progress=False)
        return out

    return _once(w, "ensemble", make)


def _adapter(w: World, tmp: Path, damage: Callable[[Path], None]) -> Path:
    """A copy of a LoRA adapter of the model (peft's folder convention), damaged."""
    from tests.logra.test_peft import make_adapter

    copy = tmp / "adapter"
    shutil.copytree(_once(w, "adapter", lambda out: make_adapter(w.model, out)), copy)
    damage(copy)
    return copy


def _adapter_base(base: str) -> Callable[[Path], None]:
    def damage(adapter: Path) -> None:
        settings = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps(settings | {"base_model_name_or_path": base}))

    return damage


def _checkpoints_with_scheduler(w: World, tmp: Path, content: bytes) -> list[str]:
    """Two copies of the model, each a Trainer checkpoint in appearance, with `content` as its scheduler.pt."""
    folders = []
    for step, model in ((1, w.model), (2, w.other_model)):
        folder = tmp / f"checkpoint-{step}"
        shutil.copytree(model, folder)
        (folder / "scheduler.pt").write_bytes(content)
        folders.append(str(folder))
    return folders


def _ensemble_build(w: World, tmp: Path, *models: Path | str, extra: tuple[str, ...] = ()) -> Run:
    """`build` with several --model (the first is the model, unless given)."""
    models = models or (w.model, w.other_model)
    run = _build(w, tmp, model=Path(models[0]), extra=tuple(a for m in models[1:] for a in ("--model", str(m))) + extra)
    return dataclasses.replace(run, incomplete=None, absent=tmp / "out")


def _plan(w: World, tmp: Path, *extra: str) -> Run:
    """`plan` with `build`'s options and --out: a plan writes nothing, so --out must stay absent."""
    args = ["plan", "--config", "tiny", "--model", str(w.model), "--data", str(w.corpus), "--id-field", "id"]
    return Run(args=[*args, "--out", str(tmp / "out"), *extra], absent=tmp / "out")


def _explain(w: World, ids: list[str], index: AttributionIndex | None = None, **options) -> Run:
    """`index.explain(QUERY, ids)` on the world's index (or `index`), which must stay unchanged."""
    index = index or _opened(w)
    return Run(call=lambda: index.explain(QUERY, ids, **options), unchanged=[index.root])


def _explain_deleted(w: World, tmp: Path) -> Run:
    copy = _copy_index(w, tmp)
    delete_ids(copy, ["doc-0003"])
    return _explain(w, ["doc-0001", "doc-0003"], AttributionIndex.open(copy))


def _explain_post(w: World, body: dict | None, **options) -> Run:
    """A POST /v1/explain of `body` (as JSON) or of `options` (content=…)."""
    sent = {"json": body} if body is not None else {}
    return Run(http={"path": "/v1/explain", **sent, **options}, unchanged=[w.index])


def _trainable(w: World):
    """The tiny model in training mode, and its tokenizer with a pad token."""
    from attribindex.model import load_model

    model, tokenizer = load_model(str(w.model), dtype="float64", device="cpu")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return model.train().requires_grad_(True), tokenizer


def _training_batch(tokenizer, texts: list[str]) -> dict:
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return dict(inputs)


def _capture(w: World, tmp: Path, ids: list[str] | None, texts: list[str], config=None) -> Run:
    """One training step of the tiny model under `capture_training` into tmp/captured: inside `capture.batch(ids)`,
    or outside any batch when `ids` is None. The capture's hooks must be gone afterwards."""
    model, tokenizer = _trainable(w)
    out = tmp / "captured"

    def step() -> None:
        try:
            with capture_training(model, tokenizer, out, config or exact_config()) as capture:
                batch = _training_batch(tokenizer, texts)
                with contextlib.nullcontext() if ids is None else capture.batch(ids):
                    model(**batch).loss.backward()
        finally:
            assert not model._forward_pre_hooks and not model._forward_hooks, "the capture left its hooks on"

    return Run(call=step, incomplete=out)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _pushed(w: World, tmp: Path, index: Path | None = None) -> str:
    """A Milvus Lite file in `tmp` holding `index` (default: the world's), released for the row's process."""
    from attribindex.milvus import push_index

    db = str(tmp / "pushed.db")
    push_index(index or w.index, db, progress=False)
    return db


def _behind_an_append(w: World, tmp: Path) -> Run:
    """A copy of the index with rows appended after it was pushed, queried through the collection."""
    copy = _copy_index(w, tmp)
    db = _pushed(w, tmp, copy)
    append_documents(copy, _corpus(tmp, _good(3)), id_field="id", progress=False)
    return _query(copy, "--search", db)


def _guarded_server(w: World) -> str:
    """milvus://127.0.0.1:PORT of a Milvus Lite server that lets in tests.milvus.conftest.LOGIN only."""
    from tests.milvus.conftest import start_lite_server

    server, _, port = _once(w, "guarded", lambda path: start_lite_server(path, login="root:Milvus"))  # kept alive
    return f"milvus://127.0.0.1:{port}"


def _busy_lite_file(w: World, tmp: Path) -> str:
    """A Milvus Lite file this process keeps open (Lite lets one process at a time open a file)."""
    from attribindex.milvus import MilvusTarget, connect

    def make(path: Path) -> str:
        path.mkdir()
        target = MilvusTarget.parse(str(path / "busy.db"))
        w.made["busy-client"] = connect(target)  # held for the session
        return target.uri

    return _once(w, "busy", make)


# ---------------------------------------------------------------------------------------------------------------
# The table


def _lm_eval_output(w: World, tmp: Path, version: str = "0.4.13", model: Path | None = None, samples: bool = True):
    """What `lm_eval --log_samples --output_path OUT` writes for one generate_until sample of a task `qa` (the
    0.4 layout: results_<date>.json beside samples_<task>_<date>.jsonl, in a folder named after the model), with
    the given lm-eval version, evaluated model and samples (real runs: tests/harness)."""
    folder = tmp / "lm-eval-out" / "model"
    folder.mkdir(parents=True)
    date = "2026-12-05T10-00-00.000000"
    results = {
        "results": {"qa": {"exact_match,none": 0.0}},
        "configs": {"qa": {"task": "qa", "output_type": "generate_until"}},
        "config": {"model": "hf", "model_args": {"pretrained": str(model or w.model)}},
        "lm_eval_version": version,
    }
    (folder / f"results_{date}.json").write_text(json.dumps(results))
    sample = {
        "doc_id": 0,
        "doc": {"question": "who wears the crown"},
        "target": " the king",
        "arguments": {"gen_args_0": {"arg_0": "Q: who wears the crown\nA:", "arg_1": {"until": ["\n"]}}},
        "resps": [[" the queen"]],
        "filtered_resps": [" the queen"],
        "filter": "none",
        "metrics": ["exact_match"],
        "exact_match": 0.0,
    }
    if samples:
        (folder / f"samples_qa_{date}.jsonl").write_text(json.dumps(sample) + "\n")
    return tmp / "lm-eval-out"


def _trace_eval(w: World, tmp: Path, results: Path, *extra: str) -> Run:
    out = tmp / "traces"
    return Run(args=["trace-eval", str(w.index), str(results), "--out", str(out), *extra], absent=out)


CASES = [
    # --- corpora -------------------------------------------------------------------------------------------------
    # A bad first record fails before the model loads (the build reads one document up front); a bad record further
    # on (mixed id types, duplicates) fails during extraction: both must leave no index behind.
    Case(
        "corpus-empty",
        lambda w, t: _build(w, t, data=_corpus(t, b"")),
        ("no documents",),
        ("non-empty",),
    ),
    Case(
        "corpus-not-utf8",
        lambda w, t: _build(w, t, data=_corpus(t, b'{"id": "a", "text": "caf\xe9 au lait"}\n')),
        ("not valid utf-8", "bad.jsonl:1"),
        ("re-encode",),
    ),
    Case(
        "corpus-line-not-an-object",
        lambda w, t: _build(w, t, data=_corpus(t, ['["a list", "not an object"]', *_good(2)])),
        ("bad.jsonl:1", "json object", "list"),
        ("one json object per line",),
    ),
    Case(
        "corpus-invalid-json",
        lambda w, t: _build(w, t, data=_corpus(t, ['{"id": "x", "text": "unterminated', *_good(2)])),
        ("bad.jsonl:1", "not valid json"),
        ("fix or remove",),
    ),
    Case(
        "corpus-missing-text-field",
        lambda w, t: _build(w, t, data=_corpus(t, [json.dumps({"id": "x", "body": "King queen."}), *_good(2)])),
        ("bad.jsonl:1", "no field 'text'", "body"),
        ("--text-field",),
    ),
    Case(
        "corpus-text-not-a-string",
        lambda w, t: _build(w, t, data=_corpus(t, [json.dumps({"id": "x", "text": None}), *_good(2)])),
        ("bad.jsonl:1", "'text'", "not a string"),
        ("--text-field",),
    ),
    Case(
        # Strings and integers may mix (7 and "b" are both ids, tests/data covers it); a float among integers is a
        # broken export (an integer column with gaps), whose id "1.0" would match nothing the user has.
        "corpus-id-mixed-types",
        lambda w, t: _build(w, t, data=_corpus(t, [json.dumps({"id": 1.0, "text": "King queen crown."}), *_good(3)])),
        ("bad.jsonl:1", "id field 'id' is float", "1.0"),
        ("strings or integers", "write 3.0 as 3"),
    ),
    Case(
        "corpus-duplicate-ids",
        lambda w, t: _build(w, t, data=_corpus(t, [*_good(3), _good(2)[1]])),
        ("bad.jsonl:4", "duplicate id 'new-1'", "record 1"),
        ("unique", "--id-field"),
    ),
    Case(
        "corpus-path-does-not-exist",
        lambda w, t: _build(w, t, data=t / "missing.jsonl"),
        ("missing.jsonl", "does not exist"),
        ("check the path",),
    ),
    Case(
        "corpus-unsupported-file-type",
        lambda w, t: _build(w, t, data=_corpus(t, ["id,text", "a,King queen"], name="corpus.csv")),
        ("corpus.csv", "unsupported file type"),
        (".jsonl",),
    ),
    # --- models --------------------------------------------------------------------------------------------------
    Case(
        "model-empty-folder",
        lambda w, t: _build(w, t, model=_empty_folder(t / "empty-model")),
        ("empty-model", "config.json"),
        ("save_pretrained",),
    ),
    Case(
        "model-zero-byte-files",
        lambda w, t: _build(w, t, model=_zero_byte_model(w, t)),
        ("zero-model", "0 bytes"),
        ("copy", "again"),
    ),
    # A tokenizer without a pad token is no error: causal LMs rarely have one, so padding falls back to eos (and
    # padded positions are masked out anyway). What is really wrong is a tokenizer from another model, whose ids
    # run past the model's embedding table.
    Case(
        "model-tokenizer-of-another-model",
        lambda w, t: _build(w, t, model=_foreign_tokenizer(w, t)),
        ("tokenizer", "tokens but", "embedding"),
        ("resize_token_embeddings",),
    ),
    Case(
        "model-no-captured-modules",
        lambda w, t: _build(
            w, t, config=_config(t, _TINY.replace("rank_in: 4", "modules: ['*.no_such_layer']\n  rank_in: 4"))
        ),
        ("no layer matches", "no_such_layer"),
        ("layer names look like",),
    ),
    Case(
        "model-nan-weight",
        lambda w, t: _build(w, t, model=_model_with(w, t, float("nan"))),
        ("not finite", "doc-0000", "transformer.h"),
        ("weights",),
    ),
    Case(
        "model-inf-weight",
        lambda w, t: _build(w, t, model=_model_with(w, t, float("inf"))),
        ("not finite", "doc-0000", "transformer.h"),
        ("weights",),
    ),
    # --- configs -------------------------------------------------------------------------------------------------
    Case(
        "config-unknown-key",
        lambda w, t: _build(w, t, config=_config(t, _TINY + "hessian:\n  dampening: 0.1\n")),
        ("dampening",),
        ("did you mean 'damping'",),
    ),
    Case(
        "config-negative-rank",
        lambda w, t: _build(w, t, config=_config(t, _TINY.replace("rank_in: 4", "rank_in: -4"))),
        ("rank_in", "-4"),
        (">= 1",),
    ),
    Case(
        "config-damping-zero",
        lambda w, t: _build(w, t, config=_config(t, _TINY + "hessian:\n  damping: 0\n")),
        ("damping", "got 0"),
        ("> 0",),
    ),
    Case(
        "config-unknown-hessian-kind",
        lambda w, t: _build(w, t, config=_config(t, _TINY + "hessian:\n  kind: fisher\n")),
        ("kind", "fisher"),
        ("ekfac",),
    ),
    Case(
        "config-unknown-preset",
        lambda w, t: _build(w, t, config="no-such-preset"),
        ("no-such-preset", "neither a yaml file nor a preset"),
        ("presets:", "tiny"),
    ),
    Case(
        "config-not-yaml",
        lambda w, t: _build(w, t, config=_config(t, "projection: [rank_in: 4\n")),
        ("not valid yaml",),
        ("line",),
    ),
    # --- build output --------------------------------------------------------------------------------------------
    Case(
        "out-is-a-file",
        lambda w, t: _build(w, t, out=_corpus(t, ["x"], name="a-file")),
        ("is a file",),
        ("folder",),
    ),
    Case(
        "out-holds-an-index",
        lambda w, t: dataclasses.replace(_build(w, t, out=w.index), unchanged=[w.index], incomplete=None),
        ("already holds an index",),
        ("--overwrite",),
    ),
    # --- indexes -------------------------------------------------------------------------------------------------
    Case(
        "index-truncated-gradient-chunk",  # refresh re-whitens every stored row: it reads them all
        lambda w, t: _damaged(w, t, _truncate("rows/000000.grads.npy"), "refresh"),
        ("000000.grads.npy is damaged", "the manifest records"),
        ("restore it from a copy", "rebuild", "attribindex verify"),
    ),
    Case(
        "index-truncated-text-chunk",  # a query reads the texts of its results
        lambda w, t: _damaged(w, t, _truncate("rows/000000.docs.jsonl")),
        ("000000.docs.jsonl is damaged",),
        ("restore it from a copy", "rebuild"),
    ),
    Case(
        "index-flipped-byte",  # same size, other bytes: only the checksums tell
        lambda w, t: _damaged(w, t, _flip_last_byte(layout.STORE_NORMS), "verify"),
        ("1 file is damaged",),
        ("restore", "rebuild"),
    ),
    Case(
        "index-missing-segment-file",
        lambda w, t: _damaged(w, t, lambda i: (i / layout.STORE_NORMS).unlink()),
        ("norms.npy", "missing"),
        ("rebuild",),
    ),
    Case(
        "index-manifest-from-the-future",
        lambda w, t: _damaged(w, t, _future_manifest),
        ("format version",),
        ("install",),
    ),
    Case(
        "index-is-not-an-index",
        lambda w, t: _query(t, unchanged=[]),
        ("not an attribindex index",),
        ("build one",),
    ),
    Case(
        "index-interrupted-build",  # a build killed before its manifest: not an index yet
        lambda w, t: _damaged(w, t, _interrupted),
        ("incomplete build",),
        ("run the same build again", "overwrite"),
    ),
    # --- queries -------------------------------------------------------------------------------------------------
    Case(
        "query-with-another-model",
        lambda w, t: _query(w.index, "--model", str(w.other_model)),
        ("model differs", "fingerprint", "another checkpoint"),
        ("the model the index was built with", "--model"),
    ),
    # k above the rows is refused, not clamped: a harness asking for the top 25 of 24 rows is asking the wrong
    # index (or the wrong k), and a silently shorter answer would skew its metrics. The message gives the bounds.
    Case(
        "query-k-above-the-rows",
        lambda w, t: _query(w.index, "-k", "25"),
        ("got 25", "indexed rows (24)"),
        ("between 1 and",),
    ),
    Case(
        "query-k-negative",
        lambda w, t: _query(w.index, "-k", "-3"),
        ("got -3",),
        ("between 1 and",),
    ),
    Case(
        "query-exact-without-the-exact-section",
        lambda w, t: _query(w.index, "--exact", "10"),
        ("exact",),
        ("rebuild",),
    ),
    # --- living index: delete, append, merge ---------------------------------------------------------------------
    Case(
        "delete-file-of-blank-lines",
        lambda w, t: Run(
            args=["delete", str(w.index), "--ids", str(_corpus(t, ["", "   ", ""], "ids.txt"))], unchanged=[w.index]
        ),
        ("no ids",),
        ("one id per line",),
    ),
    Case(
        "append-with-another-model",
        lambda w, t: _appended(w, t, "--model", str(w.other_model)),
        ("model differs", "fingerprint", "another checkpoint"),
        ("the model the index was built with", "--model"),
    ),
    Case(
        "append-ids-already-in-the-index",
        lambda w, t: _appended(w, t, data=w.corpus),
        ("already in the index",),
        ("--skip-duplicates",),
    ),
    Case(
        "merge-shards-of-two-corpora",
        lambda w, t: Run(
            args=["merge", *map(str, w.shards), "--out", str(t / "merged")],
            unchanged=list(w.shards),
            incomplete=t / "merged",
        ),
        ("disagree on the corpus",),
        ("one build command", "rebuild the odd one"),
    ),
    Case(
        "merge-one-shard-twice",
        lambda w, t: Run(
            args=["merge", str(w.shards[0]), str(w.shards[0]), "--out", str(t / "merged")],
            unchanged=[w.shards[0]],
            incomplete=t / "merged",
        ),
        ("both shard 0 of 2",),
        ("pass each shard once",),
    ),
    Case(
        "append-to-a-shard",
        lambda w, t: Run(
            args=["append", str(w.shards[0]), "--data", str(_corpus(t, _good(3))), "--id-field", "id"],
            unchanged=[w.shards[0]],
        ),
        ("shard 0 of 2", "not a searchable index"),
        ("merge",),
    ),
    Case(
        "merge-an-index",
        lambda w, t: Run(
            args=["merge", str(w.index), "--out", str(t / "merged")], unchanged=[w.index], incomplete=t / "merged"
        ),
        ("finished index, not a shard",),
        ("sharded build",),
    ),
    # --- explain (the library takes ids; `query --explain` explains the results it shows) -----------------------
    Case(
        "explain-unknown-id",
        lambda w, t: _explain(w, ["doc-0001", "no-such-doc"]),
        ("1 id(s) not in index", "'no-such-doc'"),
        ("pass ids of indexed, undeleted examples",),
    ),
    Case(
        "explain-deleted-id",
        _explain_deleted,
        ("1 id(s) not in index", "'doc-0003'"),
        ("pass ids of indexed, undeleted examples",),
    ),
    Case(
        "explain-no-ids",
        lambda w, t: _explain(w, []),
        ("no id given",),
        ("pass the ids of training examples",),
    ),
    Case(
        "explain-exact-without-the-exact-section",
        lambda w, t: _explain(w, ["doc-0001"], exact=True),
        ("exact",),
        ("rebuild",),
    ),
    Case(
        "query-explain-on-an-ensemble",
        lambda w, t: _query(_ensemble(w), "-k", "2", "--explain"),
        ("explain is not supported for a checkpoint ensemble",),
        ("use an index of one checkpoint",),
    ),
    # --- plan: refuses what build refuses, and writes nothing ----------------------------------------------------
    Case(
        "plan-checkpoint-weights-with-one-model",
        lambda w, t: _plan(w, t, "--checkpoint-weights", "1"),
        ("--checkpoint-weights weighs the checkpoints of an ensemble",),
        ("give several --model",),
    ),
    Case(
        "plan-shard-index-without-num-shards",
        lambda w, t: _plan(w, t, "--shard-index", "1"),
        ("--shard-index needs --num-shards",),
        ("say how many shards",),
    ),
    Case(
        "plan-of-an-ensemble",
        lambda w, t: _plan(w, t, "--model", str(w.other_model)),
        ("plan one checkpoint",),
        ("one --model", "k such builds"),
    ),
    # --- checkpoint ensembles ------------------------------------------------------------------------------------
    Case(
        "ensemble-of-two-architectures",
        lambda w, t: _ensemble_build(w, t, w.model, w.llama),
        ("not one architecture", "model_type: 'gpt2' vs 'llama'"),
        ("build separate indexes",),
    ),
    Case(
        "ensemble-checkpoint-missing",
        lambda w, t: _ensemble_build(w, t, w.model, t / "gone"),
        ("gone does not exist", "no config.json"),
        ("save_pretrained",),
    ),
    Case(
        "ensemble-weights-of-another-count",
        lambda w, t: _ensemble_build(w, t, extra=("--checkpoint-weights", "1,2,3")),
        ("2 checkpoints, weights [1.0, 2.0, 3.0]",),
        ("give one positive weight per checkpoint",),
    ),
    Case(
        "ensemble-weight-negative",
        lambda w, t: _ensemble_build(w, t, extra=("--checkpoint-weights", "1,-0.5")),
        ("weights [1.0, -0.5]",),
        ("give one positive weight per checkpoint",),
    ),
    Case(
        "ensemble-weights-not-numbers",
        lambda w, t: _ensemble_build(w, t, extra=("--checkpoint-weights", "one,two")),
        ("'one,two'",),
        ("comma-separated numbers such as 3e-4,1e-4",),
    ),
    Case(
        "ensemble-lr-of-a-damaged-scheduler",
        lambda w, t: _ensemble_build(
            w, t, *_checkpoints_with_scheduler(w, t, b"not a torch file"), extra=("--checkpoint-weights", "lr")
        ),
        ("checkpoint-1/scheduler.pt could not be read",),
        ("--checkpoint-weights 3e-4,1e-4",),
    ),
    Case(
        "ensemble-with-the-exact-section",
        lambda w, t: _ensemble_build(w, t, extra=("--config", _config(t, _TINY + "exact:\n  enabled: true\n"))),
        ("`exact` section", "not supported for checkpoint ensembles"),
        ("remove them from the config",),
    ),
    # --- capture during training (label smoothing, gradient checkpointing: see the module docstring) ------------
    Case(
        "capture-with-the-exact-section",
        lambda w, t: _capture(w, t, ["a"], [QUERY], config=exact_section_config()),
        ("`exact` section needs a pass over the stored examples",),
        ("remove `exact` from the config", "build the index after training"),
    ),
    Case(
        "capture-step-outside-a-batch",
        lambda w, t: _capture(w, t, None, [QUERY]),
        ("outside `with capture.batch(ids):`",),
        ("run each forward + backward inside it",),
    ),
    Case(
        "capture-ids-for-another-batch-size",
        lambda w, t: _capture(w, t, ["a"], [QUERY, "Sword castle."]),
        ("given 1 ids", "batch of 2"),
        ("one id per batch row",),
    ),
    # --- PEFT adapters -------------------------------------------------------------------------------------------
    Case(
        "adapter-whose-base-moved",
        lambda w, t: _build(w, t, model=_adapter(w, t, _adapter_base(str(t / "moved-base")))),
        ("base model of adapter", "moved-base"),
        ("fix base_model_name_or_path",),
    ),
    Case(
        "adapter-naming-no-base",
        lambda w, t: _build(w, t, model=_adapter(w, t, _adapter_base(""))),
        ("names no base model",),
        ("write the base model's path",),
    ),
    Case(
        "adapter-weights-missing",
        lambda w, t: _build(w, t, model=_adapter(w, t, lambda a: (a / "adapter_model.safetensors").unlink())),
        ("adapter in", "could not be loaded"),
        ("save the adapter again",),
    ),
    # --- the server ----------------------------------------------------------------------------------------------
    Case(
        "server-huge-body",
        lambda w, t: Run(http={"content": json.dumps({"queries": [QUERY * 400]})}, unchanged=[w.index]),
        ("exceeds 4,096 bytes",),
        ("fewer or shorter",),
        status=413,
    ),
    Case(
        "server-body-not-json",
        lambda w, t: Run(http={"content": "queries=King+queen"}, unchanged=[w.index]),
        ("not valid json",),
        ("send a json object",),
        status=400,
    ),
    Case(
        "server-wrong-token",
        lambda w, t: Run(http={"json": {"queries": [QUERY]}, "token": "not-the-token"}, unchanged=[w.index]),
        ("wrong bearer token",),
        ("--token", "authorization: bearer"),
        status=401,
    ),
    Case(
        "server-explain-unknown-id",
        lambda w, t: _explain_post(w, {"query": QUERY, "ids": ["doc-0001", "no-such-doc"]}),
        ("1 id(s) not in index", "'no-such-doc'"),
        ("pass ids of indexed, undeleted examples",),
        status=400,
    ),
    Case(
        "server-explain-without-ids",
        lambda w, t: _explain_post(w, {"query": QUERY}),
        ("ids: field required",),
        ('{"query": "a text", "ids": ["doc-1"]}',),
        status=422,
    ),
    Case(
        "server-explain-query-too-long",  # ~1 token per "~": over the server's 2,048 tokens in under 4 KB
        lambda w, t: _explain_post(w, {"query": "~" * 2100, "ids": ["doc-0001"]}),
        ("query 0 has 2100 tokens", "at most 2048"),
        ("shorter query", "--max-tokens"),
        status=400,
    ),
    Case(
        "server-explain-exact-without-the-exact-section",
        lambda w, t: _explain_post(w, {"query": QUERY, "ids": ["doc-0001"], "exact": True}),
        ("exact",),
        ("rebuild",),
        status=400,
    ),
    Case(
        "server-explain-body-not-json",  # the example the message gives is an explain body, not an attribute one
        lambda w, t: _explain_post(w, None, content="query=King+queen"),
        ("not valid json",),
        ('{"query": "a text", "ids": ["doc-1"]}',),
        status=400,
    ),
    # --- Milvus (tests/milvus: what a collection answers; here: what a user is told) -----------------------------
    Case(
        "milvus-bad-uri",
        lambda w, t: _query(w.index, "--search", "milvus:/localhost/wiki"),
        ("is not a milvus collection uri",),
        ("milvus://HOST:PORT/COLLECTION", "PATH.db"),
    ),
    Case(
        "milvus-push-of-a-folder-that-is-not-an-index",
        lambda w, t: Run(args=["push", str(t / "no-index"), str(t / "a.db")], absent=t / "no-index"),
        ("is not an attribindex index",),
        ("build one first",),
    ),
    Case(
        "milvus-server-unreachable",  # a closed local port
        lambda w, t: Run(args=["push", str(w.index), f"milvus://127.0.0.1:{_free_port()}/wiki"], unchanged=[w.index]),
        ("no milvus server answers there",),
        ("start the server", "host and port"),
    ),
    Case(
        "milvus-wrong-token",
        lambda w, t: Run(
            args=["push", str(w.index), f"{_guarded_server(w)}/wiki", "--milvus-token", "root:wrong"],
            unchanged=[w.index],
        ),
        ("refused the login", "auth check failure"),
        ("--milvus-token", "MILVUS_TOKEN"),
    ),
    Case(
        "milvus-collection-of-another-index",
        lambda w, t: _query(_ensemble(w), "--search", _pushed(w, t)),
        ("holds another index",),
        ("--replace",),
    ),
    Case(
        "milvus-push-over-another-index",
        lambda w, t: Run(args=["push", str(_ensemble(w)), _pushed(w, t)], unchanged=[_ensemble(w)]),
        ("holds another index",),
        ("--replace", "another collection"),
    ),
    Case(
        "milvus-collection-behind-an-append",
        _behind_an_append,
        ("lacks append",),
        ("attribindex push",),
    ),
    Case(
        "milvus-lite-file-open-elsewhere",
        lambda w, t: Run(args=["push", str(w.index), _busy_lite_file(w, t)], unchanged=[w.index]),
        ("another process",),
        ("milvus-lite server", "milvus://"),
    ),
    # --- evaluation harnesses (tests/harness: real lm-eval and Inspect runs) -----------------------------------
    Case(
        "trace-eval-results-of-another-lm-eval-version",
        lambda w, t: _trace_eval(w, t, _lm_eval_output(w, t, version="0.3.0")),
        ("written by lm-eval 0.3.0",),
        ("lm-eval 0.4",),
    ),
    Case(
        "trace-eval-a-run-without-samples",
        lambda w, t: _trace_eval(w, t, _lm_eval_output(w, t, samples=False)),
        ("holds no samples",),
        ("--log_samples",),
    ),
    Case(
        "trace-eval-a-task-not-in-the-run",
        lambda w, t: _trace_eval(w, t, _lm_eval_output(w, t), "--task", "qa_typo"),
        ("task 'qa_typo' is not in", "it holds qa"),
        ("--task",),
    ),
    Case(
        "trace-eval-samples-of-another-model",
        lambda w, t: _trace_eval(w, t, _lm_eval_output(w, t, model=w.other_model)),
        ("evaluated with the model", "the index explains"),
        ("--any-model",),
    ),
    Case(
        "trace-eval-a-file-that-is-no-eval-log",
        lambda w, t: _trace_eval(w, t, _corpus(t, _good(2), name="log.json")),
        ("not a readable inspect eval log",),
        ("a log inspect wrote",),
    ),
]


CASE = {case.id: case for case in CASES}


# ---------------------------------------------------------------------------------------------------------------
# Fixtures and the one test


@pytest.fixture(scope="module")
def world(tiny_models, corpus_file, tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("bad-inputs")
    model = tiny_models["gpt2"]
    other = make_tiny_model(root / "other-model", arch="gpt2", hidden=16, seed=1)
    config = exact_config("cosine")
    index = root / "idx"
    build_index(config, str(model), corpus_file, index, id_field="id", progress=False)
    corpus_b = write_jsonl(root / "other-corpus.jsonl", tiny_corpus(8, seed=7))
    shards = (root / "shard-a0", root / "shard-b1")
    for corpus, shard, number in ((corpus_file, shards[0], 0), (corpus_b, shards[1], 1)):
        build_index(config, str(model), corpus, shard, id_field="id", progress=False, num_shards=2, shard_index=number)
    return World(
        root=root,
        model=model,
        other_model=other,
        corpus=corpus_file,
        index=index,
        shards=shards,
        llama=tiny_models["llama"],
        small_corpus=corpus_b,
    )


# Each CLI row runs in a process of its own, forked from one that has imported attribindex, torch, the model
# classes and faiss (tests/forking.py), and runs `python -m attribindex` in the child exactly as the interpreter
# would: fresh argv, the row's own stdout and stderr, the real exit status, and an uncaught exception printed as a
# traceback with status 1. What the fork saves is the imports, ~2.5 s per row and ~4 s more for a row that loads a
# model; `test_a_forked_row_is_what_python_m_attribindex_prints` checks that the two agree.
PYTHON_M_ATTRIBINDEX = "import runpy; runpy.run_module('attribindex', run_name='__main__', alter_sys=True)"
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NO_COLOR": "1"}


def cli(args: list[str]) -> subprocess.CompletedProcess:
    """`python -m attribindex ARGS`, forked (see above); a row that hangs fails after 300 s instead of stalling."""
    return forked(PYTHON_M_ATTRIBINDEX, *args, env=os.environ | CHILD_ENV, timeout=300)


@pytest.fixture(scope="module")
def server(world):
    """A client of the app `attribindex serve INDEX --token TOKEN --max-body-kb 4` serves, run in this process (the
    server process itself is tests/serve's subject). An exception the app lets out is raised here, as the real
    server would log its traceback."""
    from fastapi.testclient import TestClient

    from attribindex.serve import ServerLimits, create_app

    app = create_app(AttributionIndex.open(world.index), ServerLimits(max_body_bytes=4 * 1024), token=TOKEN)
    with TestClient(app) as client:
        yield client


def _tree_hashes(folder: Path) -> dict[str, str]:
    """{file: sha256} of every file under `folder` but the lock file (a mutation creates it, empty, to hold a lock:
    it is no part of the index, and it stays)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != layout.LOCK
    }


def _error_line(stderr: str) -> str:
    """The one `Error: ...` line; progress bars and click's usage lines may stand before it, nothing after."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("Error:")]
    assert len(errors) == 1, stderr
    assert errors[0] == len(lines) - 1, f"the error is not the last line:\n{stderr}"
    return lines[errors[0]]


def test_the_table_is_at_least_30_rows():
    assert len(CASES) >= 30
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, world: World, tmp_path: Path, request):
    if case.id.startswith("milvus-") and importlib.util.find_spec("milvus_lite") is None:
        pytest.skip("Milvus Lite runs on CPU machines only (the milvus-lite extra)")
    run = case.setup(world, tmp_path)
    before = {folder: _tree_hashes(folder) for folder in run.unchanged}
    if run.http is not None:
        client = request.getfixturevalue("server")
        options = dict(run.http)
        token, path = options.pop("token", TOKEN), options.pop("path", "/v1/attribute")
        headers = {"content-type": "application/json", "authorization": f"Bearer {token}"}
        response = client.post(path, headers=headers, **options)
        assert response.status_code == case.status, response.text
        message = response.json()["error"]["message"]
        assert "Traceback" not in response.text
    elif run.call is not None:
        with pytest.raises(AttribIndexError) as refused:
            run.call()
        message = str(refused.value)
    else:
        result = cli(run.args)
        assert result.returncode != 0, f"succeeded: {result.stdout}"
        assert "Traceback" not in result.stderr, result.stderr
        message = _error_line(result.stderr)
    assert "\n" not in message, message
    lowered = message.lower()
    for word in case.cause + case.fix:
        assert word.lower() in lowered, f"{word!r} not in: {message}"
    for folder, hashes in before.items():
        after = _tree_hashes(folder)
        changed = sorted(name for name in hashes.keys() | after.keys() if hashes.get(name) != after.get(name))
        assert not changed, f"{folder} changed: {changed}"
    if run.incomplete is not None:
        assert not (run.incomplete / layout.MANIFEST).exists(), f"{run.incomplete} looks complete"
    if run.absent is not None:
        assert not run.absent.exists(), f"{run.absent} was created"


def test_a_forked_row_is_what_python_m_attribindex_prints(world, tmp_path):
    """The fork server runs the command line as `python -m attribindex` does: same status, same stdout and stderr."""
    for case in (CASE["config-unknown-preset"], CASE["index-flipped-byte"]):
        run = case.setup(world, tmp_path / case.id)
        forked = cli(run.args)
        command = [sys.executable, "-m", "attribindex", *run.args]
        real = subprocess.run(command, capture_output=True, text=True, env=os.environ | CHILD_ENV, timeout=120)
        assert (forked.returncode, forked.stdout) == (real.returncode, real.stdout)
        assert _without_bars(forked.stderr) == _without_bars(real.stderr)  # a bar shows its speed, which varies


def _without_bars(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "%|" not in line]


# ---------------------------------------------------------------------------------------------------------------
# Inputs the issue names that are not bad: what the code does instead, pinned down (not rows of the table)


def test_a_tokenizer_without_pad_and_eos_tokens_builds_the_same_rows(world, tmp_path):
    """Most causal LMs ship no pad token, some no eos either: padding then uses id 0, and padded positions carry
    neither loss nor curvature, so the rows equal those of the same model with a pad token."""
    from transformers import AutoTokenizer

    model = tmp_path / "no-pad-model"
    shutil.copytree(world.model, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.pad_token = tokenizer.eos_token = tokenizer.bos_token = None
    tokenizer.save_pretrained(model)
    assert AutoTokenizer.from_pretrained(model).pad_token_id is None
    build_index(exact_config("cosine"), str(model), world.corpus, tmp_path / "idx", id_field="id", progress=False)
    for chunk in sorted((world.index / layout.ROWS_DIR).glob("*.grads.npy")):
        mine = np.load(tmp_path / "idx" / layout.ROWS_DIR / chunk.name)
        np.testing.assert_allclose(mine, np.load(chunk), rtol=1e-6, atol=1e-9)


def test_a_rank_above_the_layer_size_keeps_the_whole_layer(world):
    """A rank wider than a layer is no error: that layer keeps its full width (no reduction, nothing lost), so one
    preset serves models of many sizes. The manifest records each module's real ranks."""
    from transformers import AutoModelForCausalLM

    from attribindex.config import ProjectionConfig
    from attribindex.logra import ProjectionSet, select_modules

    modules = select_modules(AutoModelForCausalLM.from_pretrained(world.model), ProjectionConfig())
    projections = ProjectionSet.generate(modules, seed=0, rank_in=4096, rank_out=4096)
    for module in modules:
        p_in, p_out = projections.p_in[module.name], projections.p_out[module.name]
        assert p_in.shape[0] == p_in.shape[1] and p_out.shape == (module.out_features, module.out_features)
