"""A (prompt, completion) query is tokenised as the joined text, with the loss on the completion's tokens only,
for SentencePiece-style (Llama) and byte-level BPE (GPT-2) tokenizers, fast and slow."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import PythonBackend

from attribindex import AttributionIndex, PromptCompletion, build_index
from attribindex.data import encode_texts, tokenize
from attribindex.testing import make_sentencepiece_tokenizer, make_tiny_model, make_tokenizer, tiny_corpus, write_jsonl
from tests.conftest import exact_config
from tests.reference import brute_force_scores, explicit_projected_gradients

TEXTS = [d["text"] for d in tiny_corpus(200)]
# Prompts end at a word; completions start with the space before the next word, the usual way to split a pair.
PAIRS = [
    PromptCompletion("Ghost father son", " daughter mother brother."),
    PromptCompletion("King queen crown sword love death", " night."),
    PromptCompletion("", "Storm sea ghost."),  # no prompt: every token after the first counts
]


def _tokenizers():
    # 400 > the 256 byte symbols, so the byte BPE learns merges (whole words) too
    return {"sentencepiece": make_sentencepiece_tokenizer(TEXTS), "byte-bpe": make_tokenizer(TEXTS, vocab_size=400)}


def _completion_start(tokenizer, pair: PromptCompletion) -> int:
    """First position of the completion's tokens, found from decoded text (not from offsets): the shortest prefix
    of the joined ids that decodes to the prompt."""
    ids = tokenizer(pair.prompt + pair.completion)["input_ids"]
    for start in range(len(ids) + 1):
        if tokenizer.decode(ids[:start], skip_special_tokens=True) == pair.prompt.strip():
            decoded_rest = tokenizer.decode(ids[start:], skip_special_tokens=True)
            if decoded_rest.strip() == pair.completion.strip():
                return start
    raise AssertionError(f"no token boundary at the end of the prompt {pair.prompt!r}")


@pytest.mark.parametrize("kind", ["sentencepiece", "byte-bpe"])
def test_texts_encoded_in_one_call_get_the_ids_each_gets_alone(kind):
    """`GradientExtractor.tokenize` encodes a batch of texts at once (`encode_texts`); no padding, nothing cut."""
    tokenizer = _tokenizers()[kind]
    texts = TEXTS[:20] + ["", "x", " ".join(TEXTS[:40]), "Naïve café — “quoted” 東京 🙂"]
    assert encode_texts(tokenizer, texts) == [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    alone = [tokenize(tokenizer, t, 16, f"text {i}") for i, t in enumerate(texts[:20])]
    batch = encode_texts(tokenizer, texts[:20])
    assert [tokenize(tokenizer, t, 16, f"text {i}", ids) for i, (t, ids) in enumerate(zip(texts, batch))] == alone


@pytest.mark.parametrize("kind", ["sentencepiece", "byte-bpe"])
def test_pair_is_the_joined_text_with_loss_on_the_completion_tokens(kind):
    tokenizer = _tokenizers()[kind]
    for pair in PAIRS:
        example = tokenize(tokenizer, pair, 64, "query")
        assert example.input_ids == tokenizer(pair.prompt + pair.completion)["input_ids"]
        start = max(1, _completion_start(tokenizer, pair))  # position 0 is never a prediction target
        assert example.loss_mask == [0] * start + [1] * (len(example.input_ids) - start), pair


@pytest.mark.parametrize("kind", ["sentencepiece", "byte-bpe"])
def test_a_prompt_too_long_for_max_length_loses_its_start_not_the_completion(kind):
    """A few-shot prompt past max_length: its first tokens go (a leading BOS stays), the completion stays whole."""
    tokenizer = _tokenizers()[kind]
    pair = PromptCompletion(" ".join(TEXTS[:30]), " daughter mother brother.")
    whole = tokenize(tokenizer, pair, 10_000, "query")
    completion = whole.loss_mask.count(1)
    example = tokenize(tokenizer, pair, 32, "query")
    assert len(example.input_ids) == 32 and example.truncated and example.loss_mask.count(1) == completion
    assert example.input_ids[-completion:] == whole.input_ids[-completion:]  # the completion, whole, at the end
    bos = whole.input_ids[0] in tokenizer.all_special_ids
    assert example.input_ids[: int(bos)] == whole.input_ids[: int(bos)]
    assert example.input_ids[int(bos) :] == whole.input_ids[len(whole.input_ids) - 32 + int(bos) :]


def test_separate_tokenisation_would_add_a_word_start_marker():
    # What joined tokenisation fixes: SentencePiece marks the start of any text it is given, so the completion
    # tokenised alone starts with an extra "▁" (or a different merge) that the model never reads in the joined text.
    tokenizer = make_sentencepiece_tokenizer(TEXTS)
    pair = PromptCompletion("King queen crown ", "sword love.")
    joined = tokenize(tokenizer, pair, 64, "query").input_ids
    separate = tokenizer(pair.prompt)["input_ids"] + tokenizer(pair.completion, add_special_tokens=False)["input_ids"]
    assert joined == tokenizer(pair.prompt + pair.completion)["input_ids"] != separate


@pytest.mark.parametrize("kind", ["sentencepiece", "byte-bpe"])
def test_a_token_straddling_the_boundary_counts_for_the_completion(kind):
    tokenizer = _tokenizers()[kind]
    # "crown " + "sword" is read as " sword" (byte BPE) or "▁sword" (SentencePiece): one token holding the prompt's
    # last character and the completion's first ones. It carries loss: it is how the model emits the completion.
    pair = PromptCompletion("King queen crown ", "sword love.")
    encoded = tokenizer(pair.prompt + pair.completion, return_offsets_mapping=True)
    straddling = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < len(pair.prompt) < b]
    assert straddling, "the example no longer straddles; pick another"
    example = tokenize(tokenizer, pair, 64, "query")
    first = straddling[0]
    assert example.loss_mask == [0] * first + [1] * (len(example.input_ids) - first)
    # The completion can be a single fused token and still carry loss.
    assert sum(tokenize(tokenizer, PromptCompletion("King queen crown ", "sword"), 64, "q").loss_mask) >= 1


class _CharTokenizer(PythonBackend):
    """A slow (pure Python) character tokenizer with a BOS token: no offsets, so `tokenize` takes its fallback."""

    def __init__(self, **kwargs):
        self._vocab = {"<s>": 0, "</s>": 1, **{chr(c): i + 2 for i, c in enumerate(range(32, 127))}}
        super().__init__(bos_token="<s>", eos_token="</s>", pad_token="</s>", **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return list(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self._vocab[token]

    def _convert_id_to_token(self, index: int) -> str:
        return {i: t for t, i in self._vocab.items()}[index]

    def build_inputs_with_special_tokens(self, ids, pair_ids=None):
        return [self.bos_token_id, *ids, *(pair_ids or [])]

    def get_special_tokens_mask(self, ids, pair_ids=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return [int(i in (self.bos_token_id, self.eos_token_id)) for i in ids]
        return [1] + [0] * (len(ids) + len(pair_ids or []))


def test_slow_tokenizer_falls_back_to_the_prompt_prefix():
    tokenizer = _CharTokenizer()
    assert not tokenizer.is_fast
    example = tokenize(tokenizer, PromptCompletion("Ab", " cd"), 64, "query")
    assert example.input_ids == tokenizer("Ab cd")["input_ids"] and len(example.input_ids) == 6  # <s> A b ␣ c d
    assert example.loss_mask == [0, 0, 0, 1, 1, 1]


@pytest.fixture(scope="module")
def sentencepiece_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    model = make_tiny_model(root / "llama-sp", arch="llama", texts=TEXTS, hidden=16, tokenizer="sentencepiece")
    records = tiny_corpus(16, seed=3)
    corpus = write_jsonl(root / "corpus.jsonl", records)
    build_index(exact_config("dot", "raw"), str(model), corpus, root / "idx", id_field="id", progress=False)
    return root / "idx", records


def _reference_query(model, tokenizer, pair: PromptCompletion, projections) -> tuple[float, torch.Tensor]:
    """(loss, projected gradient) of one pair by plain autograd on the joined ids, float64: summed cross-entropy of
    the completion's tokens, which are found by decoding (`_completion_start`), not by attribindex's rule."""
    ids = torch.tensor([tokenizer(pair.prompt + pair.completion)["input_ids"]])
    start = max(1, _completion_start(tokenizer, pair))
    modules = dict(model.named_modules())
    model.zero_grad()
    with torch.enable_grad():
        for spec in projections.modules:
            modules[spec.name].weight.requires_grad_(True)
        logits = model(input_ids=ids).logits[0, :-1].double()  # position t predicts token t + 1
        loss = F.cross_entropy(logits[start - 1 :], ids[0, start:], reduction="sum")
        loss.backward()
    blocks = []
    for spec in projections.modules:
        grad = modules[spec.name].weight.grad  # Linear (llama): (out, in), no bias
        p_in, p_out = projections.p_in[spec.name].double(), projections.p_out[spec.name].double()
        blocks.append((p_out @ grad @ p_in.T).reshape(-1))
    model.requires_grad_(False)
    return float(loss.detach()), torch.cat(blocks)


def test_pair_query_equals_autograd_on_the_joined_tokens(sentencepiece_index):
    path, records = sentencepiece_index
    index = AttributionIndex.open(path, dtype="float64")
    model, tokenizer = index.extractor.model, index.extractor.tokenizer
    pairs = PAIRS[:2]
    vectors = index.query_vectors(pairs)
    reference = [_reference_query(model, tokenizer, pair, index.projections) for pair in pairs]
    np.testing.assert_allclose(vectors.losses, [loss for loss, _ in reference], rtol=1e-9)

    train = explicit_projected_gradients(model, tokenizer, [r["text"] for r in records], index.projections, 32)
    queries = torch.stack([grad for _, grad in reference])
    expected = brute_force_scores(train, queries, index.block_dims, 0.1, "dot")  # (Q, N)
    answer = index.attribute(pairs, k=5)
    for q, result in enumerate(answer.results):
        order = torch.argsort(expected[q], descending=True)[:5]
        assert [a.id for a in result.top] == [records[int(i)]["id"] for i in order]
        np.testing.assert_allclose([a.score for a in result.top], expected[q, order].numpy(), rtol=2e-4)
