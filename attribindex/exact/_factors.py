"""Unprojected Kronecker factors of captured layers, summed over a batch's tokens.

A layer y = W x + b has the per-example gradient G = Σ_t δ_t x̄_tᵀ of its weight and bias together, where
x̄ = [x, 1] when the layer has a bias (its gradient is Σ_t δ_t). KFAC approximates the Hessian of the weights
by S ⊗ A with A = E[Σ_t x̄ x̄ᵀ] (n_in' × n_in') and S = E[Σ_t δ δᵀ] (n_out × n_out). The listener here sums both
over the examples of a batch, and (for KFAC) Σ_n ‖G_n‖², the trace that fixes the factors' scale, without forming
any G_n: ‖Σ_t δ_t x̄_tᵀ‖² = Σ_{t,t'} (δ_t·δ_t')(x̄_t·x̄_t'), two (T × T) Gram matrices per example.

The factors cost B·T·(n_in'² + n_out²) multiply-adds per layer, more than the layer's own weight gradient
(B·T·n_in'·n_out) unless it is square, so a build sums them over a seeded sample of its examples
(`factor_selection`), each weighted by 1 / its inclusion probability: the sums stay unbiased estimates of the sums
over every example, and shards, resumes and appends add up as before.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
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


def factor_rate(sample: int | None, corpus_length: int | None) -> float:
    """The probability that each example of a pass over `corpus_length` examples feeds the factors, for about
    `sample` of them: 1 with no sample, or when the length is unknown (a streamed corpus sums every example).

    Example:
        >>> factor_rate(1024, 4096), factor_rate(1024, 100), factor_rate(None, 4096)
        (0.25, 1.0, 1.0)
    """
    if sample is None or corpus_length is None or sample >= corpus_length:
        return 1.0
    return sample / corpus_length


def factor_selection(positions: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """Which corpus `positions` ((B,) int) feed the factors, at `rate`: a seeded hash of each position (SplitMix64),
    so a position is chosen or not whatever batch, shard or resumed run it falls in.

    Example:
        >>> factor_selection(np.arange(8), 0.5, seed=0).tolist()
        [True, True, False, True, False, False, False, True]
    """
    if rate >= 1.0:
        return np.ones(len(positions), dtype=bool)
    with np.errstate(over="ignore"):  # the hash multiplies modulo 2⁶⁴ on purpose
        z = np.asarray(positions, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53 < rate  # (B,) uniform in [0, 1) per position


@dataclass
class FactorBatch:
    """One batch's unprojected factor sums of one layer (fp64): Σ x̄ x̄ᵀ, Σ δ δᵀ and Σ ‖G‖² over its `examples`
    (the ones selected, each weighted by 1 / the selection rate)."""

    activations: torch.Tensor  # (n_in', n_in')
    gradients: torch.Tensor  # (n_out, n_out)
    trace: torch.Tensor  # () Σ_n ‖G_n‖² (zero where the trace is not kept)
    examples: int

    def add_(self, other: FactorBatch) -> None:
        """Add the sums of other examples (of the same layer) in place."""
        self.activations.add_(other.activations)
        self.gradients.add_(other.gradients)
        self.trace.add_(other.trace)
        self.examples += other.examples


class FactorListener:
    """A `TokenListener` that sums the unprojected Kronecker factors of each layer over a batch (`take`), and the
    trace Σ‖G‖² with `trace` (KFAC's scale; EK-FAC replaces the eigenvalues it would scale).

    Example:
        >>> mlp = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).requires_grad_(False)
        >>> listener = FactorListener(layer_shapes(mlp, ["0", "2"]))
        >>> with LayerHooks(mlp, ["0", "2"], torch.float64, [listener]) as hooks:
        ...     hooks.backward(mlp(torch.randn(5, 4, dtype=torch.float64)).sum())
        >>> listener.take()["2"].activations.shape
        torch.Size([4, 4])
    """

    def __init__(self, shapes: dict[str, LayerShape], trace: bool = True):
        self.shapes = shapes
        self.trace = trace
        self._rows: torch.Tensor | None = None  # the batch's examples to sum (None: all)
        self._weight = 1.0
        self._inputs: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._sums: dict[str, FactorBatch] = {}

    def select(self, rows: torch.Tensor | None, weight: float = 1.0) -> None:
        """Sum only the examples `rows` ((B',) long) of the batches that follow, each weighted by `weight`."""
        self._rows, self._weight = rows, weight

    def _chosen(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """(B, T, n) → (B', T, n): the selected examples with their padding zeroed; None when none is selected."""
        if self._rows is not None:
            if len(self._rows) == 0:
                return None
            tokens = tokens[self._rows.to(tokens.device)]
            mask = mask[self._rows.to(mask.device)] if mask is not None else None
        return masked_tokens(tokens, mask)

    def on_input(self, name: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        x = self._chosen(with_bias(x, self.shapes[name]), mask)  # (B', T, n_in')
        if x is None:
            return
        tokens = x.reshape(-1, x.shape[-1])  # (B'·T, n_in')
        self._inputs[name] = (tokens.T @ tokens, x @ x.transpose(1, 2) if self.trace else None)  # (n_in',)², (B',T,T)

    def on_output_grad(self, name: str, delta: torch.Tensor, mask: torch.Tensor | None) -> None:
        if name not in self._inputs:
            return
        activations, input_gram = self._inputs.pop(name)
        delta = self._chosen(delta, mask)  # (B', T, n_out)
        tokens = delta.reshape(-1, delta.shape[-1])  # (B'·T, n_out)
        trace = activations.new_zeros(())
        if input_gram is not None:
            trace = (input_gram * (delta @ delta.transpose(1, 2))).sum()  # Σ_n Σ_{t,t'} (x̄_t·x̄_t')(δ_t·δ_t')
        sums = [activations.double(), (tokens.T @ tokens).double(), trace.double()]
        if self._weight != 1.0:
            sums = [total * self._weight for total in sums]
        self._sums[name] = FactorBatch(*sums, examples=delta.shape[0])

    def take(self) -> dict[str, FactorBatch]:
        """The sums of the batch that just ran backward, per layer (empty when none of its examples was selected);
        the listener is then empty again."""
        sums, self._sums = self._sums, {}
        return sums
