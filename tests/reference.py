"""Independent reference computations the tests compare against: plain autograd, explicit
Kronecker projection, and influence by a linear solve (not via H^{-1/2}).

Nothing here tokenises, pads or computes a loss through attribindex: an example is tokenised by the HF tokenizer
call itself, its labels and mask are made here, and its loss is `torch.nn.functional.cross_entropy`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attribindex.data import PromptCompletion
from attribindex.logra import ProjectionSet

IGNORED = -100  # the label of a position that carries no loss


def reference_example(tokenizer, item, max_length: int, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), each (1, T), of one unpadded example: the HF tokenizer's ids (special
    tokens added) cut to `max_length`; labels hold the token where it carries loss and -100 elsewhere. The first
    token is never predicted; of a (prompt, completion) pair, tokenised as the joined text, the tokens holding a
    completion character (their offsets end past the prompt) carry loss, special tokens never."""
    if isinstance(item, PromptCompletion):
        if not getattr(tokenizer, "is_fast", False):
            raise AssertionError("the reference finds a pair's completion tokens by offsets: give a fast tokenizer")
        encoded = tokenizer(
            item.prompt + item.completion, return_offsets_mapping=True, return_special_tokens_mask=True, verbose=False
        )
        boundary = len(item.prompt)
        carries = [
            end > boundary and not special
            for (_, end), special in zip(encoded["offset_mapping"], encoded["special_tokens_mask"])
        ]
    else:
        encoded = tokenizer(item, verbose=False)
        carries = [True] * len(encoded["input_ids"])
    ids, carries = encoded["input_ids"][:max_length], carries[:max_length]
    carries[0] = False  # nothing before it to predict it from
    assert any(carries), f"{name}: no token carries loss"
    input_ids = torch.tensor([ids])
    labels = torch.tensor([[token if carry else IGNORED for token, carry in zip(ids, carries)]])
    return input_ids, torch.ones_like(input_ids), labels  # one unpadded example: every position is a real token


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) Σ_t ℓ_t per example: position t's logits predict label t + 1; positions labelled -100 add nothing."""
    shifted, targets = logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1)
    token_loss = F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORED, reduction="none"
    )
    return token_loss.view(targets.shape).sum(dim=1)


def _plain_backward(model, tokenizer, item, name: str, layers: list[str], max_length: int) -> dict:
    """One unpadded example through plain autograd (full logits, no hooks of ours), float64: per captured layer
    (module, its input, its output) with `.grad` set on the module's weight and bias and on the output."""
    modules = dict(model.named_modules())
    input_ids, attention_mask, labels = reference_example(tokenizer, item, max_length, name)
    seen = {}

    def keep(module, args, output):
        output.retain_grad()
        seen[module] = (args[0], output)

    handles = [modules[n].register_forward_hook(keep) for n in layers]
    model.zero_grad()
    with torch.enable_grad():
        for n in layers:
            modules[n].requires_grad_(True)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # as a model's own loss computes it
        summed_token_loss(logits, labels).sum().backward()
    for handle in handles:
        handle.remove()
    model.requires_grad_(False)
    return {n: (modules[n], *seen[modules[n]]) for n in layers}


def explicit_projected_gradients(
    model, tokenizer, items, projections: ProjectionSet, max_length: int, multipliers: dict | None = None
) -> torch.Tensor:
    """(N, D) per-example P_out · G · P_inᵀ from full weight (and, where captured, bias) gradients, one example at
    a time: G = [DW Db] for a captured bias. With `multipliers[name]` (the weight's own shape) and
    `multipliers[name + ".bias"]` (n_out,), G is first multiplied by them elementwise."""
    model = model.double()
    rows = []
    for i, item in enumerate(items):
        layers = _plain_backward(model, tokenizer, item, f"item {i}", _names(projections), max_length)
        blocks = []
        for spec in projections.modules:
            module = layers[spec.name][0]
            grad = module.weight.grad  # Linear: (out, in); Conv1D: (in, out)
            if multipliers is not None:
                grad = grad * multipliers[spec.name].double()
            grad = grad.T if spec.kind == "conv1d" else grad  # (out, in)
            if spec.bias:
                bias_grad = module.bias.grad  # (out,)
                if multipliers is not None:
                    bias_grad = bias_grad * multipliers[spec.name + ".bias"].double()
                grad = torch.cat([grad, bias_grad[:, None]], dim=1)  # (out, in + 1)
            p_in, p_out = projections.p_in[spec.name].double(), projections.p_out[spec.name].double()
            blocks.append((p_out @ grad @ p_in.T).reshape(-1))
        rows.append(torch.cat(blocks))
    return torch.stack(rows)


def explicit_factor_rows(model, tokenizer, items, projections: ProjectionSet, max_length: int) -> torch.Tensor:
    """(N, F) per-example KFAC token sums [Σ_t (P_in x_t)(P_in x_t)ᵀ, Σ_t (P_out δ_t)(P_out δ_t)ᵀ] per module, from
    layer inputs and autograd output gradients, one unpadded example at a time."""
    model = model.double()
    rows = []
    for i, item in enumerate(items):
        layers = _plain_backward(model, tokenizer, item, f"item {i}", _names(projections), max_length)
        parts = []
        for spec in projections.modules:
            _, inputs, outputs = layers[spec.name]
            x = inputs[0]  # (T, n_in)
            if spec.bias:
                x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # (T, n_in + 1)
            x = x @ projections.p_in[spec.name].double().T  # (T, k_in)
            delta = outputs.grad[0] @ projections.p_out[spec.name].double().T  # (T, k_out)
            parts += [(x.T @ x).reshape(-1), (delta.T @ delta).reshape(-1)]
        rows.append(torch.cat(parts))
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


def assert_same_index(
    path_a, path_b, rtol: float = 1e-6, queries: int = 5, same_sources: bool = True, curvature_rtol: float = 1e-12
) -> None:
    """Two index folders hold the same index: ids and texts (and sources) in the same order, the same raw
    rows and curvature sums, and the same search results for random queries (ids, order and scores)."""
    import numpy as np

    from attribindex import AttributionIndex
    from attribindex.hessian import CurvatureSums

    a, b = (AttributionIndex.open(p, load_model_now=False) for p in (path_a, path_b))
    assert a.manifest.rows == b.manifest.rows and a.manifest.dim == b.manifest.dim
    rows = list(range(a.manifest.rows))
    docs_a, docs_b = a.store.documents(rows), b.store.documents(rows)
    assert [(d.id, d.text) for d in docs_a] == [(d.id, d.text) for d in docs_b]
    assert not same_sources or [d.source for d in docs_a] == [d.source for d in docs_b]
    raw_a = np.concatenate([raw.numpy() for _, raw in a.store.iter_raw()])
    raw_b = np.concatenate([raw.numpy() for _, raw in b.store.iter_raw()])
    np.testing.assert_allclose(raw_a, raw_b, rtol=rtol, atol=1e-12)
    (sums_a, _), (sums_b, _) = (CurvatureSums.load(i.root / i.manifest.hessian.curvature_file) for i in (a, b))
    assert sums_a.count == sums_b.count == len(rows)
    assert sums_a.tensors.keys() == sums_b.tensors.keys()
    for name, total in sums_a.tensors.items():
        scale = float(sums_b.tensors[name].abs().max())  # near-cancelled entries are judged against the block's scale
        torch.testing.assert_close(total, sums_b.tensors[name], rtol=curvature_rtol, atol=curvature_rtol * scale)
    for key in ("model", "projection", "modules", "normalization"):
        assert getattr(a.manifest, key) == getattr(b.manifest, key), key
    probe = np.random.default_rng(0).standard_normal((queries, a.manifest.dim)).astype(np.float32)
    k = min(10, len(rows))
    scores_a, rows_a = a.index.search(probe, k)
    scores_b, rows_b = b.index.search(probe, k)
    np.testing.assert_array_equal(rows_a, rows_b)
    np.testing.assert_allclose(scores_a, scores_b, rtol=1e-5, atol=1e-6)


def stamped_queries(index, vectors):
    """QueryVectors carrying `index`'s own hashes, so precomputed (n, D) `vectors` can be searched directly."""
    import numpy as np

    from attribindex import QueryVectors

    manifest = index.manifest
    return QueryVectors(
        vectors=vectors,
        losses=np.zeros(len(vectors)),
        model_fingerprint=manifest.model.fingerprint,
        projection_hash=manifest.projection.hash,
        preconditioner_hash=manifest.hessian.preconditioner_hash,
        normalization=manifest.normalization,
    )


def _names(projections: ProjectionSet) -> list[str]:
    return [spec.name for spec in projections.modules]


def _full_gradients(model, tokenizer, item, name: str, layers: list[str], max_length: int) -> dict:
    """Per layer (G, Σ_t x̄x̄ᵀ, Σ_t δδᵀ) of one example, where G (n_out, n_in') is the autograd weight gradient
    (out × in) with the bias gradient as one more column when the layer has a bias (and x̄ = [x, 1] then)."""
    out = {}
    for n, (module, inputs, outputs) in _plain_backward(model, tokenizer, item, name, layers, max_length).items():
        weight = module.weight.grad if isinstance(module, torch.nn.Linear) else module.weight.grad.T  # (out, in)
        x, delta = inputs[0], outputs.grad[0]  # (T, n_in), (T, n_out)
        if module.bias is not None:
            weight = torch.cat([weight, module.bias.grad[:, None]], dim=1)
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        out[n] = (weight.clone(), (x.T @ x).detach(), (delta.T @ delta).detach())
    return out


def _projected(layers: dict, projections: ProjectionSet) -> dict:
    """(G, Σ x̄x̄ᵀ, Σ δδᵀ) per layer → (P_out G P_inᵀ, P_in Σ x̄x̄ᵀ P_inᵀ, P_out Σ δδᵀ P_outᵀ)."""
    out = {}
    for n, (grad, inputs, outputs) in layers.items():
        p_in, p_out = projections.p_in[n].double(), projections.p_out[n].double()
        out[n] = (p_out @ grad @ p_in.T, p_in @ inputs @ p_in.T, p_out @ outputs @ p_out.T)
    return out


def explicit_exact_scores(
    model,
    tokenizer,
    train_items,
    query_items,
    layers: list[str],
    kind: str,
    alpha: float,
    mode: str,
    max_length: int,
    projections: ProjectionSet | None = None,
) -> torch.Tensor:
    """(Q, N) unprojected KFAC / EK-FAC influence Σ_layers vec(G_q)ᵀ (H + λI)⁻¹ vec(G_n), with H formed as an
    explicit d × d matrix from `torch.kron` of the eigenbases of the mean factors: KFAC eigenvalues s_i·a_j
    rescaled to E‖G‖², EK-FAC eigenvalues E[(Kᵀ vec G)²] over all training items; λ = α · mean eigenvalue.
    Cosine divides by both self-influences' square roots. Autograd gradients, float64, one example at a time.

    With `projections`, the same influence in LoGra's projected space: G → P_out G P_inᵀ, Σ x̄x̄ᵀ → P_in (Σ x̄x̄ᵀ)
    P_inᵀ and Σ δδᵀ → P_out (Σ δδᵀ) P_outᵀ, each formed explicitly from the autograd quantities."""
    model = model.double()
    train, queries = (
        [_full_gradients(model, tokenizer, item, f"{what} {i}", layers, max_length) for i, item in enumerate(items)]
        for what, items in (("item", train_items), ("query", query_items))
    )
    if projections is not None:
        train, queries = ([_projected(g, projections) for g in grads] for grads in (train, queries))
    count = len(train)
    scores = torch.zeros(len(queries), count, dtype=torch.float64)
    self_q = torch.zeros(len(queries), dtype=torch.float64)
    self_t = torch.zeros(count, dtype=torch.float64)
    for n in layers:
        g_train = torch.stack([t[n][0].reshape(-1) for t in train])  # (N, d), row-major vec
        g_query = torch.stack([q[n][0].reshape(-1) for q in queries])  # (Q, d)
        a, u_a = torch.linalg.eigh(sum(t[n][1] for t in train) / count)
        s, u_s = torch.linalg.eigh(sum(t[n][2] for t in train) / count)
        basis = torch.kron(u_s, u_a)  # (d, d): eigenvectors of S ⊗ A, row-major like vec(G)
        if kind == "kfac":
            eigenvalues = torch.kron(s.clamp_min(0), a.clamp_min(0))
            eigenvalues = eigenvalues * (g_train.square().sum(1).mean() / eigenvalues.sum())
        else:
            eigenvalues = ((g_train @ basis) ** 2).mean(0)
        eigenvalues = eigenvalues.clamp_min(0)
        inverse = (basis / (eigenvalues + alpha * eigenvalues.mean())) @ basis.T  # (H + λI)⁻¹
        scores += g_query @ inverse @ g_train.T
        self_q += ((g_query @ inverse) * g_query).sum(1)
        self_t += ((g_train @ inverse) * g_train).sum(1)
    if mode == "cosine":
        scores = scores / (self_q.sqrt()[:, None] * self_t.sqrt()[None, :])
    return scores
