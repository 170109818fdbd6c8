"""Exact influence of training examples on queries, from one forward + backward of the examples.

Per layer, with Q̂ = U_S [(U_Sᵀ G_q U_A) ⊘ (Λ + λ)] U_Aᵀ the preconditioned query gradient, the score of an
example is ⟨G, Q̂⟩ = Σ_t δ_tᵀ Q̂ x̄_t (`ContractedScores`). Token by token it costs T·Q·n_out·n_in' multiply-adds
per example; through the example's gradient G = Σ_t δ_t x̄_tᵀ, then Q inner products, (T + Q)·n_out·n_in' — and
even at one query, where the counts match, the batched gradient ran faster on CPU (0.90 against 0.68 × a plain
training step, tools/bench_exact_stage.py). Scores go through the gradient; only per-token terms (`explain`)
are contracted token by token. Cosine mode also needs the example's self-influence Σ (U_Sᵀ G U_A)² ⊘ (Λ + λ), which
does need its gradient: `RotatedGradients` forms it in the eigenbasis, one layer at a time, for a batch whose
size a memory bound sets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from attribindex.data import TokenizedExample
from attribindex.exact._factors import LayerShape, with_bias
from attribindex.exact._whitening import ExactPreconditioner
from attribindex.logra import GradientExtractor, LayerHooks, TokenListener, masked_tokens


class RotatedGradients:
    """A `TokenListener` that forms each example's full gradient G = Σ_t δ_t x̄_tᵀ (B, n_out, n_in') of each layer,
    in the eigenbasis of `preconditioner` when one is given (U_Sᵀ G U_A, rotating the tokens first), and hands it
    to `consume(name, gradients)`."""

    def __init__(
        self,
        shapes: dict[str, LayerShape],
        preconditioner: ExactPreconditioner | None,
        consume: Callable[[str, torch.Tensor], None],
    ):
        self.shapes, self.preconditioner, self.consume = shapes, preconditioner, consume
        self._inputs: dict[str, torch.Tensor] = {}

    def on_input(self, name: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        x = masked_tokens(with_bias(x, self.shapes[name]), mask)  # (B, T, n_in')
        if self.preconditioner is not None:
            x = x @ self.preconditioner.layers[name].u_in.to(x.dtype)  # (B, T, n_in') in U_A's basis
        self._inputs[name] = x

    def on_output_grad(self, name: str, delta: torch.Tensor, mask: torch.Tensor | None) -> None:
        x = self._inputs.pop(name)
        if self.preconditioner is not None:
            delta = delta @ self.preconditioner.layers[name].u_out.to(delta.dtype)  # (B, T, n_out) in U_S's basis
        self.consume(name, delta.transpose(1, 2) @ x)  # (B, n_out, n_in')


class ContractedScores:
    """A `TokenListener` that adds Σ_t δ_tᵀ Q̂ x̄_t of each layer to `scores` (B, Q), for the preconditioned query
    gradients `preconditioned[name]` (Q, n_out, n_in'), through each example's gradient; with `per_token`, token by
    token, keeping the terms apart: (B, Q, T).

    A layer's bias column is scored apart (x̄ = [x, 1]: its term is δ_tᵀ Q̂_b), and only δ is masked (a padded
    token's term is zero when its δ is), so that the layer's inputs are never copied."""

    def __init__(self, shapes: dict[str, LayerShape], preconditioned: dict[str, torch.Tensor], per_token: bool = False):
        self.shapes, self.per_token = shapes, per_token
        self._weights: dict[str, torch.Tensor] = {}  # (Q, n_out, n_in): Q̂ of the weight columns
        self._biases: dict[str, torch.Tensor] = {}  # (Q, n_out): Q̂ of the bias column, for layers with one
        for name, queries in preconditioned.items():
            in_features = shapes[name].in_features
            self._weights[name] = queries[..., :in_features].contiguous()
            if shapes[name].bias:
                self._biases[name] = queries[..., in_features]
        self._inputs: dict[str, torch.Tensor] = {}  # (B, T, n_in) or, per token, (B, T, Q, n_out)
        self.scores: torch.Tensor | None = None

    def on_input(self, name: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        if self.per_token:
            x = torch.einsum("bti,qoi->btqo", x, self._weights[name].to(x.dtype))  # (B, T, Q, n_out): Q̂ x̄_t
            if name in self._biases:
                x = x + self._biases[name].to(x.dtype)  # the bias column, x̄'s last entry 1
        self._inputs[name] = x

    def on_output_grad(self, name: str, delta: torch.Tensor, mask: torch.Tensor | None) -> None:
        kept = self._inputs.pop(name)
        delta = masked_tokens(delta, mask)  # (B, T, n_out)
        if self.per_token:
            layer = torch.einsum("btqo,bto->bqt", kept, delta)  # (B, Q, T)
        else:
            gradients = delta.transpose(1, 2) @ kept  # (B, n_out, n_in): each example's G = Σ_t δ_t x_tᵀ
            weights = self._weights[name].to(gradients.dtype)  # (Q, n_out, n_in)
            layer = gradients.flatten(1) @ weights.flatten(1).T  # (B, Q): one GEMM
            if name in self._biases:
                layer = layer + delta.sum(dim=1) @ self._biases[name].to(delta.dtype).T  # Σ_t δ_t: the bias column
        self.scores = layer if self.scores is None else self.scores + layer

    def take(self) -> torch.Tensor:
        """The scores of the batch that just ran backward; the listener is then ready for the next batch (the
        queries' split into weight and bias columns is made once, not per batch)."""
        scores, self.scores = self.scores, None
        return scores


@dataclass
class PreparedQueries:
    """Query gradients ready for exact scoring, per layer: `rotated` = (U_Sᵀ G_q U_A) ⊘ (Λ + λ) and
    `preconditioned` = U_S [that] U_Aᵀ = (H + λ)⁻¹ G_q, both (Q, n_out, n_in'); the queries' self-influence (Q,)
    and their losses (Q,)."""

    rotated: dict[str, torch.Tensor]
    preconditioned: dict[str, torch.Tensor]
    self_influence: torch.Tensor
    losses: torch.Tensor


class ExactScorer:
    """Exact (unprojected) KFAC / EK-FAC influence of training examples on queries, with a model.

    `memory_bytes` bounds what one batch of examples holds at once (rotated gradients of the largest layer in
    cosine mode; token-by-query products in dot mode); batches are also at most `batch_size` examples.

    Example:
        >>> scorer = ExactScorer(index.extractor, ExactPreconditioner.load(path), batch_size=8)  # doctest: +SKIP
        >>> queries = scorer.prepare(index.extractor.tokenize(["To be, or not to be"]))  # doctest: +SKIP
        >>> scorer.scores(queries, candidates, mode="dot").shape  # (examples, queries)  # doctest: +SKIP
    """

    def __init__(
        self,
        extractor: GradientExtractor,
        preconditioner: ExactPreconditioner,
        batch_size: int,
        memory_bytes: int = 1 << 30,
    ):
        self.extractor = extractor
        self.preconditioner = preconditioner.to(extractor.device, extractor.dtype)
        self.shapes = preconditioner.shapes
        self.names = list(preconditioner.layers)
        self.batch_size = batch_size
        self.memory_bytes = memory_bytes
        self._inverse = {n: layer.inverse for n, layer in self.preconditioner.layers.items()}

    def prepare(self, examples: list[TokenizedExample]) -> PreparedQueries:
        """Preconditioned gradients of the query `examples` (data labels: a query is a real text)."""
        rotated: dict[str, torch.Tensor] = {}
        self_influence = torch.zeros(len(examples), dtype=torch.float64)

        def keep(name: str, gradients: torch.Tensor) -> None:  # (Q, n_out, n_in') in the eigenbasis
            weighted = gradients * self._inverse[name]
            rotated[name] = weighted
            self_influence.add_((weighted * gradients).sum(dim=(1, 2)).double().cpu())

        losses = self._run(RotatedGradients(self.shapes, self.preconditioner, keep), examples)
        layers = self.preconditioner.layers
        preconditioned = {name: layers[name].unrotate(weighted) for name, weighted in rotated.items()}
        return PreparedQueries(rotated, preconditioned, self_influence, losses.double().cpu())

    def scores(self, queries: PreparedQueries, examples: list[TokenizedExample], mode: str) -> torch.Tensor:
        """(N, Q) float64 influence of each example on each query: ⟨G_q, (H + λ)⁻¹ G⟩, divided by both
        self-influences' square roots in cosine mode (0 for a zero gradient)."""
        out = torch.zeros(len(examples), len(queries.losses), dtype=torch.float64)
        contracted = ContractedScores(self.shapes, queries.preconditioned) if mode != "cosine" else None
        for group in self._batches(examples, len(queries.losses), mode):
            batch = [examples[i] for i in group]
            if contracted is None:
                dot, self_influence = self._rotated_scores(queries, batch)
                norms = torch.sqrt(self_influence[:, None] * queries.self_influence[None, :])  # (B, Q)
                out[group] = torch.where(norms > 0, dot / torch.where(norms > 0, norms, 1.0), 0.0)
            else:
                self._run(contracted, batch)
                out[group] = contracted.take().double().cpu()  # (B, Q)
        return out

    def token_scores(self, queries: PreparedQueries, examples: list[TokenizedExample]) -> list[torch.Tensor]:
        """Per example, its (Q, T) float64 terms δ_tᵀ (H + λ)⁻¹ G_q x̄_t, one per token: they add up to the dot-mode
        score on each query. `queries` may be any prepared texts (`prepare` of training examples too)."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(examples)
        listener = ContractedScores(self.shapes, queries.preconditioned, per_token=True)
        for group in self._batches(examples, len(queries.losses), "per_token"):
            self._run(listener, [examples[i] for i in group])
            scores = listener.take()  # (B, Q, T)
            for b, i in enumerate(group):
                out[i] = scores[b, :, : len(examples[i].input_ids)].double().cpu()
        return out

    def _rotated_scores(
        self, queries: PreparedQueries, batch: list[TokenizedExample]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dot = torch.zeros(len(batch), len(queries.losses), dtype=torch.float64)
        self_influence = torch.zeros(len(batch), dtype=torch.float64)

        def accumulate(name: str, gradients: torch.Tensor) -> None:  # (B, n_out, n_in') in the eigenbasis
            dot.add_(torch.einsum("boi,qoi->bq", gradients, queries.rotated[name]).double().cpu())
            self_influence.add_((gradients.square() * self._inverse[name]).sum(dim=(1, 2)).double().cpu())

        self._run(RotatedGradients(self.shapes, self.preconditioner, accumulate), batch)
        return dot, self_influence

    def _run(self, listener: TokenListener, examples: list[TokenizedExample]) -> torch.Tensor:
        """One forward + backward of `examples` (data labels) with `listener` on the layers; their (B,) losses."""
        hooks = LayerHooks(self.extractor.model, self.names, self.extractor.dtype, [listener])
        return self.extractor.run(hooks, examples)

    def _batches(self, examples: list[TokenizedExample], queries: int, mode: str) -> Iterator[list[int]]:
        """Example positions in batches, longest first, each within `batch_size` and `memory_bytes` for what `mode`
        (cosine, dot or per_token) holds per example."""
        itemsize = torch.finfo(self.extractor.dtype).bits // 8
        widest = max(max(s.gradient_shape) for s in self.shapes.values())
        largest = max(s.gradient_shape[0] * s.gradient_shape[1] for s in self.shapes.values())
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
        group: list[int] = []
        for i in order:
            tokens = len(examples[group[0] if group else i].input_ids)  # the group's longest
            if mode == "cosine":
                per_example = (3 * largest + 2 * tokens * widest) * itemsize
            elif mode == "per_token":
                per_example = (queries + 2) * tokens * widest * itemsize
            else:  # dot: through each example's gradient
                per_example = (largest + 2 * tokens * widest) * itemsize
            if group and (len(group) >= self.batch_size or (len(group) + 1) * per_example > self.memory_bytes):
                yield group
                group = []
            group.append(i)
        if group:
            yield group
