"""Tiny, locally created models, tokenizers and corpora for tests, benchmarks and smoke runs.

Nothing here downloads anything: tokenizers (byte-level BPE, or SentencePiece-style Unigram) are trained on
the given texts.

Example:
    >>> from attribindex.testing import make_tiny_model, tiny_corpus
    >>> docs = tiny_corpus(32)
    >>> path = make_tiny_model("/tmp/tiny-gpt2", arch="gpt2", texts=[d["text"] for d in docs])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path

import torch

from attribindex.data import write_jsonl as write_jsonl  # production code, re-exported for tests and tools

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


def make_sentencepiece_tokenizer(texts: list[str], vocab_size: int = 200):
    """A Llama-style SentencePiece tokenizer (Unigram model, "▁" word-start marker, BOS added) trained on `texts`.

    It shows what a byte-level BPE hides: a text's first word gets the "▁" marker too, so tokenising a
    completion on its own adds a token that the joined text does not have.

    Example:
        >>> tokenizer = make_sentencepiece_tokenizer([d["text"] for d in tiny_corpus(50)])
        >>> tokenizer.convert_ids_to_tokens(tokenizer("king")["input_ids"])[0]
        '<s>'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    unigram = Tokenizer(models.Unigram())
    # prepend_scheme "first": only the text's start gets a "▁" (like Llama/SentencePiece add_dummy_prefix)
    unigram.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    unigram.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>", shrinking_factor=0.75
    )
    unigram.train_from_iterator(texts, trainer=trainer)
    bos = unigram.token_to_id("<s>")
    unigram.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=unigram, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def make_tiny_model(
    path: str | Path,
    arch: str = "gpt2",
    texts: list[str] | None = None,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    vocab_size: int = 256,
    tokenizer: str = "byte-bpe",
) -> Path:
    """Create and save a randomly initialised causal LM (`gpt2`: Conv1D layers; `llama`, `qwen2`, `gpt_neox`: Linear
    layers) with a tokenizer trained on `texts`: `"byte-bpe"` (GPT-2 style) or `"sentencepiece"` (Llama style,
    see `make_sentencepiece_tokenizer`).

    Example:
        >>> make_tiny_model("/tmp/tiny-llama", arch="llama", tokenizer="sentencepiece")  # doctest: +SKIP
        PosixPath('/tmp/tiny-llama')
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    path = Path(path)
    texts = texts or [d["text"] for d in tiny_corpus(200)]
    if tokenizer == "byte-bpe":
        made = make_tokenizer(texts, vocab_size)
    elif tokenizer == "sentencepiece":
        made = make_sentencepiece_tokenizer(texts, vocab_size)
    else:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; use 'byte-bpe' or 'sentencepiece'")
    torch.manual_seed(seed)
    vocab = len(made)
    eos, bos = made.eos_token_id, made.bos_token_id
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab,
            n_positions=128,
            n_embd=hidden,
            n_layer=layers,
            n_head=2,
            bos_token_id=bos,
            eos_token_id=eos,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = GPT2LMHeadModel(config)
    elif arch in ("llama", "qwen2", "gpt_neox"):  # Qwen2: q/k/v biases; GPT-NeoX (Pythia): its head is `embed_out`
        config = AutoConfig.for_model(
            arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            max_position_embeddings=128,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
            tie_word_embeddings=False,
            **({} if arch == "gpt_neox" else {"num_key_value_heads": 1}),
        )
        model = AutoModelForCausalLM.from_config(config)
    else:
        raise ValueError(f"unknown arch {arch!r}; use 'gpt2', 'llama', 'qwen2' or 'gpt_neox'")
    model.save_pretrained(path)
    made.save_pretrained(path)
    return path


def start_server(index: str | Path, *flags: str, timeout_s: float = 60.0, prelude: str = ""):
    """Start `attribindex serve INDEX` as a subprocess on a free loopback port; return (process, url) once
    /health answers. The caller stops it (`process.send_signal(SIGTERM)`); `server_log(process)` is its stderr.
    `prelude`: Python code the process runs before the command line (a test's hold on the model pass, say).

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
    arguments = ["serve", str(index), "--port", str(port), *flags]
    if prelude:  # then the command line, as `python -m attribindex` runs it
        run_cli = "import runpy; runpy.run_module('attribindex', run_name='__main__', alter_sys=True)"
        command = [sys.executable, "-c", f"{prelude}\n{run_cli}", *arguments]
    else:
        command = [sys.executable, "-m", "attribindex", *arguments]
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


@contextlib.contextmanager
def serving(index: str | Path, **options) -> Iterator[str]:
    """The server `attribindex serve INDEX` runs (`create_server(index, **options)`: the same uvicorn server and
    app), run from a thread of this process on a free loopback port; yields its URL and stops it on leaving. For
    tests about what a server answers; `start_server` starts the process itself.

    Example:
        >>> with serving("demo-index", token="s3cret") as url:  # doctest: +SKIP
        ...     Client(url, token="s3cret").attribute(["a line"], k=3)
    """
    import socket
    import threading
    import time

    from attribindex.serve._run import create_server

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        server = create_server(index, "127.0.0.1", listening.getsockname()[1], **options)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process server did not start (see its log above)")
            time.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{listening.getsockname()[1]}"
        finally:
            server.should_exit = True
            thread.join(timeout=60)


def server_log(process) -> str:
    """What a server started by `start_server` has written to stderr so far."""
    process.log.seek(0)
    return process.log.read()
