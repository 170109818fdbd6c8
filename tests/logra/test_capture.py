"""LoGra capture equals the explicit Kronecker projection of autograd per-example gradients."""

from __future__ import annotations

import pytest
import torch

from attribindex.config import ProjectionConfig
from attribindex.data import PromptCompletion
from attribindex.logra import (
    GradientExtractor,
    LoGraCapture,
    ModuleSpec,
    ProjectionSet,
    capture_gradients,
    select_modules,
)
from attribindex.model import load_model
from tests.reference import explicit_factor_rows, explicit_projected_gradients

ITEMS = [
    "King queen crown sword love death night.",
    "Ghost.",  # short: padded heavily inside a batch
    PromptCompletion("Father son daughter", " mother brother sister lord lady."),
    "Fear hope trust doubt burn freeze fear hope trust doubt burn freeze speak swear weep laugh.",
    PromptCompletion("War peace heart", " weep."),
]


def _setup(path, **projection):
    model, tokenizer = load_model(str(path), dtype="float64", device="cpu")
    specs = select_modules(model, ProjectionConfig(**projection))
    projections = ProjectionSet.generate(specs, seed=7, rank_in=3, rank_out=5)
    return model, tokenizer, projections


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_logra_equals_projected_autograd_gradients(tiny_models, arch):
    model, tokenizer, projections = _setup(tiny_models[arch])
    kinds = {spec.kind for spec in projections.modules}
    assert kinds == ({"conv1d"} if arch == "gpt2" else {"linear"})
    extractor = GradientExtractor(model, tokenizer, projections, max_length=32, dtype=torch.float64)
    names = [m.name for m in projections.modules]
    got = extractor.extract(extractor.tokenize(ITEMS)).concatenated(names)  # one padded batch
    expected = explicit_projected_gradients(model, tokenizer, ITEMS, projections, max_length=32)
    assert got.shape == expected.shape == (len(ITEMS), projections.dim)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kfac_factors_equal_explicit_token_sums_and_ignore_padding(tiny_models, arch):
    model, tokenizer, projections = _setup(tiny_models[arch])
    extractor = GradientExtractor(model, tokenizer, projections, max_length=32, dtype=torch.float64)
    names = [m.name for m in projections.modules]
    batch = extractor.extract(extractor.tokenize(ITEMS), factors=True)  # one padded batch
    got = torch.cat([batch.factors[name] for name in names], dim=1)
    expected = explicit_factor_rows(model, tokenizer, ITEMS, projections, max_length=32)
    assert got.shape == expected.shape and expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    plain = extractor.extract(extractor.tokenize(ITEMS))
    assert plain.factors is None
    torch.testing.assert_close(plain.concatenated(names), batch.concatenated(names), rtol=0, atol=0)


def test_capture_leaves_weights_without_grad(tiny_models):
    model, tokenizer, projections = _setup(tiny_models["gpt2"])
    extractor = GradientExtractor(model, tokenizer, projections, max_length=32, dtype=torch.float64)
    extractor.extract(extractor.tokenize(ITEMS[:2]))
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_prompt_tokens_do_not_count_but_their_activations_do(tiny_models):
    model, tokenizer, projections = _setup(tiny_models["llama"])
    extractor = GradientExtractor(model, tokenizer, projections, max_length=32, dtype=torch.float64)
    pair = PromptCompletion("King queen crown sword", " love death night.")
    other = PromptCompletion("Ghost war peace", pair.completion)  # the same completion after another prompt
    whole = pair.prompt + pair.completion
    examples = extractor.tokenize([pair, whole, pair.prompt, other])
    assert examples[0].input_ids == examples[1].input_ids  # the same tokens: only the loss mask differs
    g = extractor.extract(examples).concatenated([m.name for m in projections.modules])
    assert not torch.allclose(g[0], g[1])  # the prompt's loss is excluded from the pair
    # Token losses add up, and a causal prompt computes the same alone: whole text = completion (the pair) + prompt.
    # It holds only if the completion's loss flows back through the prompt positions' activations, as in the whole.
    # Not to float64 precision: Llama's RMSNorm runs in float32, so one backward of both losses rounds unlike two
    # (seen: 3.4e-8 apart at a scale of 1.5, in plain autograd too).
    torch.testing.assert_close(g[0], g[1] - g[2], rtol=0, atol=1e-6 * g[0].abs().max().item())
    # Another prompt before the same completion tokens gives the completion another gradient: the prompt is context.
    assert (g[0] - g[3]).abs().max() > 1e-3 * g[0].abs().max()
    expected = explicit_projected_gradients(model, tokenizer, [pair, other], projections, max_length=32)  # autograd
    torch.testing.assert_close(g[[0, 3]], expected, rtol=1e-9, atol=1e-12)


def test_batch_size_invariance(tiny_models):
    model, tokenizer, projections = _setup(tiny_models["gpt2"])
    extractor = GradientExtractor(model, tokenizer, projections, max_length=32, dtype=torch.float64)
    names = [m.name for m in projections.modules]
    items = ITEMS * 4  # 20 items
    together = extractor.extract(extractor.tokenize(items)).concatenated(names)
    one_by_one = torch.cat([extractor.extract(extractor.tokenize([item])).concatenated(names) for item in items])
    torch.testing.assert_close(together, one_by_one, rtol=1e-9, atol=1e-12)


def test_last_n_blocks_and_patterns_select_modules(tiny_models):
    model, _, _ = _setup(tiny_models["llama"])
    chosen = select_modules(model, ProjectionConfig(modules=("*.mlp.*",), last_n_blocks=1))
    assert [s.name for s in chosen] == [f"model.layers.1.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
    everything = select_modules(model, ProjectionConfig())
    assert all("lm_head" not in s.name for s in everything) and len(everything) == 14


def test_backward_stops_at_lowest_captured_layer(tiny_models):
    """With only the last block captured, no gradient reaches the embeddings or the first block."""
    model, tokenizer, _ = _setup(tiny_models["llama"])
    specs = select_modules(model, ProjectionConfig(last_n_blocks=1))
    projections = ProjectionSet.generate(specs, seed=0, rank_in=2, rank_out=2)
    reached = []
    first_block = model.model.layers[0]
    handle = first_block.register_full_backward_hook(lambda *args: reached.append(True))
    extractor = GradientExtractor(model, tokenizer, projections, max_length=32, dtype=torch.float64)
    extractor.extract(extractor.tokenize(ITEMS[:2]))
    handle.remove()
    assert reached == []


def test_bfloat16_model_gives_nearly_the_same_vectors(tiny_models):
    """bf16 compute (GPUs) is an approximation of the float64 vectors, not something else."""
    model, tokenizer, projections = _setup(tiny_models["llama"])
    names = [m.name for m in projections.modules]
    exact = GradientExtractor(model, tokenizer, projections, max_length=32, dtype=torch.float64)
    reference = exact.extract(exact.tokenize(ITEMS)).concatenated(names)
    low, _ = load_model(str(tiny_models["llama"]), dtype="bfloat16", device="cpu")
    approx = GradientExtractor(low, tokenizer, projections, max_length=32, dtype=torch.bfloat16)
    got = approx.extract(approx.tokenize(ITEMS)).concatenated(names)
    assert got.dtype == torch.float32  # projections run in fp32 even for a bf16 model
    cosine = torch.nn.functional.cosine_similarity(got.double(), reference, dim=1)
    assert (cosine > 0.97).all(), cosine


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_chunked_lm_head_gives_the_same_losses_and_gradients(tiny_models, arch, monkeypatch):
    """The head and loss run 3 positions at a time under checkpointing: identical losses and LoGra blocks."""
    from attribindex.logra import _extractor

    model, tokenizer, projections = _setup(tiny_models[arch])
    extractor = GradientExtractor(model, tokenizer, projections, max_length=32, dtype=torch.float64)
    examples = extractor.tokenize(ITEMS)
    whole = extractor.extract(examples)
    monkeypatch.setattr(_extractor, "HEAD_CHUNK_ELEMENTS", len(ITEMS) * model.config.vocab_size * 3)
    chunked = extractor.extract(examples)
    torch.testing.assert_close(chunked.losses, whole.losses, rtol=1e-12, atol=0)
    names = [m.name for m in projections.modules]
    torch.testing.assert_close(chunked.concatenated(names), whole.concatenated(names), rtol=1e-10, atol=1e-14)
    expected = explicit_projected_gradients(model, tokenizer, ITEMS, projections, max_length=32)
    torch.testing.assert_close(chunked.concatenated(names), expected, rtol=1e-9, atol=1e-12)


def test_a_captured_lm_head_is_captured_once(tiny_models, monkeypatch):
    from attribindex.logra import _extractor

    monkeypatch.setattr(_extractor, "HEAD_CHUNK_ELEMENTS", 64)  # would split into many chunks if it were chunked
    model, tokenizer, projections = _setup(tiny_models["llama"], modules=("lm_head",), include_head=True)
    extractor = GradientExtractor(model, tokenizer, projections, max_length=32, dtype=torch.float64)
    got = extractor.extract(extractor.tokenize(ITEMS)).concatenated(["lm_head"])
    expected = explicit_projected_gradients(model, tokenizer, ITEMS, projections, max_length=32)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_a_classifier_mlp_gets_per_example_gradients_and_factors():
    """Layers applied to whole examples (B, n) are one-position sequences: the same hooks serve an MLP."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    mlp.requires_grad_(False)
    specs = [ModuleSpec("0", "linear", 6, 5), ModuleSpec("2", "linear", 5, 3)]
    projections = ProjectionSet.generate(specs, seed=1, rank_in=4, rank_out=2)
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    capture = LoGraCapture(mlp, projections, torch.float64)
    batch = capture_gradients(
        capture, lambda: torch.nn.functional.cross_entropy(mlp(x), y, reduction="none"), factors=True
    )
    layers = {spec.name: mlp[int(spec.name)] for spec in specs}
    seen: dict = {}

    def keep(module, args, output):
        output.retain_grad()
        seen[module] = (args[0], output)

    mlp.requires_grad_(True)
    handles = [layer.register_forward_hook(keep) for layer in layers.values()]
    for i in range(7):  # reference: plain autograd, one example at a time
        mlp.zero_grad()
        torch.nn.functional.cross_entropy(mlp(x[i : i + 1]), y[i : i + 1]).backward()
        for spec in specs:
            p_in, p_out = projections.p_in[spec.name].double(), projections.p_out[spec.name].double()
            expected = (p_out @ layers[spec.name].weight.grad @ p_in.T).reshape(-1)  # weight.grad: (out, in)
            torch.testing.assert_close(batch.blocks[spec.name][i], expected, rtol=1e-10, atol=1e-12)
            acts, output = seen[layers[spec.name]]
            x_tilde, delta = acts[0] @ p_in.T, output.grad[0] @ p_out.T  # (k_in,), (k_out,)
            factors = torch.cat([torch.outer(x_tilde, x_tilde).reshape(-1), torch.outer(delta, delta).reshape(-1)])
            torch.testing.assert_close(batch.factors[spec.name][i], factors, rtol=1e-10, atol=1e-12)
    for handle in handles:
        handle.remove()
