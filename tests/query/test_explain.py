"""Per-token explanations: each token's contribution equals an autograd computation with explicit whitening and
projection matrices, on both sides (example and query); the spans map back to the token ids; the score is the
index's own (flat, IVF-PQ and exact re-rank), with fast and slow tokenizers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file

from attribindex import AttribIndexError, AttributionIndex, PromptCompletion, build_index, delete_ids
from attribindex.cli import main
from attribindex.config import IndexConfig
from attribindex.model import load_model
from attribindex.testing import tiny_corpus, write_jsonl
from tests.conftest import exact_config, exact_section_config

QUERIES = ["King queen crown sword love death night.", PromptCompletion("Father son daughter", " mother lord lady.")]
MAX_LENGTH = 32  # exact_config's extract.max_length
# Texts a byte-level tokenizer splits inside characters (accents, an emoji), and text that looks like HTML.
ODD_TEXTS = ["🎉 Café crème, naïve: king queen crown sword.", "<b>bold</b> king & queen <i>love</i> death."]


# --- the reference: plain autograd, explicit matrices read from the index's files as plain tensors ---


@dataclasses.dataclass
class _Layer:
    """One captured module: its name, the projections (None: unprojected, the exact section), and its block of
    score = Σ_layers g_qᵀ M g_n through an explicit dense (d, d) matrix B: M = B·B for the projected index (B = W,
    the whitening), M = B diag(m) Bᵀ for exact (B = U_out ⊗ U_in, m = 1 / (Λ + λ))."""

    name: str
    p_in: torch.Tensor | None
    p_out: torch.Tensor | None
    basis: torch.Tensor
    diagonal: torch.Tensor | None  # None: M = B·B

    def times_metric(self, g: torch.Tensor) -> torch.Tensor:
        if self.diagonal is None:
            return self.basis @ (self.basis @ g)
        return self.basis @ (self.diagonal * (self.basis.T @ g))


def _projected_layers(index: AttributionIndex) -> list[_Layer]:
    """W per module, dense, from the preconditioner file: stored as is (`raw`) or as (U_out ⊗ U_in) diag(s) (…)ᵀ
    (KFAC, EK-FAC); P_in and P_out from the projections file; all read as plain tensors."""
    whitening = load_file(str(index.root / index.manifest.hessian.file))
    projections = load_file(str(index.root / "projections.safetensors"))
    layers = []
    for name in index.module_names:
        p_in, p_out = projections[f"{name}.in"].double(), projections[f"{name}.out"].double()
        if name in whitening:  # raw: the dense (d, d) W
            w = whitening[name].double()
        else:  # the stored bases are orthonormal to float32 precision only: W·W, not B diag(s²) Bᵀ
            basis = torch.kron(whitening[f"{name}::u_out"].double(), whitening[f"{name}::u_in"].double())
            w = (basis * whitening[f"{name}::scale"].double().reshape(-1)) @ basis.T
        layers.append(_Layer(name, p_in, p_out, w, None))
    return layers


def _exact_layers(index: AttributionIndex) -> list[_Layer]:
    """(H + λ)⁻¹ = (U_out ⊗ U_in) diag(1 / (Λ + λ)) (U_out ⊗ U_in)ᵀ per layer of the exact preconditioner file."""
    stored = load_file(str(index.root / index.manifest.exact.file))
    names = sorted({key.split("::")[0] for key in stored}, key=index.module_names.index)
    layers = []
    for name in names:
        basis = torch.kron(stored[f"{name}::u_out"].double(), stored[f"{name}::u_in"].double())
        inverse = 1.0 / (stored[f"{name}::eigenvalues"].double().reshape(-1) + stored[f"{name}::damping"].double())
        layers.append(_Layer(name, None, None, basis, inverse))
    return layers


def _reference_ids(tokenizer, item) -> tuple[list[int], torch.Tensor]:
    """(ids, counted): the item's first MAX_LENGTH token ids straight from the tokenizer, and which targets
    (positions 1..T-1) carry loss: all of a text's; a pair's tokens that reach past the prompt (offsets)."""
    if isinstance(item, PromptCompletion):
        encoded = tokenizer(item.prompt + item.completion, return_offsets_mapping=True)
        ids = encoded["input_ids"][:MAX_LENGTH]
        counted = torch.tensor([end > len(item.prompt) for _, end in encoded["offset_mapping"][1 : len(ids)]])
        return ids, counted
    ids = tokenizer(item)["input_ids"][:MAX_LENGTH]
    return ids, torch.ones(len(ids) - 1, dtype=torch.bool)


def _token_gradients(model, tokenizer, item, layers: list[_Layer]) -> torch.Tensor:
    """(T, D): per position t, per layer, vec(P_out δ_t [x_t; 1]ᵀ P_inᵀ) (no projection for exact layers), with x_t
    the layer's input and δ_t the summed loss's gradient at its output, from plain autograd in float64 on the
    unpadded ids. Their sum over t is checked against the layer's weight (and bias) gradient."""
    ids, counted = _reference_ids(tokenizer, item)
    modules = dict(model.named_modules())
    seen = {}

    def keep(module, args, output):
        output.retain_grad()
        seen[module] = (args[0], output)

    handles = [modules[layer.name].register_forward_hook(keep) for layer in layers]
    model.zero_grad()
    with torch.enable_grad():
        for layer in layers:
            modules[layer.name].requires_grad_(True)
        input_ids = torch.tensor([ids])
        logits = model(input_ids=input_ids).logits[0, :-1].double()
        F.cross_entropy(logits[counted], input_ids[0, 1:][counted], reduction="sum").backward()
    for handle in handles:
        handle.remove()
    model.requires_grad_(False)
    columns = []
    for layer in layers:
        module = modules[layer.name]
        x, output = seen[module]
        x, delta = x[0].detach(), output.grad[0]  # (T, n_in), (T, n_out)
        grad = module.weight.grad if isinstance(module, torch.nn.Linear) else module.weight.grad.T  # (out, in)
        if module.bias is not None:
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
            grad = torch.cat([grad, module.bias.grad[:, None]], dim=1)
        if layer.p_in is not None:
            x, delta, grad = x @ layer.p_in.T, delta @ layer.p_out.T, layer.p_out @ grad @ layer.p_in.T
        per_token = torch.einsum("to,ti->toi", delta, x)  # (T, k_out, k_in)
        torch.testing.assert_close(per_token.sum(0), grad, rtol=1e-9, atol=1e-12 * float(grad.abs().max()))
        columns.append(per_token.reshape(len(ids), -1))
    return torch.cat(columns, dim=1)


@dataclasses.dataclass
class _Expected:
    score: float
    tokens: torch.Tensor  # (T_n,)
    query_tokens: torch.Tensor  # (T_q,)


def _reference(query_grads: torch.Tensor, example_grads: torch.Tensor, layers: list[_Layer], mode: str) -> _Expected:
    """score = g_qᵀ M g_n with g = Σ_t of the token gradients; token t of either side contributes its own term
    (its gradient)ᵀ M (the other side's g); cosine mode divides all by √(g_qᵀ M g_q · g_nᵀ M g_n)."""
    dims = [layer.basis.shape[0] for layer in layers]

    def times_metric(g: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer.times_metric(part) for layer, part in zip(layers, g.split(dims))])

    g_q, g_n = query_grads.sum(0), example_grads.sum(0)
    m_q, m_n = times_metric(g_q), times_metric(g_n)
    norm = torch.sqrt((g_q @ m_q) * (g_n @ m_n)) if mode == "cosine" else torch.tensor(1.0, dtype=torch.float64)
    return _Expected(float(g_n @ m_q / norm), example_grads @ m_q / norm, query_grads @ m_n / norm)


def _assert_tokens_match(explained, expected: _Expected) -> None:
    """Both sides' contributions equal the reference position by position (float64 model, float32 matrices)."""
    for got, want in ((explained.tokens, expected.tokens), (explained.query_tokens, expected.query_tokens)):
        values = torch.tensor([t.contribution for t in got], dtype=torch.float64)
        torch.testing.assert_close(values, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))


def _assert_spans_are_the_tokens(tokenizer, text: str, tokens) -> dict[tuple[int, int], list[int]]:
    """Token i is the tokenizer's i-th token of `text`, and its span [start, end) decodes from its id: the ids of
    the tokens sharing one span (the bytes of one character) decode together to exactly that span's text.
    Returns those ids by span."""
    ids = tokenizer(text)["input_ids"][: len(tokens)]
    assert [t.token for t in tokens] == tokenizer.convert_ids_to_tokens(ids)
    groups: dict[tuple[int, int], list[int]] = {}
    for token, token_id in zip(tokens, ids):
        assert token.text == text[token.start : token.end]
        if token.start == token.end:  # special tokens cover no text
            assert token_id in tokenizer.all_special_ids
        else:
            groups.setdefault((token.start, token.end), []).append(token_id)
    for (start, end), group in groups.items():
        assert tokenizer.decode(group) == text[start:end], (start, end)
    assert "".join(text[s:e] for s, e in groups) == text[: max(e for _, e in groups)]  # in order, no gaps
    return groups


# --- the projected index ---


@pytest.fixture(scope="module", params=[("ekfac", "dot"), ("raw", "cosine")], ids=lambda p: "-".join(p))
def index(request, tiny_models, corpus_records, tmp_path_factory):
    kind, mode = request.param
    root = tmp_path_factory.mktemp(f"explain-{kind}-{mode}")
    records = corpus_records + [{"id": f"odd-{i}", "text": text} for i, text in enumerate(ODD_TEXTS)]
    corpus = write_jsonl(root / "corpus.jsonl", records)
    build_index(exact_config(mode, kind), str(tiny_models["gpt2"]), corpus, root / "idx", id_field="id", progress=False)
    return AttributionIndex.open(root / "idx")


@pytest.fixture(scope="module")
def reference_model(tiny_models):
    return load_model(str(tiny_models["gpt2"]), "float64", "cpu")


@pytest.mark.parametrize("query", QUERIES, ids=["text", "prompt-completion"])
def test_each_token_equals_autograd_and_the_score_is_the_index_own(index, reference_model, query):
    model, tokenizer = reference_model
    found = index.attribute(query, k=3, bottom=2).results[0]
    ids = list(dict.fromkeys([a.id for a in found.top + found.bottom] + ["odd-0", "odd-1"]))  # odd-0: accents, emoji
    answer = index.explain(query, ids)
    assert [e.id for e in answer.examples] == ids and answer.mode == index.mode
    layers = _projected_layers(index)
    query_grads = _token_gradients(model, tokenizer, query, layers)
    full = query.prompt + query.completion if isinstance(query, PromptCompletion) else query
    _assert_spans_are_the_tokens(tokenizer, full, answer.examples[0].query_tokens)
    scale = max(abs(a.score) for a in found.top + found.bottom)
    for attribution, explained in zip(found.top + found.bottom, answer.examples):
        # recomputed through the model (float64) vs searched from the float32 store
        assert explained.score == pytest.approx(attribution.score, rel=1e-4, abs=1e-6 * scale)
        assert explained.text == attribution.text and explained.row == attribution.row
    for explained in answer.examples:
        expected = _reference(
            query_grads, _token_gradients(model, tokenizer, explained.text, layers), layers, index.mode
        )
        assert explained.score == pytest.approx(expected.score, rel=1e-9)
        _assert_tokens_match(explained, expected)
        _assert_spans_are_the_tokens(tokenizer, explained.text, explained.tokens)
        # the query's side is a pass of its own (the query through the model against each example's probe)
        assert sum(t.contribution for t in explained.query_tokens) == pytest.approx(explained.score, rel=1e-9)
    if isinstance(query, PromptCompletion):  # prompt tokens carry a share through their activations
        in_prompt = [t for t in answer.examples[0].query_tokens if t.end <= len(query.prompt)]
        assert in_prompt and any(abs(t.contribution) > 1e-6 * scale for t in in_prompt)


def test_unknown_and_deleted_ids_are_refused_by_name(tiny_models, corpus_file, tmp_path):
    out = tmp_path / "idx"
    config = exact_config()
    config = dataclasses.replace(config, store=dataclasses.replace(config.store, chunk_rows=24))
    build_index(config, str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
    delete_ids(out, ["doc-0003"])
    index = AttributionIndex.open(out)
    with pytest.raises(AttribIndexError, match=r"'doc-0003', 'nope'.*undeleted"):
        index.explain("a query", ["doc-0001", "doc-0003", "nope"])
    with pytest.raises(AttribIndexError, match="no id given"):
        index.explain("a query", [])
    assert index.explain("a query", "doc-0001").examples[0].id == "doc-0001"


def test_cli_query_explain_marks_the_strongest_tokens_and_gives_the_library_arrays_in_json(index):
    args = ["query", str(index.root), "--text", QUERIES[0], "-k", "2", "--bottom", "1", "--explain"]
    plain = CliRunner().invoke(main, args)
    assert plain.exit_code == 0, plain.output
    assert plain.output.count("query tokens:") == 3 and "[+" in plain.output and "\x1b[" not in plain.output
    as_json = CliRunner().invoke(main, [*args, "--json"])
    data = json.loads(as_json.output)
    explained = data["explanations"][0]["examples"]
    shown = data["results"][0]["top"] + data["results"][0]["bottom"]
    assert [e["id"] for e in explained] == [a["id"] for a in shown]
    local = index.explain(QUERIES[0], [a["id"] for a in shown]).to_dict()["examples"]
    for example, own in zip(explained, local):
        for side in ("tokens", "query_tokens"):
            assert [t | {"contribution": 0} for t in example[side]] == [t | {"contribution": 0} for t in own[side]]
            assert [t["contribution"] for t in example[side]] == pytest.approx(
                [t["contribution"] for t in own[side]], rel=1e-9, abs=1e-12
            )
    refused = CliRunner().invoke(main, [*args, "--exact", "5"])  # this index has no exact section
    assert refused.exit_code != 0 and "exact.enabled" in refused.output


# --- the exact (unprojected) re-rank ---


@pytest.mark.parametrize("mode", ["dot", "cosine"])
def test_exact_explanations_equal_autograd_with_the_dense_inverse(
    mode, exact_index, tiny_models, corpus_file, reference_model, tmp_path
):
    path = exact_index
    if mode == "cosine":
        path = tmp_path / "idx"
        build_index(exact_section_config("cosine", "kfac"), str(tiny_models["gpt2"]), corpus_file, path, id_field="id")
    index = AttributionIndex.open(path)
    query = QUERIES[1]
    found = index.attribute(query, k=2, bottom=1, exact=6).results[0]
    answer = index.explain(query, [a.id for a in found.top + found.bottom], exact=True)
    assert answer.method.startswith("exact:")
    model, tokenizer = reference_model
    layers = _exact_layers(index)
    assert [layer.name for layer in layers] == index.module_names  # every captured layer is in the exact section
    query_grads = _token_gradients(model, tokenizer, query, layers)
    for attribution, explained in zip(found.top + found.bottom, answer.examples):
        assert explained.score == pytest.approx(attribution.score, rel=1e-9)  # the re-rank's own exact score
        expected = _reference(query_grads, _token_gradients(model, tokenizer, explained.text, layers), layers, mode)
        assert explained.score == pytest.approx(expected.score, rel=1e-9)
        _assert_tokens_match(explained, expected)
        assert sum(t.contribution for t in explained.query_tokens) == pytest.approx(explained.score, rel=1e-9)
    projected = index.explain(query, [found.top[0].id])
    assert projected.examples[0].score != pytest.approx(answer.examples[0].score, rel=1e-3)


# --- an IVF-PQ index over a model with a slow (pure-Python) tokenizer ---


def _byt5_gpt2(path: Path):
    """A tiny GPT-2 whose tokenizer is ByT5's: pure Python (no offsets), one token per UTF-8 byte (id = byte + 3),
    an end-of-text token appended."""
    from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = ByT5Tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def slow_ivfpq_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain-slow-ivfpq")
    records = tiny_corpus(24, seed=5) + [{"id": f"odd-{i}", "text": text} for i, text in enumerate(ODD_TEXTS)]
    corpus = write_jsonl(root / "corpus.jsonl", records)
    config = exact_config("dot", "kfac")
    config = dataclasses.replace(config, index=IndexConfig(mode="dot", kind="ivf_pq", nlist=2, pq_m=4, device="cpu"))
    build_index(config, str(_byt5_gpt2(root / "byt5-gpt2")), corpus, root / "idx", id_field="id", progress=False)
    return AttributionIndex.open(root / "idx")


def test_explain_on_an_ivf_pq_index_with_a_slow_tokenizer(slow_ivfpq_index):
    index = slow_ivfpq_index
    model, tokenizer = load_model(str(index.manifest.model.name_or_path), "float64", "cpu")
    assert not tokenizer.is_fast and "PQ" in index.search_description
    query = ODD_TEXTS[0]
    index.configure_search(nprobe=1, rerank=0)  # the quantised codes' own (approximate) scores
    approximate = index.attribute(query, k=3, bottom=1).results[0]
    index.configure_search(rerank=4)  # the same cell, its candidates re-scored from the stored rows
    rescored = index.attribute(query, k=3, bottom=1).results[0]
    ids = list(dict.fromkeys(a.id for a in approximate.top + approximate.bottom + rescored.top + rescored.bottom))
    answer = index.explain(query, list(dict.fromkeys([*ids, "odd-0", "odd-1"])))
    layers = _projected_layers(index)
    query_grads = _token_gradients(model, tokenizer, query, layers)
    explained = {e.id: e for e in answer.examples}
    scale = max(abs(a.score) for a in rescored.top + rescored.bottom)
    for attribution in rescored.top + rescored.bottom:  # re-scored from the (float32) stored rows: the exact score
        assert explained[attribution.id].score == pytest.approx(attribution.score, rel=1e-4, abs=1e-6 * scale)
        assert explained[attribution.id].row == attribution.row and explained[attribution.id].text == attribution.text
    assert any(explained[a.id].score != pytest.approx(a.score, rel=1e-4) for a in approximate.top)  # PQ's differ
    for example in answer.examples:
        expected = _reference(query_grads, _token_gradients(model, tokenizer, example.text, layers), layers, "dot")
        assert example.score == pytest.approx(expected.score, rel=1e-9)
        _assert_tokens_match(example, expected)
    for text, tokens in [(query, answer.examples[0].query_tokens)] + [(e.text, e.tokens) for e in answer.examples]:
        for (start, end), group in _assert_spans_are_the_tokens(tokenizer, text, tokens).items():
            assert bytes(i - 3 for i in group) == text[start:end].encode()  # ByT5: id = UTF-8 byte + 3
    emoji = [t for t in answer.examples[0].query_tokens if t.text == "🎉"]
    assert len(emoji) == 4 and all((t.start, t.end) == (0, 1) for t in emoji)  # 4 bytes, one character
