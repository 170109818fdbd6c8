"""The manifest's log (one record per event that made a version, told apart by `event`), and the requests that
decide a build's rows (recorded in a shard's manifest and in the `building.json` marker of a running build).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from attribindex._records import omitted_when_default

# ---- the log: one record per event, told apart by `event` ----


@dataclass(frozen=True, kw_only=True)
class DriftRecord:
    """How far the whitening in use is from the one the curvature sums now imply (‖ΔW‖_F / ‖W‖_F over modules):
    a refresh's `drift_before`, and a Hessian record's `drift` after an append or delete."""

    median: float
    max: float
    examples: int


@dataclass(frozen=True, kw_only=True)
class ResumedRecord:
    rows: int  # rows the interrupted run had written
    time: str


@dataclass(frozen=True, kw_only=True)
class BuildEvent:
    event: Literal["build"] = "build"
    rows: int
    time: str
    resumed: ResumedRecord | None = omitted_when_default()


@dataclass(frozen=True, kw_only=True)
class MergedShard:
    folder: str
    rows: int
    documents: tuple[int, int]  # [start, stop) corpus positions


@dataclass(frozen=True, kw_only=True)
class MergeEvent:
    event: Literal["merge"] = "merge"
    rows: int
    time: str
    shards: tuple[MergedShard, ...]


@dataclass(frozen=True, kw_only=True)
class MutationStamp:
    """What every mutation's event starts with: the version it made, and when (its keys come first)."""

    version: int
    time: str


@dataclass(frozen=True, kw_only=True)
class AppendRequest:
    """What decides an append's rows: the documents as read, by content, and how they were read. A rerun of an
    append under the same request finds it in the log (its process may have died just after the commit)."""

    content: str  # "sha256:" + hex over one JSON line [id, source, text] per document read, in corpus order
    text_field: str
    id_field: str | None
    limit: int | None
    skip_empty: bool
    skip_duplicates: bool


@dataclass(frozen=True, kw_only=True)
class AppendEvent(MutationStamp):
    event: Literal["append"] = "append"
    rows: int
    data: str
    duplicates_skipped: int
    empty_skipped: int
    tokens: int
    request: AppendRequest | None = omitted_when_default()  # from format version 8 on


@dataclass(frozen=True, kw_only=True)
class DeleteEvent(MutationStamp):
    event: Literal["delete"] = "delete"
    rows: int
    unknown_ids: int


@dataclass(frozen=True, kw_only=True)
class CompactEvent(MutationStamp):
    event: Literal["compact"] = "compact"
    rows_removed: int
    rows: int


@dataclass(frozen=True, kw_only=True)
class RefreshEvent(MutationStamp):
    event: Literal["refresh"] = "refresh"
    rows: int
    drift_before: DriftRecord


@dataclass(frozen=True, kw_only=True)
class OperatingPointEvent(MutationStamp):
    event: Literal["operating_point"] = "operating_point"
    nprobe: int | None = omitted_when_default()
    ef_search: int | None = omitted_when_default()
    recall: float
    k: int


MutationEvent = AppendEvent | DeleteEvent | CompactEvent | RefreshEvent | OperatingPointEvent
LogEvent = BuildEvent | MergeEvent | MutationEvent


# ---- requests: what decides a build's rows ----


@dataclass(frozen=True, kw_only=True)
class ShardSlot:
    index: int
    count: int


@dataclass(frozen=True, kw_only=True)
class BuildRequest:
    """What decides a build's rows: an interrupted build resumes, and a finished shard is reused, only under
    the same request. Batch size and device are left out of `config` (`rows_settings`)."""

    model: str
    data: str
    text_field: str
    id_field: str | None
    limit: int | None
    skip_empty: bool
    config: dict[str, Any]
    shard: ShardSlot | None = omitted_when_default()  # one shard of a sharded build
    num_shards: int | None = omitted_when_default()  # a whole multi-shard build


@dataclass(frozen=True, kw_only=True)
class MergeRequest:
    merge: tuple[str, ...]  # the shard folders, resolved


@dataclass(frozen=True, kw_only=True)
class BuildMarker:
    """`building.json`: present while a build or merge runs; what it is doing and since when."""

    started: str
    request: BuildRequest | MergeRequest
