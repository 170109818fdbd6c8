"""`demo`: the embedded Shakespeare demo, offline."""

from __future__ import annotations

from pathlib import Path

import click

from attribindex.cli._base import Command


@click.command(cls=Command)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("demo-index"),
    show_default=True,
    help="Where the demo index goes.",
)
@click.option(
    "--speeches",
    type=int,
    default=None,
    help="Speeches sampled into the index (default 300); the 6 that its queries come from are always added.",
)
@click.option("--overwrite/--reuse", default=False, help="Rebuild an existing demo index instead of reusing it.")
def demo(out, speeches, overwrite):
    """Index Shakespeare with SmolLM2-135M (offline) and trace famous lines back to it.

    \b
    Example:
      attribindex demo --speeches 400
    """
    from attribindex.demo import run_demo

    run_demo(out, speeches=speeches, overwrite=overwrite)
