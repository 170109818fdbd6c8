"""Typed attribution results: ids, scores and texts, never bare row numbers."""

from __future__ import annotations

import textwrap
from dataclasses import asdict, dataclass, field

from attribindex.data import PromptCompletion


def one_line(text: str, width: int) -> str:
    """`text` on one line, clipped at a word boundary to at most `width` characters with an ellipsis (a first
    word longer than that is cut inside).

    Example:
        >>> one_line("Now is the winter\n  of our discontent", 24)
        'Now is the winter of…'
    """
    clipped = textwrap.shorten(text, width, placeholder="…")
    return clipped if clipped != "…" else " ".join(text.split())[: width - 1] + "…"


@dataclass(frozen=True)
class Attribution:
    """One training example and its influence score on a query.

    Example:
        >>> Attribution(id="hamlet/3.1/0042", score=0.41, text="To be, or not to be", source="plays.jsonl:42", row=42)
        Attribution(id='hamlet/3.1/0042', score=0.41, text='To be, or not to be', source='plays.jsonl:42', row=42)
    """

    id: str
    score: float
    text: str
    source: str
    row: int


@dataclass(frozen=True)
class QueryResult:
    """The attributions of one query: `top` (proponents, highest score first) and `bottom`
    (opponents, lowest score first; empty unless asked for). `loss` is the query's summed token loss."""

    query: str | PromptCompletion
    top: list[Attribution]
    bottom: list[Attribution] = field(default_factory=list)
    loss: float = float("nan")


@dataclass(frozen=True)
class ExactRerank:
    """How the second stage re-ranked: the exact method, C (the index's top-C, and bottom-C when opponents were
    asked for, were re-scored), the most distinct examples one query re-scored (top and bottom together), and
    the time of the stage over all queries.

    Example:
        >>> ExactRerank(method="ekfac, unprojected, empirical Fisher, damping 0.1", candidates=200, scored=200, rerank_ms=812.0)
        ExactRerank(method='ekfac, unprojected, empirical Fisher, damping 0.1', candidates=200, scored=200, rerank_ms=812.0)
    """

    method: str
    candidates: int
    scored: int
    rerank_ms: float


@dataclass(frozen=True)
class Attributions:
    """The answer to one `attribute` call.

    Example:
        >>> answer = index.attribute(["To be, or not to be"], k=3)  # doctest: +SKIP
        >>> answer.results[0].top[0].id  # doctest: +SKIP
    """

    index_id: str
    index_version: int  # the index version (manifest `version`) that answered: appends and deletes raise it
    latency_ms: float
    exact: bool  # True: the true top-k with exact scores (flat float32); False: an approximate index answered
    mode: str
    results: list[QueryResult]
    search: str = "flat"  # how it was searched, e.g. "IVF64,PQ16 nprobe=8, 4 × k re-scored exactly"
    rerank: ExactRerank | None = None  # set when the candidates were re-scored with exact, unprojected influence

    def to_dict(self) -> dict:
        """A JSON-ready dict (the CLI's --json output)."""
        data = asdict(self)
        for result, raw in zip(self.results, data["results"]):
            if isinstance(result.query, PromptCompletion):
                raw["query"] = {"prompt": result.query.prompt, "completion": result.query.completion}
        return data


def attributions_from_dict(data: dict) -> Attributions:
    """Inverse of `Attributions.to_dict` (what `Client` does with a server's JSON)."""

    def query(raw):
        return PromptCompletion(raw["prompt"], raw["completion"]) if isinstance(raw, dict) else raw

    results = [
        QueryResult(
            query=query(r["query"]),
            top=[Attribution(**a) for a in r["top"]],
            bottom=[Attribution(**a) for a in r["bottom"]],
            loss=r["loss"],
        )
        for r in data["results"]
    ]
    fields = {k: data[k] for k in ("index_id", "index_version", "latency_ms", "exact", "mode", "search") if k in data}
    rerank = ExactRerank(**data["rerank"]) if data.get("rerank") else None
    return Attributions(**fields, results=results, rerank=rerank)
