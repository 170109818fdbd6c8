"""An evaluation sample as attribindex traces it, whichever harness logged it: the texts to attribute (the
model's own answer first), the harness's metrics, and whether the model got it right."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from attribindex.data import PromptCompletion

Outcome = Literal["right", "wrong", "unscored"]
OUTCOMES: tuple[Outcome, ...] = ("wrong", "right", "unscored")  # the report's order
ANSWER_ROLES = ("response", "continuation", "chosen", "document")  # the model's own text; `target`, `gold`: not


@dataclass(frozen=True)
class SampleQuery:
    """One text of a sample to attribute: its `role` (`response`, `target`, `continuation`, `chosen`, `gold` or
    `document`), the `prompt` the model was given and the `completion` whose tokens carry the loss. Without a
    prompt (a rolling-loglikelihood document) every token counts.

    Example:
        >>> SampleQuery("response", "Q: Who wrote Hamlet?\\nA:", " Shakespeare").query
        PromptCompletion(prompt='Q: Who wrote Hamlet?\\nA:', completion=' Shakespeare')
    """

    role: str
    prompt: str
    completion: str

    @property
    def query(self) -> str | PromptCompletion:
        """What `attribute` takes: the pair, or the completion alone when there is no prompt."""
        return PromptCompletion(self.prompt, self.completion) if self.prompt else self.completion


@dataclass(frozen=True)
class EvalSample:
    """One sample of an evaluation run (lm-evaluation-harness or Inspect), ready to trace.

    `queries[0]` is what the model itself produced or chose (`answer`), unless it produced nothing; the others
    (the gold choice, the reference answer) follow. `outcome` comes from the first right-or-wrong metric of the sample (`outcome_metric`).

    Example:
        >>> sample = EvalSample("lm-eval", "qa", "0", "none", "generate_until",
        ...                     (SampleQuery("response", "Q: 2+2?\\nA:", " 4"),), {"exact_match": 1.0}, "right", "m")
        >>> sample.key
        'lm-eval/qa/0/none'
    """

    harness: Literal["lm-eval", "inspect"]
    task: str
    sample_id: str  # lm-eval's doc_id; Inspect's sample id, with its epoch after a '#' when there are several
    filter: str  # lm-eval's filter ('none' without one); Inspect: the scorer the outcome comes from
    output_type: str  # generate_until, loglikelihood, multiple_choice, loglikelihood_rolling; Inspect: generate
    queries: tuple[SampleQuery, ...]
    metrics: dict[str, float | str] = field(default_factory=dict)
    outcome: Outcome = "unscored"
    model: str = ""  # the model the harness evaluated (a path or a hub name)

    @property
    def answer(self) -> SampleQuery | None:
        """The text the model itself produced or chose (None when it produced nothing to attribute)."""
        return self.queries[0] if self.queries and self.queries[0].role in ANSWER_ROLES else None

    @property
    def key(self) -> str:
        """Unique within a run: harness, task, sample and filter."""
        return f"{self.harness}/{self.task}/{self.sample_id}/{self.filter}"

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "harness": self.harness,
            "task": self.task,
            "sample_id": self.sample_id,
            "filter": self.filter,
            "output_type": self.output_type,
            "outcome": self.outcome,
            "metrics": self.metrics,
            "model": self.model,
        }


def outcome_of(metrics: dict[str, float | str]) -> Outcome:
    """`right` / `wrong` from the first metric whose value is 1 or 0 (acc, exact_match, Inspect's C / I scored as
    1 / 0, …); `unscored` when none is (perplexities, BLEU, partial credit).

    Example:
        >>> outcome_of({"perplexity": 3.2, "acc": 0.0}), outcome_of({"bleu": 0.4})
        ('wrong', 'unscored')
    """
    for value in metrics.values():
        if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
            return "right" if value == 1 else "wrong"
    return "unscored"
