"""A model folder with a config and no weights (or no tokenizer): what a plan needs of it, without the weights.

`attribindex plan` sizes a build from module shapes alone; a folder holding only the model's `config.json` (such as
`index_configs/models/llama3-8b/`) is enough. The model is built on the meta device (shapes, no storage) and the
tokenizer, when the folder has none, is a stand-in that knows the vocabulary size and tokenises nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from attribindex.errors import AttribIndexError
from attribindex.model._loading import DTYPES

# Files that hold weights (transformers' save_pretrained, sharded or not, and the older formats it reads).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _local(name_or_path: str) -> Path | None:
    path = Path(name_or_path).expanduser()
    return path if path.is_dir() and (path / "config.json").is_file() else None


def has_weights(name_or_path: str) -> bool:
    """False only for a local folder with a config.json and no weight file; a hub id or anything else is assumed to
    have weights (loading it says otherwise)."""
    folder = _local(name_or_path)
    return folder is None or any(f.name.endswith(WEIGHT_SUFFIXES) for f in folder.iterdir() if f.is_file())


def has_tokenizer(name_or_path: str) -> bool:
    folder = _local(name_or_path)
    return folder is None or any((folder / name).is_file() for name in TOKENIZER_FILES)


@dataclass(frozen=True)
class ConfigOnlyTokenizer:
    """Stands in for a folder's missing tokenizer: its vocabulary size (from the config), no tokenising.

    Example:
        >>> len(ConfigOnlyTokenizer(vocab_size=128256))
        128256
    """

    vocab_size: int
    pad_token_id: int | None = None
    eos_token_id: int | None = None

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, *args, **kwargs):
        raise AttribIndexError(
            "this model folder has a config but no tokenizer, so no text can be tokenised. Give the sizes instead "
            "(`attribindex plan --documents N --tokens-per-document T`), or add the tokenizer's files to the folder."
        )


def model_from_config(name_or_path: str, dtype: str = "float32"):
    """(model, tokenizer) of a local folder with a config.json: the model's modules on the meta device (their shapes,
    no memory), in `dtype`; the folder's own tokenizer when it has one, else a `ConfigOnlyTokenizer`.

    Example:
        >>> lm, tokenizer = model_from_config("index_configs/models/llama3-8b", "bfloat16")  # doctest: +SKIP
        >>> sum(p.numel() for p in lm.parameters())  # doctest: +SKIP
        8030261248
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = _local(name_or_path)
    if folder is None:
        raise AttribIndexError(
            f"{name_or_path!r} is no local folder with a config.json; a model without weights is planned from its "
            f"config. Pass a folder holding the model's config.json."
        )
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise AttribIndexError(
            f"could not read the model config in {folder}: {str(err).strip()[:300]}. Write the model's own "
            f"config.json there (as save_pretrained does)."
        ) from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    if has_tokenizer(str(folder)):
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    else:
        eos = config.eos_token_id if isinstance(config.eos_token_id, int) else None
        tokenizer = ConfigOnlyTokenizer(vocab_size=config.vocab_size, pad_token_id=None, eos_token_id=eos)
    return model.eval(), tokenizer
