"""lm-evaluation-harness (0.4) samples as `EvalSample`s: from `simple_evaluate(..., log_samples=True)`'s results,
or from the files `lm_eval --log_samples --output_path DIR` writes (`results_<date>.json` beside
`samples_<task>_<date>.jsonl`, in a folder named after the model).

What each output type traces (lm-eval's `arguments` are the requests' arguments, `resps` the model's answers):
- `generate_until`: the prompt + the model's response (`resps`, before any filter), then the prompt + the target;
- `loglikelihood`: the context + the continuation scored;
- `multiple_choice`: the context + the choice the model ranked first (highest log-likelihood, the `acc` rule),
  then the context + the gold choice when they differ;
- `loglikelihood_rolling`: the document, every token.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from attribindex.errors import AttribIndexError
from attribindex.harness._samples import EvalSample, SampleQuery, outcome_of

SUPPORTED = "0.4"  # lm-eval versions whose sample logs this reads (0.4.x)
OUTPUT_TYPES = ("generate_until", "loglikelihood", "multiple_choice", "loglikelihood_rolling")


def is_lm_eval_results(value: Any) -> bool:
    """Whether `value` looks like `simple_evaluate`'s results (a dict with `results` and `configs`)."""
    return isinstance(value, dict) and "results" in value and "configs" in value


def read_lm_eval(source: dict | str | Path, tasks: tuple[str, ...] = ()) -> list[EvalSample]:
    """The samples of an lm-eval run: `simple_evaluate`'s results dict (run with `log_samples=True`), an
    `--output_path` folder, one model's folder in it, or a `results_<date>.json` file; only `tasks` when given
    (a group, such as `mmlu`, stands for its subtasks).

    Example:
        >>> results = lm_eval.simple_evaluate(model="hf", model_args="pretrained=./m", tasks=["qa"], log_samples=True)  # doctest: +SKIP
        >>> read_lm_eval(results)[0].queries[0].role  # doctest: +SKIP
        'response'
    """
    if isinstance(source, dict):
        results, samples, where = source, source.get("samples"), "simple_evaluate's results"
        if samples is None:
            raise AttribIndexError(
                "these lm-eval results hold no samples. Run simple_evaluate(..., log_samples=True), or lm_eval with "
                "--log_samples, and trace those results."
            )
    else:
        results_file = _results_file(Path(source))
        results, where = _read_json(results_file), str(results_file)
        samples = {task: list(_read_samples(path)) for task, path in _samples_files(results_file).items()}
    _check_version(results, where)
    model = _model_of(results.get("config", {}))
    configs = results.get("configs", {})
    groups = results.get("group_subtasks") or {}
    wanted = _subtasks(tasks, groups)
    chosen = {task: rows for task, rows in samples.items() if not tasks or task in wanted}
    if tasks and (missing := sorted(t for t in tasks if not _subtasks((t,), groups) & set(chosen))):
        names = ", ".join(sorted({*samples, *groups})) or "no samples"
        raise AttribIndexError(
            f"task {missing[0]!r} is not in {where}; it holds {names}. Pass one of those with --task."
        )
    out = []
    for task, rows in chosen.items():
        if not rows:
            raise AttribIndexError(f"task {task!r} of {where} logged no samples. Run it again with --log_samples.")
        output_type = configs.get(task, {}).get("output_type") or _guess_output_type(rows[0])
        out.extend(_sample(task, output_type, row, model, where) for row in rows)
    return out


def _subtasks(tasks: tuple[str, ...], groups: dict[str, list[str]]) -> set[str]:
    """`tasks` with every group among them replaced by its subtasks, at any depth (lm-eval's `group_subtasks`:
    `mmlu` → `mmlu_stem` → `mmlu_abstract_algebra`, …)."""
    found, pending = set(), list(tasks)
    while pending:
        task = pending.pop()
        if task not in found:
            found.add(task)
            pending.extend(groups.get(task, []))
    return found


def _results_file(path: Path) -> Path:
    """The results file of `path`: itself, or the newest `results_*.json` in it (its one model folder in it)."""
    if path.is_file():
        if not path.name.startswith("results_") or path.suffix != ".json":
            raise AttribIndexError(
                f"{path} is not an lm-eval results file (results_<date>.json). Give the folder lm_eval --output_path "
                f"wrote, or that file."
            )
        return path
    if not path.is_dir():
        raise AttribIndexError(
            f"{path} does not exist. Give the folder lm_eval --output_path wrote, or a results file."
        )
    found = sorted(path.glob("results_*.json")) or sorted(path.glob("*/results_*.json"))
    folders = sorted({p.parent for p in found})
    if not found:
        raise AttribIndexError(
            f"{path} holds no lm-eval results (results_<date>.json, beside samples_<task>_<date>.jsonl). Run "
            f"lm_eval with --output_path {path} --log_samples, or give the folder it wrote into."
        )
    if len(folders) > 1:
        names = ", ".join(str(p) for p in folders)
        raise AttribIndexError(f"{path} holds the results of several models ({names}). Give one of those folders.")
    return found[-1]  # the newest run: dates sort as text


def _samples_files(results_file: Path) -> dict[str, Path]:
    """{task: samples file} of the run that wrote `results_file` (the same date suffix)."""
    date = results_file.stem.removeprefix("results_")
    pattern = re.compile(rf"samples_(.+)_{re.escape(date)}\.jsonl")
    files = {m.group(1): p for p in results_file.parent.iterdir() if (m := pattern.fullmatch(p.name))}
    if not files:
        raise AttribIndexError(
            f"{results_file.parent} holds no samples of the run {date} (samples_<task>_{date}.jsonl). Run lm_eval "
            f"with --log_samples."
        )
    return dict(sorted(files.items()))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AttribIndexError(f"{path} is not readable JSON ({err}). Give the file lm_eval wrote.") from None


def _read_samples(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError:
                    raise AttribIndexError(
                        f"{path}:{number} is not a JSON line. The file is damaged: run the evaluation again."
                    ) from None


def _check_version(results: dict, where: str) -> None:
    version = str(results.get("lm_eval_version") or "")
    if version and not version.startswith(SUPPORTED + "."):
        raise AttribIndexError(
            f"{where} was written by lm-eval {version}; attribindex reads the sample logs of lm-eval {SUPPORTED}.x. "
            f"Run the evaluation with lm-eval {SUPPORTED} (pip install 'attribindex[lm-eval]')."
        )


def _model_of(config: dict) -> str:
    """The evaluated model: `pretrained=` of the model arguments (a string in memory, a dict in the file)."""
    arguments = config.get("model_args") or {}
    if isinstance(arguments, str):
        arguments = dict(part.split("=", 1) for part in arguments.split(",") if "=" in part)
    return str(arguments.get("pretrained") or arguments.get("model") or config.get("model") or "")


def _arguments(row: dict) -> list[list]:
    """The requests' arguments: a list per request (in memory), or {gen_args_i: {arg_j: …}} (in the file)."""
    arguments = row["arguments"]
    if isinstance(arguments, dict):
        return [
            [args[f"arg_{j}"] for j in range(len(args))]
            for args in (arguments[f"gen_args_{i}"] for i in range(len(arguments)))
        ]
    return [list(args) for args in arguments]


def _first(value: Any) -> Any:
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    return value


def _guess_output_type(row: dict) -> str:
    arguments = _arguments(row)
    if len(arguments) > 1:
        return "multiple_choice"
    if len(arguments[0]) == 1:
        return "loglikelihood_rolling"
    return "generate_until" if isinstance(arguments[0][1], dict) else "loglikelihood"


def _metrics(row: dict) -> dict[str, float | str]:
    out: dict[str, float | str] = {}
    for name in row.get("metrics", []):
        value = row.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
        elif value is not None:
            out[name] = float(value) if _is_number(value) else str(value)
    return out


def _is_number(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _sample(task: str, output_type: str, row: dict, model: str, where: str) -> EvalSample:
    if output_type not in OUTPUT_TYPES or "arguments" not in row or "doc_id" not in row:
        raise AttribIndexError(
            f"{where}: task {task!r} has samples attribindex cannot read (output type {output_type!r}, keys "
            f"{sorted(row)[:8]}). Give results of lm-eval {SUPPORTED} run with --log_samples."
        )
    arguments = _arguments(row)
    if output_type == "generate_until":
        context, response = arguments[0][0], str(_first(row["resps"]))
        queries = [SampleQuery("response", context, response)] if response.strip() else []  # nothing generated
        target = _first(row.get("target"))
        if isinstance(target, str) and target:
            queries.append(SampleQuery("target", context, target))
    elif output_type == "loglikelihood":
        queries = [SampleQuery("continuation", arguments[0][0], arguments[0][1])]
    elif output_type == "multiple_choice":
        likelihoods = [float(_first(response)) for response in row["filtered_resps"]]  # (choices,)
        chosen = max(range(len(likelihoods)), key=likelihoods.__getitem__)
        queries = [SampleQuery("chosen", *arguments[chosen][:2])]
        gold = _gold_choice(row.get("target"), [args[1] for args in arguments])
        if gold is not None and gold != chosen:
            queries.append(SampleQuery("gold", *arguments[gold][:2]))
    else:  # loglikelihood_rolling
        queries = [SampleQuery("document", "", arguments[0][0])]
    metrics = _metrics(row)
    return EvalSample(
        harness="lm-eval",
        task=task,
        sample_id=str(row["doc_id"]),
        filter=str(row.get("filter") or "none"),
        output_type=output_type,
        queries=tuple(queries),
        metrics=metrics,
        outcome=outcome_of(metrics),
        model=model,
    )


def _gold_choice(target: Any, choices: list[str]) -> int | None:
    """The gold choice's index: lm-eval's target is the index (an int, or its text in the file), or the choice's
    text; the first of several golds."""
    target = _first(target)
    if isinstance(target, int) or (isinstance(target, str) and target.strip().isdigit()):
        index = int(target)
        return index if 0 <= index < len(choices) else None
    stripped = [choice.strip() for choice in choices]
    return stripped.index(str(target).strip()) if str(target).strip() in stripped else None
