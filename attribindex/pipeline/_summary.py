"""What a build and a merge report at their end."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MergeSummary:
    """What a merge produced: rows per shard, total, time.

    Example:
        >>> print(merge_shards(["s0", "s1"], "idx").format())  # doctest: +SKIP
    """

    out: Path
    index_id: str
    shard_rows: list[tuple[str, int]]  # (shard folder, rows) in shard order
    rows: int
    verify_seconds: float
    seconds: float
    bytes_on_disk: int

    def format(self) -> str:
        lines = [f"merged     {len(self.shard_rows)} shards into {self.out}  ({self.index_id})"]
        lines += [f"  shard {i:<4} {rows:>12,} rows  {folder}" for i, (folder, rows) in enumerate(self.shard_rows)]
        lines += [
            f"rows       {self.rows:,}",
            f"merge      {self.seconds:.1f} s  ({self.verify_seconds:.1f} s verifying checksums)",
            f"on disk    {self.bytes_on_disk / 2**20:.1f} MiB",
        ]
        return "\n".join(lines)


@dataclass(frozen=True)
class BuildSummary:
    """What a build produced, printed at its end.

    Example:
        >>> summary = build_index(config, "./tiny-gpt2", "corpus.jsonl", Path("idx"))  # doctest: +SKIP
        >>> summary.rows, summary.dim  # doctest: +SKIP
        (200, 1024)
    """

    out: Path
    index_id: str
    rows: int
    skipped: int
    truncated: int
    tokens: int
    dim: int
    modules: int
    extract_seconds: float
    total_seconds: float
    bytes_on_disk: int
    resumed_rows: int = 0  # rows already written by an interrupted run that this one continued
    kind: str = "index"  # "index", "shard I of N", or "index of N shards …"
    merge: MergeSummary | None = None  # for a multi-shard build: how its shards were merged
    search: str = ""  # the searchable segments, e.g. "IVF1024,PQ64 (1,000,000 rows)"; empty for a shard
    approximate: bool = False

    def format(self) -> str:
        new_rows = self.rows - self.resumed_rows
        rate = new_rows / self.extract_seconds if self.extract_seconds > 0 else float("nan")
        lines = [
            f"{self.kind:<10} {self.out}  ({self.index_id})",
            f"rows       {self.rows:,}"
            + (f"  ({self.skipped} empty documents skipped)" if self.skipped else "")
            + (f"  ({self.resumed_rows:,} from the interrupted run, resumed)" if self.resumed_rows else ""),
            f"tokens     {self.tokens:,}"
            + (f"  ({self.truncated:,} documents truncated to max_length)" if self.truncated else ""),
            f"vector     {self.dim:,} dims from {self.modules} modules",
            f"extract    {self.extract_seconds:.1f} s  ({rate:.1f} examples/s)",
            f"total      {self.total_seconds:.1f} s",
            f"on disk    {self.bytes_on_disk / 2**20:.1f} MiB",
        ]
        if self.search:
            lines.append(f"search     {self.search}")
        if self.approximate:
            lines.append(f"           approximate: `attribindex eval recall {self.out} --queries …` measures it")
        return (self.merge.format() + "\n\n" if self.merge else "") + "\n".join(lines)
