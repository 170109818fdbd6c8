"""The build's exact section and the exact re-rank: equal to independent dense computations (plain autograd per
example, explicit Kronecker-factored inverse Hessians), the exact top-k of the candidates, the same across shards,
batch sizes and appends, in float32 as in float64; refused when too large or not supported."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from attribindex import (
    AttribIndexError,
    AttributionIndex,
    append_documents,
    build_ensemble,
    build_index,
    delete_ids,
    merge_shards,
)
from attribindex.config import ExactConfig, config_to_dict
from attribindex.exact import ExactPreconditioner
from attribindex.hessian import CurvatureSums
from attribindex.model import load_model
from attribindex.query._exact import QUERY_GROUP
from attribindex.store import layout, read_manifest
from attribindex.testing import write_jsonl
from tests.conftest import exact_config, exact_section_config
from tests.killing import build_killed
from tests.reference import brute_force_scores, explicit_exact_scores

QUERIES = ["the quick brown fox jumps", "a b c d e f g", "To be, or not to be"]


def _build(model, corpus_file, out, config, **kwargs):
    return build_index(config, str(model), corpus_file, out, id_field="id", progress=False, **kwargs)


# --- the independent reference: plain autograd per example, explicit (d × d) inverse Hessians -------------------

MAX_LENGTH = 32  # extract.max_length of tests.conftest.exact_config
ALPHA = ExactConfig().damping  # α of exact_section_config
SEED = ExactConfig().seed  # exact.seed: the correction sample and the true Fisher's labels


def _plain_curvature(model, tokenizer, text: str, layers: list[str], label_seed: int | None = None) -> dict:
    """{layer: (G, Σ_t x̄x̄ᵀ, Σ_t δδᵀ)} of one unpadded text through plain transformers and autograd (float64): G the
    weight gradient (out × in) with the bias gradient as a last column (x̄ = [x, 1] then), δ the gradient at the
    layer's output. The loss is the summed next-token cross-entropy of the text's tokens, or with `label_seed`, of
    targets drawn from the model's softmax (`_sampled_targets`): the true Fisher's gradients."""
    ids = tokenizer(text)["input_ids"][:MAX_LENGTH]
    modules = dict(model.named_modules())
    seen = {}

    def keep(module, args, output):
        output.retain_grad()
        seen[module] = (args[0][0], output)

    handles = [modules[name].register_forward_hook(keep) for name in layers]
    model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1]  # (T-1, V)
            targets = torch.tensor(ids[1:]) if label_seed is None else _sampled_targets(logits, ids, label_seed)
            F.cross_entropy(logits, targets, reduction="sum").backward()
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name in layers:
        module = modules[name]
        x, output = seen[module]  # (T, n_in), (1, T, n_out)
        weight = module.weight.grad if isinstance(module, torch.nn.Linear) else module.weight.grad.T  # (out, in)
        if module.bias is not None:
            weight = torch.cat([weight, module.bias.grad[:, None]], dim=1)
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        delta = output.grad[0]  # (T, n_out)
        out[name] = (weight.detach().clone(), (x.T @ x).detach(), (delta.T @ delta).detach())
    return out


def _sampled_targets(logits: torch.Tensor, ids: list[int], seed: int) -> torch.Tensor:
    """The true Fisher's targets as `exact.fisher: true` documents them (seeded per example by exact.seed and its
    tokens): one draw per position from the softmax, by a torch generator seeded with the first 8 bytes
    (little-endian, shifted right once) of sha256("<seed>:<token ids>")."""
    digest = hashlib.sha256(f"{seed}:{ids}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1, generator=generator)[:, 0]


def _correction_sample(rows: int, sample: int) -> list[int]:
    """The documented EK-FAC correction sample: numpy's default_rng(exact.seed).choice without replacement, sorted."""
    return sorted(np.random.default_rng(SEED).choice(rows, size=sample, replace=False).tolist())


@dataclasses.dataclass
class _DenseLayer:
    """One layer's (H + λI)⁻¹ = K diag(1 / (Λ + λ)) Kᵀ as explicit matrices: K the (d × d) Kronecker eigenbasis
    U_S ⊗ U_A (row-major like vec(G) = G.reshape(-1)), Λ (d,) and λ."""

    basis: torch.Tensor
    eigenvalues: torch.Tensor
    damping: float

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        """(n, d) → (H + λI)⁻¹ applied to each row."""
        return ((vectors @ self.basis) / (self.eigenvalues + self.damping)) @ self.basis.T

    @classmethod
    def stored(cls, layer) -> _DenseLayer:
        """A stored layer's inverse in the same explicit form."""
        basis = torch.kron(layer.u_out.double(), layer.u_in.double())
        return cls(basis, layer.eigenvalues.reshape(-1).double(), layer.damping)


def _dense_ekfac(curvature: list[dict], sample: list[int]) -> dict[str, _DenseLayer]:
    """EK-FAC per layer: U_S, U_A from `torch.linalg.eigh` of the mean factors over all of `curvature`, and
    Λ = the mean over the examples `sample` of ((U_S ⊗ U_A)ᵀ vec(G))², λ = α · mean(Λ)."""
    out = {}
    for name in curvature[0]:
        _, u_in = torch.linalg.eigh(sum(c[name][1] for c in curvature) / len(curvature))
        _, u_out = torch.linalg.eigh(sum(c[name][2] for c in curvature) / len(curvature))
        basis = torch.kron(u_out, u_in)  # (d, d)
        gradients = torch.stack([curvature[i][name][0].reshape(-1) for i in sample])  # (n, d)
        eigenvalues = ((gradients @ basis) ** 2).mean(0)  # (d,) the corrected eigenvalues
        out[name] = _DenseLayer(basis, eigenvalues, ALPHA * float(eigenvalues.mean()))
    return out


def _dense_scores(layers: dict, train: list[dict], queries: list[dict], mode: str = "dot") -> torch.Tensor:
    """(Q, N) Σ_layers vec(G_q)ᵀ (H + λI)⁻¹ vec(G_n); cosine divides by both self-influences' square roots."""
    scores = torch.zeros(len(queries), len(train), dtype=torch.float64)
    self_q, self_t = torch.zeros(len(queries), dtype=torch.float64), torch.zeros(len(train), dtype=torch.float64)
    for name, layer in layers.items():
        g_t = torch.stack([t[name][0].reshape(-1) for t in train])  # (N, d)
        g_q = torch.stack([q[name][0].reshape(-1) for q in queries])  # (Q, d)
        solved = layer.solve(g_t)  # (N, d)
        scores += g_q @ solved.T
        self_q += (layer.solve(g_q) * g_q).sum(1)
        self_t += (solved * g_t).sum(1)
    return scores / (self_q.sqrt()[:, None] * self_t.sqrt()[None, :]) if mode == "cosine" else scores


def _dense_inverse(layer) -> torch.Tensor:
    """A stored layer's (H + λI)⁻¹ as a (d, d) matrix: (U_out ⊗ U_in) diag(1 / (Λ + λ)) (U_out ⊗ U_in)ᵀ."""
    basis = torch.kron(layer.u_out, layer.u_in)
    return (basis * layer.inverse.reshape(-1)) @ basis.T


def _projected(curvature: list[dict], projections) -> torch.Tensor:
    """(N, D) LoGra rows of autograd gradients: P_out G P_inᵀ per layer, flattened row-major and concatenated."""
    rows = []
    for layers in curvature:
        blocks = [projections.p_out[n].double() @ g @ projections.p_in[n].double().T for n, (g, _, _) in layers.items()]
        rows.append(torch.cat([block.reshape(-1) for block in blocks]))
    return torch.stack(rows)


def _assert_same_ekfac(stored: ExactPreconditioner, reference: dict, examples: list[dict], rtol: float = 1e-7) -> None:
    """Each stored layer's eigenvalues Λ (entry by entry: both sides order each factor's eigenvectors by `eigh`),
    damping λ, and its inverse Hessian applied to every example's gradient (which eigenvector signs cannot change)
    equal the reference's."""
    assert stored.layers.keys() == reference.keys()
    for name, expected in reference.items():
        layer = _DenseLayer.stored(stored.layers[name])
        scale = float(expected.eigenvalues.max())
        torch.testing.assert_close(layer.eigenvalues, expected.eigenvalues, rtol=rtol, atol=rtol * scale)
        assert layer.damping == pytest.approx(expected.damping, rel=rtol), name
        gradients = torch.stack([e[name][0].reshape(-1) for e in examples])  # (N, d)
        solved = expected.solve(gradients)
        scale = float(solved.abs().max())
        torch.testing.assert_close(layer.solve(gradients), solved, rtol=rtol, atol=rtol * scale)


@pytest.fixture(scope="module")
def gpt2(tiny_models, exact_index):
    """The tiny GPT-2 loaded by plain transformers in float64, its tokenizer, and the layers the builds capture."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"], dtype=torch.float64).eval()
    return model, AutoTokenizer.from_pretrained(tiny_models["gpt2"]), read_manifest(exact_index).module_names


@pytest.fixture(scope="module")
def plain(gpt2, corpus_records) -> dict[str, list[dict]]:
    """`_plain_curvature` (data labels) of the 24 documents and of QUERIES."""
    model, tokenizer, layers = gpt2
    return {
        "corpus": [_plain_curvature(model, tokenizer, r["text"], layers) for r in corpus_records],
        "queries": [_plain_curvature(model, tokenizer, q, layers) for q in QUERIES],
    }


@pytest.fixture(scope="module")
def ekfac_reference(plain) -> dict:
    """The dense EK-FAC of `exact_index`: factors over the 24 documents, corrected over its seeded 16-row sample."""
    return _dense_ekfac(plain["corpus"], _correction_sample(24, 16))


@pytest.fixture(scope="module")
def ekfac_all_rows(plain) -> dict:
    """The dense EK-FAC of the 24 documents corrected over all of them: what a sample or a refit would not give."""
    return _dense_ekfac(plain["corpus"], list(range(24)))


@pytest.mark.parametrize(
    ("arch", "kind", "mode"), [("gpt2", "ekfac", "dot"), ("gpt2", "kfac", "cosine"), ("llama", "ekfac", "cosine")]
)
def test_exact_scores_equal_a_dense_kronecker_computation(
    arch, kind, mode, tiny_models, corpus_file, corpus_records, tmp_path
):
    """GPT-2's Conv1D layers carry biases (a column of G), Llama's Linear layers none; batches of 4 pad."""
    _build(tiny_models[arch], corpus_file, tmp_path / "idx", exact_section_config(mode, kind, sample=64))
    index = AttributionIndex.open(tmp_path / "idx")
    manifest = index.manifest
    assert manifest.exact.kind == kind and manifest.exact.sample == (24 if kind == "ekfac" else 0)
    assert bool(manifest.exact.biased) == (arch == "gpt2")
    model, tokenizer = load_model(str(tiny_models[arch]), "float64", "cpu")
    expected = explicit_exact_scores(
        model, tokenizer, [r["text"] for r in corpus_records], QUERIES, manifest.module_names, kind, 0.1, mode, 32
    )
    torch.testing.assert_close(torch.from_numpy(index.exact_scores(QUERIES)), expected, rtol=1e-7, atol=1e-9)
    if mode == "cosine":  # a cosine re-rank of all N candidates: the reference's top-k and bottom-k, with its scores
        for q, result in enumerate(index.attribute(QUERIES, k=3, bottom=2, exact=24).results):
            order = torch.argsort(expected[q], descending=True).tolist()
            assert [a.row for a in result.top] == order[:3] and [a.row for a in result.bottom] == order[::-1][:2]
            got = [a.score for a in result.top + result.bottom]
            np.testing.assert_allclose(got, expected[q, order[:3] + order[::-1][:2]], rtol=1e-7, atol=1e-9)


def test_the_ekfac_correction_on_a_sample_equals_a_dense_reference(exact_index, plain, ekfac_reference, ekfac_all_rows):
    """The shared index corrects its eigenvalues on 16 of its 24 rows: the stored Λ is E[(U_Sᵀ G U_A)²] over the
    documented sample of plain autograd gradients, and the inverse Hessian it forms acts on every document's gradient
    as the dense reference's does."""
    stored = ExactPreconditioner.load(exact_index / layout.EXACT_PRECONDITIONER)
    assert stored.kind == "ekfac" and read_manifest(exact_index).exact.sample == 16
    _assert_same_ekfac(stored, ekfac_reference, plain["corpus"])
    for name, layer in ekfac_all_rows.items():  # the sample is seen: all 24 rows would give other eigenvalues
        assert not torch.allclose(layer.eigenvalues, ekfac_reference[name].eigenvalues, rtol=1e-3), name


def test_the_rerank_is_the_exact_top_k_of_its_candidates_in_every_pass_of_queries(
    exact_index, plain, ekfac_reference, corpus_records
):
    """More queries in one call than one pass re-ranks (QUERY_GROUP), each answered from its own candidates: the
    dense EK-FAC reference's ranking of the first stage's top-C and bottom-C, that first stage computed independently
    (projected autograd gradients, the raw Hessian solved densely). At C = N that is the all-N top-k; at C = 6 it is
    for the lists that lie inside the candidates, and only the candidates' best for the others."""
    index = AttributionIndex.open(exact_index)
    extra = QUERY_GROUP - len(QUERIES) + 2  # two queries in a second pass
    queries = QUERIES + [r["text"] for r in corpus_records[:extra]]  # a document as a query: its own gradient
    gradients = plain["queries"] + plain["corpus"][:extra]
    exact = _dense_scores(ekfac_reference, plain["corpus"], gradients).numpy()  # (Q, N)
    projections = index.extractor.projections
    first_stage = brute_force_scores(
        _projected(plain["corpus"], projections),
        _projected(gradients, projections),
        [len(projections.p_out[n]) * len(projections.p_in[n]) for n in plain["corpus"][0]],
        0.1,  # hessian.damping of exact_config
        "dot",
    ).numpy()
    k, low, inside, answers = 3, 2, {}, {}
    for candidates in (6, 24):
        answer = answers[candidates] = index.attribute(queries, k=k, bottom=low, exact=candidates)
        assert answer.exact and answer.rerank.candidates == candidates and "ekfac" in answer.rerank.method
        assert candidates <= answer.rerank.scored <= min(2 * candidates, 24)
        inside[candidates] = 0
        for q, result in enumerate(answer.results):
            ranked, best = np.argsort(-first_stage[q]).tolist(), np.argsort(-exact[q]).tolist()
            pool = set(ranked[:candidates] + ranked[-candidates:])
            order = [row for row in best if row in pool]  # the candidates, ranked by the reference
            for got, expected, everywhere in (
                (result.top, order[:k], best[:k]),
                (result.bottom, order[::-1][:low], best[::-1][:low]),
            ):
                assert [a.row for a in got] == expected, (candidates, q)
                scale = float(np.abs(exact[q]).max())
                np.testing.assert_allclose([a.score for a in got], exact[q, expected], rtol=1e-7, atol=1e-9 * scale)
                inside[candidates] += set(everywhere) <= pool
    lists = 2 * len(queries)
    assert inside[24] == lists and 0 < inside[6] < lists  # at C = N every list is inside; at C = 6 some, not all
    alone = index.attribute(queries[-1], k=k, bottom=low, exact=6).results[0]  # a second-pass query on its own
    together = answers[6].results[-1]
    for got, expected in ((alone.top, together.top), (alone.bottom, together.bottom)):
        assert [a.row for a in got] == [a.row for a in expected]
        np.testing.assert_allclose([a.score for a in got], [a.score for a in expected], rtol=1e-10)


def test_shards_and_merge_equal_the_single_build(exact_index, tiny_models, corpus_file, tmp_path):
    for i in range(2):
        _build(
            tiny_models["gpt2"], corpus_file, tmp_path / f"s{i}", exact_section_config(), num_shards=2, shard_index=i
        )
    merge_shards([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged", progress=False)
    single, merged = read_manifest(exact_index), read_manifest(tmp_path / "merged")
    (a, _), (b, _) = (CurvatureSums.load(root / layout.CURVATURE) for root in (exact_index, tmp_path / "merged"))
    assert a.tracks_exact and set(a.tensors) == set(b.tensors)
    for name in a.exact_activations:
        for part in ("exact_activations", "exact_gradients", "exact_traces"):
            torch.testing.assert_close(getattr(a, part)[name], getattr(b, part)[name], rtol=1e-12, atol=1e-14)
    assert merged.exact.sample == single.exact.sample == 16
    assert dataclasses.replace(merged.exact, preconditioner_hash="", modules={}) == dataclasses.replace(
        single.exact, preconditioner_hash="", modules={}
    )  # the same record (hashes differ by eigenvector signs at most)
    _same_exact_preconditioner(exact_index, tmp_path / "merged")


def _splitmix64_unit(position: int, seed: int) -> float:
    """`exact.factor_sample`'s documented draw: SplitMix64 of position + seed·0x9E3779B97F4A7C15, top 53 bits."""
    mask = 2**64 - 1
    z = (position + seed * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return ((z ^ (z >> 31)) >> 11) / 2.0**53


def test_a_factor_sample_sums_its_positions_weighted_and_shards_agree(plain, tiny_models, corpus_file, tmp_path):
    """factor_sample 8 of 24 documents: the factors are 3 × the sums over the positions the hash draws, whatever the
    batch (4, padded) or shard (2, merged) they fall in."""
    config = exact_section_config(factor_sample=8)
    _build(tiny_models["gpt2"], corpus_file, tmp_path / "single", config)
    for i in range(2):
        _build(tiny_models["gpt2"], corpus_file, tmp_path / f"s{i}", config, num_shards=2, shard_index=i)
    merge_shards([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged", progress=False)
    chosen = [p for p in range(24) if _splitmix64_unit(p, SEED) < 8 / 24]
    assert 0 < len(chosen) < 24
    for root in ("single", "merged"):
        sums, _ = CurvatureSums.load(tmp_path / root / layout.CURVATURE)
        assert sums.exact_examples == read_manifest(tmp_path / root).exact.examples == len(chosen)
        for name in sums.exact_activations:
            for part, attribute in ((1, "exact_activations"), (2, "exact_gradients")):
                expected = 3 * sum(plain["corpus"][p][name][part] for p in chosen)
                torch.testing.assert_close(getattr(sums, attribute)[name], expected, rtol=1e-9, atol=1e-12)


def test_batch_size_does_not_change_the_exact_section(exact_index, tiny_models, corpus_file, tmp_path):
    _build(tiny_models["gpt2"], corpus_file, tmp_path / "idx", exact_section_config(batch_size=3))
    _same_exact_preconditioner(exact_index, tmp_path / "idx")


def test_true_fisher_factors_and_correction_use_labels_drawn_from_the_model(
    exact_index, gpt2, corpus_records, tiny_models, corpus_file, tmp_path
):
    """Every sum and the EK-FAC correction equal plain autograd with targets drawn from the model's softmax as
    documented (seeded per example by exact.seed and its tokens), one unpadded example at a time: so the draws do not
    depend on the batch (5 here, padded) either."""
    _build(tiny_models["gpt2"], corpus_file, tmp_path / "idx", exact_section_config(batch_size=5, fisher="true"))
    model, tokenizer, layers = gpt2
    sampled = [_plain_curvature(model, tokenizer, r["text"], layers, label_seed=SEED) for r in corpus_records]
    sums, _ = CurvatureSums.load(tmp_path / "idx" / layout.CURVATURE)
    empirical, _ = CurvatureSums.load(exact_index / layout.CURVATURE)
    for name in layers:
        expected = [sum(c[name][part] for c in sampled) for part in (1, 2)]
        for part, total in zip(("exact_activations", "exact_gradients"), expected):
            got = getattr(sums, part)[name].reshape(total.shape)
            torch.testing.assert_close(got, total, rtol=1e-9, atol=1e-12 * float(total.abs().max()))
        assert float(sums.exact_traces[name]) == 0.0  # EK-FAC keeps no trace: its eigenvalues are corrected instead
        assert not torch.allclose(sums.exact_gradients[name], empirical.exact_gradients[name])  # labels matter
    assert read_manifest(tmp_path / "idx").exact.fisher == "true"
    stored = ExactPreconditioner.load(tmp_path / "idx" / layout.EXACT_PRECONDITIONER)
    _assert_same_ekfac(stored, _dense_ekfac(sampled, _correction_sample(24, 16)), sampled)


def test_appended_documents_add_to_every_factor_and_are_scored_with_the_build_preconditioner(
    plain, ekfac_all_rows, tiny_models, corpus_records, tmp_path
):
    """An append adds to every curvature sum exactly as a build over old + new documents does, and, as documented
    (docs/format.md, `exact`), does not refit the exact preconditioner: every row, the appended ones included, is
    scored with the inverse Hessian fitted on the first build's documents."""
    first = write_jsonl(tmp_path / "first.jsonl", corpus_records[:16])
    rest = write_jsonl(tmp_path / "rest.jsonl", corpus_records[16:])
    everything = write_jsonl(tmp_path / "all.jsonl", corpus_records)
    _build(tiny_models["gpt2"], first, tmp_path / "grown", exact_section_config())
    fitted = (tmp_path / "grown" / layout.EXACT_PRECONDITIONER).read_bytes()
    before = read_manifest(tmp_path / "grown").exact
    append_documents(tmp_path / "grown", rest, id_field="id", progress=False)
    _build(tiny_models["gpt2"], everything, tmp_path / "whole", exact_section_config())
    (a, _), (b, _) = (
        CurvatureSums.load(p / read_manifest(p).hessian.curvature_file)
        for p in (tmp_path / "grown", tmp_path / "whole")
    )
    assert a.count == b.count == 24 and a.tensors.keys() == b.tensors.keys()
    assert any("exact_gradients" in key for key in a.tensors)
    for key, total in a.tensors.items():  # projected and exact parts: activations, gradients and traces
        scale = float(b.tensors[key].abs().max())
        torch.testing.assert_close(total, b.tensors[key], rtol=1e-10, atol=1e-14 * scale)
    after = read_manifest(tmp_path / "grown").exact
    assert after == before and after.examples == 16  # the record describes the fit, not the grown sums
    assert (tmp_path / "grown" / after.file).read_bytes() == fitted
    # The first 16 documents' factors and correction (sample 16 of 16: all of them), applied to all 24 rows.
    at_build = _dense_ekfac(plain["corpus"][:16], list(range(16)))
    expected = _dense_scores(at_build, plain["corpus"], plain["queries"])
    grown = AttributionIndex.open(tmp_path / "grown")
    torch.testing.assert_close(torch.from_numpy(grown.exact_scores(QUERIES)), expected, rtol=1e-7, atol=1e-9)
    refitted = _dense_scores(ekfac_all_rows, plain["corpus"], plain["queries"])
    assert not torch.allclose(refitted, expected, rtol=1e-3)  # a refit on all 24 would score otherwise


def test_a_float32_build_ranks_and_scores_as_the_float64_reference(
    ekfac_reference, plain, tiny_models, corpus_file, tmp_path
):
    """Users build in float32: the exact section computed and stored in float32 gives the float64 dense reference's
    top-k and bottom-k in a re-rank, and every exact score within 1e-3 of it."""
    config = exact_section_config()
    config = dataclasses.replace(config, extract=dataclasses.replace(config.extract, dtype="float32"))
    _build(tiny_models["gpt2"], corpus_file, tmp_path / "idx", config)
    index = AttributionIndex.open(tmp_path / "idx")
    stored = ExactPreconditioner.load(tmp_path / "idx" / layout.EXACT_PRECONDITIONER)
    assert all(layer.eigenvalues.dtype == torch.float32 for layer in stored.layers.values())
    expected = _dense_scores(ekfac_reference, plain["corpus"], plain["queries"]).numpy()  # (Q, N) float64
    for q, result in enumerate(index.attribute(QUERIES, k=24, bottom=2, exact=24).results):  # every row, ranked
        order = np.argsort(-expected[q]).tolist()
        assert [a.row for a in result.top[:3]] == order[:3] and [a.row for a in result.bottom] == order[::-1][:2]
        np.testing.assert_allclose(
            [a.score for a in result.top[:3] + result.bottom], expected[q, order[:3] + order[::-1][:2]], rtol=1e-3
        )
        scores = [a.score for a in result.top]  # all 24 rows: within 1e-3 of the largest score where one is near 0
        atol = 1e-3 * np.abs(expected[q]).max()
        np.testing.assert_allclose(scores, expected[q, [a.row for a in result.top]], rtol=1e-3, atol=atol)


def test_a_rerank_never_returns_a_deleted_row_and_keeps_the_others_scores(
    exact_index, plain, ekfac_reference, corpus_records, tmp_path
):
    """Deleted rows are in no answer, even when C exceeds the rows left, and every other row keeps its exact score:
    the exact preconditioner keeps the deleted rows' statistics (`retained_deleted`), so nothing is refitted."""
    root = tmp_path / "idx"
    shutil.copytree(exact_index, root)
    expected = _dense_scores(ekfac_reference, plain["corpus"], plain["queries"]).numpy()  # (Q, N)
    gone = {int(np.argmax(expected[0])), int(np.argmin(expected[1]))}  # the best of one list, the worst of another
    assert len(gone) == 2
    delete_ids(root, [corpus_records[row]["id"] for row in gone])  # rows are in corpus order
    live = [row for row in range(24) if row not in gone]
    index = AttributionIndex.open(root)
    # C = 24 candidates of the 22 live rows, all of them returned: the whole ranking of what is left.
    for q, result in enumerate(index.attribute(QUERIES, k=len(live), bottom=2, exact=24).results):
        order = [row for row in np.argsort(-expected[q]).tolist() if row in live]
        assert [a.row for a in result.top] == order and [a.row for a in result.bottom] == order[::-1][:2]
        np.testing.assert_allclose([a.score for a in result.top], expected[q, order], rtol=1e-7, atol=1e-9)


def test_an_ensemble_refuses_the_exact_section_at_build_and_the_exact_rerank_at_query(
    tiny_models, corpus_records, tmp_path
):
    """Checkpoint ensembles have no exact section yet: a config with one is refused before anything is written, and
    an ensemble refuses an exact re-rank, exact scores and exact explanations, each naming the cause and the fix."""
    corpus = write_jsonl(tmp_path / "corpus.jsonl", corpus_records[:4])
    checkpoints = [str(tiny_models["gpt2"])] * 2
    with pytest.raises(AttribIndexError, match=r"`exact` section .* not supported for checkpoint ensembles.*remove"):
        build_ensemble(exact_section_config(), checkpoints, corpus, tmp_path / "refused", id_field="id")
    assert not (tmp_path / "refused").exists()
    build_ensemble(exact_config(), checkpoints, corpus, tmp_path / "ens", id_field="id", progress=False)
    index = AttributionIndex.open(tmp_path / "ens")
    for ask in (
        lambda: index.attribute(QUERIES[0], k=2, exact=4),
        lambda: index.exact_scores(QUERIES[0]),
    ):
        with pytest.raises(AttribIndexError, match=r"not supported for a checkpoint ensemble.*index of one checkpoint"):
            ask()
    with pytest.raises(AttribIndexError, match=r"explain is not supported for a checkpoint ensemble"):
        index.explain(QUERIES[0], ["doc-0000"], exact=True)


def test_an_extraction_interrupted_resumes_with_the_exact_sums_of_the_written_chunks(
    exact_index, tiny_models, corpus_file, tmp_path
):
    out = _killed_build(
        ("attribindex.hessian._curvature", "CurvatureSums.save", 1, "after"), tiny_models, corpus_file, tmp_path
    )
    partial, _ = CurvatureSums.load(out / layout.CURVATURE)
    assert partial.tracks_exact and partial.count == 10  # the first chunk's rows only
    summary = _build(tiny_models["gpt2"], corpus_file, out, exact_section_config())
    assert summary.resumed_rows == 10
    (a, _), (b, _) = (CurvatureSums.load(root / layout.CURVATURE) for root in (exact_index, out))
    for name, total in a.exact_activations.items():
        torch.testing.assert_close(total, b.exact_activations[name], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(a.exact_traces[name], b.exact_traces[name], rtol=1e-12, atol=0)
    _same_exact_preconditioner(exact_index, out)


def test_a_correction_pass_interrupted_resumes_to_the_same_result(exact_index, tiny_models, corpus_file, tmp_path):
    out = _killed_build(
        ("attribindex.pipeline._exact", "_write_correction", 1, "after"), tiny_models, corpus_file, tmp_path
    )
    assert (out / layout.EXACT_CORRECTION).is_file() and not (out / layout.MANIFEST).exists()
    _build(tiny_models["gpt2"], corpus_file, out, exact_section_config())
    _same_exact_preconditioner(exact_index, out)
    assert not (out / layout.EXACT_CORRECTION).exists()


def test_a_section_too_large_for_memory_is_refused_before_anything_is_written(tiny_models, corpus_file, tmp_path):
    with pytest.raises(AttribIndexError, match=r"exact section needs 4 × .* GiB .* limit is .* exact.memory_gb"):
        _build(tiny_models["gpt2"], corpus_file, tmp_path / "idx", exact_section_config(memory_gb=1e-6))
    assert not (tmp_path / "idx").exists() or not any((tmp_path / "idx").iterdir())


def test_bad_rerank_requests_are_refused_with_the_fix(exact_index, tiny_models, corpus_file, tmp_path):
    index = AttributionIndex.open(exact_index)
    for exact, message in (
        (0, "positive integer"),
        (-3, "positive integer"),
        (10_001, "above the limit"),
        (2, "exact >= 3"),
    ):
        with pytest.raises(AttribIndexError, match=message):
            index.attribute(QUERIES[0], k=3, exact=exact)
    _build(tiny_models["gpt2"], corpus_file, tmp_path / "plain", exact_config("dot"))
    with pytest.raises(AttribIndexError, match=r"without the `exact` section.*exact.enabled.*rebuild"):
        AttributionIndex.open(tmp_path / "plain").attribute(QUERIES[0], k=3, exact=10)


def _killed_build(kill_at, tiny_models, corpus_file, tmp_path):
    """The shared exact build, run in a subprocess SIGKILLed at `kill_at` (tests/killing.py); its folder."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text(json.dumps(config_to_dict(exact_section_config())))
    out = tmp_path / "idx"
    killed = build_killed(kill_at, tiny_models["gpt2"], corpus_file, out, config_file)
    assert killed.returncode == -9, killed.stderr[-2000:]
    return out


def _same_exact_preconditioner(root_a, root_b) -> None:
    a, b = (ExactPreconditioner.load(root / layout.EXACT_PRECONDITIONER) for root in (root_a, root_b))
    assert a.kind == b.kind and a.layers.keys() == b.layers.keys() and a.shapes == b.shapes
    for name, layer in a.layers.items():
        # Eigenvectors are defined up to sign: compare the inverse Hessian they form.
        inverse_a, inverse_b = _dense_inverse(layer), _dense_inverse(b.layers[name])
        torch.testing.assert_close(inverse_a, inverse_b, rtol=1e-6, atol=1e-8 * float(inverse_a.abs().max()))


def test_a_tight_memory_bound_changes_batches_not_scores(exact_index):
    default = AttributionIndex.open(exact_index).exact_scores(QUERIES)
    tight = AttributionIndex.open(exact_index)
    tight.exact_memory_bytes = 1  # one candidate per batch
    np.testing.assert_allclose(tight.exact_scores(QUERIES), default, rtol=1e-10)
