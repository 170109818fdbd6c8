"""The `eval` group: measure an index (recall of approximate search, linear datamodeling score)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from attribindex.cli import _options as options
from attribindex.cli._base import Group


@click.group(name="eval", cls=Group)
def eval_group() -> None:
    """Measure an index: recall of approximate search against exact search."""


@eval_group.command()
@options.index_dir
@click.option(
    "--queries", "queries_path", required=True, help="Held-out query texts: .jsonl, folder of .txt, or dataset."
)
@options.text_field
@click.option("--limit", type=int, default=200, show_default=True, help="Use the first N queries.")
@click.option("-k", "k", type=int, default=10, show_default=True, help="Recall@k.")
@click.option("--target", type=float, default=0.95, show_default=True, help="Recall the operating point must reach.")
@click.option("--nprobe", default=None, help="IVF cells to try, e.g. 1,4,16 (default: 1, 2, 4, … nlist).")
@click.option(
    "--ef-search", default=None, help="HNSW efSearch values to try (default: rerank × k, then doubling to 512)."
)
@click.option("--rerank", type=int, default=None, help="Re-rank factor to measure with (default: the index's).")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Write recall vs latency as a PNG.")
@click.option(
    "--record/--no-record",
    default=True,
    show_default=True,
    help="Record the operating point in the manifest (with --search: in the collection).",
)
@options.device()
@options.search_uri
@options.milvus_token
@options.as_json("Print the report as JSON.")
def recall(
    index_dir,
    queries_path,
    text_field,
    limit,
    k,
    target,
    nprobe,
    ef_search,
    rerank,
    plot,
    record,
    device,
    search_uri,
    milvus_token,
    as_json,
):
    """Recall@k and latency of an approximate index per search setting, against exact search on held-out
    queries; records the fastest setting that reaches --target as the index's operating point.

    \b
    Example:
      attribindex eval recall my-ivf-index --queries held-out.jsonl -k 10 --plot recall.png
      attribindex eval recall my-index --search milvus://10.0.0.5:19530/wiki --queries held-out.jsonl
    """
    from attribindex.data import open_corpus
    from attribindex.eval import measure_recall, plot_recall
    from attribindex.pipeline import set_operating_point
    from attribindex.query import AttributionIndex

    index = AttributionIndex.open(index_dir, device=device, search=search_uri, milvus_token=milvus_token)
    texts = [document.text for document in open_corpus(queries_path, text_field=text_field, limit=limit)]
    vectors = index.query_vectors(texts).vectors
    settings = None
    if nprobe is not None or ef_search is not None:
        settings = [{"nprobe": n} for n in options.int_list(nprobe) or []]
        settings += [{"ef_search": n} for n in options.int_list(ef_search) or []]
    report = measure_recall(index, vectors, k=k, settings=settings, rerank=rerank, target=target)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.format())
    if plot is not None:
        click.echo(f"plot         {plot_recall(report, plot)}", err=as_json)
    if record and index.remote is not None:
        from attribindex.milvus import MilvusOperatingPoint

        chosen = report.chosen
        if chosen.settings:  # a kind with a search effort to choose
            (effort,) = chosen.settings.values()
            index.remote.record(MilvusOperatingPoint(effort, round(chosen.recall, 4), k, round(chosen.ms_per_query, 3)))
            click.echo(f"recorded     operating point {chosen.label} in {search_uri}", err=as_json)
    elif record:
        version = set_operating_point(index_dir, report.operating_point(), index.version)
        click.echo(
            f"recorded     operating point {report.chosen.label} in {index_dir} (version {version})", err=as_json
        )


@eval_group.command()
@options.index_dir
@click.option(
    "--ground-truth",
    "ground_truth",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder written by make_ground_truth (or retrain_on_subsets): subsets, their query losses, training "
    "ids, queries.",
)
@click.option("--bootstrap", type=int, default=1000, show_default=True, help="Bootstrap resamples of the queries.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Write a predicted-vs-actual scatter PNG.")
@options.device()
@options.as_json("Print the result as JSON.")
def lds(index_dir, ground_truth, bootstrap, plot, device, as_json):
    """Linear datamodeling score of an index against retrained-subset ground truth: the mean over queries of
    the Spearman correlation between predicted influence sums and actual subset losses, with a bootstrap CI.

    \b
    Example:
      attribindex eval lds my-index --ground-truth gt/ --plot lds.png
    """
    from attribindex.eval import GroundTruth, linear_datamodeling_score, plot_lds, training_scores
    from attribindex.query import AttributionIndex

    truth = GroundTruth.load(ground_truth).complete()
    index = AttributionIndex.open(index_dir, device=device)
    scores = training_scores(index, truth.queries, truth.train_ids)
    result = linear_datamodeling_score(scores, truth.subsets, truth.losses, bootstrap=bootstrap)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(result.format())
    if plot is not None:
        click.echo(f"plot         {plot_lds(result, truth.losses, plot, title=str(index_dir))}", err=as_json)
