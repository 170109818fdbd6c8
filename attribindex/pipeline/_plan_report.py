"""What a build plan says: its typed parts (corpus, disk, memory, time, the exact section) and their rendering as
text (`BuildPlan.format`) or JSON (`BuildPlan.to_dict`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from attribindex.store import ModuleRecord


@dataclass(frozen=True)
class CorpusPlan:
    """The documents a build would index. `counted`: every document was tokenised (a local corpus); otherwise the
    figures are the first `sample` documents' scaled to `documents`."""

    description: str
    documents: int  # rows the build will write
    counted: bool
    sample: int  # documents tokenised for these figures
    tokens: int  # after truncation to max_length
    truncated: int
    empty: int  # documents that tokenise to nothing (no token carries loss)
    text_bytes: int  # bytes of the docs.jsonl lines (id, source, full text)
    tokenize_seconds: float  # measured on the `sample` documents


@dataclass(frozen=True)
class DiskPlan:
    """Bytes of each part of the output folder, and per example."""

    store_per_example: float  # grads + scales + ids + offsets (the codec's bytes)
    index_per_example: float  # the FAISS segment
    docs_per_example: float  # docs.jsonl
    rows: int  # every rows/*.npy file, headers included
    docs: int  # every rows/*.docs.jsonl
    index: int
    projections: int
    curvature: int
    preconditioner: int
    exact_preconditioner: int
    manifest: int  # estimated from its records' sizes
    total: int
    free: int | None  # free bytes where --out would go (None when no folder is given)


@dataclass(frozen=True)
class MemoryPlan:
    """Resident bytes, at build (peak of the extraction and the finalizing phases) and at query."""

    model: int  # parameters and buffers in extract.dtype
    window: int  # a window of float32 rows being extracted, and one chunk of encoded rows being buffered
    curvature: int  # the sums held while extracting (committed + pending)
    exact: int  # the exact section's factor sums (SUM_COPIES copies)
    activations: int  # measured during the probe (CUDA: peak allocated beyond the model; CPU: growth of peak RSS)
    finalize: int  # whitening blocks + the approximate segment held in memory while it is filled
    build: int
    index: int  # the segment at query: memory-mapped (flat float32) or read into memory (other kinds)
    query: int
    assumptions: tuple[str, ...]


@dataclass(frozen=True)
class TimePlan:
    """Build time extrapolated from the probe: seconds per token of a few real batches of this config."""

    device: str
    batch_size: int
    probe_batches: int  # timed (after one warm-up batch)
    probe_examples: int
    probe_tokens: int
    probe_seconds: float
    seconds_per_token: float
    extract_seconds: float  # model passes + curvature sums + encoding + tokenising, for the whole corpus
    exact_correction_seconds: float  # EK-FAC's correction pass of the exact section over its sample (0 without)


@dataclass(frozen=True)
class ExactPlan:
    """The exact section's factor sums and whether the build's memory check lets them through."""

    kind: str
    fisher: str
    layers: int
    factor_bytes: int  # one copy of Σ (n_in'² + n_out²) × 8
    copies: int
    needed: int  # copies × factor_bytes
    limit: int  # exact.memory_gb, or half of this machine's RAM
    refusal: str | None  # the build's message when it would refuse the section


@dataclass(frozen=True)
class SearchNodePlan:
    """One kind of search index over every row: what it holds in RAM and how many search nodes that takes."""

    kind: str  # "exact flat", "IVF-SQ8", "IVF-PQ64", …, "HNSW32"
    factory: str  # its FAISS factory string at this many rows
    holds: str
    bytes_per_row: int
    fixed_bytes: int  # what training leaves (centroids, codebooks), headers
    ram_bytes: int
    nodes: int  # of the plan's node RAM, to hold it (no headroom counted)


@dataclass(frozen=True)
class ScalePlan:
    """The build on many GPUs and its search tier on many nodes. Each figure says where it comes from: the
    throughput is `measured` (the probe), `given` (--tokens-per-second) or an `estimate` (its source in
    `throughput_source`); tokens per document are counted, sampled, given or the config's max_length."""

    documents: int
    tokens_per_document: float
    tokens_per_document_source: str
    tokens: int
    parameters: int  # the model's, as its config builds it
    tokens_per_second: float  # per GPU
    throughput: str  # "measured", "given" or "estimate"
    throughput_source: str
    gpu_hours: float  # tokens / tokens_per_second / 3600
    gpus: int
    wall_clock_hours: float  # on `gpus` GPUs, shards `gpus` at a time
    shards: int
    shards_source: str
    rows_per_shard: int
    bytes_per_row: float  # the row store's, as `DiskPlan.store_per_example`
    store_bytes: int  # bytes_per_row × documents
    exact_index_bytes: int  # the store + 4 bytes per row of norms (index/norms.npy)
    node_ram_bytes: int
    search: tuple[SearchNodePlan, ...]
    milvus_fits: bool  # the vectors are within Milvus's 32,768 dims

    def format_lines(self) -> list[str]:
        days = f" ({self.wall_clock_hours / 24:,.1f} days)" if self.wall_clock_hours >= 48 else ""
        lines = [
            f"scale        {self.documents:,} documents × {self.tokens_per_document:,.0f} tokens "
            f"({self.tokens_per_document_source}) = {self.tokens:,} tokens",
            f"throughput   {self.tokens_per_second:,.0f} tokens/s per GPU — {self.throughput_source}",
            f"GPU time     {self.gpu_hours:,.0f} GPU-hours; {self.wall_clock_hours:,.1f} h{days} wall-clock on "
            f"{self.gpus:,} GPUs",
            f"shards       {self.shards:,} ({self.shards_source}), {self.rows_per_shard:,} rows each",
            f"row store    {self.bytes_per_row:,.0f} bytes per row × {self.documents:,} rows = "
            f"{format_size(self.store_bytes)}",
            f"exact index  {format_size(self.exact_index_bytes)}: the row store + 4 bytes per row of norms "
            f"(index/norms.npy)",
            f"search RAM   by index kind, on nodes of {format_size(self.node_ram_bytes)} (--node-ram-gb; no headroom):",
        ]
        width = max(len(s.kind) for s in self.search)
        lines += [
            f"  {s.kind:<{width}}  {format_size(s.ram_bytes):>10}  {s.nodes:>9,} node{'s' if s.nodes > 1 else ' '}  "
            f"{s.bytes_per_row:,} B/row + {format_size(s.fixed_bytes)}: {s.holds}"
            for s in self.search
        ]
        return lines


@dataclass(frozen=True)
class BuildPlan:
    """What `build_index` on the same arguments will produce and need. `to_dict()` for JSON, `format()` to read.

    Example:
        >>> plan = plan_build(load_config("tiny"), "./tiny-gpt2", "corpus.jsonl")  # doctest: +SKIP
        >>> plan.dim, plan.disk.total, plan.time.extract_seconds  # doctest: +SKIP
        (128, 243993, 0.8)
    """

    model: str
    kind: str  # "index", or "shard i of n"
    hessian: str
    store_dtype: str
    index: str  # the FAISS segment: "Flat", "IVF1024,PQ64", …
    segment: dict | None  # the resolved SegmentPlan of an approximate segment
    modules: tuple[ModuleRecord, ...]  # as the manifest will record them
    dim: int
    bytes_per_example: float  # store + index (+ docs.jsonl: see disk)
    corpus: CorpusPlan
    disk: DiskPlan
    memory: MemoryPlan
    time: TimePlan | None  # None when no probe ran (a model without weights, or no corpus to time)
    exact: ExactPlan | None
    scale: ScalePlan
    notes: tuple[str, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        c, d, m, t = self.corpus, self.disk, self.memory, self.time
        ranks = sorted({(p.rank_out, p.rank_in) for p in self.modules})
        how = "counted" if c.counted else f"estimated from the first {c.sample:,} documents"
        if not c.sample:
            how = "given, no corpus read"
        lines = [
            f"plan         {self.kind} of {self.model}: hessian {self.hessian}, store {self.store_dtype}, "
            f"index {self.index}",
            f"vector       {self.dim:,} dims from {len(self.modules)} modules, rank "
            + ", ".join(f"{o}×{i}" for o, i in ranks)
            + f", {sum(p.bias for p in self.modules)} with their bias",
        ]
        lines += [
            f"  {p.dim:>6,}  {p.name}  ({p.out_features}×{p.in_features}{'+b' if p.bias else ''})" for p in self.modules
        ]
        lines += [
            f"corpus       {c.documents:,} documents, {c.tokens:,} tokens after truncation ({c.truncated:,} truncated, "
            f"{c.empty:,} empty) — {how}",
            f"per example  {self.bytes_per_example:,.0f} bytes (store {d.store_per_example:,.0f} + index "
            f"{d.index_per_example:,.0f}) + {d.docs_per_example:,.0f} bytes of text",
            f"disk         {format_size(d.total)}: rows {format_size(d.rows)}, texts {format_size(d.docs)}, index {format_size(d.index)}, "
            f"projections {format_size(d.projections)}, curvature {format_size(d.curvature)}, preconditioner "
            f"{format_size(d.preconditioner)}"
            + (f", exact preconditioner {format_size(d.exact_preconditioner)}" if d.exact_preconditioner else "")
            + f", manifest {format_size(d.manifest)}"
            + (f"; {format_size(d.free)} free there" if d.free is not None else ""),
            f"RAM build    {format_size(m.build)}: model {format_size(m.model)}, activations {format_size(m.activations)}, rows "
            f"{format_size(m.window)}, curvature {format_size(m.curvature)}"
            + (f", exact factors {format_size(m.exact)}" if m.exact else "")
            + f"; finalizing {format_size(m.finalize)}",
            f"RAM query    {format_size(m.query)}: model {format_size(m.model)} + index {format_size(m.index)}",
        ]
        if t is None:
            lines.append("time         no probe ran: see the throughput below")
        else:
            lines.append(
                f"time         ~{format_duration(t.extract_seconds + t.exact_correction_seconds)} on {t.device} "
                f"({t.seconds_per_token * 1e3:.3f} ms/token from {t.probe_batches} timed batches of {t.batch_size}, "
                f"{t.probe_tokens:,} tokens in {t.probe_seconds:.2f} s)"
                + (
                    f"; of which the exact EK-FAC correction ~{format_duration(t.exact_correction_seconds)}"
                    if t.exact_correction_seconds
                    else ""
                )
            )
        e = self.exact
        if e is not None:
            verdict = "refused: " + e.refusal if e.refusal else f"fits the limit of {format_size(e.limit)}"
            lines.append(
                f"exact        {e.kind} ({e.fisher} Fisher) over {e.layers} layers: {e.copies} × "
                f"{format_size(e.factor_bytes)} = {format_size(e.needed)} of factor sums; {verdict}"
            )
        lines += self.scale.format_lines()
        lines += [f"assumes      {a}" for a in m.assumptions]
        lines += [f"note         {n}" for n in self.notes]
        return "\n".join(lines)


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
