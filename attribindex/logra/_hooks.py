"""Hooks that show each captured layer's inputs and output gradients, token by token, to listeners.

For a layer y = W x (+ b) run on (B, T) token positions, the per-example weight gradient is Σ_t δ_t x_tᵀ, where
x_t is the layer's input and δ_t = ∂loss/∂y_t. Everything attribindex computes from a backward pass is built
from these two tensors: LoGra's projected gradients (`LoGraCapture`), the unprojected Kronecker factors and
exact scores (`attribindex.exact`). `LayerHooks` owns the mechanics they share: forward hooks, a tensor hook on
each output, a backward pass that stops at the lowest captured layer, and zero gradients for layers the loss
does not reach. No parameter ever gets a `.grad`.
"""

from __future__ import annotations

from functools import partial
from typing import Protocol

import torch
from torch import nn

from attribindex.errors import AttribIndexError


class TokenListener(Protocol):
    """Receives, per captured layer and batch, the input x (B, T, n_in) during forward and the output gradient
    δ (B, T, n_out) during backward, both in the hooks' dtype. `mask` (B, T) marks real tokens, or is None."""

    def on_input(self, name: str, x: torch.Tensor, mask: torch.Tensor | None) -> None: ...

    def on_output_grad(self, name: str, delta: torch.Tensor, mask: torch.Tensor | None) -> None: ...


class LayerHooks:
    """Forward/backward hooks on the layers `names` of `model`, feeding `listeners`.

    Use as a context manager around each forward pass, then call `backward` with the summed per-example loss.

    Example:
        >>> mlp = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).requires_grad_(False)
        >>> class Shapes:
        ...     def on_input(self, name, x, mask): print(name, "x", tuple(x.shape))
        ...     def on_output_grad(self, name, delta, mask): print(name, "δ", tuple(delta.shape))
        >>> hooks = LayerHooks(mlp, ["0", "2"], torch.float32, [Shapes()])
        >>> with hooks:
        ...     hooks.backward(mlp(torch.randn(5, 4)).sum())
        0 x (5, 1, 4)
        2 x (5, 1, 3)
        2 δ (5, 1, 2)
        0 δ (5, 1, 3)
    """

    def __init__(self, model: nn.Module, names: list[str], dtype: torch.dtype, listeners: list[TokenListener]):
        self.dtype = dtype
        modules = dict(model.named_modules())
        self._targets = [(name, modules[name]) for name in names]
        self.listeners = listeners
        self.token_mask: torch.Tensor | None = None  # (B, T) 1 for real tokens; None = every position counts
        self._handles: list = []
        self._anchors: list[torch.Tensor] = []
        # layers run forward whose gradient has not arrived: their output's shape and device
        self._waiting: dict[str, tuple[torch.Size, torch.device]] = {}

    def __enter__(self) -> LayerHooks:
        for name, module in self._targets:
            self._handles.append(module.register_forward_hook(partial(self._on_forward, name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._anchors.clear()
        self._waiting.clear()

    def masked(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, n) with the positions `token_mask` excludes (padding) set to zero."""
        return masked_tokens(tokens, self.token_mask)

    def _on_forward(self, name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if name in self._waiting:
            raise AttribIndexError(
                f"layer {name} ran twice in one forward pass (shared weights); gradient capture needs each captured "
                f"layer to run once. Exclude it with projection.exclude."
            )
        self._waiting[name] = (with_positions(output).shape, output.device)
        x = with_positions(args[0].detach().to(self.dtype))  # (B, T, n_in): observed, not differentiated
        for listener in self.listeners:
            listener.on_input(name, x, self.token_mask)
        if not output.requires_grad:
            # The lowest captured layers: nothing below needs gradients, so backward starts its graph
            # here. A zero scalar leaf joins the graph without making the output a leaf (in-place safe).
            anchor = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            self._anchors.append(anchor)
            output = output + anchor
        output.register_hook(partial(self._on_output_grad, name))
        return output

    def _on_output_grad(self, name: str, grad: torch.Tensor) -> None:
        del self._waiting[name]
        delta = with_positions(grad.to(self.dtype))  # (B, T, n_out)
        for listener in self.listeners:
            listener.on_output_grad(name, delta, self.token_mask)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate `loss` (a sum of per-example losses) only as far as the lowest captured layers."""
        if not self._anchors:
            raise AttribIndexError("no captured layer ran in the forward pass; check projection.modules.")
        torch.autograd.backward(loss, inputs=self._anchors)
        self.finish_pass()

    def finish_pass(self) -> None:
        """After a backward pass (ours, or a training loop's own): the layers the loss did not reach get δ = 0."""
        for name, (shape, device) in list(self._waiting.items()):
            self._on_output_grad(name, torch.zeros(shape, dtype=self.dtype, device=device))
        self._anchors.clear()


def masked_tokens(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, n) with the positions `mask` (B, T) excludes set to zero; unchanged without a mask of that length."""
    if mask is None or tokens.shape[1] != mask.shape[1]:
        return tokens
    return tokens * mask.to(device=tokens.device, dtype=tokens.dtype).unsqueeze(-1)


def with_positions(tensor: torch.Tensor) -> torch.Tensor:
    """(B, n) → (B, 1, n): a layer applied to whole examples (an MLP) is a sequence of one position."""
    return tensor.unsqueeze(1) if tensor.dim() == 2 else tensor
