"""`build`, `plan` and `merge`: make an index from a corpus, plan one before, or merge the shards of one."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import click

from attribindex.cli import _options as options
from attribindex.cli._base import Command

WEIGHTS_NEED_AN_ENSEMBLE = "--checkpoint-weights weighs the checkpoints of an ensemble: give several --model."


def _build_options(*, out_required: bool, data_required: bool = True):
    """The options of `build`, shared with `plan` so that a build's command line plans it unchanged and the two
    cannot drift; `plan` takes --out optionally (it reports the free space there)."""
    out_help = "Index folder to create." if out_required else "Index folder the build would create (free space shown)."
    decorators = [
        click.option(
            "--config", "config_path", required=True, help="YAML config file, or a preset name from index_configs/."
        ),
        click.option(
            "--model",
            "models",
            required=True,
            multiple=True,
            help="Model folder (save_pretrained), PEFT adapter folder or hub id. Repeat it for an ensemble of "
            "checkpoints of one run: one index whose scores sum the checkpoints' scores.",
        ),
        click.option(
            "--checkpoint-weights",
            default=None,
            metavar="W1,W2,…|lr",
            help="An ensemble's weight per checkpoint in a score (default: 1 each); `lr`: the learning rate each "
            "Trainer checkpoint was saved at, as TracIn weighs them.",
        ),
        click.option(
            "--data",
            required=data_required,
            default=None,
            help="A .jsonl file, a folder of .txt files, a saved HF dataset, or a hub dataset."
            + ("" if data_required else " Optional with --documents (then it is sampled, if given)."),
        ),
        click.option("--out", required=out_required, type=click.Path(path_type=Path), help=out_help),
        options.text_field,
        options.id_field,
        options.split,
        click.option("--limit", type=int, default=None, help="Index only the first N documents."),
        click.option(
            "--max-length", type=int, default=None, help="Truncate documents to N tokens (overrides the config)."
        ),
        click.option(
            "--batch-size", type=int, default=None, help="Examples per forward+backward (overrides the config)."
        ),
        options.skip_empty,
        click.option(
            "--overwrite",
            is_flag=True,
            help="Replace whatever build --out holds (by default an interrupted one resumes).",
        ),
        click.option("--num-shards", type=int, default=None, help="Split the corpus into N contiguous shards."),
        click.option(
            "--shard-index",
            type=int,
            default=None,
            help="Build only this shard (0-based) into --out; merge the shards later with `attribindex merge`.",
        ),
        click.option("--keep-shards", is_flag=True, help="Keep OUT/shards/ after a multi-shard build has merged them."),
        click.option(
            "--hessian",
            type=click.Choice(["raw", "kfac", "ekfac", "identity"]),
            default=None,
            help="Hessian kind (overrides the config's hessian.kind; docs/quality.md compares them).",
        ),
        click.option(
            "--optimizer-state",
            type=click.Path(exists=True, path_type=Path),
            default=None,
            help="The training optimizer's state (a checkpoint folder or its optimizer.pt): divide gradients by its "
            "√v (Adam, Adafactor).",
        ),
    ]

    def apply(command):
        for option in reversed(decorators):  # decorators apply bottom-up; --help lists them in this order
            command = option(command)
        return command

    return apply


def _build_config(config_path, max_length, batch_size, hessian, optimizer_state):
    """The config of `build` and `plan`: the file or preset, then the command-line overrides, validated alike."""
    from attribindex.config import load_config

    config = load_config(config_path)
    overrides = {k: v for k, v in {"max_length": max_length, "batch_size": batch_size}.items() if v is not None}
    if overrides:
        config = dataclasses.replace(config, extract=options.replace_checked(config.extract, overrides))
    if hessian is not None:
        config = dataclasses.replace(config, hessian=options.replace_checked(config.hessian, {"kind": hessian}))
    if optimizer_state is not None:
        state = {"optimizer_state": str(optimizer_state.resolve())}
        config = dataclasses.replace(config, projection=options.replace_checked(config.projection, state))
    return config


@click.command(cls=Command)
@_build_options(out_required=True)
def build(
    config_path,
    models,
    checkpoint_weights,
    data,
    out,
    text_field,
    id_field,
    split,
    limit,
    max_length,
    batch_size,
    skip_empty,
    overwrite,
    num_shards,
    shard_index,
    keep_shards,
    hessian,
    optimizer_state,
):
    """Build an attribution index over a corpus (or one shard of it). Rerun the same command to resume.

    \b
    Examples:
      attribindex build --config index_configs/tiny.yaml --model ./tiny-gpt2 \\
          --data corpus.jsonl --id-field id --out my-index
    \b
      # shard 3 of 8, e.g. as one task of a SLURM array; then `attribindex merge`
      attribindex build --config tiny --model ./tiny-gpt2 --data corpus.jsonl \\
          --num-shards 8 --shard-index 3 --out shards/3
    \b
      # 8 shards over 4 processes, merged into my-index at the end
      torchrun --nproc-per-node 4 -m attribindex build --config tiny --model ./tiny-gpt2 \\
          --data corpus.jsonl --num-shards 8 --out my-index
    """
    from attribindex.pipeline import build_ensemble, build_index

    config = _build_config(config_path, max_length, batch_size, hessian, optimizer_state)
    weights = "lr" if checkpoint_weights == "lr" else options.float_list(checkpoint_weights)
    if len(models) > 1:
        if num_shards is not None or shard_index is not None:
            raise click.UsageError("an ensemble (several --model) is built in one process: drop --num-shards.")
        summary = build_ensemble(
            config,
            list(models),
            data,
            out,
            weights=weights,
            text_field=text_field,
            id_field=id_field,
            split=split,
            limit=limit,
            overwrite=overwrite,
            skip_empty=skip_empty,
        )
        click.echo(summary.format())
        return
    if weights is not None:
        raise click.UsageError(WEIGHTS_NEED_AN_ENSEMBLE)
    summary = build_index(
        config,
        models[0],
        data,
        out,
        text_field=text_field,
        id_field=id_field,
        split=split,
        limit=limit,
        overwrite=overwrite,
        skip_empty=skip_empty,
        num_shards=num_shards,
        shard_index=shard_index,
        keep_shards=keep_shards,
    )
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary
        click.echo(summary.format())


@click.command(cls=Command)
@_build_options(out_required=False, data_required=False)
@click.option(
    "--sample",
    type=int,
    default=1000,
    show_default=True,
    help="Documents a streamed dataset (or --data under --documents) is estimated from.",
)
@click.option("--probe-batches", type=int, default=3, show_default=True, help="Batches timed (after a warm-up batch).")
@click.option(
    "--documents",
    type=int,
    default=None,
    help="Plan for N documents instead of counting --data's (then --data is optional, and only sampled).",
)
@click.option(
    "--tokens-per-document",
    type=float,
    default=None,
    help="Mean tokens per document (default: measured on --data, else the config's max_length).",
)
@click.option(
    "--tokens-per-second",
    type=float,
    default=None,
    help="Extraction throughput of one GPU, measured elsewhere (default: this plan's probe, else a labelled "
    "estimate from bergson's published chart).",
)
@click.option("--gpus", type=int, default=1, show_default=True, help="GPUs extracting at once (wall-clock, shards).")
@click.option(
    "--node-ram-gb", type=float, default=512, show_default=True, help="RAM of one search node, GiB (nodes per index)."
)
@options.as_json("Print the plan as JSON.")
def plan(
    config_path,
    models,
    checkpoint_weights,
    max_length,
    batch_size,
    hessian,
    optimizer_state,
    overwrite,
    sample,
    probe_batches,
    documents,
    tokens_per_document,
    tokens_per_second,
    gpus,
    node_ram_gb,
    as_json,
    **args,
):
    """Plan a build — take `build`'s command line — without writing anything: dims per module, bytes per example,
    disk, RAM at build and at query, the exact section's memory, the time from a short timed probe, and the build at
    scale: GPU-hours, shards, the row store, and each search index's RAM in search nodes.

    \b
    Example:
      attribindex plan --config demo --model ./my-model --data corpus.jsonl --out my-index
      attribindex plan --config tiny --model ./tiny-gpt2 --data corpus.jsonl --json
    \b
      # a billion documents with Llama-3-8B, from its config alone (no weights, no corpus; docs/scale.md)
      attribindex plan --config llama3-8b-paper --model index_configs/models/llama3-8b \\
          --documents 1000000000 --tokens-per-document 512 --gpus 64
    """
    from attribindex.pipeline import plan_build

    weights = "lr" if checkpoint_weights == "lr" else options.float_list(checkpoint_weights)
    if len(models) > 1:
        raise click.UsageError(
            "plan one checkpoint (one --model): an ensemble of K checkpoints costs K such builds, and its vectors "
            "are K times as long."
        )
    if weights is not None:
        raise click.UsageError(WEIGHTS_NEED_AN_ENSEMBLE)
    config = _build_config(config_path, max_length, batch_size, hessian, optimizer_state)
    result = plan_build(
        config,
        model=models[0],
        **args,
        sample=sample,
        probe_batches=probe_batches,
        documents=documents,
        tokens_per_document=tokens_per_document,
        tokens_per_second=tokens_per_second,
        gpus=gpus,
        node_ram_gb=node_ram_gb,
        progress=not as_json,
        log=lambda line: click.echo(line, err=True),  # what it is doing, apart from the plan on stdout
    )
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.format())


@click.command(cls=Command)
@click.argument("shard_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Index folder to create.")
@click.option("--overwrite", is_flag=True, help="Replace an index already in --out.")
def merge(shard_dirs, out, overwrite):
    """Merge the shards of one build into a searchable index.

    Checks that the shards agree (format, model, projection, modules, config, slices, checksums),
    sums their curvature exactly, computes the preconditioner once and writes the index.

    \b
    Example:
      attribindex merge shards/* --out my-index
    """
    from attribindex.pipeline import merge_shards

    click.echo(merge_shards(list(shard_dirs), out, overwrite=overwrite).format())
