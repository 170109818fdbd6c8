"""Per-example projected gradients from forward/backward hooks (LoGra).

For a captured layer y = W x (+ b), the per-example gradient is DW = Σ_t δ_t x_tᵀ (and Db = Σ_t δ_t: the
column of a constant input 1, so a captured bias is [DW Db] = Σ_t δ_t [x_t; 1]ᵀ). We project the
activations in the forward hook (x̃ = P_in x, or P_in [x; 1]) and the output gradients in a tensor hook on the
layer's output (δ̃ = P_out δ), then form G̃ = Σ_t δ̃_t x̃_tᵀ with one batched matmul over tokens.
The full n_out × n_in gradient is never formed and no parameter gets a `.grad`.

With `track_factors`, the same hooks also return each example's token sums Σ_t x̃ x̃ᵀ and Σ_t δ̃ δ̃ᵀ over the
positions `token_mask` keeps (padding excluded): the Kronecker factors of KFAC / EK-FAC.
"""

from __future__ import annotations

import torch
from torch import nn

from attribindex.logra._hooks import LayerHooks, TokenListener
from attribindex.logra._projection import ProjectionSet


class LoGraCapture(LayerHooks):
    """Hooks that turn one backward pass into per-example projected gradients.

    Use as a context manager around each forward + backward (hooks live only inside it); one
    instance serves any number of batches. `extra_listeners` see the same unprojected inputs and output
    gradients in the same pass (the exact section's Kronecker factors).

    Example:
        >>> capture = LoGraCapture(model, projections, torch.float32)  # doctest: +SKIP
        >>> with capture:  # doctest: +SKIP
        ...     losses = per_example_loss(model, input_ids, attention_mask, loss_mask)  # (B,)
        ...     gradients = capture.backward(losses.sum())
        >>> gradients["transformer.h.0.mlp.c_fc"].shape  # (B, k_out * k_in)  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, projections: ProjectionSet, dtype: torch.dtype):
        super().__init__(model, [spec.name for spec in projections.modules], dtype, [])
        self._device = next(model.parameters()).device
        self.use_projections(projections)
        self._acts: dict[str, torch.Tensor] = {}
        self.gradients: dict[str, torch.Tensor] = {}
        self.track_factors = False
        self._input_factors: dict[str, torch.Tensor] = {}
        self.factors: dict[str, torch.Tensor] = {}  # name -> (B, k_in² + k_out²) when track_factors
        self.extra_listeners: list[TokenListener] = []

    def __enter__(self) -> LoGraCapture:
        self.listeners = [self, *self.extra_listeners]
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._acts.clear()
        self._input_factors.clear()

    def use_projections(self, projections: ProjectionSet) -> None:
        """Project with these matrices from the next pass on (same modules and ranks; a training capture refolds
        the optimizer's second moments into them step by step)."""
        self._p_in = {n: p.to(device=self._device, dtype=self.dtype) for n, p in projections.p_in.items()}
        self._p_out = {n: p.to(device=self._device, dtype=self.dtype) for n, p in projections.p_out.items()}

    def on_input(self, name: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        acts = project_inputs(x, self._p_in[name])  # (B, T, k_in)
        self._acts[name] = acts
        if self.track_factors:
            masked = self.masked(acts)
            self._input_factors[name] = masked.transpose(1, 2) @ masked  # (B, k_in, k_in)

    def on_output_grad(self, name: str, delta: torch.Tensor, mask: torch.Tensor | None) -> None:
        delta = delta @ self._p_out[name].T  # (B, T, k_out)
        acts = self._acts.pop(name)  # (B, T, k_in)
        projected = torch.bmm(delta.transpose(1, 2), acts)  # (B, k_out, k_in)
        self.gradients[name] = projected.reshape(projected.shape[0], -1)  # (B, k_out * k_in)
        if self.track_factors:
            masked = self.masked(delta)
            output_factor = masked.transpose(1, 2) @ masked  # (B, k_out, k_out)
            input_factor = self._input_factors.pop(name)  # (B, k_in, k_in)
            self.factors[name] = torch.cat([input_factor.flatten(1), output_factor.flatten(1)], dim=1)

    def backward(self, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backpropagate `loss` (a sum of per-example losses); returns {name: (B, k_out * k_in)}."""
        self.start_pass()
        super().backward(loss)
        return self.gradients

    def start_pass(self) -> None:
        """Forget the last pass's gradients and factors (`backward` does this; a training loop's pass calls it)."""
        self.gradients = {}
        self.factors = {}


def project_inputs(x: torch.Tensor, p_in: torch.Tensor) -> torch.Tensor:
    """(B, T, n_in) layer inputs → (B, T, k_in) x̃ = P_in x, or P_in [x; 1] when `p_in` has a captured bias's column.

    Example:
        >>> project_inputs(torch.ones(1, 2, 3), torch.ones(4, 4)).shape  # a bias column: [x; 1] has 4 entries
        torch.Size([1, 2, 4])
    """
    acts = x @ p_in[:, : x.shape[-1]].T  # (B, T, k_in)
    if p_in.shape[1] > x.shape[-1]:
        acts = acts + p_in[:, -1]  # the bias column times the constant input 1, at every position
    return acts
