"""Unprojected Kronecker factors of captured layers, summed over a batch's tokens.

A layer y = W x + b has the per-example gradient G = Σ_t δ_t x̄_tᵀ of its weight and bias together, where
x̄ = [x, 1] when the layer has a bias (its gradient is Σ_t δ_t). KFAC approximates the Hessian of the weights
by S ⊗ A with A = E[Σ_t x̄ x̄ᵀ] (n_in' × n_in') and S = E[Σ_t δ δᵀ] (n_out × n_out). The listener here sums both
over the examples of a batch, and Σ_n ‖G_n‖², the trace that fixes the factors' scale, without forming any G_n:
‖Σ_t δ_t x̄_tᵀ‖² = Σ_{t,t'} (δ_t·δ_t')(x̄_t·x̄_t'), two (T × T) Gram matrices per example.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn

from attribindex.logra import masked_tokens


@dataclass(frozen=True)
class LayerShape:
    """The unprojected gradient of one captured layer: (out_features, in_features), and whether a bias column
    joins the inputs.

    Example:
        >>> LayerShape(out_features=8, in_features=4, bias=True).gradient_shape
        (8, 5)
    """

    out_features: int
    in_features: int
    bias: bool

    @property
    def gradient_shape(self) -> tuple[int, int]:
        """(n_out, n_in') of G: the bias, when there is one, is one more input column."""
        return self.out_features, self.in_features + int(self.bias)

    @property
    def factor_numbers(self) -> int:
        """Numbers in the two factors: n_in'² + n_out²."""
        n_out, n_in = self.gradient_shape
        return n_in * n_in + n_out * n_out


def layer_shapes(model: nn.Module, names: list[str], biased: Collection[str] | None = None) -> dict[str, LayerShape]:
    """The unprojected gradient shapes of the layers `names` (Linear or GPT-2 Conv1D) of `model`; a bias column
    for the layers in `biased` that have a bias (None: every layer that has one).

    Example:
        >>> layer_shapes(nn.Sequential(nn.Linear(4, 8)), ["0"])
        {'0': LayerShape(out_features=8, in_features=4, bias=True)}
    """
    modules = dict(model.named_modules())
    shapes = {}
    for name in names:
        module = modules[name]
        weight = module.weight
        out_features, in_features = weight.shape if isinstance(module, nn.Linear) else weight.shape[::-1]
        bias = getattr(module, "bias", None) is not None and (biased is None or name in biased)
        shapes[name] = LayerShape(int(out_features), int(in_features), bias)
    return shapes


def with_bias(x: torch.Tensor, shape: LayerShape) -> torch.Tensor:
    """(B, T, n_in) → (B, T, n_in') : a column of ones appended when the layer has a bias."""
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1) if shape.bias else x


@dataclass
class FactorBatch:
    """One batch's unprojected factor sums of one layer (fp64): Σ x̄ x̄ᵀ, Σ δ δᵀ and Σ ‖G‖² over its examples."""

    activations: torch.Tensor  # (n_in', n_in')
    gradients: torch.Tensor  # (n_out, n_out)
    trace: torch.Tensor  # () Σ_n ‖G_n‖²

    def add_(self, other: FactorBatch) -> None:
        """Add the sums of other examples (of the same layer) in place."""
        self.activations.add_(other.activations)
        self.gradients.add_(other.gradients)
        self.trace.add_(other.trace)


class FactorListener:
    """A `TokenListener` that sums the unprojected Kronecker factors of each layer over a batch (`take`).

    Example:
        >>> mlp = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).requires_grad_(False)
        >>> listener = FactorListener(layer_shapes(mlp, ["0", "2"]))
        >>> with LayerHooks(mlp, ["0", "2"], torch.float64, [listener]) as hooks:
        ...     hooks.backward(mlp(torch.randn(5, 4, dtype=torch.float64)).sum())
        >>> listener.take()["2"].activations.shape
        torch.Size([4, 4])
    """

    def __init__(self, shapes: dict[str, LayerShape]):
        self.shapes = shapes
        self._inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._sums: dict[str, FactorBatch] = {}

    def on_input(self, name: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        x = masked_tokens(with_bias(x, self.shapes[name]), mask)  # (B, T, n_in')
        tokens = x.reshape(-1, x.shape[-1])  # (B·T, n_in')
        self._inputs[name] = (tokens.T @ tokens, x @ x.transpose(1, 2))  # (n_in', n_in'), (B, T, T)

    def on_output_grad(self, name: str, delta: torch.Tensor, mask: torch.Tensor | None) -> None:
        activations, input_gram = self._inputs.pop(name)
        delta = masked_tokens(delta, mask)  # (B, T, n_out)
        tokens = delta.reshape(-1, delta.shape[-1])  # (B·T, n_out)
        trace = (input_gram * (delta @ delta.transpose(1, 2))).sum()  # Σ_n Σ_{t,t'} (x̄_t·x̄_t')(δ_t·δ_t')
        self._sums[name] = FactorBatch(activations.double(), (tokens.T @ tokens).double(), trace.double())

    def take(self) -> dict[str, FactorBatch]:
        """The sums of the batch that just ran backward, per layer; the listener is then empty again."""
        sums, self._sums = self._sums, {}
        return sums
