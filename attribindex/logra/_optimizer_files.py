"""Reading a training optimizer's saved state: a torch ``state_dict`` (its integer parameter ids named against the
model) or a name-keyed mapping (torch.save or safetensors), told apart by the file's content. Only the wanted
parameters' states are read: the file may hold every parameter of a large model."""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from attribindex.errors import AttribIndexError
from attribindex.logra._optimizer_state import (
    FORMATS,
    MOMENT_KEYS,
    SAVE_NAMED_FIX,
    SCALAR_KEYS,
    beta2_of,
    check_shapes,
    plain_name,
    shape_problem,
)


def read_states(
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
            key in v for v in obj.values() for key in MOMENT_KEYS
        ):
            return "name-keyed torch.save", _pick(obj, wanted), "names in the file"
        if all(isinstance(v, torch.Tensor) for v in obj.values()) and any(
            k.rsplit(".", 1)[-1] in MOMENT_KEYS for k in obj
        ):
            return "name-keyed torch.save", _pick(_unflatten(obj), wanted), "names in the file"
    raise AttribIndexError(
        f"{path} holds a {type(obj).__name__} without second moments, not an optimizer state. {FORMATS}"
    )


def _is_safetensors(head: bytes) -> bool:
    # safetensors: an 8-byte little-endian header length, then a JSON header; torch.save writes a zip
    # ("PK") or a pickle (0x80).
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 32


def _torch_load(path: Path, head: bytes, trust_pickle: bool) -> Any:
    # torch.save writes a zip archive, or (before torch 1.6 / with the legacy flag) a pickle stream whose
    # first byte is the PROTO opcode; anything else is not worth unpickling.
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise AttribIndexError(f"{path} is neither a torch.save nor a safetensors file. {FORMATS}")
    try:
        # mmap leaves the tensors on disk: only the captured modules' states are ever read.
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=head.startswith(b"PK"))
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found is None:
            raise AttribIndexError(
                f"{path} is a damaged or foreign pickle that torch.load cannot read. {FORMATS}"
            ) from None
        raise AttribIndexError(
            f"{path} holds a Python object ({found.group(1)}) besides tensors, so it cannot be loaded safely "
            f"(weights_only). Fix: if you made the file yourself, pass trust_pickle=True (loading it can run "
            f"code), or {SAVE_NAMED_FIX}."
        ) from None
    except Exception as error:  # torch.load raises KeyError, EOFError, RuntimeError ... on damaged files
        raise AttribIndexError(
            f"{path} is a damaged or foreign torch.save file ({type(error).__name__}: {_last_line(error)}). {FORMATS}"
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
                if field in MOMENT_KEYS or field in SCALAR_KEYS:
                    by_name.setdefault(plain_name(name), []).append(key)
            if not any(key.rpartition(".")[2] in MOMENT_KEYS for key in keys):
                raise AttribIndexError(f"{path} is a safetensors file without second moments. {FORMATS}")
            # Read only the captured modules' tensors: the file may hold every parameter of a large model.
            return {
                name: {key.rpartition(".")[2]: handle.get_tensor(key) for key in by_name[plain_name(name)]}
                for name in wanted
                if plain_name(name) in by_name
            }
    except AttribIndexError:
        raise
    except Exception as error:
        raise AttribIndexError(f"{path} is not a readable safetensors file ({error}). {FORMATS}") from None


def _unflatten(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    nested: dict[str, dict[str, Any]] = {}
    for key, tensor in flat.items():
        name, _, field = key.rpartition(".")
        if field in MOMENT_KEYS or field in SCALAR_KEYS:
            nested.setdefault(name, {})[field] = tensor
    return nested


def _pick(named: dict[str, dict[str, Any]], wanted: list[str]) -> dict[str, dict[str, Any]]:
    """The wanted parameters' states from a name-keyed mapping, with ``betas`` reduced to ``beta2``."""
    plain = {plain_name(name): state for name, state in named.items()}
    picked = {}
    for name in wanted:
        if (state := plain.get(plain_name(name))) is not None:
            state = dict(state)
            if "beta2" not in state and (beta2 := beta2_of(state)) is not None:
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
    beta2 = {pid: beta2_of(group) for group in groups for pid in group["params"]}
    if all("param_names" in group for group in groups):
        names = {pid: name for group in groups for pid, name in zip(group["params"], group["param_names"])}
        mapping = "param_names stored in the optimizer's param_groups"
        by_plain = {plain_name(name): name for name in params}
        for pid, name in names.items():
            model_name = by_plain.get(plain_name(name))
            if model_name is not None and pid in state:
                check_shapes(model_name, state[pid], params[model_name], str(path))
    else:
        fitting, closest = [], None
        for label, candidate in _candidate_orders(model, groups):
            if candidate is None:
                continue  # group sizes differ
            problem = next(
                (p for pid, n in candidate.items() if pid in state and (p := shape_problem(n, state[pid], params[n]))),
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
                f"model that was trained, with the same parameters frozen, or {SAVE_NAMED_FIX}."
            )
        answers = {}
        for label, candidate in fitting:
            by_plain = {plain_name(name): pid for pid, name in candidate.items()}
            answers.setdefault(tuple(by_plain.get(plain_name(w)) for w in wanted), []).append(label)
        if len(answers) > 1:
            raise AttribIndexError(
                f"the parameter ids in {path} fit several orderings of the model that disagree on the captured "
                f"modules ({' / '.join(', '.join(labels) for labels in answers.values())}). Fix: {SAVE_NAMED_FIX}."
            )
        mapping = " and ".join(label for label, _ in fitting) + (" (they agree)" if len(fitting) > 1 else "")
        names = fitting[0][1]
    by_plain = {plain_name(name): pid for pid, name in names.items()}
    states = {}
    for name in wanted:
        pid = by_plain.get(plain_name(name))
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
