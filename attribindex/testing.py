"""Tiny, locally created models, tokenizers and corpora for tests, benchmarks and smoke runs.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained on the generated corpus.

Example:
    >>> from attribindex.testing import make_tiny_model, tiny_corpus
    >>> docs = tiny_corpus(32)
    >>> path = make_tiny_model("/tmp/tiny-gpt2", arch="gpt2", texts=[d["text"] for d in docs])  # doctest: +SKIP
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

_WORDS = [
    "king",
    "queen",
    "crown",
    "sword",
    "love",
    "death",
    "night",
    "day",
    "heaven",
    "earth",
    "blood",
    "honour",
    "grief",
    "joy",
    "fool",
    "wise",
    "storm",
    "sea",
    "ghost",
    "father",
    "son",
    "daughter",
    "mother",
    "brother",
    "sister",
    "lord",
    "lady",
    "knight",
    "war",
    "peace",
    "heart",
    "mind",
    "eye",
    "hand",
    "time",
    "speak",
    "swear",
    "weep",
    "laugh",
    "fight",
    "fly",
    "dream",
    "sleep",
    "wake",
    "die",
    "live",
    "kill",
    "fear",
    "hope",
    "trust",
    "doubt",
    "burn",
    "freeze",
]


def tiny_corpus(n: int, seed: int = 0, min_words: int = 6, max_words: int = 24) -> list[dict]:
    """`n` deterministic pseudo-sentences as {"id", "text", "topic"} records."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        topic = rng.randrange(4)
        words = _WORDS[topic * 16 : topic * 16 + 16] + _WORDS[64:]  # each topic prefers its own words
        length = rng.randint(min_words, max_words)
        text = " ".join(rng.choice(words) for _ in range(length)).capitalize() + "."
        docs.append({"id": f"doc-{i:04d}", "text": text, "topic": topic})
    return docs


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_tokenizer(texts: list[str], vocab_size: int = 256):
    """A byte-level BPE tokenizer trained on `texts`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def make_tiny_model(
    path: str | Path,
    arch: str = "gpt2",
    texts: list[str] | None = None,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    vocab_size: int = 256,
) -> Path:
    """Create and save a randomly initialised causal LM (`gpt2`: Conv1D layers; `llama`: Linear layers)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = make_tokenizer(texts or [d["text"] for d in tiny_corpus(200)], vocab_size)
    torch.manual_seed(seed)
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab,
            n_positions=128,
            n_embd=hidden,
            n_layer=layers,
            n_head=2,
            bos_token_id=eos,
            eos_token_id=eos,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = GPT2LMHeadModel(config)
    elif arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=128,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=eos,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown arch {arch!r}; use 'gpt2' or 'llama'")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def start_server(index: str | Path, *flags: str, timeout_s: float = 60.0):
    """Start `attribindex serve INDEX` as a subprocess on a free loopback port; return (process, url) once
    /health answers. The caller stops it (`process.send_signal(SIGTERM)`); `server_log(process)` is its stderr.

    Example:
        >>> process, url = start_server("demo-index", "--token", "s3cret")  # doctest: +SKIP
    """
    import socket
    import subprocess
    import sys
    import tempfile
    import time

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "attribindex", "serve", str(index), "--port", str(port), *flags]
    # stderr goes to a file that lives as long as the server: an unread pipe would block a chatty one
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
    process.log = log
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {server_log(process)[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the server did not answer /health within {timeout_s:.0f} s")


def server_log(process) -> str:
    """What a server started by `start_server` has written to stderr so far."""
    process.log.seek(0)
    return process.log.read()
