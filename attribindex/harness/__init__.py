"""Evaluation harnesses: trace the samples of an lm-evaluation-harness or Inspect run to their training data.

`read_eval_results` turns a run into `EvalSample`s (the model's answer first, then the gold one, with the harness's
metrics and outcome); `trace_eval` traces them through an index or a server in a harness's own loop;
`trace_eval_report` writes `traces.jsonl` and `report.html` (`attribindex trace-eval`).
"""

from attribindex.harness._report import LeadingExample, lead_summary, render_report
from attribindex.harness._run import trace_eval_report
from attribindex.harness._samples import EvalSample, SampleQuery, outcome_of
from attribindex.harness._trace import QueryTrace, SampleTrace, TraceRun, read_eval_results, trace_eval

__all__ = [
    "EvalSample",
    "LeadingExample",
    "QueryTrace",
    "SampleQuery",
    "SampleTrace",
    "TraceRun",
    "lead_summary",
    "outcome_of",
    "read_eval_results",
    "render_report",
    "trace_eval",
    "trace_eval_report",
]
