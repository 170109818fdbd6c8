"""Options that several commands share, defined once so that a flag reads the same in every command's --help;
the parsers of list values; and config overrides from the command line, validated as a config file is."""

from __future__ import annotations

from pathlib import Path

import click

index_dir = click.argument("index_dir", type=click.Path(path_type=Path))

text_field = click.option(
    "--text-field", default="text", show_default=True, help="Field holding the text (jsonl / datasets)."
)
id_field = click.option(
    "--id-field", default=None, help="Field holding a stable id (default: content hash of the text)."
)
split = click.option("--split", default="train", show_default=True, help="Dataset split (HF datasets).")
skip_empty = click.option(
    "--skip-empty", is_flag=True, help="Leave out documents that tokenise to nothing instead of failing."
)

model_instead = click.option(
    "--model", default=None, help="Use this model folder instead of the one recorded in the index."
)


server_token = click.option(
    "--token", envvar="ATTRIBINDEX_TOKEN", default=None, help="Bearer token for --server (env ATTRIBINDEX_TOKEN)."
)
# named apart from `exact`: library messages that say "the `exact` section" mean the config key, not this flag
exact_candidates = click.option(
    "--exact",
    "exact_candidates",
    type=int,
    default=None,
    metavar="C",
    help="Re-score the index's top-C (and bottom-C) candidates with exact unprojected influence; needs an index "
    "built with the `exact` config section.",
)


search_uri = click.option(
    "--search",
    "search_uri",
    default=None,
    metavar="URI",
    help="Take candidates from this Milvus collection (milvus://HOST:PORT/COLLECTION, or PATH.db for Milvus Lite), "
    "pushed from the index with `attribindex push`; scores still come from the index's store.",
)
milvus_token = click.option(
    "--milvus-token",
    envvar="MILVUS_TOKEN",
    default=None,
    help="Milvus login, user:password or an API key (env MILVUS_TOKEN; or MILVUS_USER and MILVUS_PASSWORD).",
)


def device(help: str | None = None):
    """--device: where the model and the index run."""
    return click.option(
        "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help=help
    )


def as_json(help: str):
    """--json: print `help`'s machine-readable form instead of text."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def float_list(value: str | None) -> list[float] | None:
    """`3e-4,1e-4` as [3e-4, 1e-4]; None stays None."""
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers such as 3e-4,1e-4, got {value!r}.") from None


def int_list(value: str | None) -> list[int] | None:
    """`1,4,16` as [1, 4, 16] (positive integers only); None stays None."""
    if value is None:
        return None
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 1,4,16, got {value!r}.") from None
    if not numbers or min(numbers) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}.")
    return numbers


def replace_checked(section, overrides: dict):
    """A config section with `overrides` from the command line, validated as the same keys in a config file are."""
    from attribindex.config import config_from_dict, config_to_dict

    return config_from_dict(type(section), config_to_dict(section) | overrides, where="command-line options")
