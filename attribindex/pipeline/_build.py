"""`build_index`: a corpus → an attribution index (or one shard of it), in this process or over `torchrun` ranks.

The work is done below: `_single` builds one folder (an index, or shard i of n), `_sharded` builds every shard
over the processes of a launch and merges them (`_merge`); `_output` holds what all of them share.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from attribindex.config import BuildConfig
from attribindex.data import Corpus, open_corpus
from attribindex.errors import AttribIndexError
from attribindex.pipeline._output import ModelCache, build_resource_failures, resolve_model_path
from attribindex.pipeline._sharded import build_sharded
from attribindex.pipeline._single import build_folder
from attribindex.pipeline._summary import BuildSummary
from attribindex.store import ShardSlot


def build_index(
    config: BuildConfig,
    model: str,
    data: str | Path | Corpus,
    out: str | Path,
    *,
    text_field: str = "text",
    id_field: str | None = None,
    split: str = "train",
    limit: int | None = None,
    overwrite: bool = False,
    skip_empty: bool = False,
    progress: bool = True,
    num_shards: int | None = None,
    shard_index: int | None = None,
    keep_shards: bool = False,
) -> BuildSummary:
    """Build an attribution index over a corpus, or one shard of it; resume an interrupted build.

    Args:
        config: the build configuration (see `load_config`).
        model: a local model folder or a hub id.
        data: a `.jsonl` file, a folder of `.txt` files, a saved HF dataset, a hub dataset name, or a Corpus.
        out: the index (or shard) folder. If it holds an interrupted build of the same command, the build
            resumes from its last written chunk.
        overwrite: replace whatever build `out` holds.
        skip_empty: leave out documents that tokenise to nothing instead of failing.
        num_shards, shard_index: with both, build only shard `shard_index` (a contiguous slice) into `out`,
            to be merged with `merge_shards`. With `num_shards` alone, build all shards — spread over the
            processes of a `torchrun` launch when there is one — and merge them into `out`.
        keep_shards: keep the shard folders (`out/shards/`) after a multi-shard build has merged them.

    Example:
        >>> from attribindex import build_index, load_config
        >>> build_index(load_config("tiny"), "./tiny-gpt2", "corpus.jsonl", "idx")  # doctest: +SKIP
        >>> build_index(load_config("tiny"), "./tiny-gpt2", "corpus.jsonl", "s1", num_shards=4, shard_index=1)  # doctest: +SKIP
    """
    _warn_about_precision(config)
    if shard_index is not None and num_shards is None:
        raise AttribIndexError("`shard_index` needs `num_shards`: say how many shards the corpus is split into.")
    out = Path(out)
    with build_resource_failures(out, config):
        corpus = data if isinstance(data, Corpus) else open_corpus(data, text_field, id_field, split, limit)
        model = resolve_model_path(model)
        if num_shards is not None and shard_index is None:
            return build_sharded(config, model, corpus, out, num_shards, overwrite, skip_empty, progress, keep_shards)
        shard = ShardSlot(index=shard_index, count=num_shards) if num_shards is not None else None
        return build_folder(config, model, corpus, out, overwrite, skip_empty, progress, shard, ModelCache())


def _warn_about_precision(config: BuildConfig) -> None:
    # bfloat16 rounds each raw gradient to 8 bits of mantissa before whitening amplifies its small directions:
    # at damping 0.01 with the `raw` Hessian, top-10 agreement with a float32 store fell to 0.84 (float16: 0.96),
    # tools/bench_store_precision.py and docs/quality.md.
    if config.store.dtype == "bfloat16" and config.hessian.kind == "raw" and config.hessian.damping < 0.1:
        warnings.warn(
            f"store.dtype bfloat16 with hessian.kind raw and damping {config.hessian.damping} < 0.1 loses top-k "
            "agreement (0.84 of a float32 store's top-10 at damping 0.01, docs/quality.md). Use store.dtype: "
            "float16 (the same 2 bytes, scaled per row and module), or float32.",
            UserWarning,
            stacklevel=3,
        )
