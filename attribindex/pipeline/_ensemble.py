"""One index over several checkpoints of a training run (TRAK / TracIn style ensembles).

Each checkpoint is extracted as a member (its own rows and curvature sums, projections from the same seed) into
`OUT/members/<k>-of-<K>/`, resumable like a shard. The index then holds, per example, the concatenation of the
members' projected gradients: its modules are the members' modules named `checkpoint-<k>/<module>`. Curvature,
and so the whitening, stays per (checkpoint, module) block, so a stored row's whitened vector is the
concatenation of the members' whitened vectors, and one inner-product search over it is exact. A query runs
through every checkpoint; its whitened blocks of checkpoint k are multiplied by the checkpoint's weight w_k
(e.g. its learning rate, as TracIn does), so that in `dot` mode

    score(q, n) = Σ_k w_k ⟨W_k g_q^(k), W_k g_n^(k)⟩,

the sum of the single-checkpoint scores. In `cosine` mode both concatenations are normalised as a whole.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np

from attribindex._version import __version__
from attribindex.config import BuildConfig
from attribindex.data import Corpus, open_corpus
from attribindex.errors import AttribIndexError
from attribindex.hessian import CurvatureSums
from attribindex.logra import ModuleSpec, ProjectionSet
from attribindex.pipeline._finalize import finalize_index
from attribindex.pipeline._output import (
    ModelCache,
    build_request,
    build_resource_failures,
    bytes_on_disk,
    module_records,
    now,
    prepare_output,
    resolve_model_path,
)
from attribindex.pipeline._single import build_folder
from attribindex.pipeline._summary import BuildSummary
from attribindex.store import (
    BuildEvent,
    CheckpointRecord,
    ChunkWriter,
    EnsembleRecord,
    ProjectionRecord,
    RowStore,
    ShardManifest,
    ShardSlot,
    layout,
    read_manifest,
)


def checkpoint_learning_rate(checkpoint: str | Path) -> float:
    """The learning rate a `transformers.Trainer` checkpoint folder was saved at: its scheduler's last rate
    (`scheduler.pt`), else the last `learning_rate` logged in `trainer_state.json`; the first parameter group's.

    Example:
        >>> checkpoint_learning_rate("run/checkpoint-500")  # doctest: +SKIP
        4.2e-05
    """
    import torch

    folder = Path(checkpoint)
    scheduler, state = folder / "scheduler.pt", folder / "trainer_state.json"
    rate = None
    if scheduler.is_file():
        try:
            rates = torch.load(scheduler, map_location="cpu", weights_only=True).get("_last_lr")
        except Exception as err:  # a damaged or foreign file: say which, whatever torch raised (its first sentence)
            cause = (str(err).strip().splitlines() or [""])[0].split(". ")[0]
            raise AttribIndexError(
                f"{scheduler} could not be read ({type(err).__name__}: {cause}). Copy the checkpoint again, or give the "
                "weights as numbers (--checkpoint-weights 3e-4,1e-4)."
            ) from None
        rate = float(rates[0]) if rates else None
    if rate is None and state.is_file():
        logged = [
            e["learning_rate"] for e in json.loads(state.read_text()).get("log_history", []) if "learning_rate" in e
        ]
        rate = float(logged[-1]) if logged else None
    if rate is None:
        raise AttribIndexError(
            f"{folder} has no learning rate on record (neither scheduler.pt nor a learning_rate logged in "
            "trainer_state.json): it is not a transformers.Trainer checkpoint. Give the weights as numbers "
            "(--checkpoint-weights 3e-4,1e-4)."
        )
    if not rate > 0:
        raise AttribIndexError(
            f"{folder} was saved at learning rate {rate}: TracIn would give it no weight. Leave that checkpoint out, "
            "or give the weights as numbers."
        )
    return rate


def checkpoint_prefix(k: int) -> str:
    """How checkpoint k's modules are named in an ensemble index: `checkpoint-<k>/<module>`."""
    return f"checkpoint-{k}/"


def build_ensemble(
    config: BuildConfig,
    models: list[str],
    data: str | Path | Corpus,
    out: str | Path,
    *,
    weights: list[float] | str | None = None,
    text_field: str = "text",
    id_field: str | None = None,
    split: str = "train",
    limit: int | None = None,
    overwrite: bool = False,
    skip_empty: bool = False,
    progress: bool = True,
) -> BuildSummary:
    """Build one index over the checkpoints `models` (model folders or hub ids of one architecture), each weighted
    by `weights` (default 1 each; ``"lr"``: the learning rate each Trainer checkpoint was saved at, as TracIn weighs
    them, see `checkpoint_learning_rate`) in a query's score; resume an interrupted one with the same call.

    Example:
        >>> build_ensemble(load_config("tiny"), ["run/checkpoint-100", "run/checkpoint-200"], "corpus.jsonl",
        ...                "ens-index", weights=[3e-4, 1e-4], id_field="id")  # doctest: +SKIP
    """
    started = time.perf_counter()
    if len(models) < 2:
        raise AttribIndexError(f"an ensemble needs at least 2 checkpoints, got {len(models)}; use build_index for one.")
    if weights == "lr":
        weights = [checkpoint_learning_rate(m) for m in models]
    elif isinstance(weights, str):
        raise AttribIndexError(f"weights must be numbers, one per checkpoint, or 'lr'; got {weights!r}.")
    weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
    if len(weights) != len(models) or not all(np.isfinite(w) and w > 0 for w in weights):
        raise AttribIndexError(
            f"give one positive weight per checkpoint ({len(models)} checkpoints, weights {weights}), e.g. the "
            "learning rate at each checkpoint."
        )
    if config.exact.enabled or config.projection.optimizer_state is not None:
        raise AttribIndexError(
            "the `exact` section and projection.optimizer_state are not supported for checkpoint ensembles yet; "
            "remove them from the config."
        )
    models = [resolve_model_path(m) for m in models]
    for model in models:  # a missing checkpoint fails now, not after the ones before it were extracted
        folder = Path(model)
        if folder.is_absolute() and not any((folder / n).is_file() for n in ("config.json", "adapter_config.json")):
            raise AttribIndexError(
                f"checkpoint {model} does not exist or has no config.json. Pass model folders saved with "
                "save_pretrained (or hub ids)."
            )
    _check_configs(models)
    corpus = data if isinstance(data, Corpus) else open_corpus(data, text_field, id_field, split, limit)
    out = Path(out)
    request = dataclasses.replace(
        build_request(config, " + ".join(models), corpus, skip_empty), data=f"{corpus.description} (weights {weights})"
    )
    prepare_output(out, overwrite, request)
    with build_resource_failures(out, config):
        return _build_members_and_stitch(config, models, weights, corpus, out, skip_empty, progress, started)


def _build_members_and_stitch(
    config: BuildConfig,
    models: list[str],
    weights: list[float],
    corpus: Corpus,
    out: Path,
    skip_empty: bool,
    progress: bool,
    started: float,
) -> BuildSummary:
    """Extract each checkpoint as a member shard (resumable), then stitch them into the index."""
    cache = ModelCache()
    members: list[tuple[Path, ShardManifest]] = []
    for k, model in enumerate(models):
        folder = out / layout.MEMBERS_DIR / layout.shard_dir_name(k, len(models))
        if not layout.is_index_dir(folder):
            label = f"checkpoint {k + 1}/{len(models)}"
            build_folder(
                config, model, corpus, folder, False, skip_empty, progress, ShardSlot(index=0, count=1), cache, label
            )
            cache.release()
        members.append((folder, read_manifest(folder, kind="shard")))
    _check_members(models, members)
    chunks, curvature, projections = _stitch(out, config, members)
    reference = members[-1][1]  # the last checkpoint: the one recorded as the index's model
    projections.save(out / layout.PROJECTIONS)
    curvature.save(out / layout.CURVATURE)
    header = dataclasses.replace(
        reference.header,
        created=now(),
        attribindex_version=__version__,
        modules=module_records(projections),
        dim=projections.dim,
        projection=ProjectionRecord(seed=config.projection.seed, hash=projections.hash(), file=layout.PROJECTIONS),
        ensemble=EnsembleRecord(
            checkpoints=tuple(
                CheckpointRecord(
                    name_or_path=model,
                    fingerprint=manifest.model.fingerprint,
                    weight=weight,
                    prefix=checkpoint_prefix(k),
                )
                for k, (model, weight, (_, manifest)) in enumerate(zip(models, weights, members))
            )
        ),
    )
    rows = sum(chunk.rows for chunk in chunks)
    manifest = finalize_index(out, config, header, curvature, chunks, BuildEvent(rows=rows, time=now()), progress)
    shutil.rmtree(out / layout.MEMBERS_DIR)
    return BuildSummary(
        out=out,
        index_id=manifest.index_id,
        rows=rows,
        skipped=reference.corpus.skipped_empty,
        truncated=reference.corpus.truncated,
        tokens=reference.corpus.tokens,
        dim=manifest.dim,
        modules=len(manifest.modules),
        extract_seconds=time.perf_counter() - started,
        total_seconds=time.perf_counter() - started,
        bytes_on_disk=bytes_on_disk(out),
        kind=f"ensemble of {len(models)} checkpoints",
        search=manifest.index.description,
    )


_ARCHITECTURE_KEYS = (
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "n_embd",
    "num_hidden_layers",
    "n_layer",
)


def _check_configs(models: list[str]) -> None:
    """Before any extraction: local checkpoints whose config.json says another architecture are refused."""
    seen: tuple[str, dict] | None = None
    for model in models:
        path = Path(model) / "config.json"
        if not path.is_file():
            continue  # a hub id or an adapter folder: checked by its captured layers after extraction
        settings = json.loads(path.read_text())
        shape = {key: settings.get(key) for key in _ARCHITECTURE_KEYS}
        if seen is not None and shape != seen[1]:
            key = next(k for k in _ARCHITECTURE_KEYS if shape[k] != seen[1][k])
            raise AttribIndexError(
                f"checkpoints {seen[0]} and {model} are not one architecture ({key}: {seen[1][key]!r} vs "
                f"{shape[key]!r}). An ensemble combines checkpoints of one training run; build separate indexes for "
                "different models."
            )
        seen = seen or (model, shape)


def _check_members(models: list[str], members: list[tuple[Path, ShardManifest]]) -> None:
    """The checkpoints must be one architecture: the same captured modules with the same shapes."""
    first = members[0][1]
    shape = [(m.name, m.kind, m.in_features, m.out_features, m.bias, m.dim) for m in first.modules]
    for model, (_, manifest) in zip(models[1:], members[1:]):
        theirs = [(m.name, m.kind, m.in_features, m.out_features, m.bias, m.dim) for m in manifest.modules]
        if manifest.model.class_name != first.model.class_name or theirs != shape:
            differing = next((a, b) for a, b in zip(shape + [None], theirs + [None]) if a != b)
            raise AttribIndexError(
                f"checkpoints {models[0]} ({first.model.class_name}) and {model} ({manifest.model.class_name}) are "
                f"not one architecture (captured layers differ: {differing[0]} vs {differing[1]}). An ensemble "
                "combines checkpoints of one training run; build separate indexes for different models."
            )
        if manifest.rows != first.rows:
            raise AttribIndexError(f"checkpoints {models[0]} and {model} kept different rows; rebuild the ensemble.")


def _stitch(
    out: Path, config: BuildConfig, members: list[tuple[Path, ShardManifest]]
) -> tuple[list, CurvatureSums, ProjectionSet]:
    """The members' rows side by side (stored values and scales copied bit for bit), their curvature sums and
    projections under prefixed module names."""
    stores = [RowStore(folder, m.block_dims, m.store.dtype, m.store.chunks) for folder, m in members]
    all_dims = [d for _, m in members for d in m.block_dims]
    writer = ChunkWriter(out, all_dims, config.store.dtype, config.store.chunk_rows)
    chunks = []
    for parts in zip(*(store.iter_encoded() for store in stores)):
        documents = parts[0][3]
        if any([d.id for d in p[3]] != [d.id for d in documents] for p in parts[1:]):
            raise AttribIndexError("the checkpoints' rows are not the same examples in the same order; rebuild.")
        stored = np.concatenate([p[1] for p in parts], axis=1)  # (n, Σ D_k)
        scales = np.concatenate([p[2] for p in parts], axis=1)  # (n, Σ M_k)
        start = 0
        while start < len(documents):
            stop = start + min(writer.room, len(documents) - start)
            record = writer.add_encoded(stored[start:stop], scales[start:stop], documents[start:stop])
            if record is not None:
                chunks.append(record)
            start = stop
    record = writer.close()
    if record is not None:
        chunks.append(record)
    tensors, specs, p_in, p_out = {}, [], {}, {}
    for k, (folder, manifest) in enumerate(members):
        prefix = checkpoint_prefix(k)
        sums, _ = CurvatureSums.load(folder / layout.CURVATURE)
        tensors |= {prefix + name: tensor for name, tensor in sums.tensors.items()}
        member_specs = [ModuleSpec(m.name, m.kind, m.in_features, m.out_features, m.bias) for m in manifest.modules]
        member = ProjectionSet.load(folder / layout.PROJECTIONS, member_specs)
        specs += [dataclasses.replace(s, name=prefix + s.name) for s in member_specs]
        p_in |= {prefix + name: p for name, p in member.p_in.items()}
        p_out |= {prefix + name: p for name, p in member.p_out.items()}
    curvature = CurvatureSums(count=members[0][1].rows, sums=tensors)
    return chunks, curvature, ProjectionSet(specs, p_in, p_out)
