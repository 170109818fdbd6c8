"""Corpus readers: jsonl files, folders of .txt files, HF datasets on disk or on the hub; and a .jsonl writer.

Every document gets a stable external id (from the corpus, or a content hash) and a `source`
pointer back to where its text came from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attribindex.data._seen_ids import SeenIds
from attribindex.errors import AttribIndexError


@dataclass(frozen=True)
class Document:
    """One training example.

    Example:
        >>> Document(id="doc-1", text="To be, or not to be", source="plays.jsonl:1")
        Document(id='doc-1', text='To be, or not to be', source='plays.jsonl:1')
    """

    id: str
    text: str
    source: str


def content_id(text: str) -> str:
    """A stable id derived from the text alone (used when the corpus has no id field)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class Corpus:
    """An iterable of Documents with a known length when the source has one.

    Use `open_corpus` to make one. Iterating twice yields the same documents in the same order.
    """

    def __init__(
        self,
        description: str,
        records: Callable[[], Iterator[tuple[str, Any]]],
        text_field: str,
        id_field: str | None,
        limit: int | None,
        available: int | None,
    ):
        self.description = description
        self._records = records  # yields (source pointer, record dict)
        self.text_field = text_field
        self.id_field = id_field
        self.limit = limit
        self._available = available
        self._length = available if limit is None or available is None else min(available, limit)
        # Documents of the whole corpus, of which a `window` is a part (a streamed one: at most `limit`, or None).
        self.whole_length = self._length if self._length is not None else limit
        self.start, self.stop = 0, None  # the positions this view covers (see `window`)

    def __len__(self) -> int:
        if self._length is None:
            raise TypeError("length unknown for a streaming corpus")
        return self._length

    def known_length(self) -> int | None:
        """Number of documents, or None for a streaming corpus."""
        return self._length

    def window(self, start: int, stop: int) -> Corpus:
        """The documents at positions [start, stop) of this corpus, with the ids they have in the whole corpus.

        Example:
            >>> corpus.window(100, 200).known_length()  # doctest: +SKIP
            100
        """
        view = Corpus(self.description, self._records, self.text_field, self.id_field, self.limit, self._available)
        view.start, view.stop = start, stop
        total = self._length if self._length is not None else stop
        view._length = max(0, min(stop, total) - start)
        return view

    def __iter__(self) -> Iterator[Document]:
        for _, document in self.numbered():
            yield document

    def numbered(self, first: int = 0) -> Iterator[tuple[int, Document]]:
        """(position in the whole corpus, document) for the documents of this view at positions >= `first`.

        Earlier records are still read: content-hash ids of repeated texts depend on every record before.
        """
        seen = SeenIds()
        count = 0
        for position, (source, record) in enumerate(self._records()):
            if (self.limit is not None and position >= self.limit) or (self.stop is not None and position >= self.stop):
                break
            document = self._to_document(source, record, seen)
            count += 1
            if position >= max(first, self.start):
                yield position, document
        if count == 0:
            raise AttribIndexError(f"the corpus {self.description} holds no documents. Give a non-empty corpus.")

    def _to_document(self, source: str, record: Any, seen: SeenIds) -> Document:
        if not isinstance(record, dict):
            raise AttribIndexError(
                f"{source}: expected a JSON object per record, got {type(record).__name__}. "
                f'Write one JSON object per line, e.g. {{"{self.text_field}": "...", "id": "..."}}.'
            )
        if self.text_field not in record:
            fields = ", ".join(sorted(map(str, record))) or "(none)"
            raise AttribIndexError(
                f"{source}: no field {self.text_field!r} in the record. Fields present: {fields}. "
                f"Choose the text field with `text_field`."
            )
        text = record[self.text_field]
        if not isinstance(text, str):
            raise AttribIndexError(
                f"{source}: field {self.text_field!r} is {type(text).__name__}, not a string. Fix the record, or "
                f"choose the field that holds the text with `text_field`."
            )
        if self.id_field is not None:
            if record.get(self.id_field) is None:
                raise AttribIndexError(
                    f"{source}: no id field {self.id_field!r} in the record. "
                    f"Fix the record, or leave `id_field` out to use content-hash ids."
                )
            doc_id = self._checked_id(source, record[self.id_field])
            if (first := seen.position(doc_id)) is not None:
                raise AttribIndexError(
                    f"{source}: duplicate id {doc_id!r} (first seen at record {first}). Ids must be unique: "
                    f"fix the corpus, or leave `id_field` out to use content-hash ids."
                )
        else:
            doc_id = base_id = content_id(text)
            copy = 1
            while doc_id in seen:  # an exact duplicate text: keep it, under a distinct but stable id
                copy += 1
                doc_id = f"{base_id}~{copy}"
        seen.add(doc_id)
        return Document(id=doc_id, text=text, source=source)

    def _checked_id(self, source: str, value: Any) -> str:
        """The id as a string. Strings and integers (even mixed: 7 and "b") are ids; a float, bool, list or object
        is a broken export (an integer column with gaps becomes 3.0, an id "3.0" that matches nothing the user
        has), refused rather than turned into such a string. 7 next to "7" is a duplicate."""
        if type(value) not in (str, int):
            raise AttribIndexError(
                f"{source}: id field {self.id_field!r} is {type(value).__name__} ({value!r}); ids must be strings or "
                f'integers. Fix the corpus (e.g. write 3.0 as 3 or "3"), or leave `id_field` out to use '
                f"content-hash ids."
            )
        return str(value)


def _jsonl_records(path: Path):
    def records():
        with path.open("rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise AttribIndexError(
                        f"{path}:{line_no} is not valid UTF-8 ({err.reason} at byte {err.start}). "
                        f"Re-encode the file, e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`."
                    ) from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise AttribIndexError(
                        f"{path}:{line_no} is not valid JSON ({err.msg}). Fix or remove that line."
                    ) from None
                yield f"{path.name}:{line_no}", record

    return records


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    """Write `records` as a .jsonl corpus (one JSON object per line, the form `open_corpus` reads), creating the
    folders above it; returns the path.

    Example:
        >>> write_jsonl("corpus.jsonl", [{"id": "doc-1", "text": "To be, or not to be"}])  # doctest: +SKIP
        PosixPath('corpus.jsonl')
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _txt_folder_records(folder: Path, files: list[Path]):
    def records():
        for file in files:
            rel = file.relative_to(folder).as_posix()
            try:
                text = file.read_bytes().decode("utf-8")
            except UnicodeDecodeError as err:
                raise AttribIndexError(
                    f"{file} is not valid UTF-8 ({err.reason} at byte {err.start}). "
                    f"Re-encode it, e.g. `iconv -f latin1 -t utf-8`, or remove it from the folder."
                ) from None
            yield rel, {"text": text, "id": rel}

    return records


def _dataset_records(dataset: Any, name: str):
    def records():
        for i, record in enumerate(dataset):
            yield f"{name}[{i}]", record

    return records


def _load_hf_dataset(data: str, split: str, on_disk: bool):
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a hard dependency
        raise AttribIndexError("reading HF datasets needs `pip install datasets`.") from None
    try:
        if on_disk:
            loaded = datasets.load_from_disk(data)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise AttribIndexError(
                        f"dataset {data} has no split {split!r}; splits: {', '.join(loaded)}. Choose one with `split`."
                    )
                loaded = loaded[split]
            return loaded
        return datasets.load_dataset(data, split=split, streaming=True)
    except AttribIndexError:
        raise
    except Exception as err:  # datasets raises many types; the user needs the cause, not the stack
        raise AttribIndexError(
            f"could not load dataset {data!r} ({type(err).__name__}: {err}). Check the name or path, the split "
            f"{split!r}, and network access for hub datasets."
        ) from None


def open_corpus(
    data: str | Path,
    text_field: str = "text",
    id_field: str | None = None,
    split: str = "train",
    limit: int | None = None,
) -> Corpus:
    """Open a corpus: a `.jsonl` file, a folder of `.txt` files, an HF dataset saved with
    `save_to_disk`, or a hub dataset name (streamed).

    Example:
        >>> corpus = open_corpus("corpus.jsonl", text_field="text", id_field="id")  # doctest: +SKIP
        >>> next(iter(corpus)).id  # doctest: +SKIP
        'doc-1'
    """
    if limit is not None and limit < 1:
        raise AttribIndexError(f"`limit` must be >= 1, got {limit}.")
    path = Path(data)
    if path.is_file():
        if path.suffix != ".jsonl":
            raise AttribIndexError(
                f"{path}: unsupported file type {path.suffix!r}. Use a .jsonl file (one JSON object per line)."
            )
        with path.open("rb") as handle:
            lines = sum(1 for raw in handle if raw.strip())
        corpus = Corpus(str(path), _jsonl_records(path), text_field, id_field, limit, lines)
    elif path.is_dir():
        markers = ("dataset_info.json", "state.json", "dataset_dict.json")
        if any((path / m).exists() for m in markers):
            dataset = _load_hf_dataset(str(path), split, on_disk=True)
            name = f"{path} (split {split})" if (path / "dataset_dict.json").exists() else str(path)
            corpus = Corpus(name, _dataset_records(dataset, path.name), text_field, id_field, limit, len(dataset))
        else:
            files = sorted(path.rglob("*.txt"))
            if not files:
                raise AttribIndexError(
                    f"folder {path} holds no .txt files and is not a saved HF dataset. "
                    f"Point at a .jsonl file, a folder of .txt files, or a dataset saved with save_to_disk."
                )
            corpus = Corpus(str(path), _txt_folder_records(path, files), "text", "id", limit, len(files))
    elif str(data).startswith((".", "/", "~")) or str(data).endswith((".jsonl", ".json", ".txt")):
        raise AttribIndexError(f"corpus {str(data)!r} does not exist. Check the path.")
    else:
        dataset = _load_hf_dataset(str(data), split, on_disk=False)
        name = f"{data} (split {split})"
        corpus = Corpus(name, _dataset_records(dataset, str(data)), text_field, id_field, limit, None)
    return corpus


def shard_window(corpus: Corpus, count: int, index: int) -> Corpus:
    """Shard `index` of `count`: a contiguous slice, so shards concatenated in index order are the corpus.

    Example:
        >>> shard_window(open_corpus("corpus.jsonl"), count=4, index=1).start  # doctest: +SKIP
        250
    """
    if count < 1 or not 0 <= index < count:
        raise AttribIndexError(f"`shard_index` must be in [0, {count}) for `num_shards={count}`, got {index}.")
    length = corpus.known_length() if corpus.known_length() is not None else corpus.limit
    if length is None:
        raise AttribIndexError(
            f"sharding needs to know how many documents {corpus.description} holds, and a streamed dataset does not "
            f"say. Pass `limit=N` (shards then split the first N documents), or save the dataset to disk first."
        )
    start, stop = index * length // count, (index + 1) * length // count
    if start == stop:
        raise AttribIndexError(
            f"shard {index} of {count} would be empty: the corpus has only {length} documents. Use fewer shards."
        )
    return corpus.window(start, stop)
