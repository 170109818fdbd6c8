"""A plan at scale: the extraction throughput and where it comes from (measured, given or estimated), GPU-hours and
wall-clock, the shards, the row store's bytes, and the RAM each kind of search index needs, in search nodes.

Every figure keeps its provenance: a throughput is measured (the plan's probe), given (`--tokens-per-second`) or an
estimate with its source; tokens per document are counted, sampled, given, or the config's max_length.
"""

from __future__ import annotations

import math

from attribindex.config import BuildConfig, IndexConfig
from attribindex.errors import AttribIndexError
from attribindex.index import SegmentPlan
from attribindex.milvus import MAX_DIM as MILVUS_MAX_DIM
from attribindex.pipeline._plan_report import CorpusPlan, DiskPlan, ScalePlan, SearchNodePlan, TimePlan
from attribindex.pipeline._plan_sizes import _segment_bytes

# Bergson's published throughput chart (github.com/EleutherAI/bergson): gradient extraction on one GH200 at about
# 28k tokens/s for a 1B-parameter model and 8k tokens/s at 12B. Between (and beyond) them, interpolated log-log.
BERGSON_CHART = ((1e9, 28_000.0), (12e9, 8_000.0))
PQ_CODE_BYTES = (64, 128, 256)  # IVF-PQ code sizes a search tier is planned at
GIB = 2**30


def check_scale_arguments(
    documents: int | None,
    tokens_per_document: float | None,
    tokens_per_second: float | None,
    gpus: int,
    node_ram_gb: float,
) -> None:
    """Refuse what no plan can use, naming the option and the fix."""
    if documents is not None and documents < 1:
        raise AttribIndexError(f"--documents must be >= 1, got {documents}: say how many documents the build indexes.")
    if tokens_per_document is not None and not tokens_per_document > 0:
        raise AttribIndexError(
            f"--tokens-per-document must be > 0, got {tokens_per_document}: the mean tokens of a document."
        )
    if tokens_per_second is not None and not tokens_per_second > 0:
        raise AttribIndexError(
            f"--tokens-per-second must be > 0, got {tokens_per_second}: the extraction throughput of one GPU "
            f"(leave it out for the probe's measurement or the labelled estimate)."
        )
    if gpus < 1:
        raise AttribIndexError(f"--gpus must be >= 1, got {gpus}: how many GPUs extract at once.")
    if not node_ram_gb > 0:
        raise AttribIndexError(f"--node-ram-gb must be > 0, got {node_ram_gb}: the RAM of one search node in GiB.")


def estimated_tokens_per_second(parameters: int) -> tuple[float, str]:
    """(tokens/s, its label) from `BERGSON_CHART` for a model of `parameters` parameters.

    Example:
        >>> round(estimated_tokens_per_second(1_000_000_000)[0])
        28000
    """
    (p0, t0), (p1, t1) = BERGSON_CHART
    slope = math.log(t1 / t0) / math.log(p1 / p0)
    rate = t0 * (parameters / p0) ** slope
    how = "interpolated" if p0 <= parameters <= p1 else "extrapolated"
    label = (
        f"estimate, from bergson's chart (~28k tokens/s at 1B parameters, ~8k at 12B, one GH200; {how} log-log at "
        f"{parameters / 1e9:.2f}B parameters; github.com/EleutherAI/bergson)"
    )
    return rate, label


def throughput(given: float | None, time: TimePlan | None, parameters: int) -> tuple[float, str, str]:
    """(tokens/s per GPU, provenance, label): given > measured by the probe > estimated."""
    if given is not None:
        return given, "given", "given with --tokens-per-second (measured elsewhere)"
    if time is not None:
        return (
            1 / time.seconds_per_token,
            "measured",
            f"measured: this plan's probe, {time.probe_batches} batches of {time.batch_size} on {time.device}",
        )
    rate, label = estimated_tokens_per_second(parameters)
    return rate, "estimate", label


def plan_scale(
    config: BuildConfig,
    corpus: CorpusPlan,
    tokens_source: str,
    disk: DiskPlan,
    dim: int,
    parameters: int,
    time: TimePlan | None,
    *,
    tokens_per_second: float | None,
    gpus: int,
    num_shards: int | None,
    node_ram_gb: float,
) -> ScalePlan:
    """The build's cost on `gpus` GPUs and its search tier on nodes of `node_ram_gb` GiB."""
    rows = corpus.documents
    rate, provenance, label = throughput(tokens_per_second, time, parameters)
    gpu_hours = corpus.tokens / rate / 3600
    shards = num_shards if num_shards is not None else gpus
    rows_per_shard = math.ceil(rows / shards)
    shard_hours = rows_per_shard * (corpus.tokens / max(rows, 1)) / rate / 3600
    wall_hours = math.ceil(shards / gpus) * shard_hours  # shards run gpus at a time, each on one GPU
    store = round(disk.store_per_example * rows)
    node = node_ram_gb * GIB
    norms = _search_row(config, "exact flat", IndexConfig(mode=config.index.mode), rows, dim, node)
    search = [
        norms,
        _search_row(config, "IVF-SQ8", IndexConfig(mode=config.index.mode, kind="ivf_sq8"), rows, dim, node),
        *(
            _search_row(
                config, f"IVF-PQ{m}", IndexConfig(mode=config.index.mode, kind="ivf_pq", pq_m=m), rows, dim, node
            )
            for m in PQ_CODE_BYTES
            if dim >= m
        ),
        _search_row(
            config,
            f"HNSW{config.index.hnsw_m}",
            IndexConfig(mode=config.index.mode, kind="hnsw", hnsw_m=config.index.hnsw_m),
            rows,
            dim,
            node,
        ),
    ]
    return ScalePlan(
        documents=rows,
        tokens_per_document=corpus.tokens / max(rows, 1),
        tokens_per_document_source=tokens_source,
        tokens=corpus.tokens,
        parameters=parameters,
        tokens_per_second=rate,
        throughput=provenance,
        throughput_source=label,
        gpu_hours=gpu_hours,
        gpus=gpus,
        wall_clock_hours=wall_hours,
        shards=shards,
        shards_source="--num-shards" if num_shards is not None else "one per GPU",
        rows_per_shard=rows_per_shard,
        bytes_per_row=disk.store_per_example,
        store_bytes=store,
        exact_index_bytes=store + norms.ram_bytes,
        node_ram_bytes=int(node),
        search=tuple(search),
        milvus_fits=dim <= MILVUS_MAX_DIM,
    )


def _search_row(config: BuildConfig, name: str, index: IndexConfig, rows: int, dim: int, node: float) -> SearchNodePlan:
    """What one kind holds in RAM over `rows` rows: the project's own byte accounting of its segment (`_segment_bytes`:
    codes and ids per row, plus what training leaves), split into bytes per row and a fixed part."""
    plan = SegmentPlan.resolve(index, config.index.mode, rows, dim)
    total = _segment_bytes(plan, rows)
    per_row = total - _segment_bytes(plan, rows - 1) if rows > 1 else total
    if plan.kind == "flat":
        holds = "the fp32 norms (index/norms.npy); rows stream from the store per scan"
    elif plan.kind == "ivf_sq8":
        holds = f"1-byte codes of {plan.index_dim:,} dims + an 8-byte id per row, {plan.nlist:,} fp32 centroids"
    elif plan.kind == "ivf_pq":
        holds = f"{plan.pq_m}-byte codes + an 8-byte id per row, {plan.nlist:,} centroids and the PQ codebooks"
    else:
        holds = f"fp32 vectors ({plan.index_dim:,} × 4 bytes) + a graph of ~2 × {plan.hnsw_m} int32 links per row"
    return SearchNodePlan(
        kind=name,
        factory=plan.factory,
        holds=holds,
        bytes_per_row=per_row,
        fixed_bytes=total - rows * per_row,
        ram_bytes=total,
        nodes=max(1, math.ceil(total / node)),
    )
