"""The vocabulary of an optimizer's per-parameter state, shared by the readers and the factorisation: which keys
hold second moments, parameter names without wrapper prefixes, and the check that a state fits the model's shapes."""

from __future__ import annotations

from typing import Any

import torch

from attribindex.errors import AttribIndexError

# Second-moment entries of a parameter's optimizer state. AMSGrad divides by the running max, so
# `max_exp_avg_sq` wins over `exp_avg_sq` when both are present.
FULL_KEYS = ("max_exp_avg_sq", "exp_avg_sq")
MOMENT_KEYS = ("exp_avg_sq", "max_exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")
SCALAR_KEYS = ("step", "beta2")
# Wrappers that prefix parameter names: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

FORMATS = (
    "Accepted formats: (1) a torch optimizer state_dict() saved with torch.save (e.g. HF Trainer's "
    "optimizer.pt); (2) a name-keyed mapping {param_name: {'exp_avg_sq': tensor}} or {param_name: "
    "{'exp_avg_sq_row': tensor, 'exp_avg_sq_col': tensor}} saved with torch.save, or a safetensors file with "
    "keys '{param_name}.exp_avg_sq' (or '.exp_avg_sq_row' and '.exp_avg_sq_col'), as written by "
    "attribindex.logra.save_named_second_moments(optimizer, model, path)."
)
SAVE_NAMED_FIX = (
    "save a name-keyed state instead: attribindex.logra.save_named_second_moments(optimizer, model, "
    "'second_moments.safetensors') in the training script, or build the optimizer from "
    "model.named_parameters() (torch >= 2.6 then stores the names in optimizer.pt)"
)


def shape_problem(name: str, moments: dict[str, Any], shape: tuple[int, ...]) -> str | None:
    expected = {"exp_avg_sq_row": shape[:-1], "exp_avg_sq_col": shape[:-2] + shape[-1:]}
    for key in (*MOMENT_KEYS, "exp_avg"):
        tensor = moments.get(key)
        if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) != expected.get(key, shape):
            return (
                f"parameter {name!r} has shape {shape} in the model but its optimizer {key} has shape "
                f"{tuple(tensor.shape)}"
            )
    return None


def check_shapes(name: str, moments: dict[str, Any], shape: tuple[int, ...], where: str) -> None:
    if (problem := shape_problem(name, moments, shape)) is not None:
        raise AttribIndexError(
            f"{where} does not belong to this model: {problem}. Fix: pass the model that was trained with this "
            "optimizer state (same architecture and sizes), or the optimizer state of this model's training run."
        )


def plain_name(name: str) -> str:
    """The parameter name without DistributedDataParallel / torch.compile prefixes."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name


def beta2_of(group: dict) -> float | None:
    betas = group.get("betas")
    return as_float(betas[1]) if isinstance(betas, (tuple, list)) and len(betas) == 2 else None


def as_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
