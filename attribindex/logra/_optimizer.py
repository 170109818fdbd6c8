"""Optimizer-aware gradient correction (TrackStar, LESS): per-example gradients divided by √v.

Adam-family and Adafactor optimizers precondition each weight's gradient elementwise by 1/√v, with v the
running second moment. Attributing with the same correction scores examples the way training used them.
For a captured weight W (n_out × n_in) we factorise 1/√v̂ ≈ outer(out_scale, in_scale), so the correction
folds into LoGra's Kronecker projections: P_out' = P_out·diag(out_scale), P_in' = P_in·diag(in_scale).

Two file formats are read, told apart by their content:
1. a torch optimizer ``state_dict()`` saved with ``torch.save`` (HF Trainer's ``optimizer.pt``), whose
   integer parameter ids are mapped to names (see ``_map_optimizer_ids``);
2. a name-keyed mapping, ``{param_name: {"exp_avg_sq": t}}`` / ``{param_name: {"exp_avg_sq_row": r,
   "exp_avg_sq_col": c}}`` saved with ``torch.save``, or flat safetensors keys ``"{param_name}.exp_avg_sq"``
   (``.exp_avg_sq_row`` / ``.exp_avg_sq_col``, optional ``.step`` / ``.beta2``) as written by
   ``save_named_second_moments``.
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from attribindex.errors import AttribIndexError
from attribindex.logra._modules import ModuleSpec
from attribindex.store import file_sha256, save_safetensors

# Second-moment entries of a parameter's optimizer state. AMSGrad divides by the running max, so
# `max_exp_avg_sq` wins over `exp_avg_sq` when both are present.
_FULL_KEYS = ("max_exp_avg_sq", "exp_avg_sq")
_MOMENT_KEYS = ("exp_avg_sq", "max_exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")
_SCALAR_KEYS = ("step", "beta2")
# Wrappers that prefix parameter names: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Optimizer files a training checkpoint folder may hold, in the order they are looked for.
CHECKPOINT_OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
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
_FORMATS = (
    "Accepted formats: (1) a torch optimizer state_dict() saved with torch.save (e.g. HF Trainer's "
    "optimizer.pt); (2) a name-keyed mapping {param_name: {'exp_avg_sq': tensor}} or {param_name: "
    "{'exp_avg_sq_row': tensor, 'exp_avg_sq_col': tensor}} saved with torch.save, or a safetensors file with "
    "keys '{param_name}.exp_avg_sq' (or '.exp_avg_sq_row' and '.exp_avg_sq_col'), as written by "
    "attribindex.logra.save_named_second_moments(optimizer, model, path)."
)
_SAVE_NAMED_FIX = (
    "save a name-keyed state instead: attribindex.logra.save_named_second_moments(optimizer, model, "
    "'second_moments.safetensors') in the training script, or build the optimizer from "
    "model.named_parameters() (torch >= 2.6 then stores the names in optimizer.pt)"
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
                f"optimizer state file itself. {_FORMATS}"
            )
        path = found[0]
    if not path.is_file():
        raise AttribIndexError(
            f"optimizer state file {path} does not exist. Pass the path of the saved state. {_FORMATS}"
        )
    if not eps > 0:
        raise AttribIndexError(f"eps must be > 0 (it floors √v̂), got {eps}. Pass Adam's eps, e.g. 1e-8.")
    params = dict(model.named_parameters())
    wanted = [_weight_of(spec, params) for spec in modules]
    biases = [f"{spec.name}.bias" for spec in modules if spec.bias]
    file_format, states, mapping = _read_states(path, model, wanted + biases, trust_pickle)
    scales = _factorise(states, params, modules, eps, str(path))
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
    states = _named_states(optimizer, model)
    if not any(key in state for state in states.values() for key in _MOMENT_KEYS):
        if any(states.values()):  # it has stepped (momentum buffers, a step count) and keeps no second moment
            raise AttribIndexError(
                f"{type(optimizer).__name__} keeps no second moments (exp_avg_sq), so there is nothing to fold in: "
                "only Adam-family optimizers and Adafactor do. Capture without folding second moments."
            )
        return None
    params = dict(model.named_parameters())
    for spec in modules:
        _weight_of(spec, params)
    where = f"the training optimizer ({type(optimizer).__name__})"
    return _factorise(states, params, modules, eps, where, measure_error)


def _factorise(
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
        if not moments or not any(key in moments for key in _MOMENT_KEYS):
            raise AttribIndexError(
                f"{where} has no second moment for {name!r} (captured module {spec.name!r}): the layer was frozen "
                f"during training, or the state belongs to another model. Fix: exclude the module (add "
                f"{spec.name!r} to projection.exclude) or supply the optimizer state of the run that trained it."
            )
        _check_shapes(name, moments, tuple(params[name].shape), where)
        steps[spec.name] = _as_float(moments.get("step"))
        if "exp_avg_sq_row" in moments and "exp_avg_sq_col" in moments:
            kinds[spec.name] = "adafactor"
            bias_v = _bias_moment(states, spec, where, ("exp_avg_sq",))
            out_scale[spec.name], in_scale[spec.name], errors[spec.name] = _adafactor_factors(
                moments["exp_avg_sq_row"], moments["exp_avg_sq_col"], spec.kind, bias_v
            )
        elif any(key in moments for key in _FULL_KEYS):
            kinds[spec.name] = "adam"
            v = next(moments[key] for key in _FULL_KEYS if key in moments)
            correction, note = _bias_correction(steps[spec.name], _as_float(moments.get("beta2")))
            corrections.add(note)
            bias_v = _bias_moment(states, spec, where, _FULL_KEYS)
            out_scale[spec.name], in_scale[spec.name], errors[spec.name] = _adam_factors(
                v, spec.kind, correction, eps, bias_v, measure_error
            )
        else:
            raise AttribIndexError(
                f"the state of {name!r} in {where} has only {sorted(k for k in moments if k in _MOMENT_KEYS)}: "
                f"Adafactor needs both exp_avg_sq_row and exp_avg_sq_col. Fix: supply the complete state. {_FORMATS}"
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
    return SecondMomentScales(optimizer, out_scale, in_scale, record)


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
    for name, state in _named_states(optimizer, model).items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
            else:  # step, beta2
                tensors[f"{name}.{key}"] = torch.tensor(value, dtype=torch.float64)
    if not any(key.rsplit(".", 1)[1] in _MOMENT_KEYS for key in tensors):
        raise AttribIndexError(
            f"{type(optimizer).__name__} holds no second moment for any parameter of {type(model).__name__}. "
            "Fix: call save_named_second_moments after at least one optimizer.step(), with the model whose "
            "parameters the optimizer updates."
        )
    metadata = {"format": "attribindex.second_moments", "version": "1", "optimizer": type(optimizer).__name__}
    save_safetensors(tensors, path, metadata)
    return path


def _named_states(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict[str, Any]]:
    """{parameter name: its second moments (tensors, as the optimizer holds them), `step` and `beta2` when known}
    for every parameter of `model` the optimizer has stepped; names found by identity, so grouping is irrelevant."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    names = {id(p): name for name, p in model.named_parameters()}
    states: dict[str, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        beta2 = _beta2(group)
        for param in group["params"]:
            state = optimizer.state.get(param)
            name = names.get(id(param))
            if not state or name is None:
                continue  # never stepped (frozen), or not part of this model
            entry: dict[str, Any] = {k: state[k] for k in _MOMENT_KEYS if isinstance(state.get(k), torch.Tensor)}
            if (step := _as_float(state.get("step"))) is not None:
                entry["step"] = step
            if beta2 is not None:
                entry["beta2"] = beta2
            states[name] = entry
    return states


# --- the math -----------------------------------------------------------------------------------------


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


# --- reading ------------------------------------------------------------------------------------------


def _read_states(
    path: Path, model: nn.Module, wanted: list[str], trust_pickle: bool
) -> tuple[str, dict[str, dict[str, Any]], str]:
    """(format, {wanted param name: its state}, how ids were mapped to names) for a file of either format."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if _is_safetensors(head):
        return "name-keyed safetensors", _read_safetensors(path, wanted), "names in the file"
    obj = _torch_load(path, head, trust_pickle)
    if isinstance(obj, dict) and "state" in obj and "param_groups" in obj:
        states, mapping = _map_optimizer_ids(obj, model, wanted, path)
        return "torch optimizer state_dict", states, mapping
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj):
        if all(isinstance(v, dict) for v in obj.values()) and any(
            key in v for v in obj.values() for key in _MOMENT_KEYS
        ):
            return "name-keyed torch.save", _pick(obj, wanted), "names in the file"
        if all(isinstance(v, torch.Tensor) for v in obj.values()) and any(
            k.rsplit(".", 1)[-1] in _MOMENT_KEYS for k in obj
        ):
            return "name-keyed torch.save", _pick(_unflatten(obj), wanted), "names in the file"
    raise AttribIndexError(
        f"{path} holds a {type(obj).__name__} without second moments, not an optimizer state. {_FORMATS}"
    )


def _is_safetensors(head: bytes) -> bool:
    # safetensors: an 8-byte little-endian header length, then a JSON header; torch.save writes a zip
    # ("PK") or a pickle (0x80).
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 32


def _torch_load(path: Path, head: bytes, trust_pickle: bool) -> Any:
    # torch.save writes a zip archive, or (before torch 1.6 / with the legacy flag) a pickle stream whose
    # first byte is the PROTO opcode; anything else is not worth unpickling.
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise AttribIndexError(f"{path} is neither a torch.save nor a safetensors file. {_FORMATS}")
    try:
        # mmap leaves the tensors on disk: only the captured modules' states are ever read.
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=head.startswith(b"PK"))
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found is None:
            raise AttribIndexError(
                f"{path} is a damaged or foreign pickle that torch.load cannot read. {_FORMATS}"
            ) from None
        raise AttribIndexError(
            f"{path} holds a Python object ({found.group(1)}) besides tensors, so it cannot be loaded safely "
            f"(weights_only). Fix: if you made the file yourself, pass trust_pickle=True (loading it can run "
            f"code), or {_SAVE_NAMED_FIX}."
        ) from None
    except Exception as error:  # torch.load raises KeyError, EOFError, RuntimeError ... on damaged files
        raise AttribIndexError(
            f"{path} is a damaged or foreign torch.save file ({type(error).__name__}: {_last_line(error)}). {_FORMATS}"
        ) from None


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(error).__name__


def _read_safetensors(path: Path, wanted: list[str]) -> dict[str, dict[str, Any]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            by_name: dict[str, list[str]] = {}
            for key in keys:
                name, _, field = key.rpartition(".")
                if field in _MOMENT_KEYS or field in _SCALAR_KEYS:
                    by_name.setdefault(_plain(name), []).append(key)
            if not any(key.rpartition(".")[2] in _MOMENT_KEYS for key in keys):
                raise AttribIndexError(f"{path} is a safetensors file without second moments. {_FORMATS}")
            # Read only the captured modules' tensors: the file may hold every parameter of a large model.
            return {
                name: {key.rpartition(".")[2]: handle.get_tensor(key) for key in by_name[_plain(name)]}
                for name in wanted
                if _plain(name) in by_name
            }
    except AttribIndexError:
        raise
    except Exception as error:
        raise AttribIndexError(f"{path} is not a readable safetensors file ({error}). {_FORMATS}") from None


def _unflatten(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    nested: dict[str, dict[str, Any]] = {}
    for key, tensor in flat.items():
        name, _, field = key.rpartition(".")
        if field in _MOMENT_KEYS or field in _SCALAR_KEYS:
            nested.setdefault(name, {})[field] = tensor
    return nested


def _pick(named: dict[str, dict[str, Any]], wanted: list[str]) -> dict[str, dict[str, Any]]:
    """The wanted parameters' states from a name-keyed mapping, with ``betas`` reduced to ``beta2``."""
    plain = {_plain(name): state for name, state in named.items()}
    picked = {}
    for name in wanted:
        if (state := plain.get(_plain(name))) is not None:
            state = dict(state)
            if "beta2" not in state and (beta2 := _beta2(state)) is not None:
                state["beta2"] = beta2
            picked[name] = state
    return picked


def _map_optimizer_ids(
    state_dict: dict, model: nn.Module, wanted: list[str], path: Path
) -> tuple[dict[str, dict[str, Any]], str]:
    """Name the integer ids of a torch optimizer ``state_dict`` and return the wanted parameters' states.

    ``param_names`` (torch >= 2.6, optimizer built from ``named_parameters()``) are used when present.
    Otherwise candidate orderings of the model's parameters are tried, and those whose group sizes and
    state shapes all agree are kept; they must agree on every captured module.
    """
    groups, state = state_dict["param_groups"], state_dict["state"]
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    beta2 = {pid: _beta2(group) for group in groups for pid in group["params"]}
    if all("param_names" in group for group in groups):
        names = {pid: name for group in groups for pid, name in zip(group["params"], group["param_names"])}
        mapping = "param_names stored in the optimizer's param_groups"
        by_plain = {_plain(name): name for name in params}
        for pid, name in names.items():
            model_name = by_plain.get(_plain(name))
            if model_name is not None and pid in state:
                _check_shapes(model_name, state[pid], params[model_name], str(path))
    else:
        fitting, closest = [], None
        for label, candidate in _candidate_orders(model, groups):
            if candidate is None:
                continue  # group sizes differ
            problem = next(
                (p for pid, n in candidate.items() if pid in state and (p := _shape_problem(n, state[pid], params[n]))),
                None,
            )
            if problem is None:
                fitting.append((label, candidate))
            elif closest is None:
                closest = f"{label}: {problem}"
        if not fitting:
            sizes = [len(group["params"]) for group in groups]
            trainable = sum(p.requires_grad for p in model.parameters())
            raise AttribIndexError(
                f"cannot tell which parameter each id in {path} belongs to: its param_groups hold {sizes} "
                f"parameters and no ordering of {type(model).__name__}'s {len(params)} parameters ({trainable} "
                f"trainable) matches them" + (f" (closest, {closest})" if closest else "") + ". Fix: pass the "
                f"model that was trained, with the same parameters frozen, or {_SAVE_NAMED_FIX}."
            )
        answers = {}
        for label, candidate in fitting:
            by_plain = {_plain(name): pid for pid, name in candidate.items()}
            answers.setdefault(tuple(by_plain.get(_plain(w)) for w in wanted), []).append(label)
        if len(answers) > 1:
            raise AttribIndexError(
                f"the parameter ids in {path} fit several orderings of the model that disagree on the captured "
                f"modules ({' / '.join(', '.join(labels) for labels in answers.values())}). Fix: {_SAVE_NAMED_FIX}."
            )
        mapping = " and ".join(label for label, _ in fitting) + (" (they agree)" if len(fitting) > 1 else "")
        names = fitting[0][1]
    by_plain = {_plain(name): pid for pid, name in names.items()}
    states = {}
    for name in wanted:
        pid = by_plain.get(_plain(name))
        if pid is not None and pid in state:
            states[name] = {**state[pid], "beta2": beta2[pid]}
    return states, mapping


def _candidate_orders(model: nn.Module, groups: list[dict]) -> Iterator[tuple[str, dict[int, str] | None]]:
    """(label, {id: name} or None when the group sizes rule it out) for each way optimizers are usually built."""
    ids = [list(group["params"]) for group in groups]
    flat = [pid for group in ids for pid in group]
    named = list(model.named_parameters())
    everything = [name for name, _ in named]
    # A model frozen for attribution (requires_grad False everywhere) still trained all its parameters.
    trainable = [name for name, p in named if p.requires_grad] or everything
    yield "model.named_parameters() order", dict(zip(flat, everything)) if len(flat) == len(everything) else None
    yield "trainable parameters in model order", dict(zip(flat, trainable)) if len(flat) == len(trainable) else None
    # HF Trainer.create_optimizer: group 0 = decay parameters, group 1 = the rest, each in model order.
    for label, patterns in (
        ("transformers >= 4.50", [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]),
        ("transformers < 4.50", [r"bias"]),
    ):
        decay = _decay_parameter_names(model, patterns)
        grouped = [[n for n in trainable if n in decay], [n for n in trainable if n not in decay]]
        fits = [len(group) for group in ids] == [len(group) for group in grouped]
        yield (
            f"HF Trainer decay / no-decay groups ({label})",
            dict(zip(flat, grouped[0] + grouped[1])) if fits else None,
        )


def _decay_parameter_names(model: nn.Module, patterns: list[str]) -> set[str]:
    """``Trainer.get_decay_parameter_names``: parameters outside nn.LayerNorm modules whose names match no pattern."""
    # Mirrors transformers.trainer_pt_utils.get_parameter_names(model, [nn.LayerNorm], patterns) so that
    # files written by older transformers releases still map whatever release is installed.
    compiled = [re.compile(p) for p in patterns]
    modules = dict(model.named_modules())
    decay = set()
    for name, _ in model.named_parameters():
        parts = name.split(".")
        inside_norm = any(isinstance(modules.get(".".join(parts[:k])), nn.LayerNorm) for k in range(1, len(parts)))
        if not inside_norm and not any(p.search(name.lower()) for p in compiled):
            decay.add(name)
    return decay


# --- small helpers ------------------------------------------------------------------------------------


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


def _weight_of(spec: ModuleSpec, params: dict[str, nn.Parameter]) -> str:
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


def _shape_problem(name: str, moments: dict[str, Any], shape: tuple[int, ...]) -> str | None:
    expected = {"exp_avg_sq_row": shape[:-1], "exp_avg_sq_col": shape[:-2] + shape[-1:]}
    for key in (*_MOMENT_KEYS, "exp_avg"):
        tensor = moments.get(key)
        if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) != expected.get(key, shape):
            return (
                f"parameter {name!r} has shape {shape} in the model but its optimizer {key} has shape "
                f"{tuple(tensor.shape)}"
            )
    return None


def _check_shapes(name: str, moments: dict[str, Any], shape: tuple[int, ...], where: str) -> None:
    if (problem := _shape_problem(name, moments, shape)) is not None:
        raise AttribIndexError(
            f"{where} does not belong to this model: {problem}. Fix: pass the model that was trained with this "
            "optimizer state (same architecture and sizes), or the optimizer state of this model's training run."
        )


def _plain(name: str) -> str:
    """The parameter name without DistributedDataParallel / torch.compile prefixes."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name


def _beta2(group: dict) -> float | None:
    betas = group.get("betas")
    return _as_float(betas[1]) if isinstance(betas, (tuple, list)) and len(betas) == 2 else None


def _as_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
