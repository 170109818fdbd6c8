"""The `attribindex` command line: parse, call the library, print. No logic of its own.

Each command group lives in a module of its own (`_build`, `_query`, `_inspect`, `_mutations`, `_serve`, `_eval`,
`_harness`, `_demo`, `_milvus`), the options several of them share in `_options`, and the command classes that turn a library error
into one clean line in `_base`. This module only assembles them: adding a command is one new module and one line
in `COMMANDS`.
"""

from __future__ import annotations

import sys

import click

from attribindex.cli._base import Group
from attribindex.cli._build import build, merge, plan
from attribindex.cli._demo import demo
from attribindex.cli._eval import eval_group
from attribindex.cli._harness import trace_eval
from attribindex.cli._inspect import info, verify
from attribindex.cli._milvus import push
from attribindex.cli._mutations import append, compact, delete, refresh
from attribindex.cli._query import query
from attribindex.cli._serve import serve

# The registry: every command and group of `attribindex` (--help lists them by name).
COMMANDS: tuple[click.Command, ...] = (
    plan,
    build,
    merge,
    query,
    info,
    verify,
    append,
    delete,
    compact,
    refresh,
    push,
    serve,
    eval_group,
    trace_eval,
    demo,
)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="attribindex")
def main() -> None:
    """Training-data attribution at corpus scale: LoGra gradients in a FAISS index.

    \b
    Typical use:
      attribindex plan --config tiny --model ./my-model --data corpus.jsonl   # dims, disk, RAM, time first
      attribindex build --config tiny --model ./my-model --data corpus.jsonl --out my-index
      attribindex query my-index --text "a model output" -k 5
    """


for _command in COMMANDS:
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
