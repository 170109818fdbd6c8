"""A real lm-evaluation-harness run and a real Inspect eval, both offline with the tiny GPT-2, over question-answer
documents that are also in the index's training corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from attribindex import build_index
from attribindex.testing import write_jsonl
from tests.conftest import exact_config

# Each answer is also a training document ("Q: …\nA: answer"): tracing the answer must find it first. The answers
# are long, so that their tokens (the only ones whose loss a query counts) carry most of the document's gradient.
QUESTIONS = [
    (
        "hamlet?",
        "william shakespeare wrote hamlet around sixteen hundred",
        ["christopher marlowe wrote faustus", "william shakespeare wrote hamlet around sixteen hundred"],
    ),
    (
        "sky?",
        "the sky looks blue because air scatters blue light most",
        ["the sky looks blue because air scatters blue light most", "grass is green in spring"],
    ),
    (
        "mars?",
        "mars is the red planet with iron rich dust storms",
        ["venus is cloudy and hot", "mars is the red planet with iron rich dust storms"],
    ),
]
# One more multiple-choice question the model cannot get wrong (acc ranks by summed log-likelihood, and the gold
# choice is a few tokens against dozens): a right sample beside the wrong ones. It is no training document.
EASY = ("dog?", "woof", ["woof", "a very long distractor about cats chasing mice around the old cheese shop"])
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def qa_document(question: str, answer: str) -> str:
    return f"Q: {question}\nA: {answer}"


@pytest.fixture(scope="session")
def qa_index(tiny_models, corpus_records, tmp_path_factory) -> Path:
    """The tiny GPT-2's index over the shared corpus plus one document per question (ids qa-0, qa-1, …)."""
    root = tmp_path_factory.mktemp("qa-index")
    documents = [{"id": f"doc-{i}", "text": r["text"]} for i, r in enumerate(corpus_records)]
    documents += [{"id": f"qa-{i}", "text": qa_document(q, a)} for i, (q, a, _) in enumerate(QUESTIONS)]
    corpus = write_jsonl(root / "corpus.jsonl", documents)
    build_index(exact_config("cosine"), str(tiny_models["gpt2"]), corpus, root / "idx", id_field="id", progress=False)
    return root / "idx"


@pytest.fixture(scope="session")
def lm_eval_tasks(tmp_path_factory) -> Path:
    """Two local lm-eval tasks over jsonl files: `qa_gen` (generate_until, exact_match) over QUESTIONS and `qa_mc`
    (multiple_choice, acc) over QUESTIONS and EASY."""
    root = tmp_path_factory.mktemp("lm-eval-tasks")
    rows = [{"question": q, "answer": f" {a}", "choices": c, "gold": c.index(a)} for q, a, c in [*QUESTIONS, EASY]]
    files = {"qa_gen": write_jsonl(root / "qa.jsonl", rows[:-1]), "qa_mc": write_jsonl(root / "mc.jsonl", rows)}
    common = {"test_split": "test", "doc_to_text": "Q: {{question}}\nA:"}
    tasks = {
        "qa_gen": {
            "output_type": "generate_until",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        },
        "qa_mc": {
            "output_type": "multiple_choice",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{gold}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        },
    }
    for name, config in tasks.items():
        data = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(files[name])}}}
        (root / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **data, **common, **config}))
    return root


def lm_eval_args(model: Path) -> dict:
    return {"model": "hf", "model_args": f"pretrained={model},dtype=float32", "tasks": ["qa_gen", "qa_mc"]}


@pytest.fixture(scope="session")
def lm_eval_results(tiny_models, lm_eval_tasks) -> dict:
    """`simple_evaluate(..., log_samples=True)`, in this process."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    saved = {name: os.environ.get(name) for name in OFFLINE}
    os.environ.update(OFFLINE)
    try:
        return lm_eval.simple_evaluate(
            **lm_eval_args(tiny_models["gpt2"]),
            task_manager=TaskManager(include_path=str(lm_eval_tasks)),
            log_samples=True,
            device="cpu",
            batch_size=2,
        )
    finally:
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)


@pytest.fixture(scope="session")
def lm_eval_folder(tiny_models, lm_eval_tasks, tmp_path_factory) -> Path:
    """What the `lm_eval` command writes with --log_samples --output_path (a process of its own)."""
    out = tmp_path_factory.mktemp("lm-eval-out")
    args = lm_eval_args(tiny_models["gpt2"])
    command = [sys.executable, "-m", "lm_eval", "--model", args["model"], "--model_args", args["model_args"]]
    command += ["--tasks", ",".join(args["tasks"]), "--include_path", str(lm_eval_tasks), "--device", "cpu"]
    command += ["--batch_size", "2", "--log_samples", "--output_path", str(out)]
    env = os.environ | OFFLINE | {"HF_HOME": str(out.parent / "hf-home")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def inspect_log(tiny_models, tmp_path_factory) -> Path:
    """A real Inspect eval of the questions with the tiny GPT-2 through Inspect's own `hf` provider, offline."""
    out = tmp_path_factory.mktemp("inspect-logs")
    script = f"""
from inspect_ai import Task, eval
from inspect_ai.dataset import Sample
from inspect_ai.scorer import match
from inspect_ai.solver import generate

samples = [Sample(input=f"Q: {{q}}\\nA:", target=a, id=f"q{{i}}") for i, (q, a, _) in enumerate({QUESTIONS!r})]
task = Task(dataset=samples, solver=[generate()], scorer=match(), name="qa")
[log] = eval(task, model="hf/local", model_args={{"model_path": {str(tiny_models["gpt2"])!r}, "device": "cpu"}},
             max_tokens=6, log_dir={str(out)!r}, display="none")
assert log.status == "success", log.status
print(log.location)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=os.environ | OFFLINE, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip().splitlines()[-1])


def traces_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "traces.jsonl").read_text().splitlines()]
