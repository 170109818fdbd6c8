"""Presets load into the typed config; unknown keys and bad values are refused with a clear message."""

from __future__ import annotations

import pytest

from attribindex.config import BuildConfig, config_from_dict, config_to_dict, load_config
from attribindex.config._load import PRESETS_DIR
from attribindex.errors import AttribIndexError


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
def test_every_preset_loads(preset):
    config = load_config(preset)
    assert isinstance(config, BuildConfig)
    assert config_from_dict(BuildConfig, config_to_dict(config)) == config


def test_required_presets_exist():
    names = {p.stem for p in PRESETS_DIR.glob("*.yaml")}
    assert {"tiny", "demo", "gpt2-small-paper", "llama3-8b-paper", "llama3-8b-mlp"} <= names
    assert load_config("llama3-8b-paper").projection.rank_in == 64


def test_index_kinds_come_from_presets_and_are_validated(tmp_path):
    assert load_config("llama3-8b-ivfpq").index.kind == "ivf_pq" and not load_config("demo-hnsw").index.exact
    path = tmp_path / "c.yaml"
    path.write_text("index:\n  kind: hnsw\n  storage: float16\n")
    with pytest.raises(AttribIndexError, match="index.storage=float16 applies to kind 'flat' only"):
        load_config(path)
    path.write_text("index:\n  kind: ivf_pq\n  train_per_centroid: 10\n")
    with pytest.raises(AttribIndexError, match="train_per_centroid must be within 39..256"):
        load_config(path)


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("hessian:\n  dampng: 0.1\n")
    with pytest.raises(AttribIndexError, match="unknown key 'dampng'. Did you mean 'damping'"):
        load_config(path)


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("hessian:\n  kind: kfac-ish\n", "not allowed; choose one of 'raw', 'identity'"),
        ("hessian:\n  damping: -1\n", "damping must be > 0"),
        ("extract:\n  batch_size: two\n", "expected an integer"),
        ("projection:\n  modules: '*'\n", "expected a list of strings"),
        ("projection:\n  rank_in: 0\n", "rank_in/rank_out must be >= 1"),
        ("exact:\n  enabled: true\n  factor_sample: 0\n", "exact.factor_sample must be >= 1"),
        ("store: [1, 2]\n", "expected a mapping"),
        ("index: {mode: dot\n", "not valid YAML"),
    ],
)
def test_bad_values_are_refused(tmp_path, yaml_text, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(AttribIndexError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(path)


def test_unknown_preset_lists_presets():
    with pytest.raises(AttribIndexError, match="Presets: .*tiny"):
        load_config("no-such-preset")


def test_exponents_without_a_dot_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) would read `1e-8` as the string '1e-8'."""
    path = tmp_path / "config.yaml"
    path.write_text("projection:\n  optimizer_eps: 1e-8\nhessian:\n  damping: 5E-2\nexact:\n  enabled: true\n")
    config = load_config(path)
    assert config.projection.optimizer_eps == 1e-8 and config.hessian.damping == 0.05 and config.exact.enabled
