"""Captured biases and the excluded head: a bias is the gradient's input column of ones ([DW Db]), equal to
projected autograd gradients of weight and bias; the output embedding is left out whatever its name."""

from __future__ import annotations

import pytest
import torch

from attribindex.config import ProjectionConfig
from attribindex.errors import AttribIndexError
from attribindex.logra import GradientExtractor, ProjectionSet, select_modules
from attribindex.logra._optimizer import load_second_moment_scales, save_named_second_moments
from attribindex.model import load_model
from attribindex.testing import make_tiny_model, tiny_corpus
from tests.reference import explicit_factor_rows, explicit_projected_gradients

ITEMS = ["To be, or not to be, that is the question.", "Now is the winter of our discontent", "Hi"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bias-models")
    texts = [d["text"] for d in tiny_corpus(120)]
    return {arch: make_tiny_model(root / arch, arch=arch, texts=texts, hidden=16) for arch in ("qwen2", "gpt_neox")}


def _extract(path, **projection):
    model, tokenizer = load_model(str(path), dtype="float64", device="cpu")
    projections = ProjectionSet.generate(select_modules(model, ProjectionConfig(**projection)), 3, 3, 4)
    extractor = GradientExtractor(model, tokenizer, projections, max_length=32, dtype=torch.float64)
    extracted = extractor.extract(extractor.tokenize(ITEMS), factors=True)
    return model, tokenizer, projections, extracted


def test_qwen2_qkv_biases_are_captured_and_equal_autograd(models):
    model, tokenizer, projections, extracted = _extract(models["qwen2"])
    biased = {s.name.rsplit(".", 1)[-1] for s in projections.modules if s.bias}
    assert biased == {"q_proj", "k_proj", "v_proj"}  # o_proj and the MLP have no bias
    for spec in projections.modules:
        assert projections.p_in[spec.name].shape[1] == spec.in_features + int(spec.bias)
    names = [s.name for s in projections.modules]
    expected = explicit_projected_gradients(model, tokenizer, ITEMS, projections, max_length=32)
    torch.testing.assert_close(extracted.concatenated(names), expected, rtol=1e-9, atol=1e-12)
    factors = explicit_factor_rows(model, tokenizer, ITEMS, projections, max_length=32)
    got = torch.cat([extracted.factors[name] for name in names], dim=1)
    torch.testing.assert_close(got, factors, rtol=1e-9, atol=1e-12)


def test_the_bias_column_changes_rows_and_switching_it_off_restores_weight_only_rows(models):
    model, tokenizer, with_bias, on = _extract(models["qwen2"])
    _, _, without, off = _extract(models["qwen2"], bias=False)
    assert not any(s.bias for s in without.modules)
    for spec in with_bias.modules:
        name = spec.name
        # the weight columns of P_in come from their own stream: identical with or without the bias column
        torch.testing.assert_close(with_bias.p_in[name][:, : spec.in_features], without.p_in[name], rtol=0, atol=0)
        changed = not torch.allclose(on.blocks[name], off.blocks[name])
        assert changed == spec.bias, name
    expected = explicit_projected_gradients(model, tokenizer, ITEMS, without, max_length=32)
    torch.testing.assert_close(off.concatenated([s.name for s in without.modules]), expected, rtol=1e-9, atol=1e-12)


def test_gpt_neox_head_is_excluded_whatever_its_name_and_the_chunked_head_stays_on(models):
    model, tokenizer = load_model(str(models["gpt_neox"]), dtype="float64", device="cpu")
    head = model.get_output_embeddings()
    head_name = next(n for n, m in model.named_modules() if m is head)  # `embed_out` in Pythia's checkpoints
    default = select_modules(model, ProjectionConfig(modules=("*",)))
    assert head_name not in {s.name for s in default}
    extractor = GradientExtractor(
        model, tokenizer, ProjectionSet.generate(default, 0, 2, 2), max_length=32, dtype=torch.float64
    )
    assert extractor._chunked_head
    with_head = select_modules(model, ProjectionConfig(modules=("*",), include_head=True))
    assert [s.name for s in with_head] == [*(s.name for s in default), head_name]
    with pytest.raises(AttribIndexError, match="include_head"):
        select_modules(model, ProjectionConfig(modules=(head_name,)))


def test_optimizer_state_without_the_bias_moments_is_refused_naming_the_switch(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 6)).square().sum().backward()
    optimizer.step()
    save_named_second_moments(optimizer, model, tmp_path / "all.safetensors")
    weights_only = {n: optimizer.state[p] for n, p in model.named_parameters() if n.endswith("weight")}
    torch.save({n: {"exp_avg_sq": s["exp_avg_sq"]} for n, s in weights_only.items()}, tmp_path / "weights.pt")
    specs = select_modules(model, ProjectionConfig())
    assert all(s.bias for s in specs)

    scales = load_second_moment_scales(tmp_path / "all.safetensors", model, specs)
    assert all(scales.in_scale[s.name].shape == (s.in_features + 1,) for s in specs)
    with pytest.raises(AttribIndexError, match="projection.bias: false"):
        load_second_moment_scales(tmp_path / "weights.pt", model, specs)
    unbiased = select_modules(model, ProjectionConfig(bias=False))
    scales = load_second_moment_scales(tmp_path / "weights.pt", model, unbiased)
    assert all(scales.in_scale[s.name].shape == (s.in_features,) for s in unbiased)


class _RenamedHead(torch.nn.Module):
    """A causal LM whose output embedding has a name no pattern expects (GPT-NeoX called it `embed_out`)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = torch.nn.Linear(4, 4)
        self.embed_out = torch.nn.Linear(4, 10, bias=False)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.embed_out


def test_an_output_embedding_under_any_name_is_excluded():
    model = _RenamedHead()
    assert [s.name for s in select_modules(model, ProjectionConfig())] == ["block"]
    assert [s.name for s in select_modules(model, ProjectionConfig(include_head=True))] == ["block", "embed_out"]
