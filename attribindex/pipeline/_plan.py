"""`plan_build`: what a build will take — dims, disk, memory, time — before it runs.

Everything is derived from the code a build runs: the modules and projections come from `select_modules` and
`ProjectionSet.generate` on the loaded model, the store's bytes from its codec (float16 rows carry one fp32 scale per
module), the FAISS segment's from the `SegmentPlan` the build would resolve, the manifest's from the typed records
the build would write, the exact section's memory from `check_exact_memory`, and the time from a few real batches
through the real `GradientExtractor`.

This module runs the stages; the corpus count and the timing probe are in `_plan_probe`, the size arithmetic in
`_plan_sizes`, the extrapolation to many GPUs and search nodes in `_plan_scale`, and the plan's typed parts with
their rendering in `_plan_report`. A model folder without weights (a config.json alone) is planned from its shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from attribindex.config import BuildConfig
from attribindex.data import Corpus, open_corpus, shard_window
from attribindex.errors import AttribIndexError
from attribindex.index import SegmentPlan
from attribindex.logra import GradientExtractor
from attribindex.milvus import MAX_DIM as MILVUS_MAX_DIM
from attribindex.model import DTYPES, has_tokenizer, has_weights, load_model, model_from_config
from attribindex.pipeline._exact import SUM_COPIES, ExactFactors, _physical_memory, check_exact_memory, factor_bytes
from attribindex.pipeline._output import build_projections, build_request, module_records, resolve_model_path
from attribindex.pipeline._plan_probe import (
    PROBE_BATCHES,
    PROBE_MAX_BATCHES,
    TEXT_BYTES_PER_TOKEN,
    Timing,
    TokenStats,
    device_name,
    given_corpus,
    plan_corpus,
    plan_given_corpus,
    probe,
    tokenize_corpus,
)
from attribindex.pipeline._plan_report import BuildPlan, CorpusPlan, ExactPlan, TimePlan
from attribindex.pipeline._plan_scale import check_scale_arguments, plan_scale
from attribindex.pipeline._plan_sizes import plan_disk, plan_memory
from attribindex.store import ShardSlot

SAMPLE_DOCUMENTS = 1000  # a streamed corpus is estimated from its first this-many documents
NODE_RAM_GB = 512  # RAM of one search node, GiB, unless told
Log = Callable[[str], None]


def plan_build(
    config: BuildConfig,
    model: str,
    data: str | Path | Corpus | None = None,
    *,
    text_field: str = "text",
    id_field: str | None = None,
    split: str = "train",
    limit: int | None = None,
    skip_empty: bool = False,
    num_shards: int | None = None,
    shard_index: int | None = None,
    keep_shards: bool = False,
    out: str | Path | None = None,
    sample: int = SAMPLE_DOCUMENTS,
    probe_batches: int = PROBE_BATCHES,
    documents: int | None = None,
    tokens_per_document: float | None = None,
    tokens_per_second: float | None = None,
    gpus: int = 1,
    node_ram_gb: float = NODE_RAM_GB,
    progress: bool = True,
    log: Log | None = None,
) -> BuildPlan:
    """Plan `build_index` with the same arguments: dims, bytes per example, disk, memory and time, without
    writing anything; and the same build at scale (`plan.scale`): GPU-hours, shards, the row store, and the RAM of
    each kind of search index in search nodes.

    A local corpus is tokenised in full (exact counts); a streamed one is estimated from its first `sample`
    documents and needs `limit`. The time comes from `probe_batches` real batches of the config on its device
    (the first is a warm-up), scaled to the corpus's tokens. With `documents`, the build is planned for that many
    documents: `data`, if given, is sampled (its first `sample` documents) for tokens and text, else nothing is read
    and each document counts `tokens_per_document` tokens (default: the config's max_length). A model folder with a
    config.json and no weights is planned from its module shapes (the meta device) without a probe; the throughput
    is then `tokens_per_second`, or an estimate labelled with its source.

    Args:
        config, model, data, text_field, id_field, split, limit, skip_empty, num_shards, shard_index, keep_shards:
            as for `build_index` (`data` optional with `documents`).
        out: where the index would go; only used to report the free disk space there.
        sample: documents of a streamed (or `documents`-scaled) corpus to estimate from.
        probe_batches: timed batches, after one warm-up batch.
        documents: plan for this many documents instead of counting `data`'s.
        tokens_per_document: mean tokens of a document (overrides what `data` measures).
        tokens_per_second: extraction throughput of one GPU (overrides the probe's and the estimate).
        gpus: GPUs extracting at once (wall-clock; one shard each unless `num_shards`).
        node_ram_gb: RAM of one search node, GiB.
        log: called with a line per stage (what the planner is doing).

    Example:
        >>> from attribindex import load_config, plan_build
        >>> plan = plan_build(load_config("tiny"), "./tiny-gpt2", "corpus.jsonl")  # doctest: +SKIP
        >>> print(plan.format())  # doctest: +SKIP
        >>> plan.to_dict()["disk"]["total"]  # doctest: +SKIP
        243993
        >>> big = plan_build(load_config("llama3-8b-paper"), "index_configs/models/llama3-8b",  # doctest: +SKIP
        ...                  documents=10**9, tokens_per_document=512, gpus=64)
        >>> big.scale.gpu_hours  # doctest: +SKIP
    """
    say = log or (lambda _: None)
    check_scale_arguments(documents, tokens_per_document, tokens_per_second, gpus, node_ram_gb)
    if data is None and documents is None:
        raise AttribIndexError(
            "a plan needs the corpus (`data`, --data) or its size (`documents`, --documents N). Pass either."
        )
    source = None
    if data is not None:
        source = data if isinstance(data, Corpus) else open_corpus(data, text_field, id_field, split, limit)
    model = resolve_model_path(model)
    if shard_index is not None and num_shards is None:
        raise AttribIndexError("`shard_index` needs `num_shards`: say how many shards the corpus is split into.")
    shard = shard_index is not None
    streamed = source is not None and source.known_length() is None  # a hub dataset: only `limit` bounds it
    if streamed and source.limit is None and documents is None:
        raise AttribIndexError(
            f"planning needs to know how many documents {source.description} holds, and a streamed dataset does not "
            f"say. Pass `limit=N` to plan for the first N documents, or save the dataset to disk first."
        )
    sampled = source is not None and (streamed or documents is not None)  # estimated from the first `sample`
    if sampled and sample < 1:
        raise AttribIndexError(
            f"`sample` must be >= 1, got {sample}: a streamed dataset is estimated from its first `sample` documents."
        )
    corpus = source if documents is None else given_corpus(documents, text_field, id_field, source)
    if shard:
        corpus = shard_window(corpus, num_shards, shard_index)
    if source is not None:
        next(iter(source))  # a bad path, field or encoding fails now, as it does in a build

    weights = has_weights(model)
    if weights:
        say(f"loading {model} ({config.extract.dtype}, device {config.extract.device})")
        lm, tokenizer = load_model(model, config.extract.dtype, config.extract.device)
    else:
        say(f"{model} has a config and no weights: module shapes from its config (meta device), no timing probe")
        if config.projection.optimizer_state is not None:
            raise AttribIndexError(
                f"the optimizer state folds into projections of real modules, and {model} has no weights. Plan "
                f"without --optimizer-state (the dims and bytes are the same), or with the model's weights."
            )
        lm, tokenizer = model_from_config(model, config.extract.dtype)
        if source is not None and not has_tokenizer(model):
            raise AttribIndexError(
                f"{model} has no tokenizer, so the corpus cannot be counted. Give its size instead (--documents N "
                f"--tokens-per-document T, no --data), or add the tokenizer's files to the folder."
            )
    projections, optimizer = build_projections(config, lm, shapes_only=not weights)
    extractor = GradientExtractor(lm, tokenizer, projections, config.extract.max_length, DTYPES[config.extract.dtype])
    examples, stats = [], None
    if source is not None:
        say(
            f"tokenising {f'the first {sample:,} documents' if sampled else 'every document'} of "
            f"{source.description} (max_length {config.extract.max_length})"
        )
        keep = (max(probe_batches, PROBE_MAX_BATCHES) + 1) * config.extract.batch_size
        stats, examples = tokenize_corpus(source, extractor, sample if sampled else None, keep, progress)
        corpus_plan = plan_corpus(corpus, stats, not sampled, skip_empty)
        tokens_source = (
            "counted on the corpus" if not sampled else f"measured on the first {stats.documents:,} documents"
        )
    else:
        corpus_plan = plan_given_corpus(corpus, tokens_per_document or config.extract.max_length)
        tokens_source = f"the config's extract.max_length {config.extract.max_length}: every document at full length"
    if tokens_per_document is not None:
        corpus_plan = dataclasses.replace(corpus_plan, tokens=round(tokens_per_document * corpus_plan.documents))
        tokens_source = "given with --tokens-per-document"

    exact_plan, exact_factors = None, None
    if config.exact.enabled:
        exact_plan, exact_factors = _exact_plan(config, extractor, corpus.whole_length)
    time_plan, activations = None, None
    if weights and examples:
        say(
            f"probing: {probe_batches}+ batches of {config.extract.batch_size} documents through the model on "
            f"{extractor.device}, after a warm-up batch"
        )
        timing, activations = probe(config, extractor, examples, exact_factors, probe_batches)
        time_plan = _time_plan(config, extractor, timing, stats, corpus_plan)

    rows = corpus_plan.documents
    segment = None if shard else SegmentPlan.resolve(config.index, config.index.mode, rows, projections.dim)
    slot = ShardSlot(index=shard_index, count=num_shards) if shard else None
    request = build_request(config, model, corpus, skip_empty, shard=slot)  # as the build makes it
    disk = plan_disk(config, request, corpus, projections, optimizer, corpus_plan, segment, exact_plan, extractor, out)
    memory = plan_memory(config, lm, rows, projections, disk, exact_plan, activations, segment)
    parameters = sum(p.numel() for p in lm.parameters())
    scale = plan_scale(
        config,
        corpus_plan,
        tokens_source,
        disk,
        projections.dim,
        parameters,
        time_plan,
        tokens_per_second=tokens_per_second,
        gpus=gpus,
        num_shards=num_shards,
        node_ram_gb=node_ram_gb,
    )
    notes = _notes(config, corpus_plan, skip_empty, num_shards, shard, keep_shards)
    if not weights:
        notes += (f"{model} has no weights: shapes from its config.json, no probe; the model's RAM is its size",)
    if source is None:
        notes += (
            f"no corpus read: {TEXT_BYTES_PER_TOKEN:.0f} bytes of text per token assumed for docs.jsonl (an estimate: "
            f"~4 characters per token of English text)",
        )
    if not scale.milvus_fits:
        notes += (
            f"Milvus caps vectors at {MILVUS_MAX_DIM:,} dims and these have {projections.dim:,}: `attribindex push` "
            f"stores a {MILVUS_MAX_DIM:,}-dim CountSketch of each row ({projections.dim / MILVUS_MAX_DIM:.0f}× fewer "
            f"dims; measured at 2–8×, docs/scale.md) whose candidates are re-scored from the store; fewer modules or "
            f"a lower rank keep the whole vector",
        )
    index_name = "none (a shard: the merge builds it)" if segment is None else _index_name(segment, rows)
    return BuildPlan(
        model=model,
        kind=f"shard {shard_index} of {num_shards}" if shard else "index",
        hessian=config.hessian.kind,
        store_dtype=config.store.dtype,
        index=index_name,
        segment=segment.record() if segment is not None and not config.index.exact else None,
        modules=module_records(projections),
        dim=projections.dim,
        bytes_per_example=disk.store_per_example + disk.index_per_example,
        corpus=corpus_plan,
        disk=disk,
        memory=memory,
        time=time_plan,
        exact=exact_plan,
        scale=scale,
        notes=notes,
    )


def _time_plan(
    config: BuildConfig, extractor: GradientExtractor, timing: Timing, stats: TokenStats, corpus: CorpusPlan
) -> TimePlan:
    """The probe's timing scaled to the corpus's tokens (and its tokenising to its documents)."""
    rows = corpus.documents
    seconds_per_token = timing.seconds / max(timing.tokens, 1)
    extract_seconds = seconds_per_token * corpus.tokens + stats.seconds / max(stats.documents, 1) * rows
    correction = 0.0
    if config.exact.enabled and config.exact.kind == "ekfac":  # one more model pass over the sampled rows
        correction = extract_seconds * min(config.exact.sample, rows) / max(rows, 1)
    return TimePlan(
        device=device_name(extractor.device),
        batch_size=config.extract.batch_size,
        probe_batches=timing.batches,
        probe_examples=timing.examples,
        probe_tokens=timing.tokens,
        probe_seconds=timing.seconds,
        seconds_per_token=seconds_per_token,
        extract_seconds=extract_seconds,
        exact_correction_seconds=correction,
    )


def _exact_plan(
    config: BuildConfig, extractor: GradientExtractor, corpus_length: int | None
) -> tuple[ExactPlan, ExactFactors | None]:
    """The build's own check of the exact section, reported instead of raised; the factors for the probe when
    they fit."""
    factors = ExactFactors(extractor, config.exact, corpus_length)
    one = factor_bytes(factors.shapes)
    limit = config.exact.memory_gb * 2**30 if config.exact.memory_gb is not None else _physical_memory() / 2
    refusal = None
    try:
        check_exact_memory(config.exact, factors.shapes)
    except AttribIndexError as err:
        refusal = str(err)
    plan = ExactPlan(
        kind=config.exact.kind,
        fisher=config.exact.fisher,
        layers=len(factors.shapes),
        factor_bytes=one,
        copies=SUM_COPIES,
        needed=SUM_COPIES * one,
        limit=int(limit),
        refusal=refusal,
    )
    return plan, factors if refusal is None else None


def _notes(
    config: BuildConfig,
    corpus: CorpusPlan,
    skip_empty: bool,
    num_shards: int | None,
    shard: bool,
    keep_shards: bool,
) -> tuple[str, ...]:
    notes = []
    if corpus.empty and not skip_empty:
        notes.append(
            f"{corpus.empty:,} documents tokenise to nothing: the build stops at the first; pass --skip-empty "
            f"(`skip_empty=True`) to leave them out"
        )
    if num_shards is not None and not shard:
        kept = "stay in OUT/shards/" if keep_shards else "are deleted after the merge"
        notes.append(f"{num_shards} shards hold the rows again until merged (and {kept}): disk peaks near 2× rows")
    if config.hessian.kind == "ekfac":
        notes.append("ekfac adds a pass over the stored rows (no model) before indexing; not in the time estimate")
    if not config.index.exact and not shard:
        notes.append("training and filling the approximate index are not in the time estimate")
    return tuple(notes)


def _index_name(plan: SegmentPlan, rows: int) -> str:
    return f"{plan.factory} ({rows:,} rows" + (f", nprobe {plan.nprobe})" if plan.nprobe else ")")
