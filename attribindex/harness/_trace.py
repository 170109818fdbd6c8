"""Tracing an evaluation's samples to their training data, through an open index or a server's `Client`.

Samples go through `attribute` in batches of queries (a server's `max_queries` at most); a run that writes its
traces to a folder (`trace_eval_to`) appends each batch to `traces.jsonl` as it finishes, so a killed run resumes
after the last whole line, without tracing a finished sample again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from attribindex._progress import progress as progress_bar
from attribindex.data import PromptCompletion
from attribindex.errors import AttribIndexError
from attribindex.harness._inspect import is_inspect_log, read_inspect
from attribindex.harness._lm_eval import is_lm_eval_results, read_lm_eval
from attribindex.harness._samples import EvalSample, SampleQuery
from attribindex.query import Attribution, Attributions, Explanation
from attribindex.store import atomic_open, write_json

TRACES = "traces.jsonl"
REQUEST = "trace-eval.json"  # what the traces in a folder were asked with: a resumed run must ask the same
PREVIEW_CHARS = 300  # of each training example's text kept in a trace


class Attributor(Protocol):
    """What traces samples: an open `AttributionIndex`, or a `Client` of `attribindex serve`."""

    def attribute(
        self, queries: Sequence[str | PromptCompletion], k: int = 10, bottom: int = 0, *, exact: int | None = None
    ) -> Attributions: ...

    def explain(self, query: str | PromptCompletion, ids: Sequence[str], exact: bool = False) -> Explanation: ...


@dataclass(frozen=True)
class QueryTrace:
    """The proponents (`top`) and opponents (`bottom`) of one of a sample's texts."""

    query: SampleQuery
    loss: float
    top: tuple[Attribution, ...]
    bottom: tuple[Attribution, ...] = ()


@dataclass(frozen=True)
class SampleTrace:
    """One evaluation sample and what drove each of its texts.

    Example:
        >>> trace = trace_eval(index, results, k=5)[0]  # doctest: +SKIP
        >>> trace.sample.outcome, trace.answer.top[0].id  # doctest: +SKIP
        ('wrong', 'doc-0042')
    """

    sample: EvalSample
    queries: tuple[QueryTrace, ...]

    @property
    def answer(self) -> QueryTrace | None:
        """The trace of the model's own answer (None when it produced nothing)."""
        return self.queries[0] if self.sample.answer is not None else None

    def to_dict(self) -> dict:
        """A JSON line of traces.jsonl: the sample (ids, metrics, outcome) and each text's attributions, with
        PREVIEW_CHARS of each training example's text."""

        def attributions(found: Iterable[Attribution]) -> list[dict]:
            return [
                {"id": a.id, "row": a.row, "score": a.score, "source": a.source, "text": a.text[:PREVIEW_CHARS]}
                for a in found
            ]

        return self.sample.to_dict() | {
            "queries": [
                {
                    "role": q.query.role,
                    "prompt": q.query.prompt,
                    "completion": q.query.completion,
                    "loss": q.loss,
                    "top": attributions(q.top),
                    "bottom": attributions(q.bottom),
                }
                for q in self.queries
            ]
        }

    @classmethod
    def from_dict(cls, data: dict) -> SampleTrace:
        """Inverse of `to_dict` (the previews stand in for the texts)."""
        queries = tuple(
            QueryTrace(
                SampleQuery(q["role"], q["prompt"], q["completion"]),
                q["loss"],
                tuple(Attribution(**a) for a in q["top"]),
                tuple(Attribution(**a) for a in q["bottom"]),
            )
            for q in data["queries"]
        )
        sample = EvalSample(
            harness=data["harness"],
            task=data["task"],
            sample_id=data["sample_id"],
            filter=data["filter"],
            output_type=data["output_type"],
            queries=tuple(q.query for q in queries),
            metrics=data["metrics"],
            outcome=data["outcome"],
            model=data["model"],
        )
        return cls(sample, queries)


def read_eval_results(source: Any, tasks: Sequence[str] = ()) -> list[EvalSample]:
    """The samples of an evaluation run, whichever harness wrote it: lm-eval's `simple_evaluate` results or its
    `--output_path` folder (or results file), or Inspect eval logs (`EvalLog`s, a log file, a log folder).

    Example:
        >>> samples = read_eval_results("lm-eval-out/")  # doctest: +SKIP
        >>> samples[0].task, samples[0].outcome  # doctest: +SKIP
        ('qa', 'wrong')
    """
    tasks = tuple(tasks)
    if is_lm_eval_results(source):
        return read_lm_eval(source, tasks)
    if is_inspect_log(source):
        return read_inspect(source, tasks)
    if isinstance(source, dict):
        raise AttribIndexError(
            "these results are not lm-eval's (simple_evaluate returns a dict with 'results', 'configs' and, with "
            "log_samples=True, 'samples'). Pass those results, an lm-eval output folder or an Inspect log."
        )
    path = Path(source)
    if not path.exists():
        raise AttribIndexError(
            f"{path} does not exist. Give the folder lm_eval --output_path wrote (run with --log_samples), one of its "
            f"results_<date>.json files, or an Inspect eval log (a .eval / .json file, or its log folder)."
        )
    lm_eval_files = (
        path.name.startswith("results_") or any(path.glob("results_*.json")) or any(path.glob("*/results_*.json"))
    )
    return read_lm_eval(path, tasks) if lm_eval_files else read_inspect(path, tasks)


def check_model(samples: Sequence[EvalSample], index_model: str, any_model: bool = False) -> None:
    """Refuse samples of another model than the index's: their answers are not the indexed model's to explain.
    Paths are compared resolved; `any_model` skips the check (the same model, copied elsewhere)."""
    if any_model:
        return
    expected = _model_key(index_model)
    for sample in samples:
        if sample.model and _model_key(sample.model) != expected:
            raise AttribIndexError(
                f"sample {sample.key} was evaluated with the model {sample.model}, and the index explains "
                f"{index_model}. Trace an evaluation of {index_model}, or pass --any-model (any_model=True) if "
                f"both are the same model."
            )


def _model_key(name: str) -> str:
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name.rstrip("/")


def trace_samples(
    attributor: Attributor,
    samples: Sequence[EvalSample],
    k: int = 10,
    bottom: int = 0,
    exact: int | None = None,
    batch_queries: int = 16,
    progress: bool = True,
) -> Iterator[list[SampleTrace]]:
    """Trace `samples` in batches of at most `batch_queries` texts (a sample's texts stay in one batch); yields
    each batch's traces as it finishes. A sample with nothing to attribute (no text from the model, no target) gets
    a trace without queries."""
    with progress_bar(total=len(samples), desc="trace", unit="sample", enabled=progress) as bar:
        for batch in _batches(samples, batch_queries):
            queries = [q.query for s in batch for q in s.queries]
            found = iter(attributor.attribute(queries, k=k, bottom=bottom, exact=exact).results if queries else ())
            traces = []
            for traced in batch:
                results = [(q, next(found)) for q in traced.queries]
                traces.append(
                    SampleTrace(traced, tuple(QueryTrace(q, r.loss, tuple(r.top), tuple(r.bottom)) for q, r in results))
                )
            bar.update(len(batch))
            yield traces


def _batches(samples: Sequence[EvalSample], most: int) -> Iterator[list[EvalSample]]:
    """Consecutive samples whose texts add up to at most `most` (one sample alone when it has more)."""
    batch: list[EvalSample] = []
    texts = 0
    for sample in samples:
        if batch and texts + len(sample.queries) > most:
            yield batch
            batch, texts = [], 0
        batch.append(sample)
        texts += len(sample.queries)
    if batch:
        yield batch


def trace_eval(
    index: Attributor,
    results: Any,
    *,
    k: int = 10,
    bottom: int = 0,
    exact: int | None = None,
    tasks: Sequence[str] = (),
    any_model: bool = False,
    progress: bool = False,
) -> list[SampleTrace]:
    """Trace every sample of an evaluation run to the training examples that drove it: what a harness calls
    inside its own loop. `results`: anything `read_eval_results` reads; `index`: an `AttributionIndex`, or a
    `Client` of a server.

    Example:
        >>> results = lm_eval.simple_evaluate(model="hf", model_args="pretrained=./m", tasks=["qa"], log_samples=True)  # doctest: +SKIP
        >>> wrong = [t for t in trace_eval(AttributionIndex.open("idx"), results) if t.sample.outcome == "wrong"]  # doctest: +SKIP
        >>> wrong[0].answer.top[0].id  # doctest: +SKIP
        'doc-0042'
    """
    samples = read_eval_results(results, tasks)
    facts = describe(index)
    check_model(samples, facts.model, any_model)
    batches = trace_samples(index, samples, k, bottom, exact, facts.batch_queries, progress)
    return [trace for batch in batches for trace in batch]


@dataclass(frozen=True)
class IndexFacts:
    """What tracing needs to know of an index: the model it explains, its id, and the texts per `attribute` call
    (a server's `max_queries`; twice the build's batch for an open index)."""

    model: str
    index_id: str
    batch_queries: int


def describe(index: Attributor) -> IndexFacts:
    """`IndexFacts` of an open index (its manifest), or of a server's (one `info` request)."""
    manifest = getattr(index, "manifest", None)
    if manifest is not None:
        return IndexFacts(manifest.model.name_or_path, index.index_id, manifest.config.extract.batch_size * 2)
    info = index.info()
    return IndexFacts(str(info["model"]), str(info["index_id"]), int(info["limits"]["max_queries"]))


@dataclass(frozen=True)
class TraceRun:
    """What `trace_eval_to` did: the traces (resumed ones included), how many it traced now, and its time."""

    out: Path
    traces: list[SampleTrace]
    traced_now: int
    seconds: float


def trace_eval_to(
    out: Path,
    index: Attributor,
    samples: Sequence[EvalSample],
    request: dict,
    batch_queries: int,
    k: int = 10,
    bottom: int = 0,
    exact: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> TraceRun:
    """Trace `samples` into `out/traces.jsonl`, resuming a run with the same `request` killed before it ended."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    done = _resumed(out, request, overwrite)
    keys = {s.key for s in samples}
    done = {key: trace for key, trace in done.items() if key in keys}
    pending = [s for s in samples if s.key not in done]
    traced_now = 0
    with open(out / TRACES, "a", encoding="utf-8") as lines:
        for batch in trace_samples(index, pending, k, bottom, exact, batch_queries, progress):
            lines.write("".join(json.dumps(trace.to_dict()) + "\n" for trace in batch))
            lines.flush()
            os.fsync(lines.fileno())  # a batch is durable before the next starts: a kill loses at most one
            done.update((trace.sample.key, trace) for trace in batch)
            traced_now += len(batch)
    traces = [done[s.key] for s in samples if s.key in done]
    return TraceRun(out, traces, traced_now, time.perf_counter() - started)


def _resumed(out: Path, request: dict, overwrite: bool) -> dict[str, SampleTrace]:
    """The traces an earlier run with the same request left in `out` (after its last whole line)."""
    traces, recorded = out / TRACES, out / REQUEST
    if overwrite or not recorded.is_file():
        traces.unlink(missing_ok=True)
        write_json(recorded, request)
        return {}
    if json.loads(recorded.read_text()) != request:
        raise AttribIndexError(
            f"{out} holds traces of another run (another index, results or options). Pass --overwrite to replace "
            f"them, or choose another --out."
        )
    if not traces.is_file():
        return {}
    text = traces.read_text(encoding="utf-8")
    whole = text[: text.rfind("\n") + 1]  # a line cut short by a kill is dropped, and traced again
    if len(whole) != len(text):
        with atomic_open(traces) as handle:  # a kill now leaves the old file, cut line and all, not a lost one
            handle.write(whole.encode("utf-8"))
    found = (SampleTrace.from_dict(json.loads(line)) for line in whole.splitlines() if line)
    return {trace.sample.key: trace for trace in found}
