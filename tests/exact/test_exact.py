"""The exact section's parts on a model that is not a language model (an MLP): factor sums against autograd, and
the two ways of scoring (token-contracted and from rotated full gradients) against each other and against an explicit
Kronecker-factored inverse Hessian."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attribindex.exact import (
    ContractedScores,
    FactorListener,
    RotatedGradients,
    fit_exact_preconditioner,
    kfac_bases,
    layer_shapes,
)
from attribindex.logra import LayerHooks

NAMES = ["0", "2"]


def _mlp_and_data():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3, bias=False)).double().requires_grad_(False)
    return mlp, torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,))


def _run(mlp, x, y, listener):
    hooks = LayerHooks(mlp, NAMES, torch.float64, [listener])
    with torch.enable_grad(), hooks:
        hooks.backward(F.cross_entropy(mlp(x), y, reduction="sum"))


def _autograd_gradients(mlp, x, y) -> dict[str, torch.Tensor]:
    """{layer: (N, n_out, n_in')} per-example gradients of weight and bias (as a last column), one at a time."""
    out = {name: [] for name in NAMES}
    for i in range(len(x)):
        mlp.zero_grad()
        with torch.enable_grad():
            mlp.requires_grad_(True)
            F.cross_entropy(mlp(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        for name in NAMES:
            layer = mlp.get_submodule(name)
            grad = layer.weight.grad
            out[name].append(torch.cat([grad, layer.bias.grad[:, None]], 1) if layer.bias is not None else grad.clone())
    mlp.requires_grad_(False)
    return {name: torch.stack(grads) for name, grads in out.items()}


def test_factor_sums_and_trace_match_autograd():
    mlp, x, y = _mlp_and_data()
    shapes = layer_shapes(mlp, NAMES)
    assert shapes["0"].gradient_shape == (5, 7) and shapes["2"].gradient_shape == (3, 5)  # bias column on layer 0 only
    listener = FactorListener(shapes)
    _run(mlp, x, y, listener)
    sums = listener.take()
    gradients = _autograd_gradients(mlp, x, y)
    inputs = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    torch.testing.assert_close(sums["0"].activations, inputs.T @ inputs)
    for name in NAMES:
        torch.testing.assert_close(sums[name].trace, gradients[name].square().sum())
    delta = gradients["0"][:, :, -1]  # one position per example: the bias column of G is δ itself
    torch.testing.assert_close(sums["0"].gradients, delta.T @ delta)


def test_contracted_scores_equal_scores_from_rotated_gradients():
    mlp, x, y = _mlp_and_data()
    shapes = layer_shapes(mlp, NAMES)
    listener = FactorListener(shapes)
    _run(mlp, x, y, listener)
    sums = listener.take()
    bases = kfac_bases(
        {n: s.activations for n, s in sums.items()},
        {n: s.gradients for n, s in sums.items()},
        {n: s.trace for n, s in sums.items()},
        len(x),
    )
    preconditioner = fit_exact_preconditioner("kfac", bases, shapes, 0.1, None, torch.float64)
    rotated = {}
    _run(mlp, x[:2], y[:2], RotatedGradients(shapes, preconditioner, rotated.__setitem__))  # two "queries"
    layers = preconditioner.layers
    weighted = {n: rotated[n] * layers[n].inverse for n in NAMES}  # (Q, n_out, n_in')
    contracted = ContractedScores(shapes, {n: layers[n].unrotate(weighted[n]) for n in NAMES})
    _run(mlp, x, y, contracted)
    train = {}
    _run(mlp, x, y, RotatedGradients(shapes, preconditioner, train.__setitem__))
    from_rotated = sum(torch.einsum("noi,qoi->nq", train[n], weighted[n]) for n in NAMES)
    torch.testing.assert_close(contracted.scores, from_rotated)
    # and both equal an explicit (H + λI)⁻¹, formed without the eigenbases, applied to autograd gradients
    gradients = _autograd_gradients(mlp, x, y)
    explicit = sum(
        gradients[n].reshape(len(x), -1)
        @ _dense_kfac_inverse(mlp, x, y, n, gradients[n], 0.1)
        @ gradients[n][:2].reshape(2, -1).T
        for n in NAMES
    )
    torch.testing.assert_close(contracted.scores, explicit)


def _dense_kfac_inverse(mlp, x, y, name: str, gradients: torch.Tensor, alpha: float) -> torch.Tensor:
    """(d, d) KFAC (H + λI)⁻¹ of layer `name` as an explicit matrix: H = c · (S ⊗ A) from the layer's own inputs x̄ and
    output gradients δ (one position per example: δ = softmax − onehot after the last layer, the bias gradient after
    the first), c so that tr H = E‖G‖², λ = α · tr H / d (the mean eigenvalue), inverted by a linear solve."""
    if name == "0":
        inputs, deltas = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1), gradients[:, :, -1]
    else:  # the last layer's input, and the gradient of the summed cross-entropy at its output
        inputs, deltas = torch.tanh(mlp[0](x)), torch.softmax(mlp(x), -1) - F.one_hot(y, 3).double()
    a, s = inputs.T @ inputs / len(x), deltas.T @ deltas / len(x)
    hessian = torch.kron(s, a)  # row-major like vec(G) = G.reshape(-1)
    hessian = hessian * (gradients.square().sum(dim=(1, 2)).mean() / torch.trace(hessian))
    damped = hessian + alpha * torch.trace(hessian) / len(hessian) * torch.eye(len(hessian), dtype=hessian.dtype)
    return torch.linalg.solve(damped, torch.eye(len(hessian), dtype=hessian.dtype))
