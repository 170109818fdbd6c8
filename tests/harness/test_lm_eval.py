"""lm-evaluation-harness runs (in-process `simple_evaluate`, and the `lm_eval` command's --log_samples files)
read as samples and traced: one trace per sample, answers that are training documents found first, metrics kept."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from attribindex import AttributionIndex
from attribindex.cli import main
from attribindex.harness import read_eval_results, trace_eval
from tests.harness.conftest import QUESTIONS, traces_of


def test_each_output_type_becomes_its_queries(lm_eval_results):
    samples = read_eval_results(lm_eval_results)
    by_task = {task: [s for s in samples if s.task == task] for task in ("qa_gen", "qa_mc")}
    assert [len(v) for v in by_task.values()] == [len(QUESTIONS), len(QUESTIONS) + 1]
    assert {s.outcome for s in by_task["qa_mc"]} == {"right", "wrong"}  # EASY is right
    for sample, row in zip(by_task["qa_gen"], lm_eval_results["samples"]["qa_gen"]):
        assert sample.output_type == "generate_until" and sample.metrics == {"exact_match": row["exact_match"]}
        response = row["resps"][0][0]
        roles = [q.role for q in sample.queries]
        assert roles == (["response", "target"] if response.strip() else ["target"])
        assert (
            sample.queries[-1].prompt + sample.queries[-1].completion
            == f"Q: {row['doc']['question']}\nA:{row['target']}"
        )
        assert sample.outcome == ("right" if row["exact_match"] == 1 else "wrong")
    for sample, row in zip(by_task["qa_mc"], lm_eval_results["samples"]["qa_mc"]):
        likelihoods = [float(r[0]) for r in row["filtered_resps"]]
        chosen = likelihoods.index(max(likelihoods))
        assert sample.queries[0].role == "chosen" and sample.queries[0].completion == row["arguments"][chosen][1]
        gold_roles = [q.completion for q in sample.queries if q.role == "gold"]
        assert gold_roles == ([] if chosen == row["target"] else [row["arguments"][row["target"]][1]])
        assert (
            sample.outcome == ("right" if chosen == row["target"] else "wrong") and sample.metrics["acc"] == row["acc"]
        )


def test_the_command_traces_every_sample_of_the_files_and_finds_the_answers_documents(
    qa_index, lm_eval_folder, lm_eval_results, tmp_path
):
    out = tmp_path / "traces"
    result = CliRunner().invoke(main, ["trace-eval", str(qa_index), str(lm_eval_folder), "--out", str(out), "-k", "3"])
    assert result.exit_code == 0, result.output
    samples = 2 * len(QUESTIONS) + 1
    assert f"traced     {samples} samples" in result.output and (out / "report.html").is_file()
    traces = traces_of(out)
    assert len(traces) == samples and len({t["key"] for t in traces}) == len(traces)
    for trace in traces:
        number = int(trace["sample_id"])
        logged = lm_eval_results["samples"][trace["task"]][number]
        assert trace["metrics"] == {name: logged[name] for name in logged["metrics"]}
        for query in trace["queries"]:
            if query["role"] in ("target", "gold"):
                assert query["top"][0]["id"] == f"qa-{number}", (trace["key"], query)  # the answer is a document
    # the in-memory results give the same traces, through the library call a harness makes
    local = trace_eval(AttributionIndex.open(qa_index), lm_eval_results, k=3)
    assert {t.sample.key: [a.id for q in t.queries for a in q.top] for t in local} == {
        t["key"]: [a["id"] for q in t["queries"] for a in q["top"]] for t in traces
    }


def test_a_killed_run_resumes_without_tracing_finished_samples_again(qa_index, lm_eval_folder, tmp_path):
    out = tmp_path / "traces"
    args = ["trace-eval", str(qa_index), str(lm_eval_folder), "--out", str(out), "-k", "2", "--task", "qa_mc"]
    assert CliRunner().invoke(main, args).exit_code == 0
    complete = (out / "traces.jsonl").read_text()
    first, second, *_ = complete.splitlines(keepends=True)
    (out / "traces.jsonl").write_text(first + second[: len(second) // 2])  # killed while writing the second line
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "1 from an earlier run" in result.output, result.output
    resumed, whole = (
        [json.loads(line) for line in text.splitlines()] for text in ((out / "traces.jsonl").read_text(), complete)
    )
    assert [t["key"] for t in resumed] == [t["key"] for t in whole]
    for got, expected in zip(resumed, whole):  # batches of other samples: the same answers up to round-off
        for q, e in zip(got["queries"], expected["queries"]):
            assert [a["id"] for a in q["top"]] == [a["id"] for a in e["top"]]
            assert [a["score"] for a in q["top"]] == pytest.approx([a["score"] for a in e["top"]], rel=1e-5)
    other = CliRunner().invoke(main, [*args[:-2], "-k", "3"])  # other options into the same folder: refused
    assert other.exit_code != 0 and "--overwrite" in other.output


def test_a_task_group_stands_for_its_subtasks(lm_eval_results):
    """lm-eval records a group's subtasks (`group_subtasks`, nested for mmlu → mmlu_stem → …): --task takes either."""
    grouped = lm_eval_results | {"group_subtasks": {"qa_all": ["qa_sub"], "qa_sub": ["qa_gen", "qa_mc"]}}
    assert {s.task for s in read_eval_results(grouped, tasks=["qa_all"])} == {"qa_gen", "qa_mc"}
    assert {s.task for s in read_eval_results(grouped, tasks=["qa_mc"])} == {"qa_mc"}
