"""Optimizer-aware gradient correction (TrackStar, LESS): per-example gradients divided by √v.

Adam-family and Adafactor optimizers precondition each weight's gradient elementwise by 1/√v, with v the
running second moment. Attributing with the same correction scores examples the way training used them.
For a captured weight W (n_out × n_in) we factorise 1/√v̂ ≈ outer(out_scale, in_scale), so the correction
folds into LoGra's Kronecker projections: P_out' = P_out·diag(out_scale), P_in' = P_in·diag(in_scale).

Two file formats are read, told apart by their content:
1. a torch optimizer ``state_dict()`` saved with ``torch.save`` (HF Trainer's ``optimizer.pt``), whose
   integer parameter ids are mapped to names (see ``_optimizer_files._map_optimizer_ids``);
2. a name-keyed mapping, ``{param_name: {"exp_avg_sq": t}}`` / ``{param_name: {"exp_avg_sq_row": r,
   "exp_avg_sq_col": c}}`` saved with ``torch.save``, or flat safetensors keys ``"{param_name}.exp_avg_sq"``
   (``.exp_avg_sq_row`` / ``.exp_avg_sq_col``, optional ``.step`` / ``.beta2``) as written by
   ``save_named_second_moments``.

This module holds the entry points; the files are read by `attribindex.logra._optimizer_files`, the second
moments factorised by `attribindex.logra._second_moments`, and both share `attribindex.logra._optimizer_state`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from attribindex.errors import AttribIndexError
from attribindex.logra._modules import ModuleSpec
from attribindex.logra._optimizer_files import read_states
from attribindex.logra._optimizer_state import FORMATS, MOMENT_KEYS, as_float, beta2_of
from attribindex.logra._second_moments import SecondMomentScales, factorise
from attribindex.store import file_sha256, save_safetensors

# Optimizer files a training checkpoint folder may hold, in the order they are looked for.
CHECKPOINT_OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")


def load_second_moment_scales(
    path: str | Path,
    model: nn.Module,
    modules: list[ModuleSpec],
    eps: float = 1e-8,
    *,
    trust_pickle: bool = False,
) -> SecondMomentScales:
    """Read a training optimizer's second moments and factorise 1/√v̂ per captured module.

    Adafactor's factored state is reproduced exactly as ``transformers.optimization.Adafactor`` applies
    it: out/in scales are its ``r_factor`` / ``c_factor``. Adam's full v (bias-corrected by
    1/(1 - β2^step) when the file has ``step`` and ``betas``) is approximated by the rank-1 factorisation
    v̂ = r cᵀ / mean(v), r and c its row and column means, which is exact when v is rank-1. Each factor of
    √v̂ is clamped at √eps so √v̂ ≥ eps, standing in for Adam's ``√v + eps``. How good the approximation
    was is recorded as ``record["relative_error"]``: the mean over modules of
    ‖√v̂ - max(√v, eps)‖_F / ‖max(√v, eps)‖_F (``relative_error_max`` names the worst module).

    Args:
        path: the optimizer state, or a checkpoint folder holding ``optimizer.pt`` / ``optimizer.bin``; the
            format is detected from the content (see the module docstring).
        model: the trained model (shapes are checked against it; for an id-keyed ``state_dict`` its
            ``named_parameters()`` order and ``requires_grad`` flags are used to recover names).
        modules: the captured modules; each one's ``{name}.weight`` must have a second moment.
        eps: floor on √v̂ for Adam (Adam's own ``eps``, default 1e-8); must be > 0.
        trust_pickle: load a ``torch.save`` file that holds Python objects besides tensors (this can run
            arbitrary code: only for files you made yourself). Default False: such files are refused.

    Returns:
        The scales, float32 on the CPU, and a JSON-able ``record`` with optimizer, file, sha256, format,
        mapping, step, bias_correction, approximation, eps and relative_error.

    Raises:
        AttribIndexError: unreadable file, shapes that differ from the model, ids that cannot be mapped to
            names, or a captured module without a second moment (e.g. a layer frozen during training).

    Example:
        >>> specs = select_modules(model, ProjectionConfig(modules=("*.mlp.*",)))  # doctest: +SKIP
        >>> scales = load_second_moment_scales("checkpoint-500/optimizer.pt", model, specs)  # doctest: +SKIP
        >>> scales.optimizer, scales.out_scale[specs[0].name].shape  # doctest: +SKIP
        ('adam', torch.Size([256]))
    """
    path = Path(path)
    if not modules:
        raise AttribIndexError("no captured modules were given. Pass the specs from select_modules(model, ...).")
    if path.is_dir():  # a training checkpoint folder: HF Trainer writes optimizer.pt, Accelerate optimizer.bin
        found = [path / name for name in CHECKPOINT_OPTIMIZER_FILES if (path / name).is_file()]
        if not found:
            raise AttribIndexError(
                f"checkpoint folder {path} holds none of {', '.join(CHECKPOINT_OPTIMIZER_FILES)}. Pass the "
                f"optimizer state file itself. {FORMATS}"
            )
        path = found[0]
    if not path.is_file():
        raise AttribIndexError(
            f"optimizer state file {path} does not exist. Pass the path of the saved state. {FORMATS}"
        )
    if not eps > 0:
        raise AttribIndexError(f"eps must be > 0 (it floors √v̂), got {eps}. Pass Adam's eps, e.g. 1e-8.")
    params = dict(model.named_parameters())
    wanted = [weight_of(spec, params) for spec in modules]
    biases = [f"{spec.name}.bias" for spec in modules if spec.bias]
    file_format, states, mapping = read_states(path, model, wanted + biases, trust_pickle)
    scales = factorise(states, params, modules, eps, str(path))
    scales.record = {
        "optimizer": scales.optimizer,
        "file": str(path.resolve()),
        "sha256": file_sha256(path),
        "format": file_format,
        "mapping": mapping,
        **scales.record,
    }
    return scales


def live_second_moment_scales(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    modules: list[ModuleSpec],
    eps: float = 1e-8,
    *,
    measure_error: bool = True,
) -> SecondMomentScales | None:
    """`load_second_moment_scales` of a training optimizer's current state, read in memory; None before its first
    step (Adam-family optimizers create their second moments then). `measure_error=False` skips the relative
    error of Adam's factorisation (a pass over every v; the record then has none), for a refold at every step.

    Example:
        >>> scales = live_second_moment_scales(adamw, model, specs)  # after adamw.step()  # doctest: +SKIP
        >>> scales.record["step"]  # doctest: +SKIP
        1
    """
    states = named_states(optimizer, model)
    if not any(key in state for state in states.values() for key in MOMENT_KEYS):
        if any(states.values()):  # it has stepped (momentum buffers, a step count) and keeps no second moment
            raise AttribIndexError(
                f"{type(optimizer).__name__} keeps no second moments (exp_avg_sq), so there is nothing to fold in: "
                "only Adam-family optimizers and Adafactor do. Capture without folding second moments."
            )
        return None
    params = dict(model.named_parameters())
    for spec in modules:
        weight_of(spec, params)
    where = f"the training optimizer ({type(optimizer).__name__})"
    return factorise(states, params, modules, eps, where, measure_error)


def save_named_second_moments(optimizer: torch.optim.Optimizer, model: nn.Module, path: str | Path) -> Path:
    """Write the optimizer's second moments keyed by parameter name (format 2) as safetensors.

    Parameters are named by identity against ``model.named_parameters()``, so the file is unambiguous
    whatever the optimizer's grouping. Keys are ``{name}.exp_avg_sq`` (Adam; ``.max_exp_avg_sq`` with
    AMSGrad) or ``{name}.exp_avg_sq_row`` / ``.exp_avg_sq_col`` (Adafactor), plus ``{name}.step`` and
    ``{name}.beta2`` (0-d float64) when known, so Adam's bias correction can be applied on loading.

    Example:
        >>> for batch in loader:  # doctest: +SKIP
        ...     model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()
        >>> save_named_second_moments(optimizer, model, "run/second_moments.safetensors")  # doctest: +SKIP
        PosixPath('run/second_moments.safetensors')
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for name, state in named_states(optimizer, model).items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
            else:  # step, beta2
                tensors[f"{name}.{key}"] = torch.tensor(value, dtype=torch.float64)
    if not any(key.rsplit(".", 1)[1] in MOMENT_KEYS for key in tensors):
        raise AttribIndexError(
            f"{type(optimizer).__name__} holds no second moment for any parameter of {type(model).__name__}. "
            "Fix: call save_named_second_moments after at least one optimizer.step(), with the model whose "
            "parameters the optimizer updates."
        )
    metadata = {"format": "attribindex.second_moments", "version": "1", "optimizer": type(optimizer).__name__}
    save_safetensors(tensors, path, metadata)
    return path


def named_states(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict[str, Any]]:
    """{parameter name: its second moments (tensors, as the optimizer holds them), `step` and `beta2` when known}
    for every parameter of `model` the optimizer has stepped; names found by identity, so grouping is irrelevant."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    names = {id(p): name for name, p in model.named_parameters()}
    states: dict[str, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        beta2 = beta2_of(group)
        for param in group["params"]:
            state = optimizer.state.get(param)
            name = names.get(id(param))
            if not state or name is None:
                continue  # never stepped (frozen), or not part of this model
            entry: dict[str, Any] = {k: state[k] for k in MOMENT_KEYS if isinstance(state.get(k), torch.Tensor)}
            if (step := as_float(state.get("step"))) is not None:
                entry["step"] = step
            if beta2 is not None:
                entry["beta2"] = beta2
            states[name] = entry
    return states


def weight_of(spec: ModuleSpec, params: dict[str, nn.Parameter]) -> str:
    name = f"{spec.name}.weight"
    if name not in params:
        raise AttribIndexError(
            f"captured module {spec.name!r} has no parameter {name!r} in this model. Fix: select the modules "
            "with select_modules(model, ...) on the same model you pass here."
        )
    expected = (spec.out_features, spec.in_features) if spec.kind == "linear" else (spec.in_features, spec.out_features)
    if tuple(params[name].shape) != expected:
        raise AttribIndexError(
            f"{name!r} has shape {tuple(params[name].shape)} in the model but its ModuleSpec says {expected}. "
            "Fix: select the modules with select_modules(model, ...) on the same model you pass here."
        )
    return name
