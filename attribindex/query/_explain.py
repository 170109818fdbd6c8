"""Per-token explanations: a score split exactly over the tokens of the training example and of the query.

A projected gradient is a sum over positions, g = Σ_t vec(δ̃_t x̃_tᵀ) per module, and the whitening W is linear and
symmetric, so the dot-mode score splits over the example's positions:

    ⟨W g_q, W g_n⟩ = Σ_t ⟨W² g_q, vec(δ̃_t x̃_tᵀ)⟩ = Σ_t Σ_m δ̃_{t,m}ᵀ R_m x̃_{t,m},   R_m = module m's block of W² g_q

(a k_out × k_in matrix), one number per position that add up to the score; over the query's positions likewise,
with W² g_n. Cosine mode divides both by ‖W g_q‖ ‖W g_n‖. A position's number is the share of the score carried
by that token's activations x̃_t and the loss gradient δ̃_t arriving at it, which holds the later tokens' losses
too (through attention): a prompt's tokens carry a share though they have no loss of their own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from attribindex.data import PromptCompletion, TokenizedExample, batched
from attribindex.logra import GradientExtractor, ProjectionSet, project_inputs


@dataclass(frozen=True)
class TokenContribution:
    """One token's share of a score: the tokenizer's `token`, the `text` it covers in the original document (or
    the query's prompt + completion) at characters [start, end), and its `contribution`. Special tokens (BOS)
    cover no text (start == end); the bytes of one character share its span; a token that cannot be placed in the
    text (a slow tokenizer that normalises it) has start = end = -1 and its decoded text.

    Example:
        >>> TokenContribution(token="Ġcrown", text=" crown", start=9, end=15, contribution=0.12)
        TokenContribution(token='Ġcrown', text=' crown', start=9, end=15, contribution=0.12)
    """

    token: str
    text: str
    start: int
    end: int
    contribution: float


@dataclass(frozen=True)
class ExplainedExample:
    """One training example's score on the query, split over its tokens (`tokens`) and over the query's tokens
    (`query_tokens`); each list sums to `score`.

    Example:
        >>> explained = index.explain("To be, or not to be", ["hamlet-3-1"]).examples[0]  # doctest: +SKIP
        >>> [t.text for t in explained.strongest(3)]  # doctest: +SKIP
        [' be', ' not', ' question']
    """

    id: str
    row: int
    source: str
    text: str
    score: float
    tokens: list[TokenContribution]
    query_tokens: list[TokenContribution]

    def strongest(self, n: int = 5, of_query: bool = False) -> list[TokenContribution]:
        """The `n` tokens of the example (or of the query) with the largest |contribution|, strongest first."""
        tokens = self.query_tokens if of_query else self.tokens
        return sorted(tokens, key=lambda t: -abs(t.contribution))[:n]


@dataclass(frozen=True)
class Explanation:
    """The answer to one `explain` call: the query, how it was scored (`method`) and each example explained.

    Example:
        >>> answer = index.explain("To be, or not to be", ["hamlet-3-1", "lear-1-1"])  # doctest: +SKIP
        >>> answer.examples[0].score == sum(t.contribution for t in answer.examples[0].tokens)  # doctest: +SKIP
        True
    """

    query: str | PromptCompletion
    index_id: str
    index_version: int
    mode: str
    method: str
    latency_ms: float
    examples: list[ExplainedExample] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready dict (the CLI's --json output and the server's answer)."""
        data = asdict(self)
        if isinstance(self.query, PromptCompletion):
            data["query"] = {"prompt": self.query.prompt, "completion": self.query.completion}
        return data


def explanation_from_dict(data: dict) -> Explanation:
    """Inverse of `Explanation.to_dict` (what `Client.explain` does with a server's JSON)."""
    query = data["query"]
    examples = [
        ExplainedExample(
            **{k: v for k, v in e.items() if k not in ("tokens", "query_tokens")},
            tokens=[TokenContribution(**t) for t in e["tokens"]],
            query_tokens=[TokenContribution(**t) for t in e["query_tokens"]],
        )
        for e in data["examples"]
    ]
    return Explanation(
        query=PromptCompletion(**query) if isinstance(query, dict) else query,
        **{k: data[k] for k in ("index_id", "index_version", "mode", "method", "latency_ms")},
        examples=examples,
    )


class TokenContributions:
    """A `TokenListener` giving, per example b, probe p and position t, Σ_m δ̃_{b,t,m}ᵀ R_{p,m} x̃_{b,t,m} for the
    probes `probes[name]` (P, k_out, k_in): after a pass, `values` is (B, P, T)."""

    def __init__(self, projections: ProjectionSet, probes: dict[str, torch.Tensor]):
        self.projections, self.probes = projections, probes
        self._weighted: dict[str, torch.Tensor] = {}
        self.values: torch.Tensor | None = None

    def on_input(self, name: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        acts = project_inputs(x, self.projections.p_in[name].to(x))  # (B, T, k_in)
        self._weighted[name] = torch.einsum("bti,poi->btpo", acts, self.probes[name].to(x))  # (B, T, P, k_out)

    def on_output_grad(self, name: str, delta: torch.Tensor, mask: torch.Tensor | None) -> None:
        projected = delta @ self.projections.p_out[name].to(delta).T  # (B, T, k_out)
        layer = torch.einsum("btpo,bto->bpt", self._weighted.pop(name), projected)  # (B, P, T)
        self.values = layer if self.values is None else self.values + layer


@dataclass
class _Side:
    """Texts run through the model: raw projected gradients (n, D) and per-position contributions against the
    other side's probes, (n, P, T) as a list of (P, T_i) trimmed to each text's tokens."""

    raw: torch.Tensor
    contributions: list[torch.Tensor]


def explain_pairs(
    extractor: GradientExtractor,
    whiten,
    block_shapes: list[tuple[int, int]],
    names: list[str],
    query: TokenizedExample,
    examples: list[TokenizedExample],
    mode: str,
    batch_size: int,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(scores (N,), example contributions [(T_n,)], query contributions (N, T_q)) of `examples` on `query` under the
    index's projected method, in float64. `whiten` maps (n, D) raw projected gradients to whitened ones."""

    def probes(whitened: torch.Tensor) -> dict[str, torch.Tensor]:  # (P, D) → per module (P, k_out, k_in)
        blocks = whiten(whitened).split([o * i for o, i in block_shapes], dim=1)
        return {n: b.reshape(-1, *shape) for n, b, shape in zip(names, blocks, block_shapes)}

    def run(items: list[TokenizedExample], against: dict[str, torch.Tensor]) -> _Side:
        raw, contributions = [], []
        for group in batched(items, batch_size):
            listener = TokenContributions(extractor.projections, against)
            extracted = extractor.extract(group, listeners=[listener])
            raw.append(extracted.concatenated(names).double().cpu())
            values = listener.values.double().cpu()  # (B, P, T)
            contributions += [values[b, :, : len(e.input_ids)] for b, e in enumerate(group)]
        return _Side(torch.cat(raw), contributions)

    query_whitened = whiten(extractor.extract([query]).concatenated(names).double().cpu())  # (1, D)
    train = run(examples, probes(query_whitened))  # contributions (1, T_n) each
    train_whitened = whiten(train.raw)  # (N, D)
    query_side = run([query], probes(train_whitened))  # contributions [(N, T_q)]
    norms = train_whitened.norm(dim=1) * query_whitened.norm() if mode == "cosine" else None
    return split_scores([c[0] for c in train.contributions], query_side.contributions[0], norms)


def split_scores(
    example_parts: list[torch.Tensor], query_parts: torch.Tensor, norms: torch.Tensor | None
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Dot-mode token terms → (scores (N,), example contributions [(T_n,)], query contributions (N, T_q)); with
    `norms` (N,) (cosine mode: the product of both self-influences' square roots), everything divided by them.
    A score is the sum of its example's terms; the query's terms add up to it too, up to round-off."""
    if norms is not None:
        safe = torch.where(norms > 0, norms, 1.0)  # a zero gradient scores 0 either way
        example_parts = [part / n for part, n in zip(example_parts, safe)]
        query_parts = query_parts / safe[:, None]
    return torch.stack([part.sum() for part in example_parts]), example_parts, query_parts


def token_spans(tokenizer, item: str | PromptCompletion, ids: list[int]) -> list[tuple[str, str, int, int]]:
    """(token, covered text, start, end) of each of `ids`, the tokenisation of `item` (a prompt + completion as one
    text). Character offsets come from a fast tokenizer, or, for a slow one, from decoding (`_decoded_spans`)."""
    text = item.prompt + item.completion if isinstance(item, PromptCompletion) else item
    tokens = tokenizer.convert_ids_to_tokens(ids)
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, verbose=False)
        if encoded["input_ids"][: len(ids)] == list(ids):
            offsets = encoded["offset_mapping"][: len(ids)]
            return [(token, text[s:e], s, e) for token, (s, e) in zip(tokens, offsets)]
    spans = _decoded_spans(tokenizer, text, ids)
    return [
        (token, text[s:e] if s >= 0 else tokenizer.decode([i]), s, e) for token, i, (s, e) in zip(tokens, ids, spans)
    ]


def _decoded_spans(tokenizer, text: str, ids: list[int]) -> list[tuple[int, int]]:
    """Character spans of `ids` in `text` for a tokenizer without offsets (a slow, pure-Python one).

    Token k's text is what decoding adds when it joins the tokens before it: decoded with the last token that
    completed a character as left context (so a word-start marker or a byte-level character decodes as it does
    in the whole text), checked against `text` at the current position; should that not match, the decoded
    prefix ids[: k + 1] is tried. A token that completes no character of its own (one byte of a multi-byte
    character) shares the span of the token that completes it, as a fast tokenizer's offsets have it; special
    tokens cover no text (start == end). Tokens that nothing matches (a tokenizer that normalises the text, a text
    cut inside a character) get (-1, -1). Each token costs two decodes of a few tokens, not of the whole prefix."""

    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    special = set(getattr(tokenizer, "all_special_ids", []))
    spans = [(-1, -1)] * len(ids)
    pending: list[int] = []  # tokens waiting for the one that completes their character
    end, context, context_text = 0, 0, ""  # position in `text`; where the next decoding window starts, and its text
    for k, token_id in enumerate(ids):
        if token_id in special:
            spans[k] = (end, end)
            continue
        pending.append(k)
        window = decode(ids[context : k + 1])
        piece = window[len(context_text) :] if window.startswith(context_text) else None
        if piece is None or not text.startswith(piece, end):
            whole = decode(ids[: k + 1])
            piece = whole[end:] if text.startswith(whole) else ""
        if piece:
            for p in pending:
                spans[p] = (end, end + len(piece))
            end, pending = end + len(piece), []
            context, context_text = k, decode([token_id])
    return spans
