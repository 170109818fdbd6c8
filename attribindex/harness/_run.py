"""`trace-eval`'s run: an evaluation's samples traced into a folder (`traces.jsonl`, resumable) and `report.html`."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attribindex.errors import AttribIndexError
from attribindex.harness._report import render_report
from attribindex.harness._trace import (
    Attributor,
    TraceRun,
    check_model,
    describe,
    read_eval_results,
    trace_eval_to,
)
from attribindex.store import atomic_open

REPORT = "report.html"
EXPLAINED_PER_OUTCOME = 3  # samples of each outcome whose answer's tokens the report highlights


def trace_eval_report(
    index: Attributor,
    results: Any,
    out: str | Path,
    *,
    k: int = 10,
    bottom: int = 0,
    exact: int | None = None,
    tasks: Sequence[str] = (),
    any_model: bool = False,
    explained: int = EXPLAINED_PER_OUTCOME,
    overwrite: bool = False,
    progress: bool = True,
) -> TraceRun:
    """Trace every sample of `results` (see `read_eval_results`) into `out/traces.jsonl` (one JSON line per
    sample; a killed run resumes) and write `out/report.html`; `explained` samples of each outcome get token
    highlights of their answer against its first proponent.

    Example:
        >>> run = trace_eval_report(AttributionIndex.open("idx"), "lm-eval-out/", "traces", k=10)  # doctest: +SKIP
        >>> run.out / "report.html"  # doctest: +SKIP
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AttribIndexError(f"{out} is a file. Give a folder for the traces and the report (--out).")
    samples = read_eval_results(results, tasks)
    facts = describe(index)
    check_model(samples, facts.model, any_model)
    keys = "\n".join(s.key for s in samples).encode()
    request = {
        "index": facts.index_id,
        "model": facts.model,
        "samples": hashlib.sha256(keys).hexdigest(),
        "k": k,
        "bottom": bottom,
        "exact": exact,
    }
    run = trace_eval_to(out, index, samples, request, facts.batch_queries, k, bottom, exact, overwrite, progress)
    explanations = {}
    for outcome in ("wrong", "right"):
        chosen = [t for t in run.traces if t.sample.outcome == outcome and t.answer is not None and t.answer.top]
        for trace in chosen[:explained]:
            answer = trace.answer
            explanations[trace.sample.key] = index.explain(
                answer.query.query, [answer.top[0].id], exact=exact is not None
            )
    title = f"Training data behind {', '.join(sorted({s.task for s in samples}))} ({facts.model})"
    with atomic_open(out / REPORT) as handle:
        handle.write(render_report(run.traces, explanations, title).encode("utf-8"))
    return run
