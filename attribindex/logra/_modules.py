"""Which layers of a causal LM are captured: Linear and GPT-2 Conv1D, chosen by name patterns."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from attribindex.config import ProjectionConfig
from attribindex.errors import AttribIndexError


@dataclass(frozen=True)
class ModuleSpec:
    """A captured layer: its name, its kind, its weight's (out, in) sizes and whether its bias is captured.

    A captured bias is the gradient's extra input column: y = W x + b = [W b] [x; 1], so the layer's
    per-example gradient is Σ_t δ_t [x_t; 1]ᵀ, (out × in+1), and `P_in` gets one more column.

    Example:
        >>> ModuleSpec(name="transformer.h.0.mlp.c_fc", kind="conv1d", in_features=64, out_features=256, bias=True)
        ModuleSpec(name='transformer.h.0.mlp.c_fc', kind='conv1d', in_features=64, out_features=256, bias=True)
    """

    name: str
    kind: str  # "linear" (weight is out × in) or "conv1d" (GPT-2 style, weight is in × out)
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def input_dim(self) -> int:
        """Columns of the captured gradient: the weight's inputs, plus one for a captured bias."""
        return self.in_features + int(self.bias)


def _spec(name: str, module: nn.Module, capture_bias: bool) -> ModuleSpec | None:
    bias = capture_bias and getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear):
        return ModuleSpec(name, "linear", module.in_features, module.out_features, bias)
    # transformers' Conv1D (GPT-2 family) is a Linear with a transposed weight (in × out).
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        n_in, n_out = module.weight.shape
        return ModuleSpec(name, "conv1d", n_in, n_out, bias)
    return None


def _block_index(name: str, block_lists: list[str]) -> int | None:
    for prefix in block_lists:
        if name.startswith(prefix + "."):
            return int(name[len(prefix) + 1 :].split(".", 1)[0])
    return None


def _lora_layers(model: nn.Module, candidates: list, choice: str) -> list:
    """In a PEFT LoRA model, only the adapters' A and B layers (`adapters`) or the base layers under them (`base`)."""
    wrappers = [
        name for name, module in model.named_modules() if hasattr(module, "lora_A") and hasattr(module, "base_layer")
    ]
    if not wrappers:
        return candidates
    if choice == "base":
        wanted = {f"{name}.base_layer" for name in wrappers}
        return [(name, spec) for name, spec in candidates if name in wanted]
    parts = tuple(f"{name}.lora_{side}." for name in wrappers for side in "AB")
    return [(name, spec) for name, spec in candidates if name.startswith(parts)]


def select_modules(model: nn.Module, config: ProjectionConfig) -> list[ModuleSpec]:
    """The captured layers of `model`, in module order, per the name patterns of `config`.

    The model's output embedding (``get_output_embeddings()``: ``lm_head``, GPT-NeoX's ``embed_out``, ...) is
    left out whatever its name unless ``config.include_head``; biases are captured where a layer has one
    and ``config.bias`` is on. In a PEFT LoRA model only the adapters' A and B matrices, or with
    ``config.lora: base`` the base layers under them, are candidates.

    Example:
        >>> select_modules(model, ProjectionConfig(modules=("*.mlp.*",), last_n_blocks=2))  # doctest: +SKIP
        [ModuleSpec(name='transformer.h.2.mlp.c_fc', ...), ...]
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((name for name, module in model.named_modules() if head is not None and module is head), None)
    left_out = "" if config.include_head or head_name is None else head_name
    # The head's name differs across families (lm_head, GPT-NeoX's embed_out), so it is left out by identity.
    candidates = [(name, spec) for name, module in model.named_modules() if (spec := _spec(name, module, config.bias))]
    candidates = [(name, spec) for name, spec in candidates if name != left_out]
    candidates = _lora_layers(model, candidates, config.lora)
    head_note = (
        f" The output embedding {left_out!r} is left out unless projection.include_head: true." if left_out else ""
    )
    if not candidates:
        raise AttribIndexError(f"{type(model).__name__} has no Linear or Conv1D layers to capture.{head_note}")
    chosen = [
        spec
        for name, spec in candidates
        if any(fnmatch.fnmatchcase(name, p) for p in config.modules)
        and not any(fnmatch.fnmatchcase(name, p) for p in config.exclude)
    ]
    if left_out and not any(fnmatch.fnmatchcase(left_out, p) for p in config.modules):
        head_note = ""  # the patterns do not ask for the head: it is no reason for what they miss
    if config.last_n_blocks is not None:
        # The transformer blocks are the longest ModuleList (transformer.h, model.layers, ...).
        lists = [(len(m), n) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
        if not lists:
            raise AttribIndexError("projection.last_n_blocks is set but the model has no list of blocks.")
        num_blocks, block_list = max(lists)
        first = num_blocks - config.last_n_blocks
        chosen = [s for s in chosen if (b := _block_index(s.name, [block_list])) is not None and b >= first]
    if not chosen:
        examples = ", ".join(name for name, _ in candidates[:6])
        raise AttribIndexError(
            f"no layer matches projection.modules={list(config.modules)} (exclude={list(config.exclude)}, "
            f"last_n_blocks={config.last_n_blocks}). Layer names look like: {examples}, ...{head_note}"
        )
    return chosen
