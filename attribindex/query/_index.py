"""The library entry point: open an index with its model and answer attribution queries.

`AttributionIndex` is one facade kept whole: opening and checking the folder, query vectors, search, `attribute`,
`exact_scores` and `explain` each orchestrate the modules beside it (`_exact` re-ranks, `_explain` splits scores
over tokens, `_ensemble` runs a checkpoint ensemble's models, `_results` shapes the answers).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from attribindex.data import PromptCompletion, batched
from attribindex.errors import AttribIndexError, IndexMismatchError
from attribindex.hessian import Preconditioner, normalize_rows
from attribindex.index import SegmentedIndex, StoreAccess, rerank
from attribindex.logra import GradientExtractor, ModuleSpec, ProjectionSet
from attribindex.milvus import MilvusSearch
from attribindex.model import DTYPES, load_model, model_fingerprint
from attribindex.query._ensemble import checkpoint_members, checkpoint_weights, ensemble_raw
from attribindex.query._exact import EXACT_MEMORY_BYTES, ExactReranker, check_exact
from attribindex.query._explain import (
    ExplainedExample,
    Explanation,
    TokenContribution,
    explain_pairs,
    split_scores,
    token_spans,
)
from attribindex.query._inputs import Query, as_queries, check_count, preview
from attribindex.query._results import Attribution, Attributions, QueryResult
from attribindex.store import IndexManifest, RowStore, check_file, layout, read_manifest


@dataclass(frozen=True)
class QueryVectors:
    """Whitened (and, in cosine mode, normalised) query vectors, stamped with what produced them.

    The index refuses vectors whose stamp differs from its manifest.
    """

    vectors: np.ndarray  # (Q, D) float32
    losses: np.ndarray  # (Q,)
    model_fingerprint: str
    projection_hash: str
    preconditioner_hash: str
    normalization: str


class AttributionIndex:
    """An opened index plus the model that turns queries into whitened gradients.

    Example:
        >>> from attribindex import AttributionIndex, PromptCompletion
        >>> index = AttributionIndex.open("demo-index")  # doctest: +SKIP
        >>> answer = index.attribute(["Friends, Romans, countrymen"], k=5, bottom=2)  # doctest: +SKIP
        >>> [(a.id, round(a.score, 3)) for a in answer.results[0].top]  # doctest: +SKIP
        >>> index.attribute([PromptCompletion("Q: Who is the Dane?\\nA:", " Hamlet")], k=3)  # doctest: +SKIP
    """

    def __init__(self, root: Path, manifest: IndexManifest, device: str = "auto"):
        self.root = root
        self.manifest = manifest
        self._device = device
        self.index_id = manifest.index_id
        self.mode = manifest.normalization
        specs = [ModuleSpec(m.name, m.kind, m.in_features, m.out_features, m.bias) for m in manifest.modules]
        self.module_names = manifest.module_names
        self.block_dims = manifest.block_dims
        self.version = manifest.version
        preconditioner_file = manifest.hessian.file
        hashed = (layout.PROJECTIONS, preconditioner_file)  # contents checked against their hashes below
        for name, record in manifest.files.items():  # a missing or truncated file fails here, not mid-query
            if name not in hashed or not (root / name).is_file():
                check_file(root, name, record, content=False)
        self.projections = ProjectionSet.load(root / layout.PROJECTIONS, specs)
        self._expect("projection hash", manifest.projection.hash, self.projections.hash(), layout.PROJECTIONS)
        self.preconditioner = Preconditioner.load(root / preconditioner_file, self.module_names, self.block_dims)
        self._expect(
            "preconditioner hash", manifest.hessian.preconditioner_hash, self.preconditioner.hash(), preconditioner_file
        )
        self.store = RowStore(root, self.block_dims, manifest.store.dtype, manifest.store.chunks)
        segments = manifest.index.segments
        access = StoreAccess(self.store, self.preconditioner.whiten, self.mode)  # for exact segments over the store
        self.index = SegmentedIndex.load(root, segments, manifest.deleted_rows(root), device, access)
        for segment, opened in zip(segments, self.index.segments):
            if opened.rows != segment.rows or opened.dim != manifest.dim:
                raise AttribIndexError(
                    f"{root / segment.file} holds {opened.rows} × {opened.dim} vectors but the manifest says "
                    f"{segment.rows} × {manifest.dim}. The index is damaged; rebuild it."
                )
        self.extract_config = manifest.config.extract
        self.rerank = manifest.config.index.rerank
        point = manifest.index.operating_point
        if point is not None:
            self.index.configure(nprobe=point.nprobe, ef_search=point.ef_search)
        self._extractor: GradientExtractor | None = None
        self._members: list = []  # (CheckpointRecord, GradientExtractor) of an ensemble index
        self._weights: torch.Tensor | None = None  # (D,) an ensemble's checkpoint weight per dimension
        self._fingerprint = ""
        self._reranker: ExactReranker | None = None
        self.remote: MilvusSearch | None = None  # candidates from a Milvus collection instead of `self.index`
        self.exact_memory_bytes = EXACT_MEMORY_BYTES  # what one batch of re-ranked candidates may hold

    @classmethod
    def open(
        cls,
        path: str | Path,
        model=None,
        tokenizer=None,
        *,
        load_model_now: bool = True,
        device: str = "auto",
        dtype: str | None = None,
        search: str | None = None,
        milvus_token: str | None = None,
    ) -> AttributionIndex:
        """Open the index at `path` and the model that answers queries.

        Args:
            model: None = the model recorded in the manifest; a folder / hub id; or an already loaded
                causal LM (then pass its `tokenizer` too). Its fingerprint must match the index's.
            load_model_now: False opens the index only (for `search` with precomputed QueryVectors).
            device: where the model and the FAISS index run (``auto`` = GPU when available).
            dtype: compute dtype for queries (default: the build's).
            search: a Milvus collection pushed from this index (``milvus://HOST:PORT/COLLECTION`` or a Milvus Lite
                ``PATH.db[#COLLECTION]``) to take candidates from; they are re-scored from the index's store, so
                scores are a local flat search's. `milvus_token`: its login (default: MILVUS_TOKEN).
        """
        root = Path(path)
        manifest = read_manifest(root)
        index = cls(root, manifest, device=device)
        if search is not None:
            index.remote = MilvusSearch.open(search, manifest, index.index.deleted, milvus_token)
        if manifest.ensemble is not None and model is not None:
            raise AttribIndexError(
                f"{root} is an ensemble over {len(manifest.ensemble.checkpoints)} checkpoints, which are loaded from "
                "the paths its manifest records; `model=` cannot stand in for them. Open it without `model=`."
            )
        if isinstance(model, nn.Module):
            if tokenizer is None:
                raise AttribIndexError("a loaded model needs its tokenizer: pass tokenizer=... as well.")
            index._attach_model(model, tokenizer, dtype=dtype)
        elif load_model_now and manifest.ensemble is not None:
            index._attach_checkpoints(dtype, device)
        elif load_model_now:
            source = model or manifest.model.name_or_path
            if model is None and source.startswith("/") and not Path(source).exists():
                raise AttribIndexError(
                    f"the model this index was built with ({source}) is no longer there. Point at a copy of the same "
                    f"checkpoint with `model=PATH`."
                )
            lm, loaded_tokenizer = load_model(source, dtype or index.extract_config.dtype, device)
            index._attach_model(lm, loaded_tokenizer, dtype=dtype)
        return index

    def _attach_checkpoints(self, dtype: str | None, device: str) -> None:
        """An ensemble index: every checkpoint's model, each with its own block of the projections."""
        self._members = checkpoint_members(self.manifest, self.projections, self.extract_config, dtype, device)
        self._weights = checkpoint_weights(self.manifest)
        self._extractor = self._members[-1][1]  # the last checkpoint: the index's recorded model (and tokenizer)
        self._fingerprint = self.manifest.model.fingerprint

    def _refuse_for_ensembles(self, what: str) -> None:
        if self.manifest.ensemble is not None:
            raise AttribIndexError(
                f"{what} is not supported for a checkpoint ensemble yet; use an index of one checkpoint for it."
            )

    def reopened(self) -> AttributionIndex:
        """The same folder opened again, keeping the loaded model: picks up appends, deletes and refreshes
        committed since this object was opened (a running server does this between batches)."""
        index = type(self)(self.root, read_manifest(self.root), device=self._device)
        index.exact_memory_bytes = self.exact_memory_bytes
        if self._extractor is not None:
            index._extractor = GradientExtractor(
                self._extractor.model,
                self._extractor.tokenizer,
                index.projections,
                index.extract_config.max_length,
                self._extractor.dtype,
            )
            index._fingerprint = self._fingerprint  # the same model object: its fingerprint is unchanged
        if self.remote is not None:
            index.remote = self.remote.for_index(index.manifest, index.index.deleted)
            index._members = self._members  # an ensemble's checkpoints and their projections do not change
            index._weights = self._weights
            if self._fingerprint != index.manifest.model.fingerprint:
                raise IndexMismatchError(f"{self.root} was rebuilt with another model; restart with that model.")
        return index

    def manifest_stamp(self) -> tuple[int, int]:
        """(mtime ns, size) of the manifest: it changes with every committed mutation."""
        stat = (self.root / layout.MANIFEST).stat()
        return stat.st_mtime_ns, stat.st_size

    def _expect(self, what: str, recorded: str, actual: str, source: str) -> None:
        if recorded != actual:
            raise IndexMismatchError(
                f"{what} differs: the index manifest records {recorded[:23]}…, but {source} gives {actual[:23]}…. "
                f"The index files do not belong together; rebuild the index."
            )

    def _attach_model(self, model, tokenizer, dtype: str | None = None) -> None:
        fingerprint = model_fingerprint(model)
        recorded = self.manifest.model
        if fingerprint != recorded.fingerprint and self.manifest.training is not None:
            raise IndexMismatchError(
                f"model differs: this index was captured while training, and answers queries with the model as "
                f"training left it (fingerprint {recorded.fingerprint[:19]}…); the model given ({type(model).__name__}, "
                f"fingerprint {fingerprint[:19]}…) is another checkpoint, e.g. the one training started from "
                f"({recorded.name_or_path}). Pass the trained model: `model=` (a saved copy, or the object with its "
                f"tokenizer), or `--model DIR` on the command line."
            )
        if fingerprint != recorded.fingerprint:
            raise IndexMismatchError(
                f"model differs: this index was built with {recorded.name_or_path} ({recorded.class_name}, "
                f"fingerprint {recorded.fingerprint[:19]}…) but the model given is {type(model).__name__} "
                f"(fingerprint {fingerprint[:19]}…), another checkpoint. Use the model the index was built with "
                f"(`model` may point at a copy of it)."
            )
        self._fingerprint = fingerprint
        compute = DTYPES[dtype or self.extract_config.dtype]
        self._extractor = GradientExtractor(model, tokenizer, self.projections, self.extract_config.max_length, compute)

    @property
    def extractor(self) -> GradientExtractor:
        """The model, projections and settings that turn texts into this index's gradients."""
        if self._extractor is None:
            raise AttribIndexError("this index was opened without a model (load_model_now=False).")
        return self._extractor

    @property
    def rows(self) -> int:
        """Rows that can be returned (deleted ones excluded)."""
        return self.index.live_rows

    def query_vectors(self, queries: Sequence[Query], batch_size: int | None = None) -> QueryVectors:
        """Queries → whitened query vectors (same capture, projection and whitening as the build)."""
        if self._extractor is None:
            raise AttribIndexError(
                "this index was opened without a model; open it with load_model_now=True to query text."
            )
        queries = as_queries(queries)
        if not queries:
            raise AttribIndexError("no query given. Pass at least one text or (prompt, completion) pair.")
        examples = self._extractor.tokenize(queries, [f"query {i} ({preview(q)})" for i, q in enumerate(queries)])
        # Batched longest-first so that texts of similar length pad each other (rows do not depend on batching).
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
        vectors, losses = [], []
        for group in batched([examples[i] for i in order], batch_size or self.extract_config.batch_size):
            if self.manifest.ensemble is not None:
                raw, loss = ensemble_raw(self._members, group)
                vectors.append(self.preconditioner.whiten(raw.to("cpu", torch.float32)) * self._weights)
            else:
                extracted = self._extractor.extract(group)
                raw, loss = extracted.concatenated(self.module_names), extracted.losses
                vectors.append(self.preconditioner.whiten(raw.to("cpu", torch.float32)))
            losses.append(loss.to("cpu", torch.float64))
        back = torch.argsort(torch.tensor(order))  # sorted position of each query
        whitened = torch.cat(vectors)[back]  # (Q, D), in query order
        if self.mode == "cosine":
            whitened = normalize_rows(whitened)
        return QueryVectors(
            vectors=whitened.numpy(),
            losses=torch.cat(losses)[back].numpy(),
            model_fingerprint=self._fingerprint,
            projection_hash=self.manifest.projection.hash,  # verified against the file at open
            preconditioner_hash=self.manifest.hessian.preconditioner_hash,
            normalization=self.mode,
        )

    def search(
        self, queries: QueryVectors, k: int = 10, bottom: int = 0
    ) -> list[tuple[list[Attribution], list[Attribution]]]:
        """Top-k (and bottom-k) attributions for precomputed query vectors."""
        expected = {
            "model fingerprint": (self.manifest.model.fingerprint, queries.model_fingerprint),
            "projection hash": (self.manifest.projection.hash, queries.projection_hash),
            "Hessian (preconditioner hash)": (self.manifest.hessian.preconditioner_hash, queries.preconditioner_hash),
            "normalization": (self.mode, queries.normalization),
        }
        for what, (recorded, given) in expected.items():
            if recorded != given:
                raise IndexMismatchError(
                    f"{what} differs: index {self.index_id} has {recorded[:23]}, the query vectors have {given[:23]}. "
                    f"Compute query vectors with this index's own model, projection and Hessian."
                )
        check_count("k", k, self.rows, minimum=1)
        check_count("bottom", bottom, self.rows, minimum=0)
        top_scores, top_rows = self.ranked(queries.vectors, k)
        if bottom:
            bottom_scores, bottom_rows = self.ranked(-queries.vectors, bottom)
            bottom_scores = -bottom_scores
        out = []
        for q in range(len(queries.vectors)):
            top = self._attributions(top_scores[q], top_rows[q])
            low = self._attributions(bottom_scores[q], bottom_rows[q]) if bottom else []
            out.append((top, low))
        return out

    @property
    def rescored(self) -> bool:
        """True when search re-scores approximate candidates exactly (scores exact, membership approximate)."""
        return self.remote is not None or (not self.index.exact and self.rerank > 0)

    @property
    def exact_search(self) -> bool:
        """True when search finds the exact top-k: a flat index, or a flat Milvus collection of the whole vectors."""
        return self.remote.exact if self.remote is not None else self.index.exact

    @property
    def search_description(self) -> str:
        """How this index searches, e.g. ``IVF64,PQ16 nprobe=8, 4 × k re-scored exactly``."""
        if self.remote is not None:
            return f"{self.remote.description}, {max(1, self.rerank, self.remote.min_rerank)} × k re-scored exactly"
        return self.index.description + (f", {self.rerank} × k re-scored exactly" if self.rescored else "")

    def configure_search(self, nprobe: int | None = None, ef_search: int | None = None, rerank: int | None = None):
        """Override the search effort of approximate segments (default: the recorded operating point) and the
        re-rank factor (default: the config's)."""
        self.index.configure(nprobe=nprobe, ef_search=ef_search)
        if self.remote is not None:
            self.remote.configure(ef_search if ef_search is not None else nprobe)
        if rerank is not None:
            self.rerank = rerank

    def ranked(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by inner product with `vectors` (Q, D): ((Q, k) scores, (Q, k) rows). Approximate
        indexes fetch `rerank × k` candidates and re-score them from the stored gradients (`rescore`)."""
        if not self.rescored:
            return self.index.search(vectors, k)
        count = min(self.rows, max(k, self.rerank * k))
        if self.remote is not None:
            count = min(self.rows, max(count, self.remote.min_rerank * k))
            return self.rescore(vectors, self.remote.candidates(vectors, count), k)
        _, candidates = self.index.search(vectors, count)
        return self.rescore(vectors, candidates, k)

    def rescore(self, vectors: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top-k of each query's `candidates` (Q, C) rows (-1 for none) by exact score from the stored
        gradients: ((Q, k) scores, (Q, k) rows). In dot mode the queries are preconditioned instead of the rows
        whitened, ⟨W g_t, v⟩ = ⟨g_t, W v⟩ (W symmetric), so a candidate costs D multiply-adds, not Σ d_m².

        Example:
            >>> vectors = index.query_vectors(["a model output"]).vectors  # doctest: +SKIP
            >>> scores, rows = index.rescore(vectors, candidates_from_elsewhere, k=10)  # doctest: +SKIP
        """
        if self.mode == "dot":
            preconditioned = self.preconditioner.whiten(torch.from_numpy(np.ascontiguousarray(vectors))).numpy()
            return rerank(preconditioned, candidates, self.store.raw_rows, k)
        return rerank(vectors, candidates, self.exact_vectors, k)

    def exact_vectors(self, rows: np.ndarray) -> np.ndarray:
        """(n, D) float32 whitened (and in cosine mode normalised) vectors of sorted rows, from the stored raw
        gradients: the values an exact flat index holds for them."""
        return self.preconditioner.index_vectors(self.store.raw_rows(rows), self.mode)

    def attribute(
        self,
        queries: Sequence[Query] | Query,
        k: int = 10,
        bottom: int = 0,
        batch_size: int | None = None,
        exact: int | None = None,
    ) -> Attributions:
        """The k most (and `bottom` least) influential training examples for each query.

        Args:
            queries: texts, PromptCompletion pairs (only completion tokens count), or one of either.
            k: number of proponents per query (1 ≤ k ≤ rows).
            bottom: number of opponents per query (0 = none).
            exact: re-rank: take the index's top-`exact` (and, with `bottom`, bottom-`exact`) candidates and
                score them with exact, unprojected KFAC / EK-FAC influence (the index must be built with the
                config's `exact` section). Costs one forward + backward per candidate, in batches of at most
                `extract.batch_size` that hold at most `self.exact_memory_bytes` (1 GiB unless set); see
                docs/quality.md for how the final top-k's fidelity grows with it.

        Example:
            >>> index.attribute("To be, or not to be", k=10, exact=200).rerank  # doctest: +SKIP
            ExactRerank(method='ekfac, unprojected, empirical Fisher, damping 0.1', candidates=200, rerank_ms=…)
        """
        started = time.perf_counter()
        queries = as_queries(queries)
        check_count("k", k, self.rows, minimum=1)
        check_count("bottom", bottom, self.rows, minimum=0)
        if exact is not None:
            self._refuse_for_ensembles("an exact re-rank")
            check_exact(self.manifest, exact, k, bottom)
        vectors = self.query_vectors(queries, batch_size)
        rerank = None
        if exact is None:
            found = self.search(vectors, k, bottom)
        else:
            candidates = min(exact, self.rows)
            first_stage = self.search(vectors, candidates, candidates if bottom else 0)
            reranked, rerank = self.reranker.rerank(queries, first_stage, k, bottom, candidates)
            found = [(r.top, r.bottom) for r in reranked]
        results = [
            QueryResult(query=q, top=top, bottom=low, loss=float(loss))
            for q, (top, low), loss in zip(queries, found, vectors.losses)
        ]
        latency = (time.perf_counter() - started) * 1000
        return Attributions(
            index_id=self.index_id,
            index_version=self.version,
            latency_ms=latency,
            exact=self.exact_search or rerank is not None,
            mode=self.mode,
            search=self.search_description,
            results=results,
            rerank=rerank,
        )

    def exact_scores(self, queries: Sequence[Query] | Query, rows: Sequence[int] | None = None) -> np.ndarray:
        """(Q, n) exact, unprojected influence of the stored rows `rows` (default: every live row, in row order)
        on each query: the method of `attribute(..., exact=C)` applied to all of them, with no index at all.

        Example:
            >>> scores = index.exact_scores(["To be, or not to be"])  # doctest: +SKIP
            >>> scores.shape  # (queries, live rows)  # doctest: +SKIP
            (1, 4096)
        """
        check_exact(self.manifest, 1, 1, 0)
        if rows is None:
            deleted = self.manifest.deleted_rows(self.root)
            rows = np.setdiff1d(np.arange(self.manifest.rows), deleted)
        return self.reranker.scores(as_queries(queries), [int(r) for r in rows]).T.numpy()

    def explain(
        self,
        query: Query | tuple[str, str],
        ids: Sequence[str],
        batch_size: int | None = None,
        exact: bool = False,
    ) -> Explanation:
        """Why `ids` score as they do on `query`: each score split exactly over the example's tokens and over the
        query's tokens (see `attribindex.query._explain`), recomputed through the model in float64 sums.

        The score is the index's own (the whitened projected gradients' inner product, divided by both norms in
        cosine mode), recomputed from the model, so it matches a search's score up to the store's rounding; the
        contributions add up to it. With `exact`, the score is the exact, unprojected one of `attribute(...,
        exact=C)` (the index's `exact` section), split the same way: Σ_t δ_tᵀ (H + λ)⁻¹ G_q x̄_t.

        Example:
            >>> answer = index.explain("Now is the winter of our discontent", ["richard3-1-1"])  # doctest: +SKIP
            >>> [(t.text, round(t.contribution, 3)) for t in answer.examples[0].strongest(3)]  # doctest: +SKIP
            [(' winter', 0.041), (' discontent', 0.033), (' summer', 0.019)]
        """
        started = time.perf_counter()
        self._refuse_for_ensembles("explain")
        query = PromptCompletion(*query) if isinstance(query, tuple) else query
        if not isinstance(query, (str, PromptCompletion)):
            raise AttribIndexError("explain takes one query: a text, or a (prompt, completion) pair.")
        ids = [ids] if isinstance(ids, str) else list(dict.fromkeys(ids))
        if not ids:
            raise AttribIndexError("no id given. Pass the ids of training examples, e.g. from attribute()'s results.")
        rows = self._live_rows_of(ids)
        documents = self.store.documents(rows)
        extractor = self.extractor
        (query_example,) = extractor.tokenize([query], [f"query ({preview(query)})"])
        examples = extractor.tokenize([d.text for d in documents], [f"example {d.id!r}" for d in documents])
        if exact:
            check_exact(self.manifest, 1, 1, 0)  # refuses an index without the exact section, naming the fix
            scorer = self.reranker.scorer
            prepared_query = scorer.prepare([query_example])
            query_terms, self_influence = [], []
            for example in examples:  # one example's unprojected gradients at a time: as much memory as a query's
                prepared = scorer.prepare([example])
                query_terms.append(scorer.token_scores(prepared, [query_example])[0][0])  # (T_q,)
                self_influence.append(prepared.self_influence[0])
            norms = None
            if self.mode == "cosine":
                norms = torch.sqrt(torch.stack(self_influence) * prepared_query.self_influence[0])
            scores, example_parts, query_parts = split_scores(
                [terms[0] for terms in scorer.token_scores(prepared_query, examples)], torch.stack(query_terms), norms
            )
            method = f"exact: {self.reranker.method}, {self.mode}"
        else:
            scores, example_parts, query_parts = explain_pairs(
                extractor,
                self.preconditioner.whiten,
                self.projections.block_shapes,
                self.module_names,
                query_example,
                examples,
                self.mode,
                batch_size or self.extract_config.batch_size,
            )
            method = f"projected, {self.manifest.hessian.kind} Hessian, {self.mode}"
        query_spans = token_spans(extractor.tokenizer, query, query_example.input_ids)
        explained = [
            ExplainedExample(
                id=doc.id,
                row=row,
                source=doc.source,
                text=doc.text,
                score=float(scores[n]),
                tokens=_contributions(token_spans(extractor.tokenizer, doc.text, example.input_ids), example_parts[n]),
                query_tokens=_contributions(query_spans, query_parts[n]),
            )
            for n, (row, doc, example) in enumerate(zip(rows, documents, examples))
        ]
        return Explanation(
            query=query,
            index_id=self.index_id,
            index_version=self.version,
            mode=self.mode,
            method=method,
            latency_ms=(time.perf_counter() - started) * 1000,
            examples=explained,
        )

    def _live_rows_of(self, ids: list[str]) -> list[int]:
        """The live rows of `ids`, in their order; an unknown or deleted id is refused, naming it."""
        found = self.store.find_rows(ids)
        deleted = set(self.manifest.deleted_rows(self.root).tolist())
        missing = [i for i in ids if i not in found or found[i] in deleted]
        if missing:
            shown = ", ".join(repr(i) for i in missing[:5]) + (", …" if len(missing) > 5 else "")
            raise AttribIndexError(
                f"{len(missing)} id(s) not in index {self.index_id} (version {self.version}): {shown}. Pass ids of "
                f"indexed, undeleted examples, e.g. from attribute()'s results."
            )
        return [found[i] for i in ids]

    @property
    def reranker(self) -> ExactReranker:
        """The second stage (`attribute(..., exact=C)`), loaded on first use."""
        if self._reranker is None:
            self._reranker = ExactReranker(
                self.root, self.manifest, self.extractor, self.store, self.exact_memory_bytes
            )
        return self._reranker

    def _attributions(self, scores: np.ndarray, rows: np.ndarray) -> list[Attribution]:
        valid = [(float(s), int(r)) for s, r in zip(scores, rows) if r >= 0]
        docs = self.store.documents([r for _, r in valid])
        return [Attribution(id=d.id, score=s, text=d.text, source=d.source, row=r) for (s, r), d in zip(valid, docs)]


def _contributions(spans: list[tuple[str, str, int, int]], values: torch.Tensor) -> list[TokenContribution]:
    return [TokenContribution(t, text, s, e, float(v)) for (t, text, s, e), v in zip(spans, values.tolist())]
