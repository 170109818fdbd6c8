"""A real Inspect eval log (Inspect's own `hf` provider running the tiny GPT-2 offline) read and traced."""

from __future__ import annotations

from click.testing import CliRunner
from inspect_ai.log import read_eval_log

from attribindex.cli import main
from attribindex.harness import read_eval_results
from tests.harness.conftest import QUESTIONS, traces_of


def test_samples_carry_the_input_the_output_and_the_scores(inspect_log):
    log = read_eval_log(str(inspect_log))
    samples = read_eval_results(inspect_log)
    assert (
        [s.sample_id for s in samples] == [str(s.id) for s in log.samples] == [f"q{i}" for i in range(len(QUESTIONS))]
    )
    for sample, logged, (question, answer, _) in zip(samples, log.samples, QUESTIONS):
        assert sample.harness == "inspect" and sample.task == "qa" and sample.filter == "match"
        assert sample.metrics == {"match": 1.0 if logged.scores["match"].value == "C" else 0.0}
        assert sample.outcome == ("right" if logged.scores["match"].value == "C" else "wrong")
        roles = {q.role: q for q in sample.queries}
        assert ("response" in roles) == bool(logged.output.completion.strip())
        assert roles["target"].prompt + roles["target"].completion == f"Q: {question}\nA: {answer}"
        assert sample.model == str(log.eval.model_args["model_path"])


def test_the_command_traces_an_inspect_log_to_the_answers_documents(qa_index, inspect_log, tmp_path):
    out = tmp_path / "traces"
    result = CliRunner().invoke(main, ["trace-eval", str(qa_index), str(inspect_log.parent), "--out", str(out)])
    assert result.exit_code == 0, result.output
    traces = traces_of(out)
    assert len(traces) == len(QUESTIONS)
    for number, trace in enumerate(traces):
        target = next(q for q in trace["queries"] if q["role"] == "target")
        assert target["top"][0]["id"] == f"qa-{number}" and len(target["top"]) == 10
