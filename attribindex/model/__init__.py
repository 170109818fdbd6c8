"""Loading causal LMs and fingerprinting them."""

from attribindex.model._config_only import ConfigOnlyTokenizer, has_tokenizer, has_weights, model_from_config
from attribindex.model._loading import DTYPES, load_model, model_fingerprint, resolve_device

__all__ = [
    "DTYPES",
    "ConfigOnlyTokenizer",
    "has_tokenizer",
    "has_weights",
    "load_model",
    "model_fingerprint",
    "model_from_config",
    "resolve_device",
]
