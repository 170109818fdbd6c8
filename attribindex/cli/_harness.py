"""`trace-eval`: an evaluation harness's samples (lm-eval, Inspect) traced to their training data, with a report."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from attribindex.cli import _options as options
from attribindex.cli._base import Command


@click.command(name="trace-eval", cls=Command)
@click.argument("paths", nargs=-1, required=True, metavar="[INDEX_DIR] RESULTS")
@click.option("--server", default=None, help="Trace through a running `attribindex serve` instead of INDEX_DIR.")
@options.server_token
@click.option("--task", "tasks", multiple=True, help="Only this task's samples (repeatable; default: every task).")
@click.option("-k", "k", type=int, default=10, show_default=True, help="Proponents per text of a sample.")
@click.option("--bottom", type=int, default=0, show_default=True, help="Opponents per text of a sample.")
@options.exact_candidates
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for traces.jsonl and report.html.")
@click.option(
    "--any-model", is_flag=True, help="Trace samples of another model path (the same model, copied elsewhere)."
)
@click.option("--overwrite", is_flag=True, help="Replace the traces of another run in --out instead of refusing.")
@options.model_instead
@options.device("Where the model and the index run.")
def trace_eval(paths, server, token, tasks, k, bottom, exact_candidates, out, any_model, overwrite, model, device):
    """Trace every sample of an evaluation run to the training examples that drove its answer.

    RESULTS is what lm-evaluation-harness wrote with --log_samples (its --output_path folder, or a
    results_<date>.json), or Inspect eval logs (a .eval / .json file, or a log folder). Writes OUT/traces.jsonl (one
    line per sample: ids, scores, text previews, metrics) and OUT/report.html (samples grouped by outcome, and the
    training examples that lead wrong answers more than right ones). A killed run resumes where it stopped.

    \b
    Examples:
      lm_eval --model hf --model_args pretrained=./my-model --tasks my_task --log_samples --output_path lm-out
      attribindex trace-eval my-index lm-out --out traces -k 10
      attribindex trace-eval --server http://127.0.0.1:8000 logs/2026-12-05T10-00-00_my-task.eval --out traces
    """
    from attribindex.harness import trace_eval_report
    from attribindex.query import AttributionIndex

    if server is not None and len(paths) != 1:
        raise click.UsageError("with --server give RESULTS only (the server holds the index).")
    if server is None and len(paths) != 2:
        raise click.UsageError("give INDEX_DIR and RESULTS, or --server URL and RESULTS.")
    if server is not None:
        from attribindex.serve import Client

        opened = Client(server, token=token)
    else:
        opened = contextlib.nullcontext(AttributionIndex.open(paths[0], model=model, device=device))
    with opened as index:
        run = trace_eval_report(
            index,
            Path(paths[-1]),
            out,
            k=k,
            bottom=bottom,
            exact=exact_candidates,
            tasks=tasks,
            any_model=any_model,
            overwrite=overwrite,
        )
    outcomes = {o: sum(t.sample.outcome == o for t in run.traces) for o in ("wrong", "right", "unscored")}
    resumed = len(run.traces) - run.traced_now
    per_sample = run.seconds / run.traced_now if run.traced_now else 0.0
    click.echo(
        f"traced     {len(run.traces)} samples ({', '.join(f'{n} {o}' for o, n in outcomes.items() if n)})"
        + (f"; {resumed} from an earlier run" if resumed else "")
    )
    click.echo(f"time       {run.seconds:.1f} s ({per_sample * 1000:.0f} ms per sample traced now)")
    click.echo(f"traces     {run.out / 'traces.jsonl'}")
    click.echo(f"report     {run.out / 'report.html'}")
