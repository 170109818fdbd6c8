"""Per-token explanations: contributions add up to the score, equal an autograd computation token by token, map
back to the text, and the score is the index's own."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from attribindex import AttribIndexError, AttributionIndex, PromptCompletion, build_index, delete_ids
from attribindex.cli import main
from attribindex.model import load_model
from tests.conftest import exact_config, exact_section_config
from tests.reference import _plain_backward

QUERIES = ["King queen crown sword love death night.", PromptCompletion("Father son daughter", " mother lord lady.")]


@pytest.fixture(scope="module", params=[("ekfac", "dot"), ("raw", "cosine")], ids=lambda p: "-".join(p))
def index(request, tiny_models, corpus_file, tmp_path_factory):
    kind, mode = request.param
    out = tmp_path_factory.mktemp(f"explain-{kind}-{mode}") / "idx"
    build_index(exact_config(mode, kind), str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
    return AttributionIndex.open(out)


@pytest.mark.parametrize("query", QUERIES, ids=["text", "prompt-completion"])
def test_contributions_add_up_to_the_score_the_index_gives(index, query):
    found = index.attribute(query, k=3, bottom=2).results[0]
    ids = [a.id for a in found.top + found.bottom]
    answer = index.explain(query, ids)
    assert [e.id for e in answer.examples] == ids and answer.mode == index.mode
    scale = max(abs(a.score) for a in found.top + found.bottom)
    for attribution, explained in zip(found.top + found.bottom, answer.examples):
        # recomputed through the model (float64) vs searched from the float32 store
        assert explained.score == pytest.approx(attribution.score, rel=1e-4, abs=1e-6 * scale)
        assert sum(t.contribution for t in explained.tokens) == pytest.approx(explained.score, rel=1e-9, abs=1e-12)
        assert sum(t.contribution for t in explained.query_tokens) == pytest.approx(
            explained.score, rel=1e-9, abs=1e-12
        )
        assert explained.text == attribution.text and explained.row == attribution.row
        for token in explained.tokens:  # the spans map back to the document
            assert token.start == token.end or explained.text[token.start : token.end] == token.text
        covered = "".join(t.text for t in explained.tokens)  # the first max_length (32) tokens, in order
        assert len(covered) > 10 and explained.text.startswith(covered)
    if isinstance(query, PromptCompletion):  # prompt tokens carry a share through their activations
        full = query.prompt + query.completion
        spans = answer.examples[0].query_tokens
        assert full.startswith("".join(t.text for t in spans))
        in_prompt = [t for t in spans if t.end <= len(query.prompt)]
        assert in_prompt and any(abs(t.contribution) > 0 for t in in_prompt)


def test_each_token_equals_an_autograd_computation(index, tiny_models):
    """Token t of an example contributes Σ_m (P_out δ_t)ᵀ R_m (P_in [x_t; 1]), R_m = module m's block of W² g_q,
    with δ_t and x_t from plain autograd on the unpadded example."""
    query = QUERIES[0]
    row = index.attribute(query, k=1).results[0].top[0]
    explained = index.explain(query, [row.id]).examples[0]
    model, tokenizer = load_model(str(tiny_models["gpt2"]), "float64", "cpu")
    layers = _plain_backward(model, tokenizer, row.text, "example", index.module_names, 32)
    query_whitened = index.preconditioner.whiten(
        index.extractor.extract(index.extractor.tokenize([query])).concatenated(index.module_names).double()
    )
    probe = index.preconditioner.whiten(query_whitened)[0]  # W² g_q, (D,)
    expected, offset = 0, 0
    for spec, (k_out, k_in) in zip(index.projections.modules, index.projections.block_shapes):
        _, inputs, outputs = layers[spec.name]
        x = inputs[0].detach()  # (T, n_in)
        if spec.bias:
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        x_proj = x @ index.projections.p_in[spec.name].double().T  # (T, k_in)
        delta = outputs.grad[0] @ index.projections.p_out[spec.name].double().T  # (T, k_out)
        block = probe[offset : offset + k_out * k_in].reshape(k_out, k_in)
        expected = expected + torch.einsum("to,oi,ti->t", delta, block, x_proj)
        offset += k_out * k_in
    if index.mode == "cosine":
        raw = index.extractor.extract(index.extractor.tokenize([row.text])).concatenated(index.module_names).double()
        expected = expected / (index.preconditioner.whiten(raw).norm() * query_whitened.norm())
    got = torch.tensor([t.contribution for t in explained.tokens], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10 * float(expected.abs().max()))


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


def test_cli_query_explain_marks_the_strongest_tokens_and_gives_arrays_in_json(index):
    args = ["query", str(index.root), "--text", QUERIES[0], "-k", "2", "--bottom", "1", "--explain"]
    plain = CliRunner().invoke(main, args)
    assert plain.exit_code == 0, plain.output
    assert plain.output.count("query tokens:") == 3 and "[+" in plain.output and "\x1b[" not in plain.output
    as_json = CliRunner().invoke(main, [*args, "--json"])
    data = json.loads(as_json.output)
    explained = data["explanations"][0]["examples"]
    shown = data["results"][0]["top"] + data["results"][0]["bottom"]
    assert [e["id"] for e in explained] == [a["id"] for a in shown]
    for example in explained:
        assert sum(t["contribution"] for t in example["tokens"]) == pytest.approx(example["score"], rel=1e-9)
    refused = CliRunner().invoke(main, [*args, "--exact", "5"])  # this index has no exact section
    assert refused.exit_code != 0 and "exact.enabled" in refused.output


@pytest.mark.parametrize("mode", ["dot", "cosine"])
def test_exact_explanations_split_the_exact_scores(mode, exact_index, tiny_models, corpus_file, tmp_path):
    path = exact_index
    if mode == "cosine":
        path = tmp_path / "idx"
        build_index(exact_section_config("cosine", "kfac"), str(tiny_models["gpt2"]), corpus_file, path, id_field="id")
    index = AttributionIndex.open(path)
    query = QUERIES[1]
    found = index.attribute(query, k=2, bottom=1, exact=6).results[0]
    answer = index.explain(query, [a.id for a in found.top + found.bottom], exact=True)
    assert answer.method.startswith("exact:")
    for attribution, explained in zip(found.top + found.bottom, answer.examples):
        assert explained.score == pytest.approx(attribution.score, rel=1e-9)  # the re-rank's own exact score
        assert sum(t.contribution for t in explained.query_tokens) == pytest.approx(explained.score, rel=1e-9)
        assert sum(t.contribution for t in explained.tokens) == pytest.approx(explained.score, rel=1e-12)
    projected = index.explain(query, [found.top[0].id])
    assert projected.examples[0].score != pytest.approx(answer.examples[0].score, rel=1e-3)
