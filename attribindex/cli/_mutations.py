"""The commands that change a built index in place: `append`, `delete`, `compact` and `refresh`."""

from __future__ import annotations

import click

from attribindex.cli import _options as options
from attribindex.cli._base import Command


@click.command(cls=Command)
@options.index_dir
@click.option("--data", required=True, help="New documents: .jsonl, folder of .txt, saved HF dataset, or hub dataset.")
@options.text_field
@options.id_field
@options.split
@click.option("--limit", type=int, default=None, help="Append only the first N documents.")
@options.skip_empty
@click.option("--skip-duplicates", is_flag=True, help="Leave out documents whose id is already in the index.")
@click.option("--model", default=None, help="A copy of the index's model elsewhere (its fingerprint must match).")
@click.option("--batch-size", type=int, default=None, help="Examples per forward+backward (default: the build's).")
def append(index_dir, data, text_field, id_field, split, limit, skip_empty, skip_duplicates, model, batch_size):
    """Add documents to an index with its own model, projection and whitening; no rebuild.

    \b
    Example:
      attribindex append my-index --data new-crawl.jsonl --id-field id --skip-duplicates
    """
    from attribindex.pipeline import append_documents

    summary = append_documents(
        index_dir,
        data,
        text_field=text_field,
        id_field=id_field,
        split=split,
        limit=limit,
        skip_empty=skip_empty,
        skip_duplicates=skip_duplicates,
        model=model,
        batch_size=batch_size,
    )
    click.echo(summary.format())


@click.command(cls=Command)
@options.index_dir
@click.option("--ids", "ids_file", required=True, type=click.File("r"), help="File with one id per line ('-' = stdin).")
def delete(index_dir, ids_file):
    """Delete documents by id: they never appear in a result again (compact later to free their space).

    \b
    Example:
      attribindex delete my-index --ids takedown-requests.txt
    """
    from attribindex.pipeline import delete_ids

    ids = [line.strip() for line in ids_file if line.strip()]
    if not ids:
        raise click.UsageError("the --ids file holds no ids (one id per line).")
    click.echo(delete_ids(index_dir, ids).format())


@click.command(cls=Command)
@options.index_dir
def compact(index_dir):
    """Rewrite the store and index without deleted rows, reclaiming their space (atomically).

    \b
    Example:
      attribindex compact my-index
    """
    from attribindex.pipeline import compact_index

    click.echo(compact_index(index_dir).format())


@click.command(cls=Command)
@options.index_dir
def refresh(index_dir):
    """Re-whiten every stored row with the Hessian the current curvature sums imply (after appends/deletes).

    \b
    Example:
      attribindex refresh my-index
    """
    from attribindex.pipeline import refresh_index

    click.echo(refresh_index(index_dir).format())
