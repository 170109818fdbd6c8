"""The static HTML report of a traced evaluation, and its summary of the training examples that lead wrong answers.

A training example "leads" a sample when it is among the proponents of the model's answer. Over the wrong
samples and the right ones apart, `lead_summary` counts how often each example leads, and its mean score there;
it lists the examples whose share of wrong answers exceeds their share of right ones, the largest excess first. The page needs no
script and no network: one file, its styles inline.
"""

from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from attribindex.harness._samples import OUTCOMES
from attribindex.harness._trace import SampleTrace
from attribindex.query import Explanation, TokenContribution

SHOWN_ATTRIBUTIONS = 5  # proponents (and opponents) shown per text of a sample
SUMMARY_ROWS = 20
PREVIEW = 240  # characters of a training example shown


@dataclass(frozen=True)
class LeadingExample:
    """A training example and how often it leads the answers of wrong and of right samples (with its mean score
    there); `lead` = its share of wrong samples − its share of right ones."""

    id: str
    text: str
    wrong: int
    right: int
    wrong_mean_score: float
    right_mean_score: float
    lead: float


def lead_summary(traces: Sequence[SampleTrace], limit: int = SUMMARY_ROWS) -> list[LeadingExample]:
    """The training examples that most often lead the answers of wrong samples against right ones (a positive
    `lead`), most first.

    Example:
        >>> lead_summary(traces)[0].id  # doctest: +SKIP
        'doc-0042'
    """
    counts = {outcome: defaultdict(list) for outcome in ("wrong", "right")}
    totals = {"wrong": 0, "right": 0}
    texts: dict[str, str] = {}
    for trace in traces:
        if trace.sample.outcome not in totals or trace.answer is None:
            continue
        totals[trace.sample.outcome] += 1
        for attribution in trace.answer.top:
            counts[trace.sample.outcome][attribution.id].append(attribution.score)
            texts.setdefault(attribution.id, attribution.text)

    def share(outcome: str, doc: str) -> float:
        return len(counts[outcome].get(doc, [])) / totals[outcome] if totals[outcome] else 0.0

    def mean(scores: list[float]) -> float:
        return sum(scores) / len(scores) if scores else float("nan")

    rows = [
        LeadingExample(
            id=doc,
            text=texts[doc],
            wrong=len(counts["wrong"].get(doc, [])),
            right=len(counts["right"].get(doc, [])),
            wrong_mean_score=mean(counts["wrong"].get(doc, [])),
            right_mean_score=mean(counts["right"].get(doc, [])),
            lead=share("wrong", doc) - share("right", doc),
        )
        for doc in texts
    ]
    return sorted((r for r in rows if r.lead > 0), key=lambda r: (-r.lead, -r.wrong, r.id))[:limit]


def render_report(traces: Sequence[SampleTrace], explained: dict[str, Explanation], title: str) -> str:
    """The report page: a summary, then every sample grouped by outcome, each with the proponents of its texts;
    samples in `explained` (by key) also show which tokens of their answer and of its first proponent carry it."""
    groups = {outcome: [t for t in traces if t.sample.outcome == outcome] for outcome in OUTCOMES}
    counts = ", ".join(f"{len(g)} {outcome}" for outcome, g in groups.items() if g)
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1><p class='counts'>{len(traces)} samples: {counts}</p>",
        _summary_table(lead_summary(traces)),
    ]
    for outcome, group in groups.items():
        if group:
            parts.append(f"<section id='{outcome}'><h2>{outcome.capitalize()} ({len(group)})</h2>")
            parts.extend(_sample_block(trace, explained.get(trace.sample.key)) for trace in group)
            parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary_table(rows: list[LeadingExample]) -> str:
    if not rows:
        return "<p>No right-or-wrong samples with an answer to compare.</p>"
    lines = [
        "<section id='summary'><h2>Training examples that lead wrong answers more than right ones</h2>",
        "<table><tr><th>example</th><th>wrong</th><th>right</th><th>mean score (wrong)</th>"
        "<th>mean score (right)</th><th>lead</th><th>text</th></tr>",
    ]
    for r in rows:
        lines.append(
            f"<tr><td>{_e(r.id)}</td><td>{r.wrong}</td><td>{r.right}</td><td>{_score(r.wrong_mean_score)}</td>"
            f"<td>{_score(r.right_mean_score)}</td><td>{r.lead:+.2f}</td><td class='text'>{_e(r.text[:PREVIEW])}</td></tr>"
        )
    lines.append("</table></section>")
    return "\n".join(lines)


def _sample_block(trace: SampleTrace, explanation: Explanation | None) -> str:
    sample = trace.sample
    metrics = ", ".join(f"{name} {value}" for name, value in sample.metrics.items())
    lines = [
        f"<article class='sample {sample.outcome}' data-key='{_e(sample.key)}'>",
        f"<h3>{_e(sample.task)} · {_e(sample.sample_id)} <span class='meta'>{_e(sample.output_type)}, filter "
        f"{_e(sample.filter)}; {_e(metrics)}</span></h3>",
    ]
    if not trace.queries:
        lines.append("<p>Nothing to attribute: the model produced no text, and the sample has no target.</p>")
    for query in trace.queries:
        lines.append(
            f"<div class='query'><p><b>{_e(query.query.role)}</b>: <span class='prompt'>{_e(query.query.prompt)}</span>"
            f"<span class='completion'>{_e(query.query.completion)}</span></p>"
        )
        for kind, found in (("top", query.top), ("bottom", query.bottom)):
            if found:
                title = "most influential" if kind == "top" else "least influential"
                lines.append(f"<p class='list'>{title}</p><ol class='{kind}'>")
                lines.extend(
                    f"<li><span class='score'>{a.score:+.4g}</span> <b>{_e(a.id)}</b> {_e(a.text[:PREVIEW])}</li>"
                    for a in found[:SHOWN_ATTRIBUTIONS]
                )
                lines.append("</ol>")
        lines.append("</div>")
    if explanation is not None and explanation.examples:
        first = explanation.examples[0]
        lines.append(
            f"<div class='explain'><p>Which tokens carry the answer's score on {_e(first.id)}: the answer</p>"
            f"<p class='tokens'>{_highlighted(first.query_tokens)}</p><p>the training example</p>"
            f"<p class='tokens'>{_highlighted(first.tokens)}</p></div>"
        )
    lines.append("</article>")
    return "\n".join(lines)


def _highlighted(tokens: list[TokenContribution]) -> str:
    """Tokens as spans whose background shows their share: green pushes the score up, red down."""
    largest = max((abs(t.contribution) for t in tokens), default=0.0) or 1.0
    spans = []
    for token in tokens:
        strength = abs(token.contribution) / largest
        colour = "40,160,80" if token.contribution >= 0 else "210,60,60"
        spans.append(
            f"<span class='token' style='background: rgba({colour},{strength:.2f})' "
            f"title='{token.contribution:+.3g}'>{_e(token.text)}</span>"
        )
    return "".join(spans)


def _score(value: float) -> str:
    return "–" if value != value else f"{value:.4g}"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; } h3 { font-size: 1em; margin: 0 0 .4em; }
.meta { color: #666; font-weight: normal; } .counts { color: #444; }
table { border-collapse: collapse; width: 100%; } td, th { border-bottom: 1px solid #eee; padding: .2em .5em; text-align: left; vertical-align: top; }
.text { color: #444; } .sample { border-left: 4px solid #999; padding: .4em .8em; margin: .8em 0; background: #fafafa; }
.sample.wrong { border-color: #c33; } .sample.right { border-color: #393; }
.prompt { color: #555; white-space: pre-wrap; } .completion { background: #fff3b0; white-space: pre-wrap; }
.score { font-family: monospace; color: #555; } .list { margin: .2em 0; color: #666; font-size: .9em; } .tokens { white-space: pre-wrap; font-family: monospace; }
"""
