"""The second stage of a query: re-score the index's top-C (and bottom-C) candidates with exact, unprojected
KFAC / EK-FAC influence (`attribindex.exact`), and rank them by it."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from attribindex.errors import AttribIndexError
from attribindex.exact import ExactPreconditioner, ExactScorer
from attribindex.logra import GradientExtractor
from attribindex.query._results import Attribution, ExactRerank
from attribindex.store import IndexManifest, RowStore

MAX_EXACT_CANDIDATES = 10_000  # each candidate costs one forward + backward of the model
EXACT_MEMORY_BYTES = 1 << 30  # what one batch of candidates may hold (see `ExactScorer`)
QUERY_GROUP = 16  # queries re-ranked in one pass over their candidates (each holds a model-sized query gradient)


def check_exact(
    manifest: IndexManifest,
    exact: int,
    k: int,
    bottom: int,
    limit: int = MAX_EXACT_CANDIDATES,
    limit_source: str = "attribindex.query.MAX_EXACT_CANDIDATES",
) -> None:
    """Refuse a re-rank request the index or the numbers cannot serve, saying what to change."""
    if manifest.ensemble is not None:  # checked first: rebuilding an ensemble with the exact section is refused too
        raise AttribIndexError(
            f"index {manifest.index_id} is a checkpoint ensemble: exact, unprojected influence is not supported for a "
            f"checkpoint ensemble yet (its build refuses the `exact` section). Use an index of one checkpoint for it, "
            f"built with `exact: {{enabled: true}}`."
        )
    if manifest.exact is None:
        raise AttribIndexError(
            f"index {manifest.index_id} was built without the `exact` section, so it has no unprojected curvature to "
            f"re-rank with. Add `exact: {{enabled: true}}` to the build config (YAML key exact.enabled; see "
            f"docs/format.md) and rebuild the index: the factors are summed during the build's pass over the corpus."
        )
    if isinstance(exact, bool) or not isinstance(exact, int) or exact < 1:
        raise AttribIndexError(f"exact (candidates to re-score) must be a positive integer, got {exact!r}.")
    if exact > limit:
        raise AttribIndexError(
            f"exact={exact} is above the limit of {limit} candidates ({limit_source}; each candidate is one forward "
            f"and backward pass of the model). Ask for fewer."
        )
    if exact < max(k, bottom):
        raise AttribIndexError(
            f"exact={exact} candidates cannot fill k={k}{f' and bottom={bottom}' if bottom else ''}: re-score at "
            f"least as many candidates as results (exact >= {max(k, bottom)})."
        )


@dataclass(frozen=True)
class Reranked:
    top: list[Attribution]
    bottom: list[Attribution]


class ExactReranker:
    """Exact scores for an index's candidates, with the index's model and its exact preconditioner.

    Example:
        >>> reranker = ExactReranker(index.root, index.manifest, index.extractor, index.store)  # doctest: +SKIP
        >>> reranker.rerank(["To be, or not to be"], [(top, low)], k=10, bottom=0)  # doctest: +SKIP
    """

    def __init__(
        self,
        root,
        manifest: IndexManifest,
        extractor: GradientExtractor,
        store: RowStore,
        memory_bytes: int = EXACT_MEMORY_BYTES,
    ):
        record = manifest.exact
        preconditioner = ExactPreconditioner.load(root / record.file)
        if preconditioner.hash() != record.preconditioner_hash:
            raise AttribIndexError(
                f"{root / record.file} does not match the manifest's exact preconditioner hash; rebuild the index."
            )
        self.scorer = ExactScorer(
            extractor, preconditioner, manifest.config.extract.batch_size, memory_bytes=memory_bytes
        )
        self.extractor, self.store, self.mode = extractor, store, manifest.normalization
        self.method = f"{record.kind}, unprojected, {record.fisher} Fisher, damping {record.damping:g}"

    def scores(self, queries: list, rows: list[int]) -> torch.Tensor:
        """(n, Q) float64 exact scores of stored rows `rows` on `queries`."""
        documents = self.store.documents(rows)
        examples = self.extractor.tokenize([d.text for d in documents], [f"document {d.id!r}" for d in documents])
        return self.scorer.scores(self.scorer.prepare(self.extractor.tokenize(queries)), examples, self.mode)

    def rerank(
        self,
        queries: list,
        candidates: list[tuple[list[Attribution], list[Attribution]]],
        k: int,
        bottom: int,
        count: int,
    ) -> tuple[list[Reranked], ExactRerank]:
        """Per query, its candidates (the first stage's top-`count` and bottom-`count` attributions) re-scored
        exactly: the k highest and `bottom` lowest of them.

        Up to QUERY_GROUP queries share one pass over the union of their candidates (each candidate runs through
        the model once, scored against every query of the group at once).
        """
        started = time.perf_counter()
        out, scored = [], 0
        for first in range(0, len(queries), QUERY_GROUP):
            group = range(first, min(first + QUERY_GROUP, len(queries)))
            pools = [{a.row: a for a in [*candidates[q][0], *candidates[q][1]]} for q in group]  # row -> candidate
            scored = max(scored, *(len(pool) for pool in pools))
            union = {row: a for pool in pools for row, a in pool.items()}
            rows = sorted(union)
            examples = self.extractor.tokenize(
                [union[r].text for r in rows], [f"document {union[r].id!r}" for r in rows]
            )
            prepared = self.scorer.prepare(self.extractor.tokenize([queries[q] for q in group]))
            scores = self.scorer.scores(prepared, examples, self.mode).numpy()  # (n, group)
            position = {row: i for i, row in enumerate(rows)}
            for column, pool in enumerate(pools):
                mine = np.array(sorted(pool))
                own = scores[[position[r] for r in mine], column]  # (candidates,)
                order = np.lexsort((mine, -own))  # highest first; ties by row, so answers repeat exactly
                ranked = [replace(pool[mine[i]], score=float(own[i])) for i in order]
                out.append(Reranked(top=ranked[:k], bottom=ranked[::-1][:bottom] if bottom else []))
        seconds = time.perf_counter() - started
        return out, ExactRerank(method=self.method, candidates=count, scored=scored, rerank_ms=seconds * 1000)
