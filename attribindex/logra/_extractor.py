"""Run a causal LM on texts and return per-example projected gradients, one block per module."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from attribindex.data import PromptCompletion, TokenizedExample, collate, encode_texts, tokenize
from attribindex.logra._capture import LoGraCapture
from attribindex.logra._hooks import LayerHooks, TokenListener
from attribindex.logra._projection import ProjectionSet


@dataclass
class ExtractedBatch:
    blocks: dict[str, torch.Tensor]  # module name -> (B, k_out * k_in)
    losses: torch.Tensor  # (B,) summed token cross-entropy over the tokens that count
    factors: dict[str, torch.Tensor] | None = None  # module name -> (B, k_in² + k_out²) token sums, if asked

    def concatenated(self, order: Sequence[str]) -> torch.Tensor:
        return torch.cat([self.blocks[name] for name in order], dim=1)  # (B, D)


# Architectures whose logits are exactly `output_embeddings(base_model(...).last_hidden_state)`: no soft-capping,
# logit scale or other post-processing, so the head can run a few positions at a time.
PLAIN_HEAD_MODEL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "olmo", "olmo2"})
HEAD_CHUNK_ELEMENTS = 1 << 22  # logits per chunk (B × positions × vocab): 16 MiB in float32


def per_example_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    chunked_head: bool = True,
):
    """Summed next-token cross-entropy per example over positions where `loss_mask` is set. Shape (B,).

    With `chunked_head` (for architectures in PLAIN_HEAD_MODEL_TYPES with a frozen head), the (B, T, V)
    logits are never held at once — they were the largest tensor of a build (B × T × 49k floats for
    SmolLM2). The head and loss run a few positions at a time, and the loss's gradient with respect to
    the hidden states is formed in the same pass, so nothing is recomputed: same losses, same gradients.
    """
    targets = input_ids[:, 1:]  # (B, T-1)
    mask = loss_mask[:, 1:]  # (B, T-1)
    head = model.get_output_embeddings()
    plain = getattr(model.config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES and isinstance(head, nn.Linear)
    if not (chunked_head and plain and not head.weight.requires_grad):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)
        logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # (B, T-1, V)
        token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        return (token_loss.view(targets.shape) * mask).sum(dim=1)  # (B,)
    core = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model's own causal LM
    hidden = core.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    step = max(1, HEAD_CHUNK_ELEMENTS // max(1, hidden.shape[0] * head.weight.shape[0]))
    return _ChunkedHeadLoss.apply(hidden[:, :-1], head.weight, head.bias, targets, mask, step)


def sampled_label_loss(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor, seed: int
) -> torch.Tensor:
    """Like `per_example_loss`, but each target token is drawn from the model's own prediction at that position
    instead of read from the text: the gradient whose covariance is the true Fisher (kronfluence's recipe for
    language models), where the data's labels give the empirical Fisher. Shape (B,).

    The draws are seeded per example by `seed` and the example's tokens, so they do not depend on the batch.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]  # (B, T-1, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    mask = loss_mask[:, 1:]  # (B, T-1)
    with torch.no_grad():
        probabilities = torch.softmax(logits.detach(), dim=-1)
        targets = torch.empty(mask.shape, dtype=torch.long, device=logits.device)
        for row in range(input_ids.shape[0]):
            tokens = input_ids[row][attention_mask[row].bool()].tolist()
            digest = hashlib.sha256(f"{seed}:{tokens}".encode()).digest()
            generator = torch.Generator(device=logits.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            targets[row] = torch.multinomial(probabilities[row], 1, generator=generator).squeeze(-1)
    token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (token_loss.view(targets.shape) * mask).sum(dim=1)  # (B,)


Labels = Literal["data", "sampled"]


class _ChunkedHeadLoss(torch.autograd.Function):
    """Masked summed cross-entropy of `hidden @ weightᵀ + bias`, `step` positions at a time (the head is frozen).

    Forward also forms d loss_b / d hidden = mask · (softmax − onehot) @ weight per chunk (the matmul
    backward would do anyway); backward scales it by the incoming per-example gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, step):
        # hidden: (B, S, H); weight: (V, H); targets, mask: (B, S)
        losses = hidden.new_zeros(hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32))
        grad_hidden = torch.empty_like(hidden)
        for start in range(0, hidden.shape[1], step):
            part = slice(start, start + step)
            logits = F.linear(hidden[:, part].contiguous(), weight, bias)  # (B, s, V)
            log_probs = torch.log_softmax(logits.to(losses.dtype), dim=-1)
            del logits
            picked = targets[:, part].unsqueeze(-1)  # (B, s, 1)
            chunk_mask = mask[:, part].to(losses.dtype)  # (B, s)
            losses -= (log_probs.gather(-1, picked).squeeze(-1) * chunk_mask).sum(dim=1)
            d_logits = log_probs.exp_().scatter_add_(-1, picked, torch.full_like(picked, -1, dtype=losses.dtype))
            d_logits *= chunk_mask.unsqueeze(-1)  # (B, s, V) = mask · (softmax − onehot)
            grad_hidden[:, part] = d_logits.to(weight.dtype) @ weight  # (B, s, H)
        ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_losses.to(grad_hidden.dtype)[:, None, None], None, None, None, None, None


class GradientExtractor:
    """Tokenises texts, runs forward + backward once per batch, returns projected gradients.

    Example:
        >>> extractor = GradientExtractor(model, tokenizer, projections, max_length=128)  # doctest: +SKIP
        >>> batch = extractor.extract(extractor.tokenize(["To be, or not to be"]))  # doctest: +SKIP
        >>> batch.concatenated([m.name for m in projections.modules]).shape  # doctest: +SKIP
        torch.Size([1, 1024])
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        projections: ProjectionSet,
        max_length: int,
        dtype: torch.dtype = torch.float32,
    ):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.projections = projections
        self.max_length = max_length
        # Projections run at least in fp32 even for bf16/fp16 models: the projected values are summed over tokens.
        self.dtype = torch.promote_types(dtype, torch.float32)
        self.device = next(model.parameters()).device
        self._capture = LoGraCapture(self.model, projections, self.dtype)  # projections moved to device once
        # A captured LM head must run once, not again in the chunked head's recomputation (its hook would fire twice).
        head = model.get_output_embeddings()
        modules = dict(model.named_modules())
        self._chunked_head = not any(modules.get(spec.name) is head for spec in projections.modules)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = pad if pad is not None else 0

    def tokenize(
        self, items: Sequence[str | PromptCompletion], names: Sequence[str] | None = None
    ) -> list[TokenizedExample]:
        names = names or [f"query {i}" for i in range(len(items))]
        encoded = iter(encode_texts(self.tokenizer, [item for item in items if isinstance(item, str)]))
        return [
            tokenize(self.tokenizer, item, self.max_length, name, next(encoded) if isinstance(item, str) else None)
            for item, name in zip(items, names)
        ]

    def extract(
        self, examples: list[TokenizedExample], factors: bool = False, listeners: Sequence[TokenListener] = ()
    ) -> ExtractedBatch:
        """Projected gradients of `examples`; with `factors`, also their KFAC token sums (ExtractedBatch.factors).
        `listeners` see the unprojected layer inputs and output gradients of the same pass."""
        losses, mask = self._loss_function(examples, "data", seed=0)
        self._capture.extra_listeners = list(listeners)
        try:
            return capture_gradients(self._capture, losses, factors=factors, token_mask=mask)
        finally:
            self._capture.extra_listeners = []

    def run(
        self, hooks: LayerHooks, examples: list[TokenizedExample], labels: Labels = "data", seed: int = 0
    ) -> torch.Tensor:
        """One forward + backward of `examples` under any `hooks` on this model; returns the (B,) losses.
        `labels="sampled"` draws the targets from the model (`sampled_label_loss`, seeded by `seed`)."""
        losses, mask = self._loss_function(examples, labels, seed)
        hooks.token_mask = mask
        with torch.enable_grad(), hooks:
            values = losses()  # (B,)
            hooks.backward(values.sum())
        return values.detach()

    def _loss_function(
        self, examples: list[TokenizedExample], labels: Labels, seed: int
    ) -> tuple[Callable[[], torch.Tensor], torch.Tensor]:
        """(a closure computing the (B,) per-example losses of the collated examples, their (B, T) token mask)."""
        batch = collate(examples, self.pad_token_id)
        mask = batch.attention_mask.to(self.device)
        input_ids, loss_mask = batch.input_ids.to(self.device), batch.loss_mask.to(self.device)

        def losses() -> torch.Tensor:
            if labels == "sampled":
                return sampled_label_loss(self.model, input_ids, mask, loss_mask, seed)
            return per_example_loss(self.model, input_ids, mask, loss_mask, chunked_head=self._chunked_head)

        return losses, mask


def capture_gradients(
    capture: LoGraCapture,
    per_example_losses: Callable[[], torch.Tensor],
    factors: bool = False,
    token_mask: torch.Tensor | None = None,
) -> ExtractedBatch:
    """Run `per_example_losses()` (a forward pass returning (B,) losses of independent examples) under `capture`
    and backpropagate once: the per-example projected gradients of any model, LM or not.

    `token_mask` (B, T) marks the positions that count in the KFAC factors (padding excluded).

    Example:
        >>> mlp = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).requires_grad_(False)
        >>> specs = [ModuleSpec("0", "linear", 64, 32), ModuleSpec("2", "linear", 32, 10)]
        >>> capture = LoGraCapture(mlp, ProjectionSet.generate(specs, 0, 8, 8), torch.float32)
        >>> x, y = torch.randn(5, 64), torch.randint(0, 10, (5,))
        >>> batch = capture_gradients(capture, lambda: F.cross_entropy(mlp(x), y, reduction="none"), factors=True)
        >>> batch.blocks["0"].shape, batch.factors["2"].shape
        (torch.Size([5, 64]), torch.Size([5, 128]))
    """
    capture.track_factors = factors
    capture.token_mask = token_mask
    with torch.enable_grad(), capture:
        losses = per_example_losses()  # (B,)
        blocks = capture.backward(losses.sum())
    found = {k: v.detach() for k, v in capture.factors.items()} if factors else None
    return ExtractedBatch(blocks={k: v.detach() for k, v in blocks.items()}, losses=losses.detach(), factors=found)
