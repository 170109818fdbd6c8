"""`push`: send an index's rows to a Milvus collection, for search beyond one machine."""

from __future__ import annotations

import json

import click

from attribindex.cli import _options as options
from attribindex.cli._base import Command


@click.command(cls=Command)
@options.index_dir
@click.argument("uri")
@click.option(
    "--kind",
    default=None,
    help="Milvus index type: FLAT (exact), IVF_FLAT, IVF_SQ8, HNSW; on a server also DISKANN, GPU_CAGRA, "
    "GPU_BRUTE_FORCE. Default: the collection's, FLAT for a new one; another kind rewrites the collection.",
)
@click.option(
    "--mips",
    type=click.Choice(["auto", "augment", "inner_product"]),
    default=None,
    help="How an approximate kind searches dot-mode vectors: inner_product, or augment (MIPS→L2, "
    "[x, √(M² − ‖x‖²)] with metric L2); auto = augment for IVF_FLAT only. Default: the collection's, or auto.",
)
@click.option("--replace", is_flag=True, help="Overwrite a collection that holds another index.")
@click.option(
    "--max-dim",
    type=int,
    default=32_768,
    show_default=True,
    help="Most dims the server takes per vector (its proxy.maxDimension); a wider index is pushed as a seeded "
    "CountSketch of that many dims, whose candidates are re-scored from the full rows.",
)
@options.milvus_token
@click.option("--quiet", is_flag=True, help="No progress bar.")
@options.as_json("Print the summary as JSON.")
def push(index_dir, uri, kind, mips, replace, max_dim, milvus_token, quiet, as_json):
    """Make a Milvus collection hold the index's live, whitened rows; only what changed since the collection's
    version is sent, and a push interrupted at any point ends, when run again, as an uninterrupted one.

    URI is milvus://HOST:PORT/COLLECTION for a server, or PATH.db (PATH.db#COLLECTION) for a Milvus Lite file.

    \b
    Examples:
      attribindex push my-index attributions.db
      attribindex query my-index --search attributions.db --text "a model output" -k 5
      MILVUS_TOKEN=user:password attribindex push my-index milvus://10.0.0.5:19530/wiki --kind HNSW
    """
    from dataclasses import asdict

    from attribindex.milvus import push_index

    summary = push_index(
        index_dir, uri, kind=kind, mips=mips, replace=replace, max_dim=max_dim, token=milvus_token, progress=not quiet
    )
    click.echo(json.dumps(asdict(summary), indent=2) if as_json else summary.format())
