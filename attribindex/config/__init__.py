"""Typed build configuration and YAML presets."""

from attribindex.config._load import config_from_dict, config_to_dict, load_config, rows_settings
from attribindex.config._schema import (
    BuildConfig,
    ExactConfig,
    ExtractConfig,
    HessianConfig,
    IndexConfig,
    ProjectionConfig,
    StoreConfig,
)

__all__ = [
    "BuildConfig",
    "ExactConfig",
    "ExtractConfig",
    "HessianConfig",
    "IndexConfig",
    "ProjectionConfig",
    "StoreConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "rows_settings",
]
