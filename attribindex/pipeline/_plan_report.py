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
    time: TimePlan
    exact: ExactPlan | None
    notes: tuple[str, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        c, d, m, t = self.corpus, self.disk, self.memory, self.time
        ranks = sorted({(p.rank_out, p.rank_in) for p in self.modules})
        how = "counted" if c.counted else f"estimated from the first {c.sample:,} documents"
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
            f"time         ~{format_duration(t.extract_seconds + t.exact_correction_seconds)} on {t.device} "
            f"({t.seconds_per_token * 1e3:.3f} ms/token from {t.probe_batches} timed batches of {t.batch_size}, "
            f"{t.probe_tokens:,} tokens in {t.probe_seconds:.2f} s)"
            + (
                f"; of which the exact EK-FAC correction ~{format_duration(t.exact_correction_seconds)}"
                if t.exact_correction_seconds
                else ""
            ),
        ]
        e = self.exact
        if e is not None:
            verdict = "refused: " + e.refusal if e.refusal else f"fits the limit of {format_size(e.limit)}"
            lines.append(
                f"exact        {e.kind} ({e.fisher} Fisher) over {e.layers} layers: {e.copies} × "
                f"{format_size(e.factor_bytes)} = {format_size(e.needed)} of factor sums; {verdict}"
            )
        lines += [f"assumes      {a}" for a in m.assumptions]
        lines += [f"note         {n}" for n in self.notes]
        return "\n".join(lines)


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
