"""Second-moment scales equal the optimizers' own preconditioners; optimizer ids map to the right names;
every refusal states its fix. Real AdamW / transformers Adafactor, trained a few steps on tiny models."""

from __future__ import annotations

import copy
import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.optimization import Adafactor

from attribindex.config import ProjectionConfig
from attribindex.errors import AttribIndexError
from attribindex.logra._modules import select_modules
from attribindex.logra._optimizer import load_second_moment_scales, save_named_second_moments

STEPS = 3


class Opaque:
    """A Python object torch.load(weights_only=True) refuses to unpickle."""


def _mlp(hidden: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, hidden), nn.ReLU(), nn.Linear(hidden, 5))


def _gpt2(path) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path)


def _model(kind: str, tiny_models) -> nn.Module:
    return _mlp() if kind == "mlp" else _gpt2(tiny_models["gpt2"])


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = STEPS) -> None:
    torch.manual_seed(1)
    for _ in range(steps):
        if isinstance(model, nn.Sequential):
            loss = (model(torch.randn(16, 6)) - torch.randn(16, 5)).pow(2).mean()
        else:
            ids = torch.randint(0, model.config.vocab_size, (4, 12))
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _adafactor(params) -> Adafactor:
    return Adafactor(params, lr=1e-3, scale_parameter=False, relative_step=False, warmup_init=False)


def _specs(model: nn.Module):
    return select_modules(model, ProjectionConfig())


def _weight_orientation(matrix: torch.Tensor, kind: str) -> torch.Tensor:
    """An (out, in) matrix in the weight's own orientation (Conv1D stores (in, out))."""
    return matrix if kind == "linear" else matrix.T


def _assert_same_scales(a, b) -> None:
    assert a.out_scale.keys() == b.out_scale.keys()
    for name in a.out_scale:
        torch.testing.assert_close(a.out_scale[name], b.out_scale[name], rtol=0, atol=0)
        torch.testing.assert_close(a.in_scale[name], b.in_scale[name], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["mlp", "gpt2"])
def test_adafactor_scales_equal_transformers_approx_sq_grad(tmp_path, tiny_models, kind):
    model = _model(kind, tiny_models)
    optimizer = _adafactor(model.parameters())
    _train(model, optimizer)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    specs = _specs(model)
    assert {s.kind for s in specs} == ({"linear"} if kind == "mlp" else {"conv1d"})

    scales = load_second_moment_scales(tmp_path / "optimizer.pt", model, specs)

    assert scales.optimizer == "adafactor"
    assert scales.record["approximation"].startswith("none for weights (Adafactor's own factorisation)")
    assert scales.record["step"] == STEPS
    params = dict(model.named_parameters())
    for spec in specs:
        state = optimizer.state[params[f"{spec.name}.weight"]]
        applied = Adafactor._approx_sq_grad(state["exp_avg_sq_row"], state["exp_avg_sq_col"])  # weight's shape
        out_scale, in_scale = scales.out_scale[spec.name], scales.in_scale[spec.name]
        assert spec.bias and out_scale.shape == (spec.out_features,) and in_scale.shape == (spec.in_features + 1,)
        assert out_scale.dtype == in_scale.dtype == torch.float32
        got = _weight_orientation(torch.outer(out_scale, in_scale[:-1]), spec.kind)
        torch.testing.assert_close(got, applied, rtol=1e-5, atol=0)
        # Adafactor keeps the bias's v whole. It becomes one more input column of the factorisation, with mean
        # g² = mean(v_b) and the weight's own normalisation (the weight's factors stay exact).
        bias_mean = optimizer.state[params[f"{spec.name}.bias"]]["exp_avg_sq"].double().mean()
        row, col = state["exp_avg_sq_row"].double(), state["exp_avg_sq_col"].double()
        if spec.kind == "linear":  # (out, in): the input side is Adafactor's col, the output side row/mean(row)
            expected = (row / row.mean()).rsqrt() * bias_mean.rsqrt()
        else:  # Conv1D (in, out): the input side is row/mean(row), the output side col
            expected = (bias_mean / row.mean()).rsqrt() * col.rsqrt()
        torch.testing.assert_close((out_scale * in_scale[-1]).double(), expected, rtol=1e-5, atol=0)
    assert scales.record["relative_error"] > 0  # only the bias columns are approximated


@pytest.mark.parametrize("kind", ["mlp", "gpt2"])
def test_adam_rank1_second_moment_is_reproduced_exactly(tmp_path, tiny_models, kind):
    model = _model(kind, tiny_models)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    _train(model, optimizer)
    state_dict = copy.deepcopy(optimizer.state_dict())  # the live one shares its tensors with the optimizer
    ids = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    specs = _specs(model)
    generator = torch.Generator().manual_seed(2)
    rank1 = {}
    for spec in specs:
        n_out, n_in = spec.out_features, spec.in_features
        # the bias is the gradient's last input column, so a rank-1 v of the (n_out, n_in + 1) gradient
        v = torch.outer(torch.rand(n_out, generator=generator) + 0.1, torch.rand(n_in + 1, generator=generator) + 0.1)
        rank1[spec.name] = v * 1e-6  # (n_out, n_in + 1), gradients of order 1e-3: well above eps
        state = state_dict["state"]
        state[ids[f"{spec.name}.weight"]]["exp_avg_sq"] = _weight_orientation(rank1[spec.name][:, :-1], spec.kind)
        state[ids[f"{spec.name}.bias"]]["exp_avg_sq"] = rank1[spec.name][:, -1].clone()
    torch.save(state_dict, tmp_path / "optimizer.pt")

    scales = load_second_moment_scales(tmp_path / "optimizer.pt", model, specs)

    assert scales.optimizer == "adam"
    assert "beta2=0.99" in scales.record["bias_correction"]
    for spec in specs:
        corrected = rank1[spec.name] / (1 - 0.99**STEPS)
        got = torch.outer(scales.out_scale[spec.name], scales.in_scale[spec.name]).double() ** -2
        torch.testing.assert_close(got, corrected.double(), rtol=1e-5, atol=0)
    assert scales.record["relative_error"] < 1e-5


def test_adam_real_state_records_a_finite_error_and_provenance(tmp_path, tiny_models):
    model = _gpt2(tiny_models["gpt2"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train(model, optimizer)
    path = tmp_path / "optimizer.pt"
    torch.save(optimizer.state_dict(), path)
    specs = _specs(model)

    scales = load_second_moment_scales(path, model, specs)

    record = scales.record
    assert 0 < record["relative_error"] <= record["relative_error_max"] < 1
    assert math.isfinite(record["relative_error"])
    assert record["relative_error_worst_module"] in {s.name for s in specs}
    assert record["sha256"] == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["step"] == STEPS and record["optimizer"] == "adam" and record["file"] == str(path.resolve())
    assert record["format"] == "torch optimizer state_dict"
    json.dumps(record)  # goes into the index manifest
    for spec in specs:
        for scale in (scales.out_scale[spec.name], scales.in_scale[spec.name]):
            assert scale.dtype == torch.float32 and torch.isfinite(scale).all() and (scale > 0).all()


def test_adam_zero_second_moment_is_floored_at_eps(tmp_path):
    model = _mlp()
    v = {f"{name}.exp_avg_sq": torch.zeros_like(p) for name, p in model.named_parameters()}
    save_file(v, str(tmp_path / "zeros.safetensors"))

    scales = load_second_moment_scales(tmp_path / "zeros.safetensors", model, _specs(model), eps=1e-6)

    for name in scales.out_scale:  # a never-updated weight: Adam divides by eps alone
        correction = torch.outer(scales.out_scale[name], scales.in_scale[name])
        torch.testing.assert_close(correction, torch.full_like(correction, 1e6), rtol=1e-6, atol=0)
    assert scales.record["bias_correction"] == "not applied (the file has no step or betas)"


def _hf_trainer_groups(model: nn.Module) -> list[dict]:
    from transformers import Trainer

    decay = Trainer.get_decay_parameter_names(None, model)  # the helper Trainer.create_optimizer uses
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n in decay and p.requires_grad], "weight_decay": 0.01},
        {"params": [p for n, p in named if n not in decay and p.requires_grad], "weight_decay": 0.0},
    ]


@pytest.mark.parametrize(
    ("built_from", "mapping"),
    [
        ("parameters", "model.named_parameters() order"),
        ("named_parameters", "param_names stored in the optimizer's param_groups"),
        ("hf_trainer_groups", "HF Trainer decay / no-decay groups"),
    ],
)
@pytest.mark.parametrize("optimizer_class", ["adamw", "adafactor"])
def test_optimizer_ids_map_to_the_right_names(tmp_path, tiny_models, built_from, mapping, optimizer_class):
    model = _gpt2(tiny_models["gpt2"])
    params = {
        "parameters": lambda: model.parameters(),
        "named_parameters": lambda: model.named_parameters(),
        "hf_trainer_groups": lambda: _hf_trainer_groups(model),
    }[built_from]()
    optimizer = torch.optim.AdamW(params, lr=1e-3) if optimizer_class == "adamw" else _adafactor(params)
    _train(model, optimizer)
    if built_from == "hf_trainer_groups":  # the grouping reorders parameters, or this test proves nothing
        assert optimizer.param_groups[1]["params"] and len(optimizer.param_groups[0]["params"]) > 2
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    save_named_second_moments(optimizer, model, tmp_path / "named.safetensors")
    specs = _specs(model)

    by_id = load_second_moment_scales(tmp_path / "optimizer.pt", model, specs)
    by_name = load_second_moment_scales(tmp_path / "named.safetensors", model, specs)

    assert mapping in by_id.record["mapping"]
    assert by_name.record["format"] == "name-keyed safetensors"
    _assert_same_scales(by_id, by_name)
    assert by_id.record["relative_error"] == by_name.record["relative_error"]


@pytest.mark.parametrize("optimizer_class", ["adamw", "adafactor"])
def test_save_named_second_moments_round_trips(tmp_path, optimizer_class):
    model = _mlp()
    optimizer = (
        torch.optim.AdamW(model.parameters(), betas=(0.8, 0.95))
        if optimizer_class == "adamw"
        else _adafactor(model.parameters())
    )
    _train(model, optimizer)

    path = save_named_second_moments(optimizer, model, tmp_path / "named.safetensors")

    saved = load_file(str(path))
    expected = {}
    for name, p in model.named_parameters():
        state = optimizer.state[p]
        expected |= {f"{name}.{k}": t for k, t in state.items() if k.startswith("exp_avg_sq")}
        expected[f"{name}.step"] = torch.tensor(float(state["step"]), dtype=torch.float64)
        if optimizer_class == "adamw":
            expected[f"{name}.beta2"] = torch.tensor(0.95, dtype=torch.float64)
    assert saved.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(saved[key], tensor, rtol=0, atol=0)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    _assert_same_scales(
        load_second_moment_scales(path, model, _specs(model)),
        load_second_moment_scales(tmp_path / "optimizer.pt", model, _specs(model)),
    )


def test_name_keyed_torch_save_nested_flat_and_wrapper_prefixed(tmp_path):
    model = _mlp()
    optimizer = _adafactor(model.parameters())
    _train(model, optimizer)
    named = {n: optimizer.state[p] for n, p in model.named_parameters()}
    keys = ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq")  # a weight's factored moments, a bias's full one
    nested = {n: {k: s[k] for k in keys if k in s} for n, s in named.items()}
    # DistributedDataParallel prefixes every name with "module."
    flat = {f"module.{n}.{k}": t for n, s in nested.items() for k, t in s.items()}
    torch.save(nested, tmp_path / "nested.pt")
    torch.save(flat, tmp_path / "flat.pt")
    save_named_second_moments(optimizer, model, tmp_path / "named.safetensors")
    specs = _specs(model)

    reference = load_second_moment_scales(tmp_path / "named.safetensors", model, specs)
    for name in ("nested.pt", "flat.pt"):
        scales = load_second_moment_scales(tmp_path / name, model, specs)
        assert scales.record["format"] == "name-keyed torch.save"
        _assert_same_scales(scales, reference)


@pytest.mark.parametrize("file_format", ["optimizer.pt", "named.safetensors"])
def test_a_different_model_is_refused_naming_the_parameter_and_shapes(tmp_path, file_format):
    trained = _mlp(hidden=8)
    optimizer = torch.optim.AdamW(trained.parameters())
    _train(trained, optimizer)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    save_named_second_moments(optimizer, trained, tmp_path / "named.safetensors")
    other = _mlp(hidden=9)  # same parameter count and names, other sizes

    with pytest.raises(AttribIndexError) as error:
        load_second_moment_scales(tmp_path / file_format, other, _specs(other))

    message = str(error.value)
    assert "'0.weight'" in message and "(9, 6)" in message and "(8, 6)" in message
    assert "Fix:" in message and "model that was trained" in message


@pytest.mark.parametrize("built_from", ["parameters", "named_trainable"])
def test_a_captured_layer_frozen_in_training_is_refused_with_the_fix(tmp_path, built_from):
    model = _mlp()
    model[0].requires_grad_(False)
    params = (
        model.parameters()
        if built_from == "parameters"
        else [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    )
    optimizer = torch.optim.AdamW(params)
    _train(model, optimizer)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    specs = _specs(model)
    assert [s.name for s in specs] == ["0", "2"]

    with pytest.raises(AttribIndexError, match=r"no second moment for '0\.weight'.*projection\.exclude"):
        load_second_moment_scales(tmp_path / "optimizer.pt", model, specs)
    # Excluding it, as the message says, works.
    scales = load_second_moment_scales(tmp_path / "optimizer.pt", model, specs[1:])
    assert list(scales.out_scale) == ["2"]


def test_garbage_and_foreign_files_are_refused_listing_the_formats(tmp_path):
    model = _mlp()
    specs = _specs(model)
    (tmp_path / "notes.txt").write_text("these are not optimizer states\n" * 20)
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x02" + b"garbage" * 30)
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "trainer_state.pt")
    torch.save(_mlp().state_dict(), tmp_path / "model.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "model.pt").read_bytes()[:300])
    save_file({"0.weight": torch.ones(8, 6)}, str(tmp_path / "model.safetensors"))

    names = ("notes.txt", "junk.pkl", "trainer_state.pt", "model.pt", "truncated.pt", "model.safetensors")
    for name in names:
        with pytest.raises(AttribIndexError, match="Accepted formats") as error:
            load_second_moment_scales(tmp_path / name, model, specs)
        assert "save_named_second_moments" in str(error.value)
    with pytest.raises(AttribIndexError, match="does not exist"):
        load_second_moment_scales(tmp_path / "missing.pt", model, specs)


def test_a_pickle_with_python_objects_needs_trust_pickle(tmp_path):
    model = _mlp()
    optimizer = torch.optim.AdamW(model.parameters())
    _train(model, optimizer)
    state_dict = optimizer.state_dict()
    state_dict["param_groups"][0]["scheduler"] = Opaque()  # e.g. an object a custom loop stashed there
    torch.save(state_dict, tmp_path / "optimizer.pt")

    with pytest.raises(AttribIndexError, match=r"Opaque.*trust_pickle=True.*save_named_second_moments"):
        load_second_moment_scales(tmp_path / "optimizer.pt", model, _specs(model))
    scales = load_second_moment_scales(tmp_path / "optimizer.pt", model, _specs(model), trust_pickle=True)
    assert scales.optimizer == "adam"


class _TwoSquareLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj_norm = nn.Linear(4, 4, bias=False)  # "_norm" puts it in HF Trainer's no-decay group
        self.fc = nn.Linear(4, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.proj_norm(x))


def test_orderings_that_disagree_on_captured_modules_are_refused(tmp_path):
    model = _TwoSquareLayers()
    # HF Trainer groups: [fc.weight], [proj_norm.weight]; model order reads the same ids the other way round
    # and every shape fits both, so no one can tell which is right.
    optimizer = torch.optim.AdamW(_hf_trainer_groups(model))
    optimizer.zero_grad()
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")

    with pytest.raises(AttribIndexError, match="several orderings.*save_named_second_moments"):
        load_second_moment_scales(tmp_path / "optimizer.pt", model, _specs(model))


def test_a_checkpoint_folder_without_an_optimizer_file_is_refused_naming_what_was_looked_for(tmp_path):
    model = _mlp()
    (tmp_path / "checkpoint-7").mkdir()
    with pytest.raises(AttribIndexError, match=r"holds none of optimizer\.pt, optimizer\.bin"):
        load_second_moment_scales(tmp_path / "checkpoint-7", model, _specs(model))
