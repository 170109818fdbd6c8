"""`query`: the training examples that most influenced a text, from an index folder or a running server."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from attribindex.cli import _options as options
from attribindex.cli._base import Command
from attribindex.query import one_line
from attribindex.query._render import explained_lines


@click.command(cls=Command)
@click.argument("index_dir", type=click.Path(path_type=Path), required=False)
@click.option(
    "--server", default=None, help="Ask a running `attribindex serve` at this URL instead of opening INDEX_DIR."
)
@options.server_token
@click.option("--text", "texts", multiple=True, help="A query text (repeatable).")
@click.option("--prompt", default=None, help="Prompt of a (prompt, completion) query; only completion tokens count.")
@click.option("--completion", default=None, help="Completion of a (prompt, completion) query.")
@click.option("-k", "k", type=int, default=10, show_default=True, help="Number of most influential examples.")
@click.option("--bottom", type=int, default=0, show_default=True, help="Number of least influential examples.")
@options.exact_candidates
@options.model_instead
@options.device("Where the model and the index run.")
@options.search_uri
@options.milvus_token
@click.option("--nprobe", type=int, default=None, help="IVF cells scanned (default: the recorded operating point).")
@click.option("--ef-search", type=int, default=None, help="HNSW candidate list (default: the operating point).")
@click.option(
    "--explain",
    is_flag=True,
    help="Split each shown score (the exact one with --exact) over the example's tokens and the query's: the "
    "strongest are highlighted (in colour on a terminal, as [+token] / [-token] otherwise; arrays with --json).",
)
@options.as_json("Print machine-readable JSON.")
@click.option("--width", type=int, default=100, show_default=True, help="Characters of text shown per result.")
def query(
    index_dir,
    server,
    token,
    texts,
    prompt,
    completion,
    k,
    bottom,
    exact_candidates,
    model,
    device,
    search_uri,
    milvus_token,
    nprobe,
    ef_search,
    explain,
    as_json,
    width,
):
    """Find the training examples that most influenced a text.

    \b
    Examples:
      attribindex query my-index --text "Now is the winter of our discontent" -k 5
      attribindex query my-index --prompt "Q: Who killed Duncan?\\nA:" --completion " Macbeth" --bottom 3
      attribindex query my-index --text "first" --text "second" --json
      attribindex query --server http://127.0.0.1:8000 --text "Friends, Romans, countrymen"
      attribindex query my-index --search milvus://10.0.0.5:19530/wiki --text "a model output"   # Milvus candidates
    \b
      # re-rank the top 200 candidates with exact, unprojected influence (index built with `exact`)
      attribindex query my-index --text "Now is the winter of our discontent" -k 10 --exact 200
      # which tokens of each result (and of the query) carry its score
      attribindex query my-index --text "Now is the winter of our discontent" -k 3 --explain
    """
    from attribindex.data import PromptCompletion
    from attribindex.query import AttributionIndex

    queries: list = list(texts)
    if (prompt is None) != (completion is None):
        raise click.UsageError("--prompt and --completion go together; give both.")
    if prompt is not None:
        queries.append(PromptCompletion(prompt, completion))
    if not queries:
        raise click.UsageError("give at least one --text, or --prompt with --completion.")
    if (index_dir is None) == (server is None):
        raise click.UsageError("give an INDEX_DIR to open, or --server URL to ask a running server (not both).")
    explanations: list = []
    exact_explained = exact_candidates is not None  # explain the re-ranked (exact) scores that are shown
    if server is not None:
        from attribindex.serve import Client

        with Client(server, token=token) as remote:
            answer = remote.attribute(queries, k=k, bottom=bottom, exact=exact_candidates)
            if explain:
                explanations = [
                    remote.explain(r.query, [a.id for a in r.top + r.bottom], exact=exact_explained)
                    for r in answer.results
                ]
    else:
        index = AttributionIndex.open(
            index_dir, model=model, device=device, search=search_uri, milvus_token=milvus_token
        )
        index.configure_search(nprobe=nprobe, ef_search=ef_search)
        answer = index.attribute(queries, k=k, bottom=bottom, exact=exact_candidates)
        if explain:
            explanations = [
                index.explain(r.query, [a.id for a in r.top + r.bottom], exact=exact_explained) for r in answer.results
            ]
    if as_json:
        data = answer.to_dict()
        if explain:
            data["explanations"] = [e.to_dict() for e in explanations]
        click.echo(json.dumps(data, ensure_ascii=False, indent=2))
        return
    _print_answer(answer, explanations, explain=explain, bottom=bottom, width=width)


def _print_answer(answer, explanations: list, *, explain: bool, bottom: int, width: int) -> None:
    """An answer as text: each query's top (and bottom) results, with their explanations under them if asked."""
    colour = sys.stdout.isatty()
    for q, result in enumerate(answer.results):
        shown = result.query if isinstance(result.query, str) else f"{result.query.prompt} ⟶ {result.query.completion}"
        click.secho(f"\nquery: {one_line(shown, width)}   (loss {result.loss:.2f})", bold=True)
        explained = {e.id: e for e in explanations[q].examples} if explain else {}
        for title, attributions in (("most influential", result.top), ("least influential", result.bottom)):
            if attributions:
                click.echo(f"  {title}:")
            for rank, a in enumerate(attributions, start=1):
                click.echo(f"  {rank:3d}. {a.score:+.4f}  {a.id}  {one_line(a.text, width)}")
                if a.id in explained:
                    for line in explained_lines(explained[a.id], width, colour):
                        click.echo(f"         {line}")
    if explain:
        click.echo(
            "\nexplained: each score split over tokens (the shares add up to it); [+x] raises the score, [-x] lowers it"
        )
    click.echo(
        f"\n{answer.index_id} v{answer.index_version}: {len(answer.results)} queries in {answer.latency_ms:.0f} ms "
        f"({answer.mode}, {'exact' if answer.exact else 'approximate'}: {answer.search})"
    )
    if answer.rerank is not None:
        rerank = answer.rerank
        click.echo(
            f"re-ranked the top-{rerank.candidates}{' and bottom-' + str(rerank.candidates) if bottom else ''} "
            f"candidates per query exactly ({rerank.method}) in {rerank.rerank_ms:.0f} ms"
        )
