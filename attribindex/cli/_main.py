"""The `attribindex` command line: parse, call the library, print. No logic of its own."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path

import click

from attribindex.cli._render import explained_lines
from attribindex.errors import AttribIndexError

_CODE_SPAN = re.compile(r"`([^`]+)`")
QUOTES = "'\""  # around a string value in a library message: `text_field='body'`


def in_flags(message: str, command: click.Command) -> str:
    """A library message as this command's user should read it: each code span that names parameters of the
    command (`overwrite=True`, `num_shards=3, shard_index=1`, `text_field`) names its flags instead
    (--overwrite, --num-shards 3 --shard-index 1, --text-field). Other spans stay as they are.

    Example:
        >>> in_flags("Pass `overwrite=True` to replace it.", build)
        'Pass --overwrite to replace it.'
    """
    options = {p.name: p for p in command.params if isinstance(p, click.Option)}

    def as_flags(span: re.Match) -> str:
        flags = []
        for part in re.split(r",\s*", span.group(1)):
            name, _, value = part.partition("=")
            option = options.get(name.strip())
            if option is None:
                return span.group(0)
            flag = max(option.opts, key=len)
            flags.append(flag if option.is_flag or not value else f"{flag} {value.strip(QUOTES)}")
        return " ".join(flags)

    return _CODE_SPAN.sub(as_flags, message)


class _Command(click.Command):
    """Turns AttribIndexError into one clean error line (exit code 1) instead of a traceback, naming this
    command's flags where the library names parameters."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AttribIndexError as err:
            from attribindex._progress import close_open_bars

            close_open_bars()  # a bar left open by the failure would share the error's line
            raise click.ClickException(in_flags(str(err), self)) from None


class _Group(click.Group):
    command_class = _Command
    group_class = type  # subgroups are _Groups too, so their commands are _Commands


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="attribindex")
def main() -> None:
    """Training-data attribution at corpus scale: LoGra gradients in a FAISS index.

    \b
    Typical use:
      attribindex plan --config tiny --model ./my-model --data corpus.jsonl   # dims, disk, RAM, time first
      attribindex build --config tiny --model ./my-model --data corpus.jsonl --out my-index
      attribindex query my-index --text "a model output" -k 5
    """


def _build_options(*, out_required: bool):
    """The options of `build`, shared with `plan` so that a build's command line plans it unchanged and the two
    cannot drift; `plan` takes --out optionally (it reports the free space there)."""
    out_help = "Index folder to create." if out_required else "Index folder the build would create (free space shown)."
    options = [
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
            "--data", required=True, help="A .jsonl file, a folder of .txt files, a saved HF dataset, or a hub dataset."
        ),
        click.option("--out", required=out_required, type=click.Path(path_type=Path), help=out_help),
        click.option(
            "--text-field", default="text", show_default=True, help="Field holding the text (jsonl / datasets)."
        ),
        click.option("--id-field", default=None, help="Field holding a stable id (default: content hash of the text)."),
        click.option("--split", default="train", show_default=True, help="Dataset split (HF datasets)."),
        click.option("--limit", type=int, default=None, help="Index only the first N documents."),
        click.option(
            "--max-length", type=int, default=None, help="Truncate documents to N tokens (overrides the config)."
        ),
        click.option(
            "--batch-size", type=int, default=None, help="Examples per forward+backward (overrides the config)."
        ),
        click.option(
            "--skip-empty", is_flag=True, help="Leave out documents that tokenise to nothing instead of failing."
        ),
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
        for option in reversed(options):  # decorators apply bottom-up; --help lists them in this order
            command = option(command)
        return command

    return apply


def _build_config(config_path, max_length, batch_size, hessian, optimizer_state):
    """The config of `build` and `plan`: the file or preset, then the command-line overrides, validated alike."""
    from attribindex.config import load_config

    config = load_config(config_path)
    overrides = {k: v for k, v in {"max_length": max_length, "batch_size": batch_size}.items() if v is not None}
    if overrides:
        config = dataclasses.replace(config, extract=_replace_checked(config.extract, overrides))
    if hessian is not None:
        config = dataclasses.replace(config, hessian=_replace_checked(config.hessian, {"kind": hessian}))
    if optimizer_state is not None:
        state = {"optimizer_state": str(optimizer_state.resolve())}
        config = dataclasses.replace(config, projection=_replace_checked(config.projection, state))
    return config


@main.command()
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
    weights = "lr" if checkpoint_weights == "lr" else _float_list(checkpoint_weights)
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
        raise click.UsageError("--checkpoint-weights weighs the checkpoints of an ensemble: give several --model.")
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


@main.command()
@_build_options(out_required=False)
@click.option(
    "--sample", type=int, default=1000, show_default=True, help="Documents a streamed dataset is estimated from."
)
@click.option("--probe-batches", type=int, default=3, show_default=True, help="Batches timed (after a warm-up batch).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
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
    as_json,
    **args,
):
    """Plan a build — take `build`'s command line — without writing anything: dims per module, bytes per example,
    disk, RAM at build and at query, the exact section's memory, and the time from a short timed probe.

    \b
    Example:
      attribindex plan --config demo --model ./my-model --data corpus.jsonl --out my-index
      attribindex plan --config tiny --model ./tiny-gpt2 --data corpus.jsonl --json
    """
    from attribindex.pipeline import plan_build

    if len(models) > 1:
        raise click.UsageError(
            "plan one checkpoint (one --model): an ensemble of K checkpoints costs K such builds, and its vectors "
            "are K times as long."
        )
    config = _build_config(config_path, max_length, batch_size, hessian, optimizer_state)
    result = plan_build(
        config,
        model=models[0],
        **args,
        sample=sample,
        probe_batches=probe_batches,
        progress=not as_json,
        log=lambda line: click.echo(line, err=True),  # what it is doing, apart from the plan on stdout
    )
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.format())


@main.command()
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


@main.command()
@click.argument("index_dir", type=click.Path(path_type=Path))
@click.option("--data", required=True, help="New documents: .jsonl, folder of .txt, saved HF dataset, or hub dataset.")
@click.option("--text-field", default="text", show_default=True, help="Field holding the text (jsonl / datasets).")
@click.option("--id-field", default=None, help="Field holding a stable id (default: content hash of the text).")
@click.option("--split", default="train", show_default=True, help="Dataset split (HF datasets).")
@click.option("--limit", type=int, default=None, help="Append only the first N documents.")
@click.option("--skip-empty", is_flag=True, help="Leave out documents that tokenise to nothing instead of failing.")
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


@main.command()
@click.argument("index_dir", type=click.Path(path_type=Path))
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


@main.command()
@click.argument("index_dir", type=click.Path(path_type=Path))
def compact(index_dir):
    """Rewrite the store and index without deleted rows, reclaiming their space (atomically).

    \b
    Example:
      attribindex compact my-index
    """
    from attribindex.pipeline import compact_index

    click.echo(compact_index(index_dir).format())


@main.command()
@click.argument("index_dir", type=click.Path(path_type=Path))
def refresh(index_dir):
    """Re-whiten every stored row with the Hessian the current curvature sums imply (after appends/deletes).

    \b
    Example:
      attribindex refresh my-index
    """
    from attribindex.pipeline import refresh_index

    click.echo(refresh_index(index_dir).format())


@main.command()
@click.argument("index_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (loopback unless you ask).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option(
    "--token", envvar="ATTRIBINDEX_TOKEN", default=None, help="Require this bearer token (env ATTRIBINDEX_TOKEN)."
)
@click.option("--model", default=None, help="Use this model folder instead of the one recorded in the index.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
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
    serve(index_dir, host, port, token=token, model=model, device=device, limits=limits)


@main.command()
@click.argument("index_dir", type=click.Path(path_type=Path))
def verify(index_dir):
    """Re-check every file of an index or shard against the checksums in its manifest.

    Exits with status 1 and lists the damaged files if any.

    \b
    Example:
      attribindex verify my-index
    """
    from attribindex._progress import progress
    from attribindex.store import read_manifest, verify_files

    manifest = read_manifest(index_dir, kind="any")
    total = sum(record.bytes for _, record in manifest.recorded_files())
    with progress(total=total, desc="verify", unit="B", unit_scale=True) as bar:
        report = verify_files(index_dir, manifest, progress=bar.update)
    for name, problem in report.damaged:
        click.echo(f"DAMAGED  {index_dir / name}: {problem}")
    verdict = "intact" if report.ok else f"{len(report.damaged)} damaged"
    click.echo(f"{index_dir}: {report.files} files, {report.bytes / 2**20:.1f} MiB checked, {verdict}")
    if not report.ok:  # the list is on stdout; stderr says what to do, and the exit status is 1
        files, them = ("file is", "it") if len(report.damaged) == 1 else ("files are", "them")
        raise click.ClickException(
            f"{len(report.damaged)} {files} damaged in {index_dir}. Restore {them} from a copy, or rebuild the index."
        )


def _replace_checked(section, overrides: dict):
    from attribindex.config import config_from_dict, config_to_dict

    return config_from_dict(type(section), config_to_dict(section) | overrides, where="command-line options")


@main.command()
@click.argument("index_dir", type=click.Path(path_type=Path), required=False)
@click.option(
    "--server", default=None, help="Ask a running `attribindex serve` at this URL instead of opening INDEX_DIR."
)
@click.option(
    "--token", envvar="ATTRIBINDEX_TOKEN", default=None, help="Bearer token for --server (env ATTRIBINDEX_TOKEN)."
)
@click.option("--text", "texts", multiple=True, help="A query text (repeatable).")
@click.option("--prompt", default=None, help="Prompt of a (prompt, completion) query; only completion tokens count.")
@click.option("--completion", default=None, help="Completion of a (prompt, completion) query.")
@click.option("-k", "k", type=int, default=10, show_default=True, help="Number of most influential examples.")
@click.option("--bottom", type=int, default=0, show_default=True, help="Number of least influential examples.")
# named apart from `exact`: library messages that say "the `exact` section" mean the config key, not this flag
@click.option(
    "--exact",
    "exact_candidates",
    type=int,
    default=None,
    metavar="C",
    help="Re-score the index's top-C (and bottom-C) candidates with exact unprojected influence; needs an index "
    "built with the `exact` config section.",
)
@click.option("--model", default=None, help="Use this model folder instead of the one recorded in the index.")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where the model and the index run.",
)
@click.option("--nprobe", type=int, default=None, help="IVF cells scanned (default: the recorded operating point).")
@click.option("--ef-search", type=int, default=None, help="HNSW candidate list (default: the operating point).")
@click.option(
    "--explain",
    is_flag=True,
    help="Split each shown score (the exact one with --exact) over the example's tokens and the query's: the "
    "strongest are highlighted (in colour on a terminal, as [+token] / [-token] otherwise; arrays with --json).",
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
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
    \b
      # re-rank the top 200 candidates with exact, unprojected influence (index built with `exact`)
      attribindex query my-index --text "Now is the winter of our discontent" -k 10 --exact 200
      # which tokens of each result (and of the query) carry its score
      attribindex query my-index --text "Now is the winter of our discontent" -k 3 --explain
    """
    from attribindex.data import PromptCompletion
    from attribindex.query import AttributionIndex, one_line

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
        index = AttributionIndex.open(index_dir, model=model, device=device)
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
        f"({answer.mode}, {'exact' if answer.exact else 'approximate: ' + answer.search})"
    )
    if answer.rerank is not None:
        rerank = answer.rerank
        click.echo(
            f"re-ranked the top-{rerank.candidates}{' and bottom-' + str(rerank.candidates) if bottom else ''} "
            f"candidates per query exactly ({rerank.method}) in {rerank.rerank_ms:.0f} ms"
        )


@main.group(name="eval")
def eval_group() -> None:
    """Measure an index: recall of approximate search against exact search."""


def _float_list(value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers such as 3e-4,1e-4, got {value!r}.") from None


def _int_list(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 1,4,16, got {value!r}.") from None
    if not numbers or min(numbers) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}.")
    return numbers


@eval_group.command()
@click.argument("index_dir", type=click.Path(path_type=Path))
@click.option(
    "--queries", "queries_path", required=True, help="Held-out query texts: .jsonl, folder of .txt, or dataset."
)
@click.option("--text-field", default="text", show_default=True, help="Field holding the text (jsonl / datasets).")
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
    "--record/--no-record", default=True, show_default=True, help="Record the operating point in the manifest."
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def recall(
    index_dir, queries_path, text_field, limit, k, target, nprobe, ef_search, rerank, plot, record, device, as_json
):
    """Recall@k and latency of an approximate index per search setting, against exact search on held-out
    queries; records the fastest setting that reaches --target as the index's operating point.

    \b
    Example:
      attribindex eval recall my-ivf-index --queries held-out.jsonl -k 10 --plot recall.png
    """
    from attribindex.data import open_corpus
    from attribindex.eval import measure_recall, plot_recall
    from attribindex.pipeline import set_operating_point
    from attribindex.query import AttributionIndex

    index = AttributionIndex.open(index_dir, device=device)
    texts = [document.text for document in open_corpus(queries_path, text_field=text_field, limit=limit)]
    vectors = index.query_vectors(texts).vectors
    settings = None
    if nprobe is not None or ef_search is not None:
        settings = [{"nprobe": n} for n in _int_list(nprobe) or []]
        settings += [{"ef_search": n} for n in _int_list(ef_search) or []]
    report = measure_recall(index, vectors, k=k, settings=settings, rerank=rerank, target=target)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.format())
    if plot is not None:
        click.echo(f"plot         {plot_recall(report, plot)}", err=as_json)
    if record:
        version = set_operating_point(index_dir, report.operating_point(), index.version)
        click.echo(
            f"recorded     operating point {report.chosen.label} in {index_dir} (version {version})", err=as_json
        )


@eval_group.command()
@click.argument("index_dir", type=click.Path(path_type=Path))
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
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
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


@main.command()
@click.argument("index_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def info(index_dir, as_json):
    """Summarise an index or shard: rows, dims, model, Hessian, sizes on disk.

    \b
    Example:
      attribindex info my-index
    """
    from attribindex._records import to_json
    from attribindex.store import IndexManifest, read_manifest

    manifest = read_manifest(index_dir, kind="any")
    if as_json:
        click.echo(json.dumps(to_json(manifest), indent=2))
        return
    sizes: dict[str, int] = {}
    for path in index_dir.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            top = path.relative_to(index_dir).parts[0]
            sizes[top] = sizes.get(top, 0) + path.stat().st_size
    modules = manifest.modules
    indexed = isinstance(manifest, IndexManifest)
    lines = [
        f"{'index' if indexed else 'shard':<13}{manifest.index_id}  (format v{manifest.read_from_version}"
        + (
            f", read as v{manifest.format_version}: its next change writes it so"
            if manifest.read_from_version != manifest.format_version
            else ""
        )
        + f", created {manifest.created})",
        f"rows         {manifest.live_rows if indexed else manifest.rows:,}  in {len(manifest.store.chunks)} chunks "
        f"({manifest.store.dtype})",
        f"vector       {manifest.dim:,} dims from {len(modules)} modules, rank {modules[0].rank_out}×{modules[0].rank_in}"
        f", {sum(m.bias for m in modules)} with their bias",
        f"model        {manifest.model.name_or_path} ({manifest.model.class_name})",
    ]
    if manifest.ensemble is not None:
        checkpoints = manifest.ensemble.checkpoints
        lines.append(
            f"ensemble     {len(checkpoints)} checkpoints, score = Σ weight × score: "
            + ", ".join(f"{c.name_or_path} (×{c.weight:g})" for c in checkpoints)
        )
    if manifest.training is not None:
        training = manifest.training
        lines.append(
            f"training     captured while training: {training.gradients:,} gradients over {training.steps:,} steps "
            f"({training.first_step}–{training.last_step}), rows {training.rows}"
        )
    lines += _index_lines(manifest) if indexed else _shard_lines(manifest)
    lines += [
        f"projection   seed {manifest.projection.seed}, {manifest.projection.hash[:23]}…",
        "on disk      " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(sizes.items())),
    ]
    click.echo("\n".join(lines))


def _shard_lines(manifest) -> list[str]:
    shard = manifest.shard
    start, stop = shard.documents
    return [
        f"slice        shard {shard.index} of {shard.count}: documents [{start:,}, {stop:,}) — "
        f"merge all {shard.count} with `attribindex merge`"
    ]


def _index_lines(manifest) -> list[str]:
    hessian, segments, deleted = manifest.hessian, manifest.index.segments, manifest.deleted.rows
    lines = [
        f"version      {manifest.version}  ({len(manifest.log)} events; --json shows the log)"
        + (f", {deleted:,} rows deleted (`attribindex compact` frees them)" if deleted else ""),
        f"hessian      {hessian.kind}, damping α={hessian.damping} over {hessian.examples:,} examples"
        + _spectrum(hessian.modules)
        + (
            f"; its curvature sums still count {hessian.retained_deleted:,} deleted examples "
            f"(token statistics are not stored per row: rebuild to drop them)"
            if hessian.retained_deleted
            else ""
        ),
        f"scores       {manifest.normalization}  ({len(segments)} segment{'s' if len(segments) > 1 else ''}: "
        f"{manifest.index.description})",
    ]
    exact = manifest.exact
    if exact is not None:
        sample = f", eigenvalues corrected on {exact.sample:,} examples" if exact.kind == "ekfac" else ""
        lines.append(
            f"exact        {exact.kind} unprojected, {exact.fisher} Fisher, damping α={exact.damping} over "
            f"{exact.examples:,} examples{sample}; factors {exact.factor_bytes / 2**20:.1f} MiB; "
            f"`query --exact C` re-ranks the top-C"
        )
    point = manifest.index.operating_point
    if point:
        lines.append(
            f"operating    {point.settings}: recall@{point.k} {point.recall:.3f} at {point.ms_per_query:.2f} ms/query "
            f"(measured on {point.queries} queries, target {point.target})"
        )
    drift = hessian.drift
    if drift and drift.max > 0:
        lines.append(
            f"drift        whitening is {drift.median:.2%} (median), {drift.max:.2%} (max) from what the "
            f"current {drift.examples:,} examples imply; `attribindex refresh` re-whitens"
        )
    return lines


def _spectrum(stats: dict) -> str:
    """The median effective rank (Σe / max e) of the per-module Hessians: how many directions matter."""
    if not stats:
        return ""
    ranks = sorted(s.effective_rank for s in stats.values())
    return f"; median effective rank {ranks[len(ranks) // 2]:.1f} of {len(ranks)} module blocks"


@main.command()
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
