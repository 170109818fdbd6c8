"""Loading a Hugging Face causal LM (hub id or local path) and fingerprinting it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from attribindex.errors import AttribIndexError

ADAPTER_CONFIG = "adapter_config.json"  # what makes a folder a PEFT adapter
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise AttribIndexError("device 'cuda' was asked for but no CUDA GPU is visible. Use device: auto or cpu.")
    return torch.device(device)


def load_model(name_or_path: str, dtype: str = "float32", device: str = "auto", revision: str | None = None):
    """Load (model, tokenizer) from a local folder or a hub id, in eval mode on `device`.

    Example:
        >>> model, tokenizer = load_model("./tiny-gpt2", dtype="float64", device="cpu")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars report progress; per-shard loading bars are noise

    local = Path(name_or_path).expanduser()
    looks_local = local.exists() or str(name_or_path).startswith((".", "/", "~"))
    if looks_local and (local / ADAPTER_CONFIG).is_file() and not (local / "config.json").is_file():
        return _load_adapter(local, dtype, device)
    if looks_local and not (local / "config.json").is_file():
        raise AttribIndexError(
            f"model folder {name_or_path!r} does not exist or has no config.json. Pass a folder saved with "
            f"save_pretrained, or a hub id such as 'gpt2'."
        )
    if looks_local:
        files = [f for f in local.iterdir() if f.is_file() and not f.name.startswith(".")]
        empty = sorted(f.name for f in files if f.stat().st_size == 0)
        if empty:  # transformers would call a 0-byte config "not valid JSON" and 0-byte weights worse
            raise AttribIndexError(
                f"model folder {name_or_path!r} has empty (0 bytes) files: {', '.join(empty)}; an interrupted copy "
                f"or download? Copy or download the model again (save_pretrained writes complete files)."
            )
    source = str(local) if looks_local else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=DTYPES[dtype])
    except OSError as err:
        raise AttribIndexError(
            f"could not load model {name_or_path!r}: {str(err).strip().rstrip('.')}. Check the path or hub id "
            f"(hub ids need network access, or a copy in the local HF cache)."
        ) from None
    rows = getattr(model.get_input_embeddings(), "num_embeddings", None)
    # The base vocabulary, not len(tokenizer): added special tokens (chat markers) that a model was saved without
    # resizing for are common and harmless unless they occur; a larger base vocabulary is another model's tokenizer.
    if rows is not None and tokenizer.vocab_size > rows:
        raise AttribIndexError(
            f"the tokenizer of {name_or_path!r} has {tokenizer.vocab_size} tokens but the model's input embedding has "
            f"{rows} rows: it is another model's tokenizer, or tokens were added without resizing. Save the model's "
            f"own tokenizer with it, or call model.resize_token_embeddings(len(tokenizer)) and save both."
        )
    if tokenizer.pad_token_id is None:  # most causal LMs have none; padded positions are masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(resolve_device(device)).eval(), tokenizer


def _load_adapter(folder: Path, dtype: str, device: str):
    """(PeftModel, tokenizer) from a PEFT adapter folder (peft's own convention: `adapter_config.json` names the base
    model in `base_model_name_or_path`); the tokenizer is the folder's own when it has one, else the base model's."""
    try:
        from peft import PeftModel
    except ImportError:
        raise AttribIndexError(
            f"{folder} is a PEFT adapter folder, and loading it needs peft: pip install 'attribindex[peft]' "
            "(or pip install peft)."
        ) from None
    settings = json.loads((folder / ADAPTER_CONFIG).read_text())
    base = settings.get("base_model_name_or_path")
    if not base:
        raise AttribIndexError(
            f"{folder / ADAPTER_CONFIG} names no base model (base_model_name_or_path). Write the base model's path "
            "or hub id there."
        )
    if settings.get("peft_type", "LORA") != "LORA":
        raise AttribIndexError(
            f"{folder} holds a {settings['peft_type']} adapter; attribindex captures LoRA adapters only. Merge the "
            "adapter into the model (merge_and_unload) and index the merged model."
        )
    base_path = Path(base).expanduser()
    if not base_path.is_absolute() and (folder / base_path / "config.json").is_file():
        base = str(folder / base_path)  # a base model saved next to the adapter, named relative to it
    try:
        model, tokenizer = load_model(base, dtype, "cpu")
    except AttribIndexError as err:
        raise AttribIndexError(
            f"the base model of adapter {folder} could not be loaded ({err}) Fix base_model_name_or_path in "
            f"{folder / ADAPTER_CONFIG}, or put the base model where it points."
        ) from None
    if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    try:
        adapted = PeftModel.from_pretrained(model, str(folder))
    except (OSError, ValueError) as err:
        raise AttribIndexError(
            f"the adapter in {folder} could not be loaded onto {base}: {str(err).strip()[:300]}. Save the adapter "
            "again with save_pretrained (adapter_config.json and adapter_model.safetensors)."
        ) from None
    return adapted.to(resolve_device(device)).eval(), tokenizer


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the architecture and the weights (a strided sample of each tensor, for speed).

    Checkpoints that differ in architecture, shapes, or values at the sampled positions (which
    include every tensor's first and last elements) get different fingerprints. Sampled values are
    rounded to bfloat16 first, so one checkpoint loaded in float32, float64 or bfloat16 (e.g. built on
    a GPU in bf16, queried on a CPU in fp32) keeps one fingerprint.
    """
    digest = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        settings = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
        for volatile in ("dtype", "torch_dtype", "transformers_version", "use_cache"):
            settings.pop(volatile, None)
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        if flat.numel() == 0:
            continue
        stride = max(1, flat.numel() // 4096)
        sample = torch.cat([flat[::stride], flat[-1:]]).to("cpu").to(torch.bfloat16).to(torch.float64)
        digest.update(sample.numpy().tobytes())
    return "sha256:" + digest.hexdigest()
