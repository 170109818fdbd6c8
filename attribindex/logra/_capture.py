"""Per-example projected gradients from forward/backward hooks (LoGra).

For a captured layer y = W x, the per-example gradient is DW = Σ_t δ_t x_tᵀ. We project the
activations in the forward hook (x̃ = P_in x) and the output gradients in a tensor hook on the
layer's output (δ̃ = P_out δ), then form G̃ = Σ_t δ̃_t x̃_tᵀ with one batched matmul over tokens.
The full n_out × n_in gradient is never formed and no parameter gets a `.grad`.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from attribindex.errors import AttribIndexError
from attribindex.logra._projection import ProjectionSet


class LoGraCapture:
    """Hooks that turn one backward pass into per-example projected gradients.

    Use as a context manager around each forward + backward (hooks live only inside it); one
    instance serves any number of batches.

    Example:
        >>> capture = LoGraCapture(model, projections, torch.float32)  # doctest: +SKIP
        >>> with capture:  # doctest: +SKIP
        ...     losses = per_example_loss(model, input_ids, attention_mask, loss_mask)  # (B,)
        ...     gradients = capture.backward(losses.sum())
        >>> gradients["transformer.h.0.mlp.c_fc"].shape  # (B, k_out * k_in)  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, projections: ProjectionSet, dtype: torch.dtype):
        self.dtype = dtype
        modules = dict(model.named_modules())
        self._targets = [(spec.name, modules[spec.name]) for spec in projections.modules]
        device = next(model.parameters()).device
        self._p_in = {n: p.to(device=device, dtype=dtype) for n, p in projections.p_in.items()}
        self._p_out = {n: p.to(device=device, dtype=dtype) for n, p in projections.p_out.items()}
        self._handles: list = []
        self._anchors: list[torch.Tensor] = []
        self._acts: dict[str, torch.Tensor] = {}
        self.gradients: dict[str, torch.Tensor] = {}

    def __enter__(self) -> LoGraCapture:
        for name, module in self._targets:
            self._handles.append(module.register_forward_hook(partial(self._on_forward, name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._acts.clear()
        self._anchors.clear()

    def _on_forward(self, name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if name in self._acts:
            raise AttribIndexError(
                f"layer {name} ran twice in one forward pass (shared weights); LoGra capture needs each captured "
                f"layer to run once. Exclude it with projection.exclude."
            )
        x = args[0].to(self.dtype)  # (B, T, n_in)
        self._acts[name] = x @ self._p_in[name].T  # (B, T, k_in)
        if not output.requires_grad:
            # The lowest captured layers: nothing below needs gradients, so backward starts its graph
            # here. A zero scalar leaf joins the graph without making the output a leaf (in-place safe).
            anchor = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            self._anchors.append(anchor)
            output = output + anchor
        output.register_hook(partial(self._on_output_grad, name))
        return output

    def _on_output_grad(self, name: str, grad: torch.Tensor) -> None:
        delta = grad.to(self.dtype) @ self._p_out[name].T  # (B, T, k_out)
        acts = self._acts.pop(name)  # (B, T, k_in)
        projected = torch.bmm(delta.transpose(1, 2), acts)  # (B, k_out, k_in)
        self.gradients[name] = projected.reshape(projected.shape[0], -1)  # (B, k_out * k_in)

    def backward(self, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backpropagate `loss` (a sum of per-example losses) only as far as the lowest captured layers."""
        self.gradients = {}
        if not self._anchors:
            raise AttribIndexError("no captured layer ran in the forward pass; check projection.modules.")
        torch.autograd.backward(loss, inputs=self._anchors)
        for name, _ in self._targets:
            if name not in self.gradients:  # the loss does not reach this layer: its gradient is zero
                acts = self._acts.pop(name)
                self.gradients[name] = acts.new_zeros((acts.shape[0], self._p_out[name].shape[0] * acts.shape[2]))
        self._anchors.clear()
        return self.gradients
