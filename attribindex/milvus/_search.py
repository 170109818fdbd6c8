"""Candidates from a Milvus collection that mirrors an index; the index re-scores them from its own store.

Before every search the collection's record is read (one small RPC) and checked against the index: another index,
another model, projection or Hessian, a rewrite under way, or rows the collection lacks (appended, compacted or
refreshed since its version) are refused with the fix, `attribindex push`. A collection that lags only by deletes
is searched with as many extra candidates as the index has deleted rows, and deleted rows are dropped, so a deleted
row never comes back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import numpy as np

from attribindex.errors import AttribIndexError, IndexMismatchError
from attribindex.milvus._collection import MAX_TOPK, SKETCH_RERANK, CollectionState, read_state, write_state
from attribindex.milvus._target import MilvusTarget, connect, disconnect, milvus_errors
from attribindex.store import IndexManifest
from attribindex.store._log_records import DeleteEvent, OperatingPointEvent


@dataclass(frozen=True)
class MilvusOperatingPoint:
    """A search effort measured by `eval recall --search`, recorded in the collection."""

    effort: int
    recall: float
    k: int
    ms_per_query: float


class MilvusSearch:
    """First-stage search through a Milvus collection pushed from `manifest`'s index.

    Example:
        >>> search = MilvusSearch.open("attributions.db", manifest, deleted_rows)  # doctest: +SKIP
        >>> rows = search.candidates(query_vectors, 40)  # (Q, 40) global rows, -1 where fewer exist  # doctest: +SKIP
    """

    def __init__(self, client, target: MilvusTarget, manifest: IndexManifest, deleted: np.ndarray):
        self.client, self.target, self.manifest, self.deleted = client, target, manifest, deleted
        self.state = self.check()
        self.effort: int | None = self.state.effort  # None: the kind's default
        with milvus_errors(target):
            self.client.load_collection(target.collection)

    @classmethod
    def open(cls, uri: str, manifest: IndexManifest, deleted: np.ndarray, token: str | None = None) -> MilvusSearch:
        target = MilvusTarget.parse(uri)
        client = connect(target, token)
        try:
            return cls(client, target, manifest, deleted)
        except BaseException:
            disconnect(client, target)  # a refused collection keeps no Milvus Lite file open
            raise

    def for_index(self, manifest: IndexManifest, deleted: np.ndarray) -> MilvusSearch:
        """The same collection and connection, checked against a newer version of the index."""
        search = MilvusSearch(self.client, self.target, manifest, deleted)
        search.effort = self.effort
        return search

    @property
    def description(self) -> str:
        kind = self.state.milvus_kind
        effort = f" {kind.effort}={self.effort}" if kind.effort and self.effort else ""
        sketch = f" over a {self.state.sketch_dim:,}-dim sketch" if self.state.sketch_dim else ""
        return f"Milvus {kind.name}{effort}{sketch} ({self.target.uri})"

    @property
    def exact(self) -> bool:
        """True when the collection's kind scans every row (its candidates are a flat search's)."""
        return self.state.milvus_kind.name in ("FLAT", "GPU_BRUTE_FORCE") and not self.state.sketch_dim

    @property
    def min_rerank(self) -> int:
        """Candidates per result this collection needs at least: more when it holds sketches (module docstring of
        `attribindex.milvus._collection`)."""
        return SKETCH_RERANK if self.state.sketch_dim else 1

    def check(self) -> CollectionState:
        """The collection's record, refused with the fix unless it can answer for this index."""
        manifest, uri = self.manifest, self.target.uri
        push = f"Run `attribindex push INDEX {uri}`."
        state = read_state(self.client, self.target)
        if state is None:
            raise AttribIndexError(f"{uri}: there is no collection {self.target.collection!r}. {push}")
        if state.index_id != manifest.index_id:
            raise IndexMismatchError(
                f"{uri} holds another index ({state.index_id}), not {manifest.index_id}. Point --search at this "
                f"index's collection, or push it there with --replace."
            )
        if state.pushing and state.rewrite or not state.version:
            raise AttribIndexError(f"{uri} is being rewritten by a push, or one was interrupted. {push}")
        if state.version > manifest.version:
            raise IndexMismatchError(
                f"{uri} holds version {state.version} of {manifest.index_id}, newer than this copy (version "
                f"{manifest.version}). Open the newer copy, or push this one with --replace."
            )
        missing = [
            f"{e.event} (version {e.version})"
            for e in manifest.log
            if getattr(e, "version", 0) > state.version and not isinstance(e, (DeleteEvent, OperatingPointEvent))
        ]
        if missing:
            raise IndexMismatchError(
                f"{uri} holds version {state.version} of {manifest.index_id}, which lacks {', '.join(missing)}. {push}"
            )
        recorded = (state.model_fingerprint, state.projection_hash, state.preconditioner_hash, state.dim)
        if recorded != (
            manifest.model.fingerprint,
            manifest.projection.hash,
            manifest.hessian.preconditioner_hash,
            manifest.dim,
        ):
            raise IndexMismatchError(f"{uri} holds vectors of another model, projection or Hessian. {push}")
        return state

    def candidates(self, vectors: np.ndarray, count: int) -> np.ndarray:
        """(Q, count) global rows, best first by the collection's metric, deleted rows dropped (-1 pads)."""
        self.state = state = self.check()  # every search: a push or rewrite since the last one is noticed
        lagging = len(self.deleted) if state.version < self.manifest.version else 0  # deletes not pushed yet
        if count + lagging > MAX_TOPK:
            raise AttribIndexError(
                f"{count + lagging:,} candidates ({count:,} asked for, {lagging:,} for deletes not pushed yet) exceed "
                f"Milvus's {MAX_TOPK:,} per search. Ask for fewer (k, rerank, --exact), or push the deletes."
            )
        kind = state.milvus_kind
        with milvus_errors(self.target):
            hits = self.client.search(
                self.target.collection,
                data=list(state.queries(vectors)),
                limit=count + lagging,
                search_params={"metric_type": state.metric, "params": kind.search_params(self.effort, count + lagging)},
                output_fields=["row"],
            )
        out = np.full((len(vectors), count), -1, dtype=np.int64)
        for q, found in enumerate(hits):
            rows = np.array([hit["row"] for hit in found], dtype=np.int64)
            rows = rows[~np.isin(rows, self.deleted) & (rows < self.manifest.rows)][:count]
            out[q, : len(rows)] = rows
        return out

    def close(self) -> None:
        """Let go of the collection (and of a Milvus Lite file, which another process may then open)."""
        disconnect(self.client, self.target)

    def configure(self, effort: int | None) -> None:
        if effort is not None:
            self.effort = effort

    def record(self, point: MilvusOperatingPoint) -> None:
        """Make `point` the collection's operating point (what a search uses unless told otherwise)."""
        state = self.check()
        write_state(self.client, self.target, replace(state, operating_point=json.dumps(asdict(point))))
        self.effort = point.effort


def collection_summary(uri: str, manifest: IndexManifest, deleted: np.ndarray, token: str | None = None) -> list[str]:
    """What the collection at `uri` holds, and whether it can answer for `manifest`'s index: lines for `info`."""
    target = MilvusTarget.parse(uri)
    client = connect(target, token)
    try:
        state = read_state(client, target)
        if state is None:
            return [f"milvus       {uri}: no collection {target.collection!r} yet (`attribindex push` makes it)"]
        kind = state.milvus_kind
        with milvus_errors(target):
            client.load_collection(target.collection)
            count = client.query(target.collection, filter="", output_fields=["count(*)"])[0]["count(*)"]
        metric = f"L2 on [x, √(M² − ‖x‖²)], M = {state.max_norm:.4g}" if state.augmented else "inner product"
        lines = [
            f"milvus       {uri}: {kind.name} ({metric}), {count:,} vectors of {state.vector_dim():,} dims",
            f"             holds {state.index_id} version {state.version}"
            + (f", a push to version {state.pushing} under way or interrupted" if state.pushing else ""),
        ]
        if state.operating_point:
            point = MilvusOperatingPoint(**json.loads(state.operating_point))
            lines.append(
                f"             operating point {kind.effort}={point.effort}: recall@{point.k} {point.recall:.3f}, "
                f"{point.ms_per_query:.1f} ms/query"
            )
        try:
            MilvusSearch(client, target, manifest, deleted)
            lag = " (deletes since then are dropped at search until pushed)" if state.version < manifest.version else ""
            lines.append(f"             answers for this index (version {manifest.version}){lag}")
        except AttribIndexError as refused:
            lines.append(f"             cannot answer for this index: {refused}")
        return lines
    finally:
        disconnect(client, target)
