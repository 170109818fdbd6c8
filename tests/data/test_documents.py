"""Corpus readers: jsonl, .txt folders, saved HF datasets; stable ids; clear errors on bad input."""

from __future__ import annotations

import logging

import pytest
from transformers import AutoTokenizer

from attribindex import build_index, load_config
from attribindex.data import PromptCompletion, content_id, open_corpus, shard_window, tokenize
from attribindex.errors import AttribIndexError
from attribindex.testing import make_tiny_model, make_tokenizer, tiny_corpus, write_jsonl


def test_jsonl_with_and_without_id_field(tmp_path):
    path = write_jsonl(
        tmp_path / "c.jsonl", [{"id": 7, "text": "alpha"}, {"id": "b", "text": "beta"}, {"id": 9, "text": "alpha"}]
    )
    assert [d.id for d in open_corpus(path, id_field="id")] == ["7", "b", "9"]
    hashed = [d.id for d in open_corpus(path)]
    assert hashed[0] == content_id("alpha") and hashed[2] == content_id("alpha") + "~2"  # duplicate text, distinct id
    assert [d.source for d in open_corpus(path, limit=2)] == ["c.jsonl:1", "c.jsonl:2"]
    assert len(open_corpus(path, limit=2)) == 2


def test_txt_folder_uses_relative_paths_as_ids(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "sub" / "a.txt").write_text("first")
    docs = list(open_corpus(tmp_path))
    assert [(d.id, d.text) for d in docs] == [("b.txt", "second"), ("sub/a.txt", "first")]


def test_saved_hf_dataset(tmp_path):
    import datasets

    dataset = datasets.Dataset.from_dict({"content": ["one two", "three four"], "key": ["k1", "k2"]})
    dataset.save_to_disk(str(tmp_path / "ds"))
    docs = list(open_corpus(tmp_path / "ds", text_field="content", id_field="key"))
    assert [(d.id, d.text) for d in docs] == [("k1", "one two"), ("k2", "three four")]
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "dd"))
    assert len(list(open_corpus(tmp_path / "dd", text_field="content"))) == 2
    with pytest.raises(AttribIndexError, match="no split 'test'"):
        open_corpus(tmp_path / "dd", text_field="content", split="test")


@pytest.mark.parametrize(
    ("content", "kwargs", "message"),
    [
        (b"", {}, "holds no documents"),
        (b'{"body": "x"}\n', {}, "no field 'text' in the record. Fields present: body"),
        (b'{"text": "caf\xe9"}\n', {}, "not valid UTF-8"),
        (b'{"text": "x"\n', {}, "not valid JSON"),
        (b'{"text": 5}\n', {}, "is int, not a string"),
        (b'{"text": "a", "id": 1}\n{"text": "b", "id": 1}\n', {"id_field": "id"}, "duplicate id '1'"),
        (b'{"text": "a"}\n', {"id_field": "id"}, "no id field 'id'"),
    ],
)
def test_bad_jsonl_gives_a_clear_error(tmp_path, content, kwargs, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(AttribIndexError, match=message):
        list(open_corpus(path, **kwargs))


def test_bad_paths(tmp_path):
    with pytest.raises(AttribIndexError, match="does not exist"):
        open_corpus(tmp_path / "missing.jsonl")
    with pytest.raises(AttribIndexError, match="holds no .txt files"):
        open_corpus(tmp_path)
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(AttribIndexError, match="unsupported file type"):
        open_corpus(tmp_path / "x.csv")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    with pytest.raises(AttribIndexError, match="latin.txt is not valid UTF-8"):
        list(open_corpus(tmp_path))


def test_tokenize_masks_prompt_and_refuses_empty():
    tokenizer = make_tokenizer(["hello world, the quick brown fox"] * 5, vocab_size=300)
    pair = tokenize(tokenizer, PromptCompletion("hello", " world"), 32, "q")
    prompt_len = len(tokenizer("hello")["input_ids"])
    assert pair.loss_mask[:prompt_len] == [0] * prompt_len and all(pair.loss_mask[prompt_len:])
    plain = tokenize(tokenizer, "hello world", 32, "d")
    assert plain.loss_mask[0] == 0 and all(plain.loss_mask[1:]) and not plain.truncated
    cut = tokenize(tokenizer, "hello world, the quick brown fox", 3, "d")
    assert len(cut.input_ids) == len(cut.loss_mask) == 3 and cut.truncated
    with pytest.raises(AttribIndexError, match="doc 'e': no token carries loss"):
        tokenize(tokenizer, "", 32, "doc 'e'")
    with pytest.raises(AttribIndexError, match="completion is empty"):
        tokenize(tokenizer, PromptCompletion("hello world the quick", ""), 32, "q")
    # a completion past max_length is not cut away: the prompt's start is (tests/query/test_tokenization.py)
    assert sum(tokenize(tokenizer, PromptCompletion("hello world the quick", " fox"), 2, "q").loss_mask) >= 1


def test_hub_dataset_without_network_is_a_clean_error():
    with pytest.raises(AttribIndexError, match="could not load dataset 'someone/no-such-dataset'"):
        open_corpus("someone/no-such-dataset")


def test_shards_are_contiguous_and_keep_whole_corpus_ids(tmp_path):
    texts = ["alpha", "beta", "alpha", "gamma", "alpha", "delta", "beta"]
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    whole = [(d.id, d.source) for d in open_corpus(path)]
    pieces = [shard_window(open_corpus(path), 3, i) for i in range(3)]
    assert [(p.start, p.stop, p.known_length()) for p in pieces] == [(0, 2, 2), (2, 4, 2), (4, 7, 3)]
    assert [(d.id, d.source) for p in pieces for d in p] == whole  # a repeated text keeps its ~2/~3 id in its shard
    assert [pos for pos, _ in pieces[2].numbered(first=5)] == [5, 6]  # resuming inside a shard


def test_shard_errors(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in ("a b", "c d")])
    with pytest.raises(AttribIndexError, match="shard 0 of 3 would be empty: the corpus has only 2 documents"):
        shard_window(open_corpus(path), 3, 0)
    with pytest.raises(AttribIndexError, match=r"`shard_index` must be in \[0, 2\)"):
        shard_window(open_corpus(path), 2, 2)


class _Log(logging.Handler):
    """Collects the messages transformers logs (its own handler writes to a stream pytest may not see)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_log():
    log, logger = _Log(), logging.getLogger("transformers")
    logger.addHandler(log)
    yield log
    logger.removeHandler(log)


def test_long_documents_are_truncated_without_the_too_long_warning(tmp_path, capfd, transformers_log):
    texts = [d["text"] for d in tiny_corpus(50)]
    long_text = " ".join(texts[:20])  # hundreds of tokens
    tokenizer = make_tokenizer(texts)
    tokenizer.model_max_length = 16  # the model's limit: the text is far longer
    cut = tokenize(tokenizer, long_text, 12, "d")
    assert cut.truncated and len(cut.input_ids) == 12
    assert cut.input_ids == tokenizer(long_text, verbose=False)["input_ids"][:12]
    pair = tokenize(tokenizer, PromptCompletion("King", " " + long_text), 12, "q")
    assert pair.truncated and sum(pair.loss_mask) == 12 - len(tokenizer("King")["input_ids"])

    # A whole build over long documents prints it neither (once per tokenizer, so a fresh model folder).
    model = make_tiny_model(tmp_path / "model", texts=texts, hidden=8, layers=1)
    saved = AutoTokenizer.from_pretrained(model)
    saved.model_max_length = 16
    saved.save_pretrained(model)
    corpus = write_jsonl(tmp_path / "long.jsonl", [{"text": long_text}, {"text": " ".join(texts[20:40])}])
    build_index(load_config("tiny"), str(model), corpus, tmp_path / "idx", progress=False)
    assert not [m for m in transformers_log.messages if "sequence length is longer" in m]
    assert "sequence length is longer" not in "".join(capfd.readouterr())

    # The capture works: a fresh tokenizer called plainly does print it.
    plain = make_tokenizer(texts)
    plain.model_max_length = 16
    plain(long_text)
    assert [m for m in transformers_log.messages if "sequence length is longer" in m]
