"""Factorising second moments: 1/√v̂ of each captured weight as outer(out_scale, in_scale), so that the correction
folds into LoGra's Kronecker projections. Adafactor's own factored state is used exactly as it applies it; Adam's
full v gets a rank-1 factorisation (Shazeer & Stern 2018), with its error measured on request."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attribindex.errors import AttribIndexError
from attribindex.logra._modules import ModuleSpec
from attribindex.logra._optimizer_state import FORMATS, FULL_KEYS, MOMENT_KEYS, as_float, check_shapes

# Adafactor adds eps1 = 1e-30 to every squared gradient, so a state it wrote never falls below this.
_ADAFACTOR_FLOOR = 1e-30

_ADAFACTOR_APPROXIMATION = (
    "none for weights (Adafactor's own factorisation); a captured bias, whose v Adafactor keeps whole, is "
    "factored as one more input column of its weight"
)
_ADAM_APPROXIMATION = (
    "rank-1 factorisation of Adam's v (Shazeer & Stern 2018): v̂ = r cᵀ / mean(v) with r, c the row and "
    "column means of the bias-corrected v; each factor of √v̂ is clamped at √eps so √v̂ ≥ eps"
)


@dataclass
class SecondMomentScales:
    """Per captured module, 1/√v̂ factorised as outer(out_scale, in_scale), in the weight's (out, in) orientation.

    Example:
        >>> scales = load_second_moment_scales("checkpoint-500/optimizer.pt", model, specs)  # doctest: +SKIP
        >>> correction = torch.outer(scales.out_scale["mlp.fc"], scales.in_scale["mlp.fc"])  # doctest: +SKIP
        >>> scales.record["approximation"], scales.record["relative_error"]  # doctest: +SKIP
        ('rank-1 factorisation of Adam's v ...', 0.21)
    """

    optimizer: str  # "adam" or "adafactor"
    out_scale: dict[str, torch.Tensor]  # module name -> (n_out,) float32, > 0
    in_scale: dict[str, torch.Tensor]  # module name -> (n_in (+1 for a captured bias),) float32, > 0
    record: dict  # JSON-able provenance for the index manifest


def factorise(
    states: dict[str, dict[str, Any]],
    params: dict[str, nn.Parameter],
    modules: list[ModuleSpec],
    eps: float,
    where: str,
    measure_error: bool = True,
) -> SecondMomentScales:
    """1/√v̂ per captured module, factorised, from the parameters' named optimizer states; `where` names them in
    errors."""
    kinds: dict[str, str] = {}
    out_scale: dict[str, torch.Tensor] = {}
    in_scale: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    steps: dict[str, float | None] = {}
    corrections: set[str] = set()
    for spec in modules:
        name = f"{spec.name}.weight"
        moments = states.get(name)
        if not moments or not any(key in moments for key in MOMENT_KEYS):
            raise AttribIndexError(
                f"{where} has no second moment for {name!r} (captured module {spec.name!r}): the layer was frozen "
                f"during training, or the state belongs to another model. Fix: exclude the module (add "
                f"{spec.name!r} to projection.exclude) or supply the optimizer state of the run that trained it."
            )
        check_shapes(name, moments, tuple(params[name].shape), where)
        steps[spec.name] = as_float(moments.get("step"))
        if "exp_avg_sq_row" in moments and "exp_avg_sq_col" in moments:
            kinds[spec.name] = "adafactor"
            bias_v = _bias_moment(states, spec, where, ("exp_avg_sq",))
            out_scale[spec.name], in_scale[spec.name], errors[spec.name] = _adafactor_factors(
                moments["exp_avg_sq_row"], moments["exp_avg_sq_col"], spec.kind, bias_v
            )
        elif any(key in moments for key in FULL_KEYS):
            kinds[spec.name] = "adam"
            v = next(moments[key] for key in FULL_KEYS if key in moments)
            correction, note = _bias_correction(steps[spec.name], as_float(moments.get("beta2")))
            corrections.add(note)
            bias_v = _bias_moment(states, spec, where, FULL_KEYS)
            out_scale[spec.name], in_scale[spec.name], errors[spec.name] = _adam_factors(
                v, spec.kind, correction, eps, bias_v, measure_error
            )
        else:
            raise AttribIndexError(
                f"the state of {name!r} in {where} has only {sorted(k for k in moments if k in MOMENT_KEYS)}: "
                f"Adafactor needs both exp_avg_sq_row and exp_avg_sq_col. Fix: supply the complete state. {FORMATS}"
            )
    if len(set(kinds.values())) > 1:
        by_kind = {kind: [m for m, k in kinds.items() if k == kind][:3] for kind in set(kinds.values())}
        raise AttribIndexError(
            f"{where} mixes Adam (full exp_avg_sq) and Adafactor (factored) states across captured modules "
            f"({by_kind}). Fix: supply the state of a single optimizer, or capture only modules it trained."
        )
    optimizer = next(iter(kinds.values()))
    known_steps = {s for s in steps.values() if s is not None}
    record = {
        "step": (int(known_steps.pop()) if len(known_steps) == 1 else steps) if known_steps else None,
        "bias_correction": "; ".join(sorted(corrections)) if corrections else "not applicable (Adafactor)",
        "approximation": _ADAFACTOR_APPROXIMATION if optimizer == "adafactor" else _ADAM_APPROXIMATION,
        "eps": eps,
    }
    if measure_error:
        worst = max(errors, key=errors.__getitem__)
        record |= {
            "relative_error": sum(errors.values()) / len(errors),
            "relative_error_max": errors[worst],
            "relative_error_worst_module": worst,
        }
    # the projections they fold into live on the CPU, whatever device the optimizer state is on
    cpu = {side: {n: t.cpu() for n, t in scales.items()} for side, scales in (("out", out_scale), ("in", in_scale))}
    return SecondMomentScales(optimizer, cpu["out"], cpu["in"], record)


def _adafactor_factors(
    row: torch.Tensor, col: torch.Tensor, kind: str, bias_v: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(out_scale, in_scale, relative error) exactly as transformers' ``Adafactor._approx_sq_grad`` scales the
    gradient.

    Adafactor keeps a bias's v whole. A captured bias (`bias_v`, (n_out,)) is factored as Adafactor would factor
    one more input column of the weight: its mean of g² is mean(v_b), scaled like the other input columns. Only
    that column is approximate; the error is ‖√v̂ − √v‖_F / ‖√v‖_F over weight and bias."""
    # Adafactor's row is the mean of g² over the weight's last dim, its col the mean over the first.
    row = row.to(torch.float64).clamp_min(_ADAFACTOR_FLOOR)  # (weight.shape[0],)
    col = col.to(torch.float64).clamp_min(_ADAFACTOR_FLOOR)  # (weight.shape[1],)
    r_factor = (row / row.mean()).rsqrt()  # (weight.shape[0],)
    c_factor = col.rsqrt()  # (weight.shape[1],)
    # A Linear weight is (out, in); a GPT-2 Conv1D weight is (in, out), so its row side is the input.
    out_scale, in_scale = (r_factor, c_factor) if kind == "linear" else (c_factor, r_factor)
    if bias_v is None:
        return out_scale.float(), in_scale.float(), 0.0
    bias_v = bias_v.to(torch.float64).clamp_min(_ADAFACTOR_FLOOR)  # (n_out,)
    # The input side is Adafactor's col (Linear: used as is) or its row (Conv1D: divided by the row mean).
    bias_scale = bias_v.mean().rsqrt() if kind == "linear" else (bias_v.mean() / row.mean()).rsqrt()
    # ‖√v̂‖_F of the (exact) weight part is ‖1/out‖ · ‖1/in‖.
    weight_norm_sq = out_scale.reciprocal().square().sum() * in_scale.reciprocal().square().sum()
    bias_error = torch.linalg.norm((out_scale * bias_scale).reciprocal() - bias_v.sqrt())
    error = float(bias_error / torch.sqrt(weight_norm_sq + bias_v.sum()))
    return out_scale.float(), torch.cat([in_scale, bias_scale.reshape(1)]).float(), error


def _adam_factors(
    v: torch.Tensor,
    kind: str,
    correction: float,
    eps: float,
    bias_v: torch.Tensor | None = None,
    measure_error: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(out_scale, in_scale, relative error, or NaN unless `measure_error`) of the rank-1 factorisation of Adam's
    v / correction.

    With `bias_v` (n_out,), the bias's second moment is the last column of the factorised matrix (the bias is
    the gradient's input column of ones), so in_scale has n_in + 1 entries."""
    v = v.float()  # (weight.shape): float32 keeps the full-size temporaries small; means are float64
    if kind != "linear":
        v = v.T  # Conv1D (in, out) -> (n_out, n_in)
    if bias_v is not None:
        v = torch.cat([v, bias_v.float().reshape(-1, 1)], dim=1)  # (n_out, n_in + 1)
    r = v.mean(dim=1, dtype=torch.float64) / correction  # (n_out,)
    c = v.mean(dim=0, dtype=torch.float64) / correction  # (n_in,)
    m = (r.mean()).clamp_min(1e-300)  # mean(r) = mean(c) = mean(v); the floor only guards an all-zero state
    # √v̂ = √(r cᵀ / m) = outer(√r / m^¼, √c / m^¼): splitting √m evenly keeps both sides near √|g|,
    # so one √eps clamp per side gives √v̂ ≥ eps without distorting a side whose values are genuine.
    root = m.sqrt().sqrt()
    a = (r.sqrt() / root).clamp_min(math.sqrt(eps))  # (n_out,)
    b = (c.sqrt() / root).clamp_min(math.sqrt(eps))  # (n_in,)
    error = float("nan")
    if measure_error:
        approx = torch.outer(a.float(), b.float())  # (n_out, n_in) √v̂
        target = (v / correction).sqrt().clamp_min(eps)  # (n_out, n_in) √v floored as Adam's + eps does
        error = float(torch.linalg.norm(approx - target) / torch.linalg.norm(target))
    return (1.0 / a).float(), (1.0 / b).float(), error


def _bias_correction(step: float | None, beta2: float | None) -> tuple[float, str]:
    if step is None or beta2 is None or step < 1 or not 0.0 < beta2 < 1.0:
        return 1.0, "not applied (the file has no step or betas)"
    return 1.0 - beta2**step, f"v / (1 - beta2**step) with beta2={beta2}"


def _bias_moment(
    states: dict[str, dict[str, Any]], spec: ModuleSpec, where: str, keys: tuple[str, ...]
) -> torch.Tensor | None:
    """The (n_out,) second moment of `spec`'s captured bias, or None when its bias is not captured."""
    if not spec.bias:
        return None
    name = f"{spec.name}.bias"
    moments = states.get(name) or {}
    found = next((moments[key] for key in keys if isinstance(moments.get(key), torch.Tensor)), None)
    if found is None or found.numel() != spec.out_features:
        raise AttribIndexError(
            f"{where} has no second moment of shape ({spec.out_features},) for the bias {name!r} (captured module "
            f"{spec.name!r}); the bias was frozen during training or the state belongs to another model. Fix: set "
            "projection.bias: false to leave biases out, or supply the optimizer state of the run that trained it."
        )
    return found.reshape(-1)
