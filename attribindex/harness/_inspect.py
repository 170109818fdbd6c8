"""Inspect (inspect_ai) eval logs as `EvalSample`s: each sample's input messages as the prompt, the model's
output completion as what is attributed, then the target when there is one; its scores as metrics (C / I, and
other letter grades, through Inspect's own `value_to_float`).

A chat model saw its messages through a chat template; the prompt here is their texts joined by newlines, which
is what the index's tokenizer turns into tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from attribindex.errors import AttribIndexError
from attribindex.harness._samples import EvalSample, SampleQuery, outcome_of

LOG_VERSION = 2  # the eval log format (EvalLog.version) this reads
LOG_SUFFIXES = (".eval", ".json")


def is_inspect_log(value: Any) -> bool:
    """Whether `value` is an Inspect `EvalLog` (or a list of them)."""
    items = value if isinstance(value, list) else [value]
    return bool(items) and all(type(item).__name__ == "EvalLog" and hasattr(item, "samples") for item in items)


def read_inspect(source: Any, tasks: tuple[str, ...] = ()) -> list[EvalSample]:
    """The samples of Inspect eval logs: an `EvalLog` (or a list of them), a log file (`.eval` / `.json`), or a
    folder of them (`INSPECT_LOG_DIR`); only the logs of `tasks` when given.

    Example:
        >>> logs = inspect_ai.eval(my_task(), model="hf/local", model_args={"model_path": "./m"})  # doctest: +SKIP
        >>> read_inspect(logs)[0].queries[0].role  # doctest: +SKIP
        'response'
    """
    logs = source if isinstance(source, list) else [source]
    if not is_inspect_log(logs):
        logs = [_read_log(path) for path in _log_files(Path(source))]
    out = []
    for log in logs:
        where = getattr(log, "location", None) or f"the {log.eval.task} log"
        if log.version != LOG_VERSION:
            raise AttribIndexError(
                f"{where} is an Inspect log of format {log.version}; attribindex reads format {LOG_VERSION}. Read and "
                f"write it again with this Inspect (inspect log convert), or run the eval again."
            )
        if tasks and log.eval.task not in tasks:
            continue
        if not log.samples:
            raise AttribIndexError(
                f"{where} holds no samples (status {log.status}). Run the eval to completion, with samples logged "
                f"(not --no-log-samples)."
            )
        out.extend(_sample(log, sample) for sample in log.samples)
    if tasks and not out:
        raise AttribIndexError(f"no log of task {', '.join(tasks)} in {source}. Pass a task that ran, or no --task.")
    return out


def _log_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.glob("*") if p.suffix in LOG_SUFFIXES) if path.is_dir() else []
    if not files:
        raise AttribIndexError(
            f"{path} holds no Inspect eval log (.eval or .json). Give a log file, or the folder Inspect wrote its "
            f"logs into (--log-dir)."
        )
    return files


def _read_log(path: Path):
    try:
        from inspect_ai.log import read_eval_log
    except ImportError:
        raise AttribIndexError(
            "reading Inspect logs needs inspect_ai. Install it: pip install 'attribindex[inspect]'."
        ) from None
    try:
        return read_eval_log(str(path))
    except Exception as err:  # noqa: BLE001 (Inspect raises many kinds on a file that is not a log)
        raise AttribIndexError(
            f"{path} is not a readable Inspect eval log ({err}). Give a log Inspect wrote."
        ) from None


def _text(value: Any) -> str:
    """A message list's texts joined by newlines, or the text itself."""
    if isinstance(value, str):
        return value
    return "\n".join(message.text for message in value if message.text)


def _after(prompt: str, text: str) -> str:
    """`text` as a continuation of `prompt`: a chat reply is a turn of its own, so a space parts them unless one
    of them already has one there."""
    return text if not prompt or prompt[-1:].isspace() or text[:1].isspace() else " " + text


def _sample(log, sample) -> EvalSample:
    from inspect_ai.scorer import value_to_float

    to_float = value_to_float()
    metrics: dict[str, float | str] = {}
    for name, score in (sample.scores or {}).items():
        value = score.value
        metrics[name] = to_float(value) if isinstance(value, (str, int, float, bool)) else str(value)
    prompt = _text(sample.input)
    completion = sample.output.completion if sample.output else ""
    queries = [SampleQuery("response", prompt, _after(prompt, completion))] if completion.strip() else []
    target = sample.target if isinstance(sample.target, str) else (sample.target[0] if sample.target else "")
    if target:
        queries.append(SampleQuery("target", prompt, _after(prompt, target)))
    epochs = log.eval.config.epochs or 1
    return EvalSample(
        harness="inspect",
        task=log.eval.task,
        sample_id=str(sample.id) + (f"#{sample.epoch}" if epochs > 1 else ""),
        filter=next(iter(sample.scores), "none") if sample.scores else "none",
        output_type="generate",
        queries=tuple(queries),
        metrics=metrics,
        outcome=outcome_of(metrics),
        model=str((log.eval.model_args or {}).get("model_path") or log.eval.model),
    )
