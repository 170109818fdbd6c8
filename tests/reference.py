"""Independent reference computations the tests compare against: plain autograd, explicit
Kronecker projection, and influence by a linear solve (not via H^{-1/2})."""

from __future__ import annotations

import torch

from attribindex.data import collate, tokenize
from attribindex.logra import ProjectionSet, per_example_loss


def explicit_projected_gradients(model, tokenizer, items, projections: ProjectionSet, max_length: int) -> torch.Tensor:
    """(N, D) per-example P_out · G · P_inᵀ from full weight gradients, one example at a time."""
    model = model.double()
    modules = dict(model.named_modules())
    rows = []
    for i, item in enumerate(items):
        example = tokenize(tokenizer, item, max_length, f"item {i}")
        batch = collate([example], tokenizer.pad_token_id)
        model.zero_grad()
        with torch.enable_grad():
            for spec in projections.modules:
                modules[spec.name].weight.requires_grad_(True)
            per_example_loss(model, batch.input_ids, batch.attention_mask, batch.loss_mask).sum().backward()
        blocks = []
        for spec in projections.modules:
            grad = modules[spec.name].weight.grad  # Linear: (out, in); Conv1D: (in, out)
            grad = grad.T if spec.kind == "conv1d" else grad
            p_in, p_out = projections.p_in[spec.name].double(), projections.p_out[spec.name].double()
            blocks.append((p_out @ grad @ p_in.T).reshape(-1))
        rows.append(torch.cat(blocks))
    model.requires_grad_(False)
    return torch.stack(rows)


def brute_force_scores(
    train: torch.Tensor, queries: torch.Tensor, dims: list[int], damping: float | None, mode: str
) -> torch.Tensor:
    """(Q, N) influence g_qᵀ (H + λI)^{-1} g_t summed over modules (H = mean g gᵀ, λ = α·mean eig),
    or plain g_qᵀ g_t when damping is None; cosine divides by both self-influences."""
    scores = torch.zeros(queries.shape[0], train.shape[0], dtype=torch.float64)
    self_q = torch.zeros(queries.shape[0], dtype=torch.float64)
    self_t = torch.zeros(train.shape[0], dtype=torch.float64)
    offset = 0
    for dim in dims:
        g_t, g_q = train[:, offset : offset + dim], queries[:, offset : offset + dim]
        if damping is None:
            solved_t = g_t
        else:
            fisher = g_t.T @ g_t / g_t.shape[0]
            lam = damping * torch.trace(fisher) / dim  # mean eigenvalue = trace / dim
            solved_t = torch.linalg.solve(fisher + lam * torch.eye(dim, dtype=torch.float64), g_t.T).T
        scores += g_q @ solved_t.T
        self_t += (g_t * solved_t).sum(1)
        solved_q = (
            g_q if damping is None else torch.linalg.solve(fisher + lam * torch.eye(dim, dtype=torch.float64), g_q.T).T
        )
        self_q += (g_q * solved_q).sum(1)
        offset += dim
    if mode == "cosine":
        scores = scores / (self_q.sqrt()[:, None] * self_t.sqrt()[None, :])
    return scores
