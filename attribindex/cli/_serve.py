"""`serve`: answer attribution requests over HTTP/JSON from one loaded model and index."""

from __future__ import annotations

import click

from attribindex.cli import _options as options
from attribindex.cli._base import Command


@click.command(cls=Command)
@options.index_dir
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (loopback unless you ask).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option(
    "--token", envvar="ATTRIBINDEX_TOKEN", default=None, help="Require this bearer token (env ATTRIBINDEX_TOKEN)."
)
@options.model_instead
@options.device()
@options.search_uri
@options.milvus_token
@click.option("--max-queries", type=int, default=64, show_default=True, help="Queries per request.")
@click.option("--max-tokens", type=int, default=2048, show_default=True, help="Tokens per query.")
@click.option("--max-k", type=int, default=1000, show_default=True, help="Largest k and bottom.")
@click.option(
    "--max-exact",
    type=int,
    default=1000,
    show_default=True,
    help="Most candidates an exact re-rank (query --exact C) may re-score; 0 = refuse exact re-ranks.",
)
@click.option("--max-body-kb", type=int, default=1024, show_default=True, help="Request body size.")
@click.option("--batch-window-ms", type=float, default=5.0, show_default=True, help="Micro-batching wait; 0 = none.")
@click.option("--max-batch", type=int, default=64, show_default=True, help="Queries per model pass (1 = no batching).")
def serve(
    index_dir,
    host,
    port,
    token,
    model,
    device,
    search_uri,
    milvus_token,
    max_queries,
    max_tokens,
    max_k,
    max_exact,
    max_body_kb,
    batch_window_ms,
    max_batch,
):
    """Serve an index over HTTP/JSON: load the model and index once, answer many requests.

    \b
    Example:
      attribindex serve demo-index --port 8000 &
      attribindex query --server http://127.0.0.1:8000 --text "Friends, Romans, countrymen" -k 5
      curl -s localhost:8000/v1/attribute -H 'content-type: application/json' \\
          -d '{"queries": ["To be, or not to be"], "k": 3}'
    """
    from attribindex.serve import ServerLimits, serve

    limits = ServerLimits(
        max_body_bytes=max_body_kb * 1024,
        max_queries=max_queries,
        max_tokens=max_tokens,
        max_k=max_k,
        max_exact=max_exact,
        batch_window_ms=batch_window_ms,
        max_batch_queries=max_batch,
    )
    serve(
        index_dir,
        host,
        port,
        token=token,
        model=model,
        device=device,
        limits=limits,
        search=search_uri,
        milvus_token=milvus_token,
    )
